//! Scoped job secrets: the only secrets a job can get. The controller's configuration
//! names each one and the jobs that may use it (`[job-secrets.deploy-token] jobs =
//! ["deploy-*"]`); the daemon's own credentials (agents' secrets, plugins' granted
//! secrets such as store keys and fence device passwords, the Kafka SASL password) can
//! never be one. A job naming any other secret is refused at submit, with the rule it
//! broke and the fix. Each job secret must be long enough to be masked reliably in the
//! job's output (see `agent::mask`).

use super::Job;
use crate::capabilities::secrets::SecretStore;
use crate::config::{DaemonConfig, JobSecretRule, Problem};
use std::collections::BTreeMap;
use std::fmt;

/// The shortest job secret (in characters, surrounding white space aside): a shorter
/// value would be masked wherever it happens to appear in output, and would show where
/// it does. The same length decides which lines of a multi-line secret are masked.
pub const MIN_JOB_SECRET_LEN: usize = 6;

/// The job secrets, with their values, and the names of the daemon's credentials (for
/// the message that refuses one).
#[derive(Default, Clone)]
pub struct JobSecrets {
    secrets: BTreeMap<String, JobSecret>,
    /// Daemon credential name -> what uses it.
    daemon: BTreeMap<String, String>,
}

#[derive(Clone)]
struct JobSecret {
    value: String,
    /// As configured, for messages.
    jobs: Vec<String>,
    patterns: Vec<glob::Pattern>,
}

impl fmt::Debug for JobSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobSecrets")
            .field("names", &self.secrets.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Why a job may not have a secret it names (a 400 at submit).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretRefusal {
    #[error(
        "job `{job}` names secret `{secret}`, which is {used_for}: a daemon credential is never given to a job; store a separate secret for the job and scope it in the controller's configuration: [job-secrets.<its name>] jobs = [\"{job}\"]"
    )]
    DaemonCredential {
        job: String,
        secret: String,
        used_for: String,
    },
    #[error(
        "job `{job}` names secret `{secret}`, which is not a job secret (a job gets only the secrets the controller's configuration scopes to it); to allow it, add to the controller's configuration:\n\n[job-secrets.{secret}]\njobs = [\"{job}\"]\n\n(a glob such as \"{job}-*\" allows several jobs) and restart the controller"
    )]
    NotAJobSecret { job: String, secret: String },
    #[error(
        "job `{job}` may not use secret `{secret}`: the rule [job-secrets.{secret}] jobs = {jobs:?} does not match `{job}`; add \"{job}\" (or a glob matching it) to that list, or use another secret"
    )]
    NotForThisJob {
        job: String,
        secret: String,
        jobs: Vec<String>,
    },
}

impl JobSecrets {
    /// The job secrets of a daemon configuration, their values from `store`. Every
    /// problem is named: a rule without a value, a value too short to mask, a value that
    /// is also a daemon credential's (under another name).
    pub fn from_config(
        cfg: &DaemonConfig,
        store: &SecretStore,
    ) -> Result<JobSecrets, Vec<Problem>> {
        Self::new(&cfg.job_secrets, store, cfg.daemon_credentials())
    }

    /// `rules` with their values from `store`; `daemon` names the daemon's credentials
    /// (name -> what uses it), which no rule may name or share a value with.
    pub fn new(
        rules: &BTreeMap<String, JobSecretRule>,
        store: &SecretStore,
        daemon: BTreeMap<String, String>,
    ) -> Result<JobSecrets, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut secrets = BTreeMap::new();
        for (name, rule) in rules {
            let field = format!("job-secrets.{name}");
            if let Some(used_for) = daemon.get(name) {
                problems.push(Problem {
                    field,
                    problem: format!(
                        "`{name}` is {used_for}: a daemon credential is never given to a job"
                    ),
                    fix: "store a separate secret for jobs and scope that one".into(),
                });
                continue;
            }
            let Some(value) = store.get(name) else {
                problems.push(Problem {
                    field,
                    problem: format!("the secrets file has no `{name}`"),
                    fix: format!("add {name} = \"...\" to the secrets file, or remove the rule"),
                });
                continue;
            };
            if value.trim().chars().count() < MIN_JOB_SECRET_LEN {
                problems.push(Problem {
                    field,
                    problem: format!(
                        "its value is shorter than {MIN_JOB_SECRET_LEN} characters: too short to be masked reliably in the job's output"
                    ),
                    fix: format!("use a longer secret (at least {MIN_JOB_SECRET_LEN} characters; a random token is best)"),
                });
                continue;
            }
            if let Some((other, used_for)) = daemon
                .iter()
                .find(|(d, _)| store.get(d).is_some_and(|v| v == value))
            {
                problems.push(Problem {
                    field,
                    problem: format!(
                        "its value is also the value of `{other}`, which is {used_for}: a daemon credential is never given to a job"
                    ),
                    fix: "give the job its own secret value".into(),
                });
                continue;
            }
            let patterns = rule
                .jobs
                .iter()
                .filter_map(|g| glob::Pattern::new(g).ok())
                .collect();
            secrets.insert(
                name.clone(),
                JobSecret {
                    value: value.to_string(),
                    jobs: rule.jobs.clone(),
                    patterns,
                },
            );
        }
        if problems.is_empty() {
            Ok(JobSecrets { secrets, daemon })
        } else {
            Err(problems)
        }
    }

    /// The environment a job's `secrets` resolve to: (variable, value) pairs, in the
    /// job's order. Refused when it names a secret it may not use.
    pub fn resolve(&self, job: &Job) -> Result<Vec<(String, String)>, SecretRefusal> {
        let mut env = Vec::new();
        for (var, name) in &job.secrets {
            let Some(s) = self.secrets.get(name) else {
                return Err(match self.daemon.get(name) {
                    Some(used_for) => SecretRefusal::DaemonCredential {
                        job: job.name.clone(),
                        secret: name.clone(),
                        used_for: used_for.clone(),
                    },
                    None => SecretRefusal::NotAJobSecret {
                        job: job.name.clone(),
                        secret: name.clone(),
                    },
                });
            };
            if !s.patterns.iter().any(|p| p.matches(&job.name)) {
                return Err(SecretRefusal::NotForThisJob {
                    job: job.name.clone(),
                    secret: name.clone(),
                    jobs: s.jobs.clone(),
                });
            }
            env.push((var.clone(), s.value.clone()));
        }
        Ok(env)
    }
}

