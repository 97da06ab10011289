//! Secrets in step output are replaced before any line leaves the agent — including a
//! secret split across two reads of the pipe, or across the cut of an overlong line.
//!
//! Output is masked line by line, so a secret of several lines (a PEM key) could never
//! match whole: each of its lines is masked on its own instead, wherever it appears
//! (trimmed of surrounding white space, as a step may indent it). Lines shorter than
//! `MIN_LINE` (a PEM key's short last line, an empty one) are left: masking them would
//! blank unrelated output while hiding next to nothing.

use std::borrow::Cow;

pub const MASK: &str = "****";

/// The shortest line of a multi-line secret that is masked (the shortest job secret;
/// see `jobs::secrets::MIN_JOB_SECRET_LEN`).
pub const MIN_LINE: usize = crate::jobs::secrets::MIN_JOB_SECRET_LEN;

/// Replaces every occurrence of the given secrets.
#[derive(Debug, Clone, Default)]
pub struct Masker {
    /// Longest first, so a secret containing another is masked whole.
    secrets: Vec<Vec<u8>>,
}

impl Masker {
    pub fn new<I: IntoIterator<Item = S>, S: AsRef<str>>(secrets: I) -> Masker {
        let mut secrets: Vec<Vec<u8>> = secrets
            .into_iter()
            .flat_map(|s| {
                let s = s.as_ref();
                if s.contains('\n') {
                    // Each line whole (output is masked per line), trimmed.
                    s.lines()
                        .map(str::trim)
                        .filter(|l| l.chars().count() >= MIN_LINE)
                        .map(|l| l.as_bytes().to_vec())
                        .collect()
                } else {
                    vec![s.as_bytes().to_vec()]
                }
            })
            .filter(|s| !s.is_empty())
            .collect();
        secrets.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
        secrets.dedup();
        Masker { secrets }
    }

    /// The longest secret's length: a line cut must keep that much minus one back.
    pub fn longest(&self) -> usize {
        self.secrets.first().map_or(0, |s| s.len())
    }

