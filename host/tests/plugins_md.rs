//! docs/PLUGINS.md's examples are built and checked, so the guide cannot drift from the
//! SDK and the host: every code block under a `<!-- compiled: ... -->` line. The Rust
//! plugin (its Cargo.toml, src/lib.rs and the Errors section's src/errors.rs) is built
//! for wasm32-wasip2 with the manifest beside it and passes `trellis plugin check`, and
//! again for trellis:plugin@0.1.0 (the Versioning section's dependency line); so do
//! the Python and JavaScript versions, built in projects `trellis plugin new` made; the
//! grants example passes `trellis config check`. The only edits: the SDK's path, a `[workspace]` table so that the crate builds
//! on its own, and the grants' paths pointed into the test's directory.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The blocks of `text` marked `<!-- compiled: LABEL ... -->`, by label's first word.
fn marked_blocks(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(label) = line
            .strip_prefix("<!-- compiled: ")
            .and_then(|l| l.split_whitespace().next())
        else {
            continue;
        };
        let fence = lines.next().unwrap_or_default();
        assert!(
            fence.starts_with("```"),
            "a compiled block must follow `{line}`"
        );
        let body: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
        out.push((label.to_string(), body.join("\n") + "\n"));
    }
    out
}

/// `trellis plugin new NAME --point logging-method --lang LANG` in `dir`.
fn new_project(dir: &Path, name: &str, lang: &str) -> PathBuf {
    run_ok(trellis().current_dir(dir).args([
        "plugin",
        "new",
        name,
        "--point",
        "logging-method",
        "--lang",
        lang,
    ]));
    dir.join(name)
}

#[test]
fn the_guides_examples_build_and_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let guide = std::fs::read_to_string(root.join("docs/PLUGINS.md")).unwrap();
    let blocks = marked_blocks(&guide);
    let labels: Vec<&str> = blocks.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(
        labels,
        [
            "Cargo.toml",
            "src/lib.rs",
            "app.py",
            "logging_method.py",
            "world.wit",
            "app.js",
            "plugin.toml",
            "daemon",
            "src/errors.rs",
            "Cargo.toml@0.1.0",
        ],
        "the guide's compiled examples"
    );
    let block = |label: &str| {
        blocks
            .iter()
            .find(|(l, _)| l == label)
            .map(|(_, b)| b.clone())
            .unwrap()
    };
    let d = tempfile::tempdir().unwrap();
    let project = d.path().join("log-to-host");
    std::fs::create_dir_all(project.join("src")).unwrap();
    let sdk = root.join("sdk").canonicalize().unwrap();
    let cargo = block("Cargo.toml").replace("../../sdk", &sdk.display().to_string());
    std::fs::write(project.join("Cargo.toml"), cargo + "\n[workspace]\n").unwrap();
    // The Errors section's module is part of the same crate.
    std::fs::write(
        project.join("src/lib.rs"),
        block("src/lib.rs") + "\npub mod errors;\n",
    )
    .unwrap();
    std::fs::write(project.join("src/errors.rs"), block("src/errors.rs")).unwrap();
    build_rust_plugin(&project, "log-to-host");
    std::fs::write(project.join("plugin.toml"), block("plugin.toml")).unwrap();
    let text = run_ok(trellis().args(["plugin", "check"]).arg(&project));
    assert!(
        text.contains("OK") && text.contains("trial start    ok"),
        "{text}"
    );

    // Versioning: the same plugin built for 0.1.0 (the SDK's wit-0-1 feature), which
    // the host serves as 0.1.0.
    let old = d.path().join("log-to-host-0-1");
    std::fs::create_dir_all(old.join("src")).unwrap();
    let package = block("Cargo.toml");
    let package = &package[..package.find("[dependencies]").unwrap()];
    let cargo = format!("{package}{}", block("Cargo.toml@0.1.0"))
        .replace("../../sdk", &sdk.display().to_string());
    std::fs::write(old.join("Cargo.toml"), cargo + "\n[workspace]\n").unwrap();
    std::fs::copy(project.join("src/lib.rs"), old.join("src/lib.rs")).unwrap();
    std::fs::copy(project.join("src/errors.rs"), old.join("src/errors.rs")).unwrap();
    build_rust_plugin(&old, "log-to-host");
    std::fs::write(
        old.join("plugin.toml"),
        block("plugin.toml").replace("wit = \"0.3.0\"", "wit = \"0.1.0\""),
    )
    .unwrap();
    let text = run_ok(trellis().args(["plugin", "check"]).arg(&old));
    assert!(
        text.contains("contract       trellis:plugin@0.1.0") && text.contains("trial start    ok"),
        "{text}"
    );

    // The Python and JavaScript versions: projects as `trellis plugin new` makes them,
    // their sources replaced by the guide's, built as their READMEs say.
    let python = new_project(d.path(), "log-to-host-py", "python");
    std::fs::write(python.join("app.py"), block("app.py")).unwrap();
    std::fs::write(python.join("logging_method.py"), block("logging_method.py")).unwrap();
    run_ok(Command::new("componentize-py").current_dir(&python).args([
        "-d",
        "wit",
        "-w",
        "logging-method-plugin",
        "componentize",
        "app",
        "-o",
        "log_to_host_py.wasm",
    ]));
    let text = run_ok(trellis().args(["plugin", "check"]).arg(&python));
    assert!(text.contains("trial start    ok"), "{text}");

    let js = new_project(d.path(), "log-to-host-js", "js");
    std::fs::write(js.join("app.js"), block("app.js")).unwrap();
    std::fs::write(js.join("wit/world.wit"), block("world.wit")).unwrap();
    let path = path_with_componentize_js();
    run_ok(
        Command::new("npm")
            .current_dir(&js)
            .args(["run", "build", "--silent"])
            .env("PATH", path),
    );
    let text = run_ok(trellis().args(["plugin", "check"]).arg(&js));
    assert!(text.contains("trial start    ok"), "{text}");

    // The grants example, its paths in the test's directory.
    let x = d.path().join("x");
    std::fs::create_dir_all(&x).unwrap();
    let (ca, _, _) = tls_files(d.path());
    let config = block("daemon")
        .replace("/var/lib/trellis/x", &x.display().to_string())
        .replace("/etc/trellis/es-ca.pem", &ca);
    let file = d.path().join("trellis.toml");
    std::fs::write(&file, config).unwrap();
    run_ok(trellis().args(["config", "check"]).arg(&file));
}
