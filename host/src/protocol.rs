//! The messages controller and agent exchange over a session (JSON in frames).
//! Orders (start, cancel) travel on the control lane, which overtakes bulk traffic;
//! step output, artifacts and step/run results on the bulk lane, in the order they
//! happened.
//!
//! A message is its JSON, optionally followed by a 0 byte and raw data (artifact
//! chunks travel as they are, not inflated by an encoding; JSON never holds a raw 0).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A message, with `data` after it when there is any.
pub fn encode<T: Serialize>(msg: &T, data: &[u8]) -> Vec<u8> {
    let mut out = serde_json::to_vec(msg).expect("serialisable");
    if !data.is_empty() {
        out.reserve(data.len() + 1);
        out.push(0);
        out.extend_from_slice(data);
    }
    out
}

/// A message and the data after it (empty when there is none).
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> serde_json::Result<(T, &[u8])> {
    let (json, data) = split(payload);
    Ok((serde_json::from_slice(json)?, data))
}

/// `decode` for the agent's messages, with a fast path for `Output`, nearly all of them.
/// serde reads an internally tagged enum through a buffered copy of the whole message
/// (it cannot know where the tag is); output messages, written by `encode` with the tag
/// first, are read straight into their fields instead: that took 40% off the
/// controller's decoding per line. Anything else takes the general path.
pub fn decode_to_controller(payload: &[u8]) -> serde_json::Result<(ToController, &[u8])> {
    #[derive(Deserialize)]
    struct Output {
        run: String,
        step: String,
        lines: Vec<OutLine>,
        #[serde(default)]
        first: u64,
    }
    if payload.starts_with(br#"{"type":"output","#) {
        let (json, data) = split(payload);
        // The tag is an unknown field to `Output`, skipped.
        let Output {
            run,
            step,
            lines,
            first,
        } = serde_json::from_slice(json)?;
        return Ok((
            ToController::Output {
                run,
                step,
                lines,
                first,
            },
            data,
        ));
    }
    decode(payload)
}

fn split(payload: &[u8]) -> (&[u8], &[u8]) {
    match payload.iter().position(|&b| b == 0) {
        Some(i) => (&payload[..i], &payload[i + 1..]),
        None => (payload, &payload[..0]),
    }
}

/// Controller -> agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ToAgent {
    StartRun(RunOrder),
    Cancel {
        run: String,
        /// As `RunOrder::token`.
        #[serde(default)]
        token: u64,
    },
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
    /// The job's log size limit in bytes (see `agent::budget`).
    #[serde(default)]
    pub log_limit: Option<u64>,
    /// Start-of-event pattern for multi-line events (see `agent::multiline`).
    #[serde(default)]
    pub multiline_start: Option<String>,
    /// Set when the run's logging method runs on the agent: the agent writes the log
    /// itself and sends the controller `Logged` counts instead of `Output`.
    #[serde(default)]
    pub agent_log: Option<AgentLog>,
    /// The ordering controller's fencing token (0: no HA): an agent that has seen a
    /// newer one refuses the order (`ha::token::CommandGate`).
    #[serde(default)]
    pub token: u64,
}

/// An agent-side log: the method to write it with, and what the log's metadata needs
/// from the controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentLog {
    pub method: String,
    pub instance_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepOrder {
    pub name: String,
    pub run: String,
    pub timeout_ms: u64,
    pub workdir: Option<String>,
    /// Globs, relative to the step's workdir, of files to keep after the step.
    #[serde(default)]
    pub artifacts: Vec<String>,
}

