//! `trellis plugin check|test|list` and `trellis config check`.

use crate::config::DaemonConfig;
use crate::runtime::manifest::Capability;
use crate::runtime::{Plugin, Runtime, SERVED_WIT, canary, plugin_dirs};
use std::path::Path;
use std::process::ExitCode;

fn load_config(path: Option<&Path>) -> anyhow::Result<DaemonConfig> {
    match path {
        Some(p) => DaemonConfig::load(p).map_err(|e| anyhow::anyhow!("{e}")),
        None => Ok(DaemonConfig::default()),
    }
}

pub fn check_config(file: &Path) -> anyhow::Result<ExitCode> {
    match DaemonConfig::load(file) {
        Ok(cfg) => {
            let mut problems = Vec::new();
            if let Some(dir) = &cfg.runtime.plugin_dir
                && !dir.is_dir()
            {
                problems.push(format!(
                    "`runtime.plugin-dir`: {} is not a directory",
                    dir.display()
                ));
            }
            match &cfg.secrets.file {
                Some(f) => match crate::capabilities::secrets::SecretStore::load(f) {
                    // Job secrets against their values: present, long enough to mask,
                    // none a daemon credential's.
                    Ok(store) => {
                        if let Err(p) = crate::jobs::secrets::JobSecrets::from_config(&cfg, &store) {
                            problems.extend(p.iter().map(|p| p.to_string()));
                        }
                    }
                    Err(e) => problems.push(format!("`secrets.file`: {e}")),
                },
                None if !cfg.job_secrets.is_empty() => problems.push(
                    "`job-secrets`: job secrets need a secrets file for their values (fix: set [secrets] file = \"/etc/trellis/secrets.toml\", mode 0600)".into(),
                ),
                None => {}
            }
            if let Some(t) = cfg.controller.as_ref().and_then(|c| c.tls.as_ref())
                && let Err(e) = crate::api::tls_config(&t.cert, &t.key)
            {
                problems.push(format!("{e}"));
            }
            if problems.is_empty() {
                println!(
                    "{}: ok ({} plugin grant section{})",
                    file.display(),
                    cfg.plugins.len(),
                    if cfg.plugins.len() == 1 { "" } else { "s" }
                );
                Ok(ExitCode::SUCCESS)
            } else {
                println!("{}: {} problem(s)", file.display(), problems.len());
                for p in problems {
                    println!("  - {p}");
                }
                Ok(ExitCode::FAILURE)
            }
        }
        Err(p) => {
            print!("{p}");
            Ok(ExitCode::FAILURE)
        }
    }
}

