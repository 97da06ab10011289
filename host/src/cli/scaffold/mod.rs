//! `trellis plugin new`: a buildable plugin project for one extension point, in Rust,
//! Python or JavaScript (every point in each): manifest, source, build command and a
//! README that says how to build, check and test it. The logging methods write the
//! default file store's layout, so they pass `trellis plugin test` with `file-browser`
//! as generated; the other points start from the contract's shape, every call failing
//! with "not implemented yet" (a fence agent fails closed) until the author fills it in.
//! Python and JavaScript projects carry their own copy of the WIT (`wit.rs`).

mod js;
mod python;
mod rust;
mod wit;

use crate::points::Point;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub struct NewPlugin<'a> {
    pub name: &'a str,
    pub point: Point,
    pub lang: &'a str,
    /// Where the project goes (default: ./NAME).
    pub dir: Option<&'a Path>,
    /// The trellis-sdk the Rust project depends on (a path).
    pub sdk: Option<&'a Path>,
}

/// The SDK's path on the machine this `trellis` was built on, if it is still there.
fn default_sdk() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk");
    p.join("Cargo.toml")
        .exists()
        .then(|| p.canonicalize().ok())
        .flatten()
}

fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        anyhow::bail!(
            "`{name}`: a plugin name is lowercase letters, digits and `-`, starting with a letter (e.g. `my-logger`)"
        )
    }
}

pub fn new_plugin(n: NewPlugin<'_>) -> anyhow::Result<ExitCode> {
    check_name(n.name)?;
    let dir = n
        .dir
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(n.name));
    if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() {
        anyhow::bail!(
            "{} exists and is not empty: choose another name or --dir",
            dir.display()
        );
    }
    let files = match n.lang {
        "rust" => {
            let sdk = match n.sdk.map(Path::to_path_buf).or_else(default_sdk) {
                Some(s) => s,
                None => anyhow::bail!(
                    "where is trellis-sdk? pass --sdk PATH (the `sdk` folder of a Trellis checkout)"
                ),
            };
            rust::project(n.name, n.point, &sdk)
        }
        "python" => python::project(n.name, n.point)?,
        "js" => js::project(n.name, n.point)?,
        other => anyhow::bail!("--lang {other}: choose rust, python or js"),
    };
    std::fs::create_dir_all(&dir)?;
    for (rel, text) in &files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, text)?;
    }
    println!(
        "created {} ({} plugin in {}):",
        dir.display(),
        n.point,
        n.lang
    );
    for (rel, _) in &files {
        println!("  {}", dir.join(rel).display());
    }
    println!(
        "\nnext: see {}/README.md (build, check, test)",
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn snake(name: &str) -> String {
    name.replace('-', "_")
}

fn manifest(name: &str, point: Point, component: &str, capabilities: &str, config: &str) -> String {
    let wit = crate::wit::versioned::CURRENT;
    format!(
        r#"# The plugin's manifest: what the host reads before it loads the component.
[plugin]
name = "{name}"
version = "0.1.0"
description = "A {point} plugin"
component = "{component}"
wit = "{wit}"
worlds = ["{point}-plugin"]
# What the component may import; the operator still grants each one (deny by default).
capabilities = [{capabilities}]
{config}"#
    )
}

fn readme(name: &str, point: Point, build: &str, grants: &str, test: &str) -> String {
    let wit = crate::wit::versioned::CURRENT;
    format!(
        r#"# {name}

A Trellis `{point}` plugin. The contract it implements is the `{point}` interface of
the WIT package `trellis:plugin@{wit}` (its docs say what the host guarantees and
what the plugin must do); docs/PLUGINS.md is the guide.

## Build

{build}

## Check and test

```sh
trellis plugin check .                  # manifest, component, exports, capabilities
trellis plugin test . --config kit.toml {test}
```

`trellis plugin test` runs the conformance kit for the extension point against the
real host runtime and prints what passes and what fails, with the reason.

## Grant it what it needs

Plugins get nothing by default. In the daemon's (or the kit's) configuration:

```toml
{grants}
```
"#
    )
}

const NOT_YET: &str = "not implemented yet";

/// What a point's project needs from the operator, whatever its language.
struct Needs {
    /// Capabilities the point's typical plugin uses (the manifest declares them).
    capabilities: &'static [&'static str],
    /// `[config.*]` tables for the manifest.
    config: &'static str,
    /// The grants to put in the daemon's (or the kit's) configuration.
    grants: String,
    /// The rest of the `trellis plugin test` command line.
    test: &'static str,
}

const DIRECTORY_CONFIG: &str = "\n[config.directory]\ntype = \"string\"\ndefault = \"/logs\"\ndescription = \"Where the logs go, as the plugin sees it (grant it read-write)\"\n";

fn needs(name: &str, point: Point) -> Needs {
    match point {
        Point::LoggingMethod => Needs {
            capabilities: &["log", "filesystem"],
            config: DIRECTORY_CONFIG,
            grants: format!(
                "[plugins.{name}]\ndirs = [{{ host = \"logs\", guest = \"/logs\", mode = \"read-write\" }}]\n[plugins.file-browser]\ndirs = [{{ host = \"logs\", guest = \"/logs\" }}]"
            ),
            test: "--with <bundle>/file-browser",
        },
        Point::LogBrowser => Needs {
            capabilities: &["log"],
            config: "",
            grants: format!("[plugins.{name}]\n# what your store needs: dirs, http, secrets ..."),
            test: "--with <the logging method that writes your store>",
        },
        Point::CommandTransport => Needs {
            capabilities: &["log", "sockets"],
            config: "",
            grants: format!(
                "[plugins.{name}]\nsockets = {{ bind = [\"127.0.0.1:7400\"], connect = [\"127.0.0.1:7400\"] }}\nconfig = {{ address = \"127.0.0.1:7400\" }}"
            ),
            test: "",
        },
        Point::FenceAgent => Needs {
            capabilities: &["log", "secrets", "http"],
            config: "",
            grants: format!(
                "[plugins.{name}]\nhttp = [\"https://bmc.example\"]\nsecrets = [\"bmc-password\"]"
            ),
            test: "--param ip=... --param username=... --param password=bmc-password",
        },
    }
}

/// `"a", "b"` for a manifest, with `more` after the point's own (once each).
fn capability_list(own: &[&str], more: &[&str]) -> String {
    let mut all: Vec<&str> = own.to_vec();
    for m in more {
        if !all.contains(m) {
            all.push(m);
        }
    }
    all.iter()
        .map(|c| format!("\"{c}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The trellis:host capabilities a world imports: componentize-py and componentize-js
/// import all of a world's imports, used or not, so their manifests declare them all
/// (declaring grants nothing).
fn world_imports(point: Point) -> &'static [&'static str] {
    match point {
        Point::FenceAgent => &["log", "secrets", "kafka", "exec"],
        _ => &["log", "secrets", "kafka"],
    }
}

/// The manifest of a project built by `tool` (componentize-py or componentize-js):
/// those import everything the world offers, used or not, so it declares it all.
fn tool_manifest(name: &str, point: Point, tool: &str) -> String {
    let Needs {
        capabilities,
        config,
        ..
    } = needs(name, point);
    manifest(
        name,
        point,
        &format!("{}.wasm", snake(name)),
        &capability_list(capabilities, world_imports(point)),
        &format!(
            "\n# {tool} imports everything the world offers, used or not, so the\n# manifest declares it all; declaring grants nothing.\n{config}"
        ),
    )
}
