//! `trellis:host/exec`: programs the operator allow-listed for one plugin, as argv
//! templates with `{placeholder}`s the plugin fills. No shell, an empty environment
//! (a fixed PATH), no stdin, a time limit (the child is killed past it, with its
//! process group) and a cap on the output kept. A value is one argv element of a safe
//! alphabet, so nothing the plugin passes can turn into an option or an extra argument.

use crate::config::ExecTemplate;
use crate::runtime::state::InstanceState;
use crate::wit::host_exec::{ExecError, Host, Output};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use tokio::io::AsyncReadExt;

const PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// One instance's view: its plugin's granted templates.
#[derive(Debug, Clone, Default)]
pub struct ExecGate {
    pub plugin: Arc<str>,
    pub templates: Arc<Vec<ExecTemplate>>,
}

/// Check the operator's templates at load: names unique, argv not empty, placeholders
/// well formed. Problems as (field suffix, problem).
pub fn check(templates: &[ExecTemplate]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (i, t) in templates.iter().enumerate() {
        if t.argv.is_empty() {
            out.push((
                format!("exec[{i}].argv"),
                "is empty: name the program".into(),
            ));
        }
        if t.argv.first().is_some_and(|p| p.contains('{')) {
            out.push((
                format!("exec[{i}].argv[0]"),
                "the program itself cannot be a placeholder".into(),
            ));
        }
        if templates[..i].iter().any(|o| o.name == t.name) {
            out.push((
                format!("exec[{i}].name"),
                format!("`{}` is granted twice", t.name),
            ));
        }
        for (j, a) in t.argv.iter().enumerate() {
            if let Err(e) = placeholders(a) {
                out.push((format!("exec[{i}].argv[{j}]"), e));
            }
        }
    }
    out
}

/// The placeholder names in one argv element.
fn placeholders(arg: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let mut rest = arg;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| format!("`{arg}`: a `{{` without its `}}`"))?;
        let name = &after[..close];
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!("`{arg}`: `{{{name}}}` is not a placeholder name"));
        }
        out.push(name);
        rest = &after[close + 1..];
    }
    Ok(out)
}

fn allowed_value(v: &str) -> bool {
    !v.is_empty()
        && !v.starts_with('-')
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._:/@=,+-".contains(c))
}

/// The argv of `t` with `values` filled in.
fn fill(t: &ExecTemplate, values: &[(String, String)]) -> Result<Vec<String>, String> {
    let mut argv = Vec::with_capacity(t.argv.len());
    for a in &t.argv {
        let mut filled = a.clone();
        for name in placeholders(a)? {
            let Some((_, v)) = values.iter().find(|(k, _)| k == name) else {
                return Err(format!(
                    "template `{}` needs a value for `{{{name}}}`",
                    t.name
                ));
            };
            if !allowed_value(v) {
                return Err(format!(
                    "value {v:?} for `{{{name}}}` is not allowed (letters, digits and ._:/@=,+- only, not starting with -)"
                ));
            }
            filled = filled.replace(&format!("{{{name}}}"), v);
        }
        argv.push(filled);
    }
    Ok(argv)
}

/// Read at most `max` bytes of `r`, draining (and counting) the rest.
async fn read_capped(mut r: impl tokio::io::AsyncRead + Unpin, max: usize) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let mut truncated = false;
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return (out, truncated),
            Ok(n) => {
                let room = max.saturating_sub(out.len());
                out.extend_from_slice(&buf[..n.min(room)]);
                truncated |= n > room;
            }
        }
    }
}

async fn run(t: &ExecTemplate, argv: Vec<String>) -> Result<Output, ExecError> {
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .env("PATH", PATH)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| ExecError::Failed(format!("cannot start `{}`: {e}", argv[0])))?;
    let max = t.max_output.0 as usize;
    let (stdout, stderr) = (
        child.stdout.take().expect("piped"),
        child.stderr.take().expect("piped"),
    );
    let pid = child.id();
    let work = async {
        let ((out, t1), (err, t2)) =
            tokio::join!(read_capped(stdout, max), read_capped(stderr, max));
        let status = child.wait().await;
        (out, err, t1 || t2, status)
    };
    match tokio::time::timeout(t.timeout.0, work).await {
        Ok((stdout, stderr, truncated, status)) => {
            let status = status.map_err(|e| ExecError::Failed(format!("`{}`: {e}", argv[0])))?;
            Ok(Output {
                status: status.code(),
                stdout,
                stderr,
                truncated,
            })
        }
        Err(_) => {
            if let Some(pid) = pid {
                // SAFETY: signalling the child's own process group.
                unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
            }
            Err(ExecError::Failed(format!(
                "`{}` ran past its time limit of {:?} and was killed",
                t.name, t.timeout.0
            )))
        }
    }
}

