//! Names that end up in paths: run ids, step names, job names and artifact names. Each
//! crosses a boundary (a job file, an agent's message, an order) before the controller
//! or an agent builds a path from it, so each is checked against one strict allow-list
//! here first, on both sides.

use std::fmt;

/// The longest identifier (run id, step name, job name, label).
pub const MAX_ID: usize = 64;

/// The longest artifact name, and the longest part of one between `/`.
pub const MAX_ARTIFACT_NAME: usize = 512;
pub const MAX_ARTIFACT_PART: usize = 128;

/// The identifier rule in words, for error messages.
pub const ID_RULE: &str = "use 1 to 64 letters, digits, `-`, `_` and `.`, not starting with `.`";

/// The artifact name rule in words.
pub const ARTIFACT_RULE: &str = "a relative path of parts separated by `/`, each 1 to 128 letters, digits, `-`, `_`, `.`, `+` or inner spaces and none `.` or `..` (512 at most in all)";

/// An identifier: 1 to `MAX_ID` ASCII letters, digits, `-`, `_` and `.`, not starting
/// with `.` (so never `.`, `..` or a hidden file), and never containing `/`.
pub fn is_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// An artifact name: a relative path whose parts are each a plain file or directory
/// name from the allow-list (see `ARTIFACT_RULE`). Nothing absolute, no `..`, no
/// empty part, no control or shell characters.
pub fn is_artifact_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ARTIFACT_NAME
        && s.split('/').all(|part| {
            !part.is_empty()
                && part.len() <= MAX_ARTIFACT_PART
                && part != "."
                && part != ".."
                && !part.starts_with(' ')
                && !part.ends_with(' ')
                && part.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'+' | b' ')
                })
        })
}

/// A name as it may be shown in a log line or an error: escaped and cut short, so
/// a crafted one can neither forge log lines nor flood them.
pub struct Shown<'a>(pub &'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 80;
        for (n, c) in self.0.chars().enumerate() {
            if n == SHOWN {
                return write!(f, "…({} bytes)", self.0.len());
            }
            write!(f, "{}", c.escape_debug())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        for good in ["r-000001", "build", "a.b_c-D9", &"x".repeat(64)] {
            assert!(is_id(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            ".hidden",
            "a/b",
            "a\\b",
            "a b",
            "a\nb",
            "a\0b",
            "é",
            &"x".repeat(65),
        ] {
            assert!(!is_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn artifact_names() {
        for good in [
            "report.xml",
            "out/a.tar.gz",
            "out/deep/b+c.bin",
            "out/a blob.bin",
            ".config/x",
            "trellis-full-log.txt.gz",
        ] {
            assert!(is_artifact_name(good), "{good}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "out/../../x",
            "out/./x",
            "out//x",
            "out/",
            " a",
            "a /b",
            "a\tb",
            "a\nb",
            "a\\b",
            "$(x)",
            &"x".repeat(129),
            &["abc"; 200].join("/"),
        ] {
            assert!(!is_artifact_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn shown_names_are_escaped_and_short() {
        assert_eq!(Shown("a\nb").to_string(), "a\\nb");
        let long = Shown(&"x".repeat(1000)).to_string();
        assert!(long.len() < 100 && long.ends_with("(1000 bytes)"), "{long}");
    }
}