pub async fn check(
    paths: &[std::path::PathBuf],
    config: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let have_config = config.is_some();
    let runtime = Runtime::new(load_config(config)?)?;
    let mut failed = 0;
    for path in paths {
        match runtime.prepare(path) {
            Err(problems) => {
                failed += 1;
                println!("FAIL {}", path.display());
                for p in &problems.items {
                    println!("  - {p}");
                }
            }
            Ok(plugin) => {
                describe(&plugin);
                let trial = canary(&plugin).await;
                match (&trial, have_config) {
                    (Ok(()), _) => {
                        println!("  trial start    ok (init accepted its configuration)")
                    }
                    (Err(p), true) => {
                        failed += 1;
                        println!("  trial start    FAILED");
                        for i in &p.items {
                            println!("    - {i}");
                        }
                    }
                    (Err(p), false) => {
                        println!(
                            "  trial start    failed without grants (pass --config to check with the operator's grants):"
                        );
                        for i in &p.items {
                            println!("    - {}", i.problem);
                        }
                    }
                }
                println!("OK   {}", path.display());
            }
        }
        println!();
    }
    println!("{} checked, {} failed", paths.len(), failed);
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn describe(p: &Plugin) {
    let m = &p.manifest;
    println!(
        "plugin         {} {}{}",
        m.name,
        m.version,
        if m.description.is_empty() {
            String::new()
        } else {
            format!(" — {}", m.description)
        }
    );
    println!(
        "component      {} ({} KiB, sha256 {}…), {} in {:.1} ms",
        m.component
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or("?"),
        p.compiled.bytes / 1024,
        &p.compiled.sha256[..12],
        if p.compiled.from_cache {
            "loaded precompiled"
        } else {
            "compiled"
        },
        p.compiled.took.as_secs_f64() * 1000.0
    );
    let versions: Vec<_> = p.info.plugin_versions().into_iter().collect();
    println!(
        "contract       trellis:plugin@{} (this host serves {})",
        versions.join(", "),
        SERVED_WIT.join(", ")
    );
    let current = crate::wit::versioned::CURRENT;
    if !versions.is_empty() && !versions.contains(&current) {
        println!(
            "               served as it is; the current contract is {current} (what changed: wit/README.md)"
        );
    }
    for w in &m.worlds {
        let points: Vec<_> = w.points().iter().map(|p| p.interface()).collect();
        println!(
            "world          {} — exports lifecycle, {}",
            w.name(),
            points.join(", ")
        );
    }
    for point in p.info.points() {
        println!("policy         {point}: {}", point.failure_policy());
    }
    let caps: Vec<_> = m.capabilities.iter().map(|c| c.name()).collect();
    println!(
        "capabilities   {}",
        if caps.is_empty() {
            "none".into()
        } else {
            caps.join(", ")
        }
    );
    let host: Vec<_> = p
        .info
        .host_imports
        .iter()
        .map(|(i, v)| format!("trellis:host/{i}@{v}"))
        .collect();
    println!(
        "host imports   {}",
        if host.is_empty() {
            "none".into()
        } else {
            host.join(", ")
        }
    );
    println!(
        "wasi imports   {} interface(s); grants decide what they reach",
        p.info.wasi_imports.len()
    );
    let current = p.current().1;
    let g = &current.grants;
    let mut grants = Vec::new();
    for d in &g.dirs {
        grants.push(format!(
            "dir {} as {} ({:?})",
            d.host.display(),
            d.guest,
            d.mode
        ));
    }
    for h in g.http.iter() {
        grants.push(format!("http {h}"));
    }
    for a in &g.sockets.connect {
        grants.push(format!("connect {a}"));
    }
    for a in &g.sockets.bind {
        grants.push(format!("bind {a}"));
    }
    for s in g.secrets.iter() {
        grants.push(format!("secret {s}"));
    }
    println!(
        "grants         {}",
        if grants.is_empty() {
            "none".into()
        } else {
            grants.join("; ")
        }
    );
    let ungranted: Vec<_> = m
        .capabilities
        .iter()
        .filter(|c| match c {
            Capability::Filesystem => g.dirs.is_empty(),
            Capability::Http => g.http.is_empty(),
            Capability::Sockets => g.sockets.is_empty(),
            Capability::Secrets => g.secrets.is_empty(),
            _ => false,
        })
        .map(|c| c.name())
        .collect();
    if !ungranted.is_empty() {
        println!(
            "not granted    {} (requested; uses will be denied)",
            ungranted.join(", ")
        );
    }
    let l = &p.limits();
    println!(
        "limits         memory {} MiB, call {:?}, return {} MiB, {} handles",
        l.memory >> 20,
        l.call_timeout,
        l.max_return >> 20,
        l.max_resources
    );
    if !m.config.is_empty() {
        for (k, c) in &m.config {
            let d = c
                .default
                .as_ref()
                .map(|d| format!(", default {d}"))
                .unwrap_or_default();
            let r = if c.required { ", required" } else { "" };
            println!(
                "config         {k} ({}{d}{r}){}",
                c.ty.name(),
                if c.description.is_empty() {
                    String::new()
                } else {
                    format!(": {}", c.description)
                }
            );
        }
    }
}

pub async fn list(
    dir: Option<&Path>,
    config: Option<&Path>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config)?;
    let dir = match dir
        .map(Path::to_path_buf)
        .or_else(|| cfg.runtime.plugin_dir.clone())
    {
        Some(d) => d,
        None => {
            anyhow::bail!("no plugin directory: give one, or --config with [runtime] plugin-dir")
        }
    };
    let runtime = Runtime::new(cfg)?;
    let mut rows = Vec::new();
    let mut bad = 0;
    for path in plugin_dirs(&dir)? {
        let row = match runtime.prepare(&path) {
            Ok(p) => {
                let status = match canary(&p).await {
                    Ok(()) => "ok".to_string(),
                    Err(e) => {
                        let why = e
                            .items
                            .first()
                            .map(|i| i.problem.clone())
                            .unwrap_or_default();
                        // A plugin that only lacks the operator's grants, or settings
                        // only the operator can give (a cluster's URL), is valid.
                        if why.contains(": denied: ") {
                            format!(
                                "valid; needs grants ({})",
                                why.rsplit(": denied: ").next().unwrap_or("")
                            )
                        } else if why.contains(" is required") && why.contains(": bad-config: ") {
                            format!(
                                "valid; needs config ({})",
                                why.rsplit(": bad-config: ").next().unwrap_or("")
                            )
                        } else {
                            format!("refused: {why}")
                        }
                    }
                };
                serde_json::json!({
                    "name": p.manifest.name,
                    "version": p.manifest.version,
                    "points": p.info.points().iter().map(|p| p.interface()).collect::<Vec<_>>(),
                    "wit": p.manifest.wit.to_string(),
                    "capabilities": p.manifest.capabilities.iter().map(|c| c.name()).collect::<Vec<_>>(),
                    "status": status,
                    "path": path.display().to_string(),
                })
            }
            Err(problems) => {
                bad += 1;
                serde_json::json!({
                    "name": path.file_name().and_then(|f| f.to_str()).unwrap_or("?"),
                    "status": format!("invalid: {}", problems.items.first().map(|i| i.to_string()).unwrap_or_default()),
                    "path": path.display().to_string(),
                })
            }
        };
        rows.push(row);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "{:<20} {:<8} {:<34} {:<6} {:<26} STATUS",
            "NAME", "VERSION", "POINTS", "WIT", "CAPABILITIES"
        );
        for r in &rows {
            let s = |k: &str| r.get(k).and_then(|v| v.as_str()).unwrap_or("-").to_string();
            let l = |k: &str| {
                r.get(k)
                    .and_then(|v| v.as_array())
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str())
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or("-".into())
            };
            println!(
                "{:<20} {:<8} {:<34} {:<6} {:<26} {}",
                s("name"),
                s("version"),
                l("points"),
                s("wit"),
                l("capabilities"),
                s("status")
            );
        }
        println!("{} plugin(s) in {}", rows.len(), dir.display());
    }
    Ok(if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `trellis plugin test`: the conformance kit (`crate::conformance`).
pub async fn test(
    plugin: &Path,
    with: Option<&Path>,
    config: Option<&Path>,
    params: &[String],
) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config)?;
    let secrets = match &cfg.secrets.file {
        Some(f) => crate::capabilities::secrets::SecretStore::load(f)?,
        None => Default::default(),
    };
    let params = params
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow::anyhow!("--param `{p}`: write it as key=value"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let runtime = Runtime::with_secrets(cfg, secrets)?;
    let load = |path: &Path| {
        let runtime = runtime.clone();
        let path = path.to_path_buf();
        async move {
            runtime.load(&path).await.map_err(|p| {
                let items: Vec<String> = p.items.iter().map(|i| format!("  - {i}")).collect();
                anyhow::anyhow!("{} does not load:\n{}", path.display(), items.join("\n"))
            })
        }
    };
    let subject = load(plugin).await?;
    let partner = match with {
        Some(w) => Some(load(w).await?),
        None => None,
    };
    println!(
        "conformance kit: {} {} (trellis:plugin@{}; {})",
        subject.manifest.name,
        subject.manifest.version,
        subject
            .info
            .plugin_versions()
            .into_iter()
            .collect::<Vec<_>>()
            .join(", "),
        subject
            .info
            .points()
            .iter()
            .map(|p| p.interface())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let suites = crate::conformance::run(
        subject,
        &crate::conformance::Options {
            with: partner,
            params,
        },
    )
    .await;
    if suites.is_empty() {
        println!("no suite applies: the plugin exports none of the four extension points");
        return Ok(ExitCode::FAILURE);
    }
    let (mut passed, mut failed) = (0, 0);
    for s in &suites {
        println!();
        print!("{}", s.render());
        passed += s.passed();
        failed += s.failed();
    }
    println!("\n{passed} passed, {failed} failed");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
