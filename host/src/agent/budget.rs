//! A job's log size limit, applied on the agent before anything crosses the link.
//!
//! Under the limit nothing changes. Past it, the stored log keeps the first half of the
//! budget (sent live) and the last half (held in a ring, sent when the run ends: the
//! tail is what people need), with a note at the cut saying what was left out. Every
//! line, masked like the stored ones, also goes to a gzip file that is kept as the
//! run's artifact `FULL_LOG`, so nothing is lost — only moved out of the log store.

use crate::protocol::{OutLine, now_ms};
use flate2::Compression;
use flate2::write::GzEncoder;
use std::collections::VecDeque;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The artifact holding the whole output of a run whose log hit its limit.
pub const FULL_LOG: &str = "trellis-full-log.txt.gz";

/// What a line costs against the budget: its bytes and a newline.
fn cost(l: &OutLine) -> u64 {
    l.text.len() as u64 + 1
}

/// A line and the step it belongs to.
pub type StepLine = (String, OutLine);

pub struct LogBudget {
    limit: u64,
    /// Budget left for the head (sent live).
    head_left: u64,
    /// The most recent lines past the head, at most `limit / 2` bytes.
    tail: VecDeque<StepLine>,
    tail_bytes: u64,
    /// Dropped from the tail ring: only in the full log.
    omitted_lines: u64,
    omitted_bytes: u64,
    cut: bool,
    full: GzEncoder<BufWriter<std::fs::File>>,
    full_path: PathBuf,
    step: Option<String>,
}

impl LogBudget {
    /// A budget of `limit` bytes; the full log is written to `<dir>/FULL_LOG`.
    pub fn new(limit: u64, dir: &Path) -> std::io::Result<LogBudget> {
        let full_path = dir.join(FULL_LOG);
        let file = std::fs::File::create(&full_path)?;
        Ok(LogBudget {
            limit,
            head_left: limit.div_ceil(2),
            tail: VecDeque::new(),
            tail_bytes: 0,
            omitted_lines: 0,
            omitted_bytes: 0,
            cut: false,
            full: GzEncoder::new(BufWriter::new(file), Compression::fast()),
            full_path,
            step: None,
        })
    }

    /// Pass one line of `step`: returns the lines to send now (the line itself while in
    /// the head; the note when the head just ran out; nothing while in the tail).
    pub fn admit(&mut self, step: &str, line: OutLine) -> std::io::Result<Vec<OutLine>> {
        if self.step.as_deref() != Some(step) {
            writeln!(self.full, "==> step {step} <==")?;
            self.step = Some(step.to_string());
        }
        self.full.write_all(line.text.as_bytes())?;
        self.full.write_all(b"\n")?;
        let c = cost(&line);
        if !self.cut && c <= self.head_left {
            self.head_left -= c;
            return Ok(vec![line]);
        }
        let mut now = Vec::new();
        if !self.cut {
            self.cut = true;
            now.push(note(format!(
                "[trellis] the log reached its limit of {} bytes: what follows is kept as the last part only, when the run ends; the whole output is in artifact `{FULL_LOG}`",
                self.limit
            )));
        }
        self.tail_bytes += c;
        self.tail.push_back((step.to_string(), line));
        while self.tail_bytes > self.limit / 2 {
            let Some((_, old)) = self.tail.pop_front() else {
                break;
            };
            self.tail_bytes -= cost(&old);
            self.omitted_lines += 1;
            self.omitted_bytes += cost(&old);
        }
        Ok(now)
    }

    /// The run ended: the tail to send (by step, in order, after a note counting what
    /// was left out), and the finished full log's path when the limit was reached
    /// (None: the stored log is whole; the file is removed).
    pub fn finish(mut self) -> std::io::Result<(Vec<StepLine>, Option<PathBuf>)> {
        self.full.flush()?;
        let file = self
            .full
            .finish()?
            .into_inner()
            .map_err(|e| e.into_error())?;
        file.sync_all()?;
        if !self.cut {
            let _ = std::fs::remove_file(&self.full_path);
            return Ok((Vec::new(), None));
        }
        let mut out = Vec::with_capacity(self.tail.len() + 1);
        if let Some((step, _)) = self.tail.front() {
            out.push((
                step.clone(),
                note(format!(
                    "[trellis] {} lines ({} bytes) left out here; they are in artifact `{FULL_LOG}`",
                    self.omitted_lines, self.omitted_bytes
                )),
            ));
        }
        out.extend(self.tail);
        Ok((out, Some(self.full_path)))
    }
}

fn note(text: String) -> OutLine {
    OutLine {
        stream: "err".into(),
        text,
        ts_ms: now_ms(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn line(i: u32) -> OutLine {
        OutLine {
            stream: "out".into(),
            text: format!("line {i:04}"), // 9 bytes + newline = 10
            ts_ms: 0,
        }
    }

    #[test]
    fn under_the_limit_nothing_changes_and_no_artifact_is_left() {
        let d = tempfile::tempdir().unwrap();
        let mut b = LogBudget::new(1000, d.path()).unwrap();
        let sent: Vec<_> = (0..50)
            .flat_map(|i| b.admit("s", line(i)).unwrap())
            .collect();
        assert_eq!(sent.len(), 50);
        let (tail, full) = b.finish().unwrap();
        assert!(tail.is_empty() && full.is_none());
        assert!(!d.path().join(FULL_LOG).exists());
    }

    #[test]
    fn over_the_limit_head_and_tail_are_kept_and_the_full_log_has_everything() {
        let d = tempfile::tempdir().unwrap();
        let mut b = LogBudget::new(200, d.path()).unwrap();
        let mut sent = Vec::new();
        for i in 0..60 {
            sent.extend(b.admit("one", line(i)).unwrap());
        }
        for i in 60..100 {
            sent.extend(b.admit("two", line(i)).unwrap());
        }
        // head: 100 bytes = 10 lines, then the note
        assert_eq!(sent.len(), 11);
        assert_eq!(sent[9].text, "line 0009");
        assert!(sent[10].text.contains("reached its limit of 200 bytes"));
        let (tail, full) = b.finish().unwrap();
        // tail: the last 100 bytes = 10 lines of step two, after a note
        assert_eq!(tail.len(), 11);
        assert!(tail[0].1.text.contains("80 lines (800 bytes) left out"));
        let texts: Vec<_> = tail[1..].iter().map(|(_, l)| l.text.clone()).collect();
        assert_eq!(
            texts,
            (90..100)
                .map(|i| format!("line {i:04}"))
                .collect::<Vec<_>>()
        );
        assert!(tail.iter().all(|(s, _)| s == "two"));
        let mut text = String::new();
        flate2::read::GzDecoder::new(std::fs::File::open(full.unwrap()).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 102); // 100 lines, 2 step headers
        assert_eq!(lines[0], "==> step one <==");
        assert_eq!(lines[61], "==> step two <==");
        assert_eq!(lines[101], "line 0099");
    }
}
