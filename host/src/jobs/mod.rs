//! Job files: what to run, where, and with what.
//!
//! ```toml
//! name = "build-and-test"
//! agent = "linux"                       # label an agent must carry
//! env = { RUST_LOG = "info" }
//! secrets = { DEPLOY_TOKEN = "deploy-token" }   # env name = a job secret scoped to this job (see `secrets`)
//! log-limit = "64MiB"                   # optional: keep head and tail, full log as an artifact
//! multiline-start = '^\S'               # optional: lines not matching continue the event before
//! logging = "elasticsearch-logging"     # optional: this job's logging method (else the controller's)
//! browser = "elasticsearch-browser"     # optional: the browser its log is read with
//! priority = 10                         # optional: higher waits less in the queue (default 0)
//! queue-timeout = "30m"                 # optional: end the run if it waits longer for an agent
//!
//! [[step]]
//! name = "build"
//! run = "cargo build --release"
//! timeout = "20m"                       # default 1h
//! workdir = "src"                       # relative to the run's workspace
//! artifacts = ["target/release/*.tar.gz"]
//! ```

pub mod secrets;

use crate::config::{ByteSize, HumanDuration, Problem, Problems};
use crate::ids::{ID_RULE, is_id};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(3600);

/// Kept as JSON while its run waits in the queue (`controller::queue`), so a queued
/// run survives a controller restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub name: String,
    pub agent: String,
    pub env: BTreeMap<String, String>,
    /// Environment variable -> secret name.
    pub secrets: BTreeMap<String, String>,
    pub log_limit: Option<u64>,
    /// Start-of-event pattern: a line that does not match continues the event before
    /// it (see `agent::multiline`).
    pub multiline_start: Option<String>,
    /// The logging method and log browser for this job's runs (JEP-212's locator);
    /// None: the controller's defaults. The controller must have loaded them.
    pub logging: Option<String>,
    pub browser: Option<String>,
    /// Queue order: a waiting run with a higher priority is placed first; equal ones in
    /// the order they were submitted (default 0).
    #[serde(default)]
    pub priority: i32,
    /// A run that waited this long for an agent is ended (`cancelled`, with a note).
    #[serde(default)]
    pub queue_timeout: Option<Duration>,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    pub run: String,
    pub timeout: Duration,
    /// Relative to the run's workspace; never escapes it.
    pub workdir: Option<PathBuf>,
    pub artifacts: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawJob {
    name: String,
    agent: String,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    secrets: BTreeMap<String, String>,
    log_limit: Option<ByteSize>,
    multiline_start: Option<String>,
    logging: Option<String>,
    browser: Option<String>,
    #[serde(default)]
    priority: i32,
    queue_timeout: Option<HumanDuration>,
    #[serde(default)]
    step: Vec<RawStep>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawStep {
    name: String,
    run: String,
    timeout: Option<HumanDuration>,
    workdir: Option<String>,
    #[serde(default)]
    artifacts: Vec<String>,
}

fn is_env_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(f) if f == '_' || f.is_ascii_alphabetic())
        && c.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// A relative path that stays inside its root (no `..`, not absolute).
pub fn contained(p: &str) -> Option<PathBuf> {
    let path = Path::new(p);
    if p.is_empty() || path.is_absolute() {
        return None;
    }
    path.components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        .then(|| path.to_path_buf())
}