/// Agent -> controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ToController {
    StepStarted {
        run: String,
        step: String,
    },
    /// Lines of a step's output. The agent numbers a run's lines from 1, in the order it
    /// sends them: `first` is the number of `lines[0]`. The numbers are the log's event
    /// seqs, so a message sent again (to a restarted controller) writes the same events,
    /// which the logging method stores once. 0: not numbered (the controller counts).
    Output {
        run: String,
        step: String,
        lines: Vec<OutLine>,
        #[serde(default)]
        first: u64,
    },
    /// The run's agent-side log holds `events` events so far (stored durably on the
    /// agent; the logging method delivers them).
    Logged {
        run: String,
        events: u64,
    },
    StepFinished {
        run: String,
        step: String,
        outcome: StepOutcome,
    },
    /// A piece of an artifact's content (the message's data), in order from offset 0;
    /// the last piece carries the size and checksum of the whole.
    ArtifactChunk {
        run: String,
        /// The step that produced it (None: the run itself, e.g. the full log).
        step: Option<String>,
        /// Its path relative to the step's workdir.
        name: String,
        offset: u64,
        end: Option<ArtifactEnd>,
    },
    RunFinished {
        run: String,
        outcome: RunOutcome,
        /// How many lines the run's log has (the last `Output` line's number).
        #[serde(default)]
        lines: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactEnd {
    pub size: u64,
    /// SHA-256 of the content, hex.
    pub sha256: String,
}

impl ToController {
    /// The run a message is about.
    pub fn run(&self) -> &str {
        match self {
            ToController::StepStarted { run, .. }
            | ToController::Output { run, .. }
            | ToController::Logged { run, .. }
            | ToController::StepFinished { run, .. }
            | ToController::ArtifactChunk { run, .. }
            | ToController::RunFinished { run, .. } => run,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_after_a_message_round_trips_and_plain_json_still_reads() {
        let msg = ToController::ArtifactChunk {
            run: "r-1".into(),
            step: Some("build".into()),
            name: "out/a.bin".into(),
            offset: 0,
            end: None,
        };
        let data = [0u8, 1, 2, 0, 255];
        let wire = encode(&msg, &data);
        let (back, got): (ToController, &[u8]) = decode(&wire).unwrap();
        assert_eq!((back, got), (msg.clone(), &data[..]));
        let plain = encode(&msg, &[]);
        assert!(!plain.contains(&0), "no data, no separator");
        let (back, got): (ToController, &[u8]) = decode(&plain).unwrap();
        assert_eq!((back, got.len()), (msg, 0));
        assert!(decode::<ToController>(b"{\"type\":\"nope\"}").is_err());
    }

    #[test]
    fn the_output_fast_path_reads_what_the_general_path_reads() {
        let output = ToController::Output {
            run: "r-1".into(),
            step: "build".into(),
            lines: vec![
                OutLine {
                    stream: "out".into(),
                    text: "a \"quoted\" line\twith\u{0} escapes and ünïcode".into(),
                    ts_ms: 1_700_000_000_000,
                },
                OutLine {
                    stream: "err".into(),
                    text: String::new(),
                    ts_ms: -1,
                },
            ],
            first: 41,
        };
        let others = [
            ToController::StepStarted {
                run: "r-1".into(),
                step: "build".into(),
            },
            ToController::RunFinished {
                run: "r-1".into(),
                outcome: RunOutcome::Succeeded,
                lines: 42,
            },
        ];
        let wire = encode(&output, &[]);
        assert!(
            wire.starts_with(br#"{"type":"output","#),
            "the tag comes first"
        );
        assert_eq!(decode_to_controller(&wire).unwrap().0, output);
        assert_eq!(decode::<ToController>(&wire).unwrap().0, output);
        for m in others {
            assert_eq!(decode_to_controller(&encode(&m, &[])).unwrap().0, m);
        }
        // Tag not first (not what `encode` writes, but valid): the general path.
        let moved = br#"{"run":"r-1","step":"s","lines":[],"type":"output"}"#;
        assert!(matches!(
            decode_to_controller(moved).unwrap().0,
            ToController::Output { ref lines, .. } if lines.is_empty()
        ));
        assert!(decode_to_controller(br#"{"type":"output","run":1}"#).is_err());
    }
}