    pub fn mask<'a>(&self, text: &'a [u8]) -> Cow<'a, [u8]> {
        if self.secrets.is_empty() || !self.secrets.iter().any(|s| find(text, s, 0).is_some()) {
            return Cow::Borrowed(text);
        }
        let mut out = Vec::with_capacity(text.len());
        let mut i = 0;
        'outer: while i < text.len() {
            for s in &self.secrets {
                if text[i..].starts_with(s) {
                    out.extend_from_slice(MASK.as_bytes());
                    i += s.len();
                    continue 'outer;
                }
            }
            out.push(text[i]);
            i += 1;
        }
        Cow::Owned(out)
    }

    /// The largest cut <= `want` that splits no occurrence of a secret, so that a part
    /// of a secret is never emitted unmasked.
    fn safe_cut(&self, buf: &[u8], want: usize) -> usize {
        let mut cut = want.min(buf.len());
        loop {
            let mut moved = false;
            for s in &self.secrets {
                let from = cut.saturating_sub(s.len() - 1);
                let mut at = from;
                while let Some(p) = find(buf, s, at) {
                    if p >= cut {
                        break;
                    }
                    if p + s.len() > cut {
                        cut = p;
                        moved = true;
                        break;
                    }
                    at = p + 1;
                }
            }
            if !moved {
                return cut;
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || from >= hay.len() {
        return None;
    }
    hay[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// Turns pipe reads into masked lines. Lines longer than `max_line` are emitted in
/// parts (never cutting through a secret).
#[derive(Debug)]
pub struct LineAssembler {
    masker: Masker,
    buf: Vec<u8>,
    max_line: usize,
}

/// One line of output (without its newline), or a part of an overlong one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub text: String,
    /// More of the same line follows.
    pub partial: bool,
}

impl LineAssembler {
    pub fn new(masker: Masker, max_line: usize) -> LineAssembler {
        let max_line = max_line.max(masker.longest() * 2 + 1);
        LineAssembler {
            masker,
            buf: Vec::new(),
            max_line,
        }
    }

    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<Piece>) {
        self.buf.extend_from_slice(chunk);
        let mut start = 0;
        while let Some(nl) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let end = start + nl;
            let mut line = &self.buf[start..end];
            line = line.strip_suffix(b"\r").unwrap_or(line);
            let rest = self.cut_overlong(line, out);
            out.push(Piece {
                text: self.masked(rest),
                partial: false,
            });
            start = end + 1;
        }
        let tail = self.buf.split_off(start);
        let rest_len = {
            let rest = self.cut_overlong(&tail, out);
            rest.len()
        };
        self.buf = tail[tail.len() - rest_len..].to_vec();
    }

    /// Emit parts of `line` while it is longer than `max_line`; returns what is left.
    fn cut_overlong<'b>(&self, mut line: &'b [u8], out: &mut Vec<Piece>) -> &'b [u8] {
        while line.len() > self.max_line {
            // Cut below the limit, keeping back enough that a secret starting near the
            // end can still be recognised whole in the next part.
            let keep = self.masker.longest().saturating_sub(1);
            let mut cut = self
                .masker
                .safe_cut(line, self.max_line.min(line.len() - keep));
            // Do not split a UTF-8 character either.
            while cut > 0 && cut < line.len() && (line[cut] & 0xc0) == 0x80 {
                cut -= 1;
            }
            if cut == 0 {
                break;
            }
            out.push(Piece {
                text: self.masked(&line[..cut]),
                partial: true,
            });
            line = &line[cut..];
        }
        line
    }

    fn masked(&self, b: &[u8]) -> String {
        String::from_utf8_lossy(&self.masker.mask(b)).into_owned()
    }

    /// The output ended: emit what is left as a last line.
    pub fn finish(&mut self, out: &mut Vec<Piece>) {
        if !self.buf.is_empty() {
            let line = std::mem::take(&mut self.buf);
            let line = line.strip_suffix(b"\r").unwrap_or(&line);
            out.push(Piece {
                text: String::from_utf8_lossy(&self.masker.mask(line)).into_owned(),
                partial: false,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(secrets: &[&str], chunks: &[&[u8]], max_line: usize) -> Vec<Piece> {
        let mut a = LineAssembler::new(Masker::new(secrets), max_line);
        let mut out = Vec::new();
        for c in chunks {
            a.push(c, &mut out);
        }
        a.finish(&mut out);
        out
    }

    fn text(p: &[Piece]) -> String {
        p.iter()
            .map(|p| {
                if p.partial {
                    p.text.clone()
                } else {
                    format!("{}\n", p.text)
                }
            })
            .collect()
    }

    #[test]
    fn masks_whole_and_overlapping_secrets() {
        let m = Masker::new(["hunter2", "hunter2-long", "ab"]);
        assert_eq!(
            m.mask(b"pw=hunter2-long;hunter2 abab").as_ref(),
            b"pw=****;**** ********"
        );
        assert!(matches!(m.mask(b"nothing here"), Cow::Borrowed(_)));
    }

    /// A PEM key: every line of it that says anything is masked, however the output
    /// arrives (in pieces, indented, with CRLF), and the key never appears whole.
    #[test]
    fn every_line_of_a_multi_line_secret_is_masked() {
        let pem = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj\nZg==\n-----END PRIVATE KEY-----\n";
        let m = Masker::new([pem]);
        let printed = format!("key:\n{pem}  MIIEvQIBADANBgkqhkiG9w0BAQEFAASC\r\nafter\n");
        for chunk in [1usize, 5, 64, 4096] {
            let chunks: Vec<&[u8]> = printed.as_bytes().chunks(chunk).collect();
            let mut a = LineAssembler::new(m.clone(), 1 << 16);
            let mut out = Vec::new();
            for c in &chunks {
                a.push(c, &mut out);
            }
            a.finish(&mut out);
            let lines: Vec<&str> = out.iter().map(|p| p.text.as_str()).collect();
            assert_eq!(
                lines,
                [
                    "key:", "****", "****", "****", "Zg==", "****", "  ****", "after"
                ],
                "chunk {chunk}"
            );
        }
        // A one-line secret stays whole (it is not split on anything).
        assert_eq!(
            Masker::new(["ab cd ef"]).mask(b"x ab cd ef").as_ref(),
            b"x ****"
        );
    }

    #[test]
    fn a_secret_split_across_reads_is_masked() {
        let secret = "s3cr3t-T0KEN";
        let line = format!("token={secret} done\n");
        // every split point of the line into two reads
        for cut in 0..line.len() {
            let (a, b) = line.as_bytes().split_at(cut);
            let out = run(&[secret], &[a, b], 1 << 16);
            assert_eq!(text(&out), "token=**** done\n", "cut at {cut}");
        }
    }

    #[test]
    fn overlong_lines_are_cut_but_never_through_a_secret() {
        let secret = "0123456789ABCDEF";
        for offset in 0..40 {
            let line = format!("{}{secret}{}\n", "x".repeat(offset), "y".repeat(50));
            for chunk in [1usize, 3, 7, 64] {
                let chunks: Vec<&[u8]> = line.as_bytes().chunks(chunk).collect();
                let out = run(&[secret], &chunks, 33);
                let all = text(&out);
                assert!(
                    !all.contains("0123") && !all.contains("CDEF") && !all.contains("789A"),
                    "offset {offset}, chunk {chunk}: {out:?}"
                );
                assert_eq!(
                    all.replace(MASK, "S"),
                    format!("{}S{}\n", "x".repeat(offset), "y".repeat(50)),
                    "offset {offset}, chunk {chunk}"
                );
                assert!(
                    out.iter().all(|p| p.text.replace(MASK, "S").len() <= 33),
                    "{out:?}"
                );
                assert!(out.len() > 1, "the line was cut");
            }
        }
    }

    #[test]
    fn crlf_utf8_and_unterminated_last_line() {
        let out = run(&[], &["héllo\r\nwörld".as_bytes()], 1 << 16);
        assert_eq!(
            out,
            vec![
                Piece {
                    text: "héllo".into(),
                    partial: false
                },
                Piece {
                    text: "wörld".into(),
                    partial: false
                }
            ]
        );
        // a multi-byte character is not split by an overlong-line cut
        let long = "é".repeat(40);
        let out = run(&[], &[long.as_bytes()], 11);
        assert!(out.iter().all(|p| !p.text.contains('\u{fffd}')), "{out:?}");
        assert_eq!(
            out.iter().map(|p| p.text.as_str()).collect::<String>(),
            long
        );
    }
}