impl Job {
    pub fn load(path: &Path) -> Result<Job, Problems> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Problems {
            file: file.clone(),
            items: vec![Problem {
                field: "(file)".into(),
                problem: format!("cannot read it: {e}"),
                fix: "check the path".into(),
            }],
        })?;
        Job::parse(&text, &file)
    }

    pub fn parse(text: &str, file: &str) -> Result<Job, Problems> {
        let raw: RawJob = toml::from_str(text).map_err(|e| Problems {
            file: file.into(),
            items: vec![crate::config::toml_problem(&e)],
        })?;
        let mut items = Vec::new();
        let mut bad = |field: String, problem: String, fix: &str| {
            items.push(Problem {
                field,
                problem,
                fix: fix.into(),
            })
        };
        if !is_id(&raw.name) {
            bad(
                "name".into(),
                format!("`{}` is not a valid job name", raw.name),
                ID_RULE,
            );
        }
        if !is_id(&raw.agent) {
            bad(
                "agent".into(),
                format!("`{}` is not a valid agent label", raw.agent),
                ID_RULE,
            );
        }
        for k in raw.env.keys() {
            if !is_env_name(k) {
                bad(
                    format!("env.{k}"),
                    format!("`{k}` is not an environment variable name"),
                    "use letters, digits and `_`, not starting with a digit",
                );
            }
        }
        for (k, v) in &raw.secrets {
            if !is_env_name(k) {
                bad(
                    format!("secrets.{k}"),
                    format!("`{k}` is not an environment variable name"),
                    "name the variable the step sees, e.g. DEPLOY_TOKEN = \"deploy-token\"",
                );
            }
            if raw.env.contains_key(k) {
                bad(
                    format!("secrets.{k}"),
                    format!("`{k}` is also set in `env`"),
                    "set it in one place only",
                );
            }
            if v.is_empty() {
                bad(
                    format!("secrets.{k}"),
                    "empty secret name".into(),
                    "name a secret in the controller's secret store",
                );
            }
        }
        if let Some(p) = &raw.multiline_start
            && let Err(e) = crate::agent::multiline::compile(p)
        {
            bad(
                "multiline-start".into(),
                e,
                "give a pattern a new event's first line matches, e.g. '^\\S' (not indented)",
            );
        }
        for (field, name) in [("logging", &raw.logging), ("browser", &raw.browser)] {
            if let Some(n) = name
                && !is_id(n)
            {
                bad(
                    field.into(),
                    format!("`{n}` is not a plugin name"),
                    "name a plugin the controller loads, e.g. \"elasticsearch-logging\"",
                );
            }
        }
        if raw.queue_timeout.is_some_and(|t| t.0.is_zero()) {
            bad(
                "queue-timeout".into(),
                "a zero queue timeout ends the run before any agent can take it".into(),
                "use e.g. \"30m\", or leave it out to wait for as long as it takes",
            );
        }
        if raw.step.is_empty() {
            bad(
                "step".into(),
                "the job has no steps".into(),
                "add at least one [[step]] with `name` and `run`",
            );
        }
        let mut names = BTreeSet::new();
        let mut steps = Vec::new();
        for (i, s) in raw.step.iter().enumerate() {
            let at = format!("step[{i}]");
            if !is_id(&s.name) {
                bad(
                    format!("{at}.name"),
                    format!(
                        "`{}` is not a valid step name (it names the step's log and artifacts)",
                        crate::ids::Shown(&s.name)
                    ),
                    ID_RULE,
                );
            } else if !names.insert(s.name.clone()) {
                bad(
                    format!("{at}.name"),
                    format!("step `{}` appears twice", s.name),
                    "give each step its own name (it is the step's log id)",
                );
            }
            if s.run.trim().is_empty() {
                bad(
                    format!("{at}.run"),
                    "empty command".into(),
                    "give the shell command to run",
                );
            }
            let timeout = s.timeout.map(|t| t.0).unwrap_or(DEFAULT_STEP_TIMEOUT);
            if timeout.is_zero() {
                bad(
                    format!("{at}.timeout"),
                    "a zero timeout fails the step at once".into(),
                    "use e.g. \"10m\"",
                );
            }
            let workdir = match &s.workdir {
                None => None,
                Some(w) => match contained(w) {
                    Some(p) => Some(p),
                    None => {
                        bad(
                            format!("{at}.workdir"),
                            format!("`{w}` leaves the run's workspace"),
                            "use a relative path without `..`",
                        );
                        None
                    }
                },
            };
            for (j, a) in s.artifacts.iter().enumerate() {
                if contained(a).is_none() {
                    bad(
                        format!("{at}.artifacts[{j}]"),
                        format!("`{a}` leaves the step's directory"),
                        "use a relative glob without `..`, e.g. \"target/*.tar.gz\"",
                    );
                }
            }
            steps.push(Step {
                name: s.name.clone(),
                run: s.run.clone(),
                timeout,
                workdir,
                artifacts: s.artifacts.clone(),
            });
        }
        if !items.is_empty() {
            return Err(Problems {
                file: file.into(),
                items,
            });
        }
        Ok(Job {
            name: raw.name,
            agent: raw.agent,
            env: raw.env,
            secrets: raw.secrets,
            log_limit: raw.log_limit.map(|b| b.0),
            multiline_start: raw.multiline_start,
            logging: raw.logging,
            browser: raw.browser,
            priority: raw.priority,
            queue_timeout: raw.queue_timeout.map(|t| t.0),
            steps,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        name = "build-and-test"
        agent = "linux"
        env = { RUST_LOG = "info" }
        secrets = { DEPLOY_TOKEN = "deploy-token" }
        log-limit = "64MiB"

        [[step]]
        name = "build"
        run = "make"
        timeout = "20m"
        workdir = "src"
        artifacts = ["out/*.tar.gz"]

        [[step]]
        name = "test"
        run = "make test"
    "#;

    #[test]
    fn a_good_job() {
        let j = Job::parse(GOOD, "job.toml").unwrap();
        assert_eq!(j.steps.len(), 2);
        assert_eq!(j.steps[0].timeout, Duration::from_secs(1200));
        assert_eq!(j.steps[1].timeout, DEFAULT_STEP_TIMEOUT);
        assert_eq!(j.steps[0].workdir.as_deref(), Some(Path::new("src")));
        assert_eq!(j.log_limit, Some(64 << 20));
        assert_eq!(j.secrets["DEPLOY_TOKEN"], "deploy-token");
    }

    #[test]
    fn mistakes_name_the_field_and_the_fix() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "name = \"build-and-test\"",
                "name = \"build and test\"",
                "`name`",
            ),
            ("agent = \"linux\"", "agent = \"\"", "`agent`"),
            (
                "agent = \"linux\"",
                "agent = \"linux\"\nlogging = \"../x\"",
                "`logging`",
            ),
            (
                "agent = \"linux\"",
                "agent = \"linux\"\nbrowser = \"a b\"",
                "`browser`",
            ),
            ("RUST_LOG = \"info\"", "1BAD = \"x\"", "env.1BAD"),
            (
                "DEPLOY_TOKEN = \"deploy-token\"",
                "RUST_LOG = \"x\"",
                "secrets.RUST_LOG",
            ),
            (
                "workdir = \"src\"",
                "workdir = \"../etc\"",
                "step[0].workdir",
            ),
            ("workdir = \"src\"", "workdir = \"/etc\"", "step[0].workdir"),
            (
                "artifacts = [\"out/*.tar.gz\"]",
                "artifacts = [\"../*.key\"]",
                "step[0].artifacts[0]",
            ),
            ("name = \"test\"", "name = \"build\"", "step[1].name"),
            ("name = \"test\"", "name = \"../../etc\"", "step[1].name"),
            ("name = \"test\"", "name = \".hidden\"", "step[1].name"),
            ("run = \"make test\"", "run = \"  \"", "step[1].run"),
            ("timeout = \"20m\"", "timeout = \"0s\"", "step[0].timeout"),
            (
                "agent = \"linux\"",
                "agent = \"linux\"\nqueue-timeout = \"0s\"",
                "`queue-timeout`",
            ),
        ];
        for (from, to, field) in cases {
            let text = GOOD.replacen(from, to, 1);
            let err = Job::parse(&text, "job.toml").expect_err(to).to_string();
            assert!(err.contains(field), "{to}: expected {field} in {err}");
            assert!(err.contains("fix:"), "{to}: no fix in {err}");
        }
        let err = Job::parse("name = \"x\"\nagent = \"y\"\n", "job.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no steps"), "{err}");
        let err = Job::parse(
            &GOOD.replace("run = \"make\"", "run = \"make\"\ncommand = \"x\""),
            "job.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown field `command`"), "{err}");
    }
}
