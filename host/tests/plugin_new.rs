//! `trellis plugin new`: every generated project builds as its README says, passes
//! `trellis plugin check`, and the logging methods (Rust and Python) pass the
//! conformance kit with the default file browser as generated. Bad names and languages
//! are refused with the fix.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(c: &mut Command) -> String {
    let out = c.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{c:?}:\n{text}");
    text
}

/// `trellis plugin new NAME --point POINT --lang LANG` in `dir`; the project's path.
fn new(dir: &Path, name: &str, point: &str, lang: &str) -> PathBuf {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk");
    run(trellis()
        .current_dir(dir)
        .args([
            "plugin", "new", name, "--point", point, "--lang", lang, "--sdk",
        ])
        .arg(&sdk));
    dir.join(name)
}

/// Build a generated Rust project as its README says, the component beside its manifest.
fn build_rust(project: &Path, name: &str) {
    // The test's own target directory when there is one: trellis-sdk's dependencies
    // are built already.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| project.join("target"));
    run(Command::new(env!("CARGO"))
        .current_dir(project)
        .args(["build", "--target", "wasm32-wasip2", "--release"])
        .env("CARGO_TARGET_DIR", &target));
    let wasm = format!("{}.wasm", name.replace('-', "_"));
    std::fs::copy(
        target.join("wasm32-wasip2/release").join(&wasm),
        project.join(&wasm),
    )
    .unwrap();
}

fn kit_logging(dir: &Path, project: &Path, name: &str) {
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let cfg = dir.join(format!("kit-{name}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "[plugins.{name}]\ndirs = [{{ host = \"logs\", guest = \"/logs\", mode = \"read-write\" }}]\n\
             [plugins.file-browser]\ndirs = [{{ host = \"logs\", guest = \"/logs\" }}]\n"
        ),
    )
    .unwrap();
    let text = run(trellis()
        .args(["plugin", "test"])
        .arg(project)
        .arg("--with")
        .arg(bundle().join("file-browser"))
        .arg("--config")
        .arg(&cfg));
    assert!(text.contains("14 passed, 0 failed"), "{text}");
}

#[test]
fn every_rust_template_builds_and_checks_and_the_logging_method_passes_the_kit() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    for point in [
        "logging-method",
        "log-browser",
        "command-transport",
        "fence-agent",
    ] {
        let name = format!("my-{point}");
        let project = new(dir, &name, point, "rust");
        for f in ["Cargo.toml", "plugin.toml", "src/lib.rs", "README.md"] {
            assert!(project.join(f).exists(), "{name}: {f}");
        }
        build_rust(&project, &name);
        let text = run(trellis().args(["plugin", "check"]).arg(&project));
        assert!(text.contains("OK"), "{text}");
        assert!(
            text.contains(&format!("exports lifecycle, {point}")),
            "{text}"
        );
    }
    kit_logging(dir, &dir.join("my-logging-method"), "my-logging-method");
}

#[test]
fn the_python_template_builds_and_passes_the_kit() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let project = new(dir, "py-logger", "logging-method", "python");
    let wit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit");
    let readme = std::fs::read_to_string(project.join("README.md")).unwrap();
    assert!(readme.contains("componentize-py -d"), "{readme}");
    run(Command::new("componentize-py")
        .current_dir(&project)
        .arg("-d")
        .arg(&wit)
        .args([
            "-w",
            "logging-method-plugin",
            "componentize",
            "app",
            "-o",
            "py_logger.wasm",
        ]));
    kit_logging(dir, &project, "py-logger");
}

#[test]
fn bad_requests_are_refused_with_the_fix() {
    let d = tempfile::tempdir().unwrap();
    let refused = |args: &[&str]| {
        let out = trellis()
            .current_dir(d.path())
            .args(["plugin", "new"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(refused(&["Bad_Name", "--point", "fence-agent"]).contains("lowercase letters"));
    assert!(
        refused(&["x", "--point", "fence-agent", "--lang", "python"]).contains("use --lang rust")
    );
    assert!(
        refused(&["x", "--point", "fence-agent", "--lang", "cobol"])
            .contains("choose rust or python")
    );
    std::fs::create_dir_all(d.path().join("taken")).unwrap();
    std::fs::write(d.path().join("taken/file"), "").unwrap();
    assert!(refused(&["taken", "--point", "fence-agent"]).contains("not empty"));
}