impl Host for InstanceState {
    async fn run(
        &mut self,
        name: String,
        values: Vec<(String, String)>,
    ) -> Result<Output, ExecError> {
        let plugin = self.exec.plugin.clone();
        let Some(t) = self.exec.templates.iter().find(|t| t.name == name).cloned() else {
            self.metrics.denials.fetch_add(1, Relaxed);
            let msg = format!(
                "no program `{name}` is granted; the operator grants it with exec = [{{ name = \"{name}\", argv = [...] }}] in [plugins.{plugin}]"
            );
            tracing::warn!(plugin = %plugin, "denied: {msg}");
            return Err(ExecError::Denied(msg));
        };
        let argv = match fill(&t, &values) {
            Ok(a) => a,
            Err(msg) => {
                self.metrics.denials.fetch_add(1, Relaxed);
                tracing::warn!(plugin = %plugin, "denied: {msg}");
                return Err(ExecError::Denied(msg));
            }
        };
        tracing::debug!(plugin = %plugin, ?argv, "exec");
        run(&t, argv).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ByteSize, HumanDuration};
    use std::time::Duration;

    fn t(argv: &[&str]) -> ExecTemplate {
        ExecTemplate {
            name: "t".into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            timeout: HumanDuration(Duration::from_secs(5)),
            max_output: ByteSize(16),
        }
    }

    fn v(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn values_fill_placeholders_and_nothing_else() {
        let tpl = t(&[
            "gluster",
            "volume",
            "set",
            "{volume}",
            "auth.reject",
            "{addr}",
        ]);
        assert_eq!(
            fill(&tpl, &v(&[("volume", "gv0"), ("addr", "10.0.0.5")])).unwrap(),
            ["gluster", "volume", "set", "gv0", "auth.reject", "10.0.0.5"]
        );
        for bad in ["a b", "-rf", "$(reboot)", "x;y", "", "a\nb"] {
            let e = fill(&tpl, &v(&[("volume", bad), ("addr", "1")])).unwrap_err();
            assert!(e.contains("not allowed"), "{bad:?}: {e}");
        }
        assert!(
            fill(&tpl, &v(&[("volume", "gv0")]))
                .unwrap_err()
                .contains("needs a value for `{addr}`")
        );
        assert!(check(&[t(&[])]).iter().any(|(f, _)| f == "exec[0].argv"));
        assert!(
            check(&[t(&["{prog}"])])
                .iter()
                .any(|(f, _)| f == "exec[0].argv[0]")
        );
        assert!(
            check(&[t(&["x", "{bad name}"])])
                .iter()
                .any(|(f, _)| f == "exec[0].argv[1]")
        );
    }

    #[tokio::test]
    async fn output_is_capped_and_a_slow_program_is_killed() {
        let out = run(
            &t(&[
                "sh",
                "-c",
                "echo 0123456789abcdefghij; echo err >&2; exit 3",
            ]),
            vec![
                "sh".into(),
                "-c".into(),
                "echo 0123456789abcdefghij; echo err >&2; exit 3".into(),
            ],
        )
        .await
        .unwrap();
        assert_eq!(out.status, Some(3));
        assert_eq!(out.stdout, b"0123456789abcdef");
        assert!(out.truncated);
        assert_eq!(out.stderr, b"err\n");
        let mut slow = t(&["sleep", "30"]);
        slow.timeout = HumanDuration(Duration::from_millis(300));
        let started = std::time::Instant::now();
        let e = run(&slow, vec!["sleep".into(), "30".into()])
            .await
            .unwrap_err();
        assert!(
            matches!(e, ExecError::Failed(ref m) if m.contains("time limit")),
            "{e:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        // No environment from the daemon reaches the program.
        let mut env = t(&["env"]);
        env.max_output = ByteSize(1 << 20);
        let env = run(&env, vec!["env".into()]).await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&env.stdout),
            format!("PATH={PATH}\n")
        );
    }
}
