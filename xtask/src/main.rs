//! `cargo xtask <task>`: the workspace's own build steps, so nothing is built by hand.
//!
//! Plugins are built for wasm32-wasip2 one cargo invocation each: cargo unifies features
//! within one invocation, and each plugin enables exactly one world of trellis-sdk.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const HELP: &str = "\
usage: cargo xtask <task>

tasks:
  bundle     build the sample plugin bundle (plugins/*, examples/*) into <target>/bundle
  fixtures   build the test fixture plugins (tests/fixtures/*) into <target>/fixtures
  test       bundle + fixtures, then run the whole test suite
  lint       cargo fmt --check, clippy (native and wasm32), all with -D warnings
  bench      bundle, then the benchmarks in release: runtime, lines, transport, es, runs, scale
             (`bench NAME` runs one; lines compares with rsyslog, transport runs
             kafka-transport against raw rdkafka and tcp-transport on an Apache Kafka
             broker (./scripts/setup.sh fetches it and rsyslog), es runs elasticsearch-logging against
             a native bulk writer on the tests/es-mock server, runs starts a controller
             on 100,000 finished runs: start time, memory, a page of /api/runs; scale
             runs the load generator: N simulated agents against a release controller,
             see docs/SCALE.md)
  demo       bundle, then run examples/jobs/hello.toml with `trellis up` (controller + agent, default bundle)
";

/// The host's benchmarks, in the order `cargo xtask bench` runs them.
const BENCHES: &[&str] = &["runtime", "lines", "transport", "es", "runs", "scale"];

fn main() -> Result<()> {
    let task = std::env::args().nth(1).unwrap_or_default();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match task.as_str() {
        "bundle" => {
            bundle(&root)?;
        }
        "fixtures" => {
            fixtures(&root)?;
        }
        "test" => {
            let b = bundle(&root)?;
            let f = fixtures(&root)?;
            test(&[("TRELLIS_BUNDLE_DIR", &b), ("TRELLIS_FIXTURES_DIR", &f)])?;
        }
        "lint" => lint(&root)?,
        "bench" => {
            let which: Vec<String> = match std::env::args().nth(2) {
                None => BENCHES.iter().map(|b| b.to_string()).collect(),
                Some(b) if BENCHES.contains(&b.as_str()) => vec![b],
                Some(b) => bail!("unknown benchmark `{b}` (there are: {BENCHES:?})\n\n{HELP}"),
            };
            let b = bundle(&root)?;
            // Fixtures too: the transport bench compares a 0.1.0 build with the bundle's.
            let f = fixtures(&root)?;
            for bench in &which {
                cargo(
                    &["bench", "-p", "trellis", "--bench", bench],
                    &[("TRELLIS_BUNDLE_DIR", &b), ("TRELLIS_FIXTURES_DIR", &f)],
                )?;
            }
        }
        "demo" => {
            let b = bundle(&root)?;
            cargo(&["build", "-q", "-p", "trellis"], &[])?;
            let trellis = target_dir(&root).join("debug/trellis");
            // The main job: an example job through `trellis up` with the default bundle.
            let state = target_dir(&root).join("demo-state");
            let _ = std::fs::remove_dir_all(&state);
            run(Command::new(&trellis)
                .arg("up")
                .arg(root.join("examples/jobs/hello.toml"))
                .arg("--bundle")
                .arg(&b)
                .arg("--state")
                .arg(&state))?;
        }
        "" | "help" | "-h" | "--help" => print!("{HELP}"),
        other => bail!("unknown task `{other}`\n\n{HELP}"),
    }
    Ok(())
}

/// The workspace being worked on, found at run time: `cargo run` sets
/// CARGO_MANIFEST_DIR for the process. (Not `env!`: with a target directory shared
/// between checkouts, an xtask binary built in another checkout would otherwise build
/// and test that checkout instead of this one.)
fn workspace_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_MANIFEST_DIR")
        && let Some(root) = Path::new(&dir).parent()
    {
        return root.to_path_buf();
    }
    let mut dir = std::env::current_dir().expect("a current directory");
    loop {
        let manifest = dir.join("Cargo.toml");
        if std::fs::read_to_string(&manifest).is_ok_and(|t| t.contains("[workspace]")) {
            return dir;
        }
        if !dir.pop() {
            panic!("not inside the Trellis workspace");
        }
    }
}

fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        None => root.join("target"),
    }
}

fn cargo(args: &[&str], env: &[(&str, &Path)]) -> Result<()> {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    run(&mut c)
}

fn run(c: &mut Command) -> Result<()> {
    let status = c.status().with_context(|| format!("running {c:?}"))?;
    if !status.success() {
        bail!("{c:?} failed ({status})");
    }
    Ok(())
}

/// `cargo test --workspace`, then the controller/agent end-to-end suite again over the
/// Kafka transport (`TRELLIS_TEST_TRANSPORT=kafka`, see host/tests/common), echoing
/// their output, then one summary line over all test binaries.
fn test(env: &[(&str, &Path)]) -> Result<()> {
    let all = cargo_test(&["test", "--workspace", "--no-fail-fast"], env, None)?;
    println!("\n== the controller/agent suite again, over the Kafka transport ==");
    let kafka = cargo_test(
        &["test", "-p", "trellis", "--test", "controller_agent"],
        env,
        Some("kafka"),
    )?;
    let [passed, failed, ignored] = [0, 1, 2].map(|i| all.0[i] + kafka.0[i]);
    println!("\nsummary: {passed} passed, {failed} failed, {ignored} skipped");
    all.1?;
    kafka.1?;
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// One `cargo test` run, echoing its output: its (passed, failed, ignored) summed over
/// the test binaries (cargo prints one `test result:` per binary), and whether it passed.
fn cargo_test(
    args: &[&str],
    env: &[(&str, &Path)],
    transport: Option<&str>,
) -> Result<([u64; 3], Result<()>)> {
    use std::io::{BufRead, BufReader};
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.args(args).stdout(std::process::Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    if let Some(t) = transport {
        c.env("TRELLIS_TEST_TRANSPORT", t);
    }
    let mut child = c.spawn().context("running cargo test")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut w = part.split_whitespace().rev();
                let (Some(word), Some(n)) = (w.next(), w.next()) else {
                    continue;
                };
                let n: u64 = n.parse().unwrap_or(0);
                match word {
                    "passed" => passed += n,
                    "failed" => failed += n,
                    "ignored" => ignored += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    let outcome = if status.success() {
        Ok(())
    } else {
        Err(anyhow::anyhow!("{c:?} failed ({status})"))
    };
    Ok(([passed, failed, ignored], outcome))
}

/// A plugin crate: a directory with Cargo.toml and plugin.toml.
struct PluginCrate {
    dir: PathBuf,
    package: String,
    plugin: String,
    component: String,
}

fn plugin_crates(parent: &Path) -> Result<Vec<PluginCrate>> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Ok(out);
    };
    for e in entries {
        let dir = e?.path();
        let (cargo_toml, manifest) = (dir.join("Cargo.toml"), dir.join("plugin.toml"));
        if !cargo_toml.is_file() || !manifest.is_file() {
            continue;
        }
        let c: toml::Table = toml::from_str(&std::fs::read_to_string(&cargo_toml)?)?;
        let m: toml::Table = toml::from_str(&std::fs::read_to_string(&manifest)?)
            .with_context(|| format!("{}", manifest.display()))?;
        let package = c["package"]["name"]
            .as_str()
            .context("package.name")?
            .to_string();
        let plugin = m["plugin"]["name"]
            .as_str()
            .context("plugin.name")?
            .to_string();
        let component = m["plugin"]["component"]
            .as_str()
            .context("plugin.component")?
            .to_string();
        out.push(PluginCrate {
            dir,
            package,
            plugin,
            component,
        });
    }
    out.sort_by(|a, b| a.plugin.cmp(&b.plugin));
    Ok(out)
}

fn ensure_wasm_target() -> Result<()> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    if let Ok(out) = out
        && !String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.trim() == "wasm32-wasip2")
    {
        bail!("the wasm32-wasip2 target is not installed: run `rustup target add wasm32-wasip2`");
    }
    Ok(())
}

/// Build each crate for wasm32-wasip2 and lay out `<out>/<plugin>/{plugin.toml, component}`.
fn build_into(root: &Path, crates: &[PluginCrate], out: &Path) -> Result<()> {
    ensure_wasm_target()?;
    std::fs::create_dir_all(out)?;
    let wasm_dir = target_dir(root).join("wasm32-wasip2/release");
    for c in crates {
        let t = Instant::now();
        cargo(
            &[
                "build",
                "-q",
                "--release",
                "--target",
                "wasm32-wasip2",
                "-p",
                &c.package,
            ],
            &[],
        )?;
        let built = wasm_dir.join(format!("{}.wasm", c.package.replace('-', "_")));
        let dest = out.join(&c.plugin);
        std::fs::create_dir_all(&dest)?;
        let dest_wasm = dest.join(&c.component);
        // Copy only when changed, so the host's precompiled cache stays valid.
        let new = std::fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
        if std::fs::read(&dest_wasm).ok().as_deref() != Some(&new[..]) {
            std::fs::write(&dest_wasm, &new)?;
        }
        std::fs::copy(c.dir.join("plugin.toml"), dest.join("plugin.toml"))?;
        eprintln!(
            "  built {:<16} {:>7} KiB  {:>5.1}s  -> {}",
            c.plugin,
            new.len() / 1024,
            t.elapsed().as_secs_f64(),
            dest.display()
        );
    }
    Ok(())
}

fn bundle(root: &Path) -> Result<PathBuf> {
    let mut crates = plugin_crates(&root.join("plugins"))?;
    crates.extend(plugin_crates(&root.join("examples"))?);
    let out = target_dir(root).join("bundle");
    eprintln!("bundle: {} plugin(s) -> {}", crates.len(), out.display());
    build_into(root, &crates, &out)?;
    build_python(root, &root.join("examples"), &out)?;
    build_js(root, &root.join("examples"), &out)?;
    // Check every plugin with the host and leave its precompiled artifact beside it
    // (<bundle>/<plugin>/.cache/); an invalid plugin fails the build here.
    cargo(&["build", "-q", "-p", "trellis"], &[])?;
    let trellis = target_dir(root).join("debug/trellis");
    run(Command::new(&trellis)
        .args(["plugin", "list"])
        .arg(&out)
        .env("TRELLIS_LOG", "error"))?;
    Ok(out)
}

/// The WIT the examples build against: the project's package and its vendored deps.
const PROJECT_WIT: [&str; 3] = ["wit", "wit/deps", "wit/deps/trellis-host"];

/// One example in another language, built into `out/<plugin>/` by a tool: the manifest
/// copied beside the component, and the build skipped when the sources' hash is the one
/// stamped by the last build (the tools take 15 s or so, and a new file would also cost
/// the host a fresh compile).
struct Example {
    dir: PathBuf,
    manifest: toml::Table,
    dest: PathBuf,
    wasm: PathBuf,
    stamp: PathBuf,
    hash: String,
}

impl Example {
    /// `dir`'s example, its sources those of `sources`; None when it is up to date.
    fn prepare(
        dir: &Path,
        out: &Path,
        mut sources: Vec<PathBuf>,
        lang: &str,
    ) -> Result<Option<Example>> {
        let file = dir.join("plugin.toml");
        let manifest: toml::Table = toml::from_str(&std::fs::read_to_string(&file)?)
            .with_context(|| format!("{}", file.display()))?;
        let plugin = manifest["plugin"]["name"].as_str().context("plugin.name")?;
        let component = manifest["plugin"]["component"]
            .as_str()
            .context("plugin.component")?;
        let hash = sources_hash(&mut sources)?;
        let dest = out.join(plugin);
        std::fs::create_dir_all(&dest)?;
        let (wasm, stamp) = (dest.join(component), dest.join(".source-hash"));
        std::fs::copy(&file, dest.join("plugin.toml"))?;
        if wasm.is_file() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&hash) {
            eprintln!("  up to date {plugin:<11} ({lang})");
            return Ok(None);
        }
        Ok(Some(Example {
            dir: dir.to_path_buf(),
            manifest,
            dest,
            wasm,
            stamp,
            hash,
        }))
    }

    fn name(&self) -> &str {
        self.manifest["plugin"]["name"].as_str().unwrap_or_default()
    }

    /// Run the tool that writes the component, then stamp the hash and report.
    fn build(&self, mut tool: Command, what: &str) -> Result<()> {
        let t = Instant::now();
        let status = tool
            .stdout(std::process::Stdio::null())
            .status()
            .with_context(|| format!("{what} (run ./scripts/setup.sh)"))?;
        if !status.success() {
            bail!("{what} failed for {}", self.dir.display());
        }
        std::fs::write(&self.stamp, &self.hash)?;
        eprintln!(
            "  built {:<16} {:>7} KiB  {:>5.1}s  -> {} ({what})",
            self.name(),
            std::fs::metadata(&self.wasm)?.len() / 1024,
            t.elapsed().as_secs_f64(),
            self.dest.display()
        );
        Ok(())
    }
}

/// Plugins written in Python (a folder with `app.py` and `plugin.toml`): built with
/// componentize-py against `wit/`, for the manifest's first world.
fn build_python(root: &Path, parent: &Path, out: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Ok(());
    };
    for e in entries {
        let dir = e?.path();
        if !dir.join("app.py").is_file() || !dir.join("plugin.toml").is_file() {
            continue;
        }
        let mut sources = files_with(&dir, &["py"])?;
        for d in PROJECT_WIT {
            sources.extend(files_with(&root.join(d), &["wit"])?);
        }
        let Some(ex) = Example::prepare(&dir, out, sources, "Python")? else {
            continue;
        };
        let world = ex.manifest["plugin"]["worlds"][0]
            .as_str()
            .context("plugin.worlds[0]")?;
        let mut tool = Command::new("componentize-py");
        tool.arg("-d")
            .arg(root.join("wit"))
            .args(["-w", world, "componentize", "-p"])
            .arg(&dir)
            .arg("app")
            .arg("-o")
            .arg(&ex.wasm);
        ex.build(tool, "Python, componentize-py")?;
    }
    Ok(())
}

/// SHA-256 over files' names and contents: an example is rebuilt only when it changed.
fn sources_hash(files: &mut [PathBuf]) -> Result<String> {
    use sha2::{Digest, Sha256};
    files.sort();
    let mut h = Sha256::new();
    for f in files.iter() {
        h.update(f.to_string_lossy().as_bytes());
        h.update(std::fs::read(f)?);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// The files in `dir` whose extension is one of `exts` (not recursive).
fn files_with(dir: &Path, exts: &[&str]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(out);
    };
    for f in entries {
        let f = f?.path();
        if f.extension()
            .and_then(|x| x.to_str())
            .is_some_and(|x| exts.contains(&x))
        {
            out.push(f);
        }
    }
    Ok(out)
}

/// Plugins in JavaScript (`examples/*/app.js` with `package.json` and `wit/world.wit`),
/// built with componentize-js. The tool is installed from the example's own
/// package.json into the target directory (no node_modules in the tree); the WIT folder
/// it builds against is the example's world with the project's package and WASI under
/// `deps/`, so it builds offline once installed.
fn build_js(root: &Path, parent: &Path, out: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Ok(());
    };
    for e in entries {
        let dir = e?.path();
        let world_file = dir.join("wit/world.wit");
        if !dir.join("app.js").is_file()
            || !dir.join("plugin.toml").is_file()
            || !world_file.is_file()
        {
            continue;
        }
        let mut sources = files_with(&dir, &["js", "json"])?;
        sources.extend(files_with(&dir.join("wit"), &["wit"])?);
        for d in PROJECT_WIT {
            sources.extend(files_with(&root.join(d), &["wit"])?);
        }
        let Some(ex) = Example::prepare(&dir, out, sources, "JavaScript")? else {
            continue;
        };
        let plugin = ex.name();
        let world_text = std::fs::read_to_string(&world_file)?;
        let world = world_text
            .lines()
            .find_map(|l| l.trim().strip_prefix("world "))
            .and_then(|l| l.split_whitespace().next())
            .with_context(|| format!("{}: no `world NAME`", world_file.display()))?;
        // componentize-js, as the example's package.json pins it.
        let tools = target_dir(root).join("js-tools").join(plugin);
        std::fs::create_dir_all(&tools)?;
        let package = std::fs::read(dir.join("package.json"))?;
        let tool = tools.join("node_modules/.bin/componentize-js");
        if !tool.is_file()
            || std::fs::read(tools.join("package.json")).ok() != Some(package.clone())
        {
            std::fs::write(tools.join("package.json"), &package)?;
            eprintln!("  installing componentize-js for {plugin} (npm)");
            let ok = Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(&tools)
                .stdout(std::process::Stdio::null())
                .status()
                .context("npm (run ./scripts/setup.sh)")?
                .success();
            if !ok {
                bail!("npm install failed in {}", tools.display());
            }
        }
        // The WIT folder: the example's world, the project's package and WASI as deps.
        let wit = target_dir(root).join("js-wit").join(plugin);
        let _ = std::fs::remove_dir_all(&wit);
        for (from, to) in [
            (dir.join("wit"), wit.clone()),
            (root.join("wit"), wit.join("deps/trellis-plugin")),
            (root.join("wit/deps"), wit.join("deps")),
            (
                root.join("wit/deps/trellis-host"),
                wit.join("deps/trellis-host"),
            ),
        ] {
            std::fs::create_dir_all(&to)?;
            for f in files_with(&from, &["wit"])? {
                std::fs::copy(&f, to.join(f.file_name().unwrap()))?;
            }
        }
        let mut cmd = Command::new(&tool);
        cmd.arg(dir.join("app.js"))
            .arg("--wit")
            .arg(&wit)
            .args(["-n", world, "-o"])
            .arg(&ex.wasm);
        ex.build(cmd, "JavaScript, componentize-js")?;
    }
    Ok(())
}

fn fixtures(root: &Path) -> Result<PathBuf> {
    let crates = plugin_crates(&root.join("tests/fixtures"))?;
    let out = target_dir(root).join("fixtures");
    eprintln!("fixtures: {} plugin(s) -> {}", crates.len(), out.display());
    build_into(root, &crates, &out)?;
    Ok(out)
}

fn lint(root: &Path) -> Result<()> {
    cargo(&["fmt", "--all", "--check"], &[])?;
    cargo(
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )?;
    let mut crates = plugin_crates(&root.join("plugins"))?;
    crates.extend(plugin_crates(&root.join("examples"))?);
    crates.extend(plugin_crates(&root.join("tests/fixtures"))?);
    for c in &crates {
        cargo(
            &[
                "clippy",
                "-q",
                "--release",
                "--target",
                "wasm32-wasip2",
                "-p",
                &c.package,
                "--",
                "-D",
                "warnings",
            ],
            &[],
        )?;
    }
    Ok(())
}
