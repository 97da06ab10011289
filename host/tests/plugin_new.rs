//! `trellis plugin new`: every generated project (four points in Rust, Python and
//! JavaScript) builds as its README says, passes `trellis plugin check`, the logging
//! methods pass the conformance kit with the default file browser as generated, and the
//! fence agents fail closed. Bad names and languages are refused with the fix.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `trellis plugin new NAME --point POINT --lang LANG` in `dir`; the project's path.
fn new(dir: &Path, name: &str, point: &str, lang: &str) -> PathBuf {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk");
    run_ok(
        trellis()
            .current_dir(dir)
            .args([
                "plugin", "new", name, "--point", point, "--lang", lang, "--sdk",
            ])
            .arg(&sdk),
    );
    dir.join(name)
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
    let text = run_ok(
        trellis()
            .args(["plugin", "test"])
            .arg(project)
            .arg("--with")
            .arg(bundle().join("file-browser"))
            .arg("--config")
            .arg(&cfg),
    );
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
        // As its README says.
        build_rust_plugin(&project, &name);
        let text = run_ok(trellis().args(["plugin", "check"]).arg(&project));
        assert!(text.contains("OK"), "{text}");
        assert!(
            text.contains(&format!("exports lifecycle, {point}")),
            "{text}"
        );
    }
    kit_logging(dir, &dir.join("my-logging-method"), "my-logging-method");
}

/// `trellis plugin new` without `--sdk`: Python and JavaScript projects need none.
fn new_other(dir: &Path, name: &str, point: &str, lang: &str) -> PathBuf {
    run_ok(
        trellis()
            .current_dir(dir)
            .args(["plugin", "new", name, "--point", point, "--lang", lang]),
    );
    dir.join(name)
}

const POINTS: [&str; 4] = [
    "logging-method",
    "log-browser",
    "command-transport",
    "fence-agent",
];

/// Check a built project, and run the kit where a template can pass or must fail
/// closed: the logging method passes with file-browser; the fence agent answers its
/// metadata and validate, and fails the rest with "not implemented yet".
fn check_and_kit(dir: &Path, project: &Path, name: &str, point: &str) {
    let text = run_ok(trellis().args(["plugin", "check"]).arg(project));
    assert!(text.contains("OK"), "{text}");
    assert!(
        text.contains(&format!("exports lifecycle, {point}")),
        "{text}"
    );
    match point {
        "logging-method" => kit_logging(dir, project, name),
        "fence-agent" => {
            let out = trellis()
                .args(["plugin", "test"])
                .arg(project)
                .args(["--param", "ip=127.0.0.1", "--param", "username=a"])
                .args(["--param", "password=x"])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert_eq!(out.status.code(), Some(1), "{text}");
            assert!(
                text.contains(&format!(
                    "PASS  metadata names the agent, its parameters and actions: `fence_{}`, 3 parameters, 5 actions",
                    name.replace('-', "_")
                )),
                "{text}"
            );
            assert!(
                text.contains("FAIL  off, then status says off: off:")
                    && text.contains("not implemented yet: fence"),
                "{text}"
            );
        }
        _ => {}
    }
}

#[test]
fn every_python_template_builds_and_checks_and_the_logging_method_passes_the_kit() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    for point in POINTS {
        let name = format!("py-{point}");
        let project = new_other(dir, &name, point, "python");
        let readme = std::fs::read_to_string(project.join("README.md")).unwrap();
        let world = format!("{point}-plugin");
        let wasm = format!("{}.wasm", name.replace('-', "_"));
        // The build command as the README gives it, against the project's own WIT.
        assert!(
            readme.contains(&format!(
                "componentize-py -d wit -w {world} componentize app -o {wasm}"
            )),
            "{readme}"
        );
        run_ok(Command::new("componentize-py").current_dir(&project).args([
            "-d",
            "wit",
            "-w",
            &world,
            "componentize",
            "app",
            "-o",
            &wasm,
        ]));
        check_and_kit(dir, &project, &name, point);
    }
}

#[test]
fn every_javascript_template_builds_and_checks_and_the_logging_method_passes_the_kit() {
    let path = path_with_componentize_js();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    for point in POINTS {
        let name = format!("js-{point}");
        let project = new_other(dir, &name, point, "js");
        let readme = std::fs::read_to_string(project.join("README.md")).unwrap();
        assert!(readme.contains("npm run build"), "{readme}");
        // `npm run build`: the package.json's build script, as the README says.
        run_ok(
            Command::new("npm")
                .current_dir(&project)
                .args(["run", "build", "--silent"])
                .env("PATH", &path),
        );
        check_and_kit(dir, &project, &name, point);
    }
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
        refused(&["x", "--point", "fence-agent", "--lang", "cobol"])
            .contains("[possible values: rust, python, js]")
    );
    std::fs::create_dir_all(d.path().join("taken")).unwrap();
    std::fs::write(d.path().join("taken/file"), "").unwrap();
    assert!(refused(&["taken", "--point", "fence-agent"]).contains("not empty"));
}
