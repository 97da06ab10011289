//! The messages controller and agent exchange over a session (JSON in frames).
//! Orders (start, cancel) travel on the control lane, which overtakes bulk traffic;
//! step output and step/run results on the bulk lane, in the order they happened.

use serde::{Deserialize, Serialize};

/// Controller -> agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ToAgent {
    StartRun(RunOrder),
    Cancel { run: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunOrder {
    pub run: String,
    pub job: String,
    pub steps: Vec<StepOrder>,
    /// Job env and resolved secrets.
    pub env: Vec<(String, String)>,
    /// Values to mask in the output (the secrets' values).
    pub mask: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepOrder {
    pub name: String,
    pub run: String,
    pub timeout_ms: u64,
    pub workdir: Option<String>,
}

/// Agent -> controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ToController {
    StepStarted {
        run: String,
        step: String,
    },
    Output {
        run: String,
        step: String,
        lines: Vec<OutLine>,
    },
    StepFinished {
        run: String,
        step: String,
        outcome: StepOutcome,
    },
    RunFinished {
        run: String,
        outcome: RunOutcome,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutLine {
    /// "out" or "err".
    pub stream: String,
    pub text: String,
    pub ts_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum StepOutcome {
    Exited { code: i32 },
    Signalled { signal: i32 },
    TimedOut,
    Cancelled,
    CouldNotStart { reason: String },
}

impl StepOutcome {
    pub fn succeeded(&self) -> bool {
        *self == StepOutcome::Exited { code: 0 }
    }
}

impl From<crate::agent::exec::StepEnd> for StepOutcome {
    fn from(e: crate::agent::exec::StepEnd) -> Self {
        use crate::agent::exec::StepEnd::*;
        match e {
            Exited(code) => StepOutcome::Exited { code },
            Signalled(signal) => StepOutcome::Signalled { signal },
            TimedOut => StepOutcome::TimedOut,
            Cancelled => StepOutcome::Cancelled,
            CouldNotStart(reason) => StepOutcome::CouldNotStart { reason },
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum RunOutcome {
    Succeeded,
    Failed { step: String, outcome: StepOutcome },
    TimedOut { step: String },
    Cancelled,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