/// Problems as one readable error (`file`: where they were found).
pub fn problems_error(file: &str, items: Vec<Problem>) -> anyhow::Error {
    anyhow::anyhow!(
        "{}",
        crate::config::Problems {
            file: file.to_string(),
            items
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> BTreeMap<String, JobSecretRule> {
        toml::from_str(text).unwrap()
    }

    fn store() -> SecretStore {
        SecretStore::from_pairs(
            [
                ("deploy-token", "d3ploy-t0ken"),
                ("agent-build-1", "agent-secret-value"),
                ("bmc-b", "bmc-password"),
                ("short", "abc12"),
                ("same-as-agent", "agent-secret-value"),
                ("pem", "-----BEGIN KEY-----\nAAAA\n-----END KEY-----\n"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    fn daemon() -> BTreeMap<String, String> {
        BTreeMap::from([
            (
                "agent-build-1".to_string(),
                "the secret of agent `build-1`".to_string(),
            ),
            (
                "bmc-b".to_string(),
                "granted to plugin `redfish-fence`".to_string(),
            ),
        ])
    }

    fn job(name: &str, secret: &str) -> Job {
        Job::parse(
            &format!(
                "name = \"{name}\"\nagent = \"a\"\nsecrets = {{ TOKEN = \"{secret}\" }}\n[[step]]\nname = \"s\"\nrun = \"true\"\n"
            ),
            "job.toml",
        )
        .unwrap()
    }

    #[test]
    fn a_job_gets_only_the_secrets_scoped_to_it() {
        let s = JobSecrets::new(
            &rules(
                "[deploy-token]\njobs = [\"deploy-*\", \"release\"]\n[pem]\njobs = [\"sign\"]\n",
            ),
            &store(),
            daemon(),
        )
        .unwrap();
        assert_eq!(
            s.resolve(&job("deploy-web", "deploy-token")).unwrap(),
            vec![("TOKEN".to_string(), "d3ploy-t0ken".to_string())]
        );
        assert!(s.resolve(&job("release", "deploy-token")).is_ok());
        assert!(s.resolve(&job("sign", "pem")).is_ok());
        let e = s.resolve(&job("build", "deploy-token")).unwrap_err();
        assert!(matches!(e, SecretRefusal::NotForThisJob { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("[job-secrets.deploy-token] jobs = [\"deploy-*\", \"release\"]"),
            "{e}"
        );
        // The daemon's own credentials, by name: refused, saying what they are.
        for credential in ["agent-build-1", "bmc-b"] {
            let e = s.resolve(&job("deploy-web", credential)).unwrap_err();
            assert!(matches!(e, SecretRefusal::DaemonCredential { .. }), "{e}");
            assert!(e.to_string().contains("never given to a job"), "{e}");
        }
        // A plain secret of the store (a config from before scoping): the error says
        // exactly what to add.
        let e = s
            .resolve(&job("build", "same-as-agent"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[job-secrets.same-as-agent]\njobs = [\"build\"]"),
            "{e}"
        );
    }

    #[test]
    fn bad_rules_are_refused_at_load_naming_the_rule() {
        let cases = [
            ("[short]\njobs = [\"*\"]\n", "shorter than 6"),
            ("[missing]\njobs = [\"*\"]\n", "has no `missing`"),
            (
                "[same-as-agent]\njobs = [\"*\"]\n",
                "also the value of `agent-build-1`",
            ),
            ("[agent-build-1]\njobs = [\"*\"]\n", "never given to a job"),
        ];
        for (text, expected) in cases {
            let p = JobSecrets::new(&rules(text), &store(), daemon()).unwrap_err();
            let all = p
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("\n");
            assert!(all.contains(expected), "{text}: {all}");
            assert!(all.contains("job-secrets."), "{all}");
        }
    }

    #[test]
    fn the_config_names_daemon_credentials_as_job_secrets_as_problems() {
        let text = r#"
            [controller]
            state-dir = "/tmp/x"
            agents = { "build-1" = "agent-build-1" }
            [plugins.redfish-fence]
            secrets = ["bmc-b"]
            [job-secrets.agent-build-1]
            jobs = ["*"]
            [job-secrets.bmc-b]
            jobs = ["*"]
            [job-secrets.deploy-token]
            jobs = []
            [job-secrets.other]
            jobs = ["[bad"]
        "#;
        let p = DaemonConfig::parse(text, "c.toml", std::path::Path::new("/"))
            .unwrap_err()
            .to_string();
        for expected in [
            "`job-secrets.agent-build-1`: `agent-build-1` is the secret of agent `build-1`",
            "`job-secrets.bmc-b`: `bmc-b` is granted to plugin `redfish-fence`",
            "`job-secrets.deploy-token.jobs`: no job may use it",
            "`job-secrets.other.jobs[0]`: `[bad` is not a glob",
        ] {
            assert!(p.contains(expected), "{expected}\n{p}");
        }
    }
}
