//! Multi-line events: with a start-of-event pattern (as log shippers have: Filebeat's
//! `multiline.pattern`, Fluent Bit's `multiline.parser`), a line that does not match it
//! continues the event before it, so a stack trace stays one event whose message keeps
//! its line breaks. Without a pattern every line is its own event.
//!
//! Applied on the agent, per step and per stream (stdout and stderr interleave freely,
//! an event never mixes them), before the log size limit. An event is held until the
//! next start line, the end of the step, a quiet spell (`QUIET`: a trace printed just
//! before a long pause shows up without waiting for the next line) or `MAX_EVENT` bytes.

use crate::protocol::OutLine;
use regex::Regex;
use std::time::Duration;

/// A held event goes out after this long without another line on its stream.
pub const QUIET: Duration = Duration::from_millis(300);

/// An event grows to at most this many bytes; the next line then starts a new one.
pub const MAX_EVENT: usize = 256 << 10;

pub struct MultiLine {
    start: Regex,
    /// The event being put together, per stream ("out", "err").
    held: Vec<OutLine>,
}

impl MultiLine {
    pub fn new(start: Regex) -> MultiLine {
        MultiLine {
            start,
            held: Vec::new(),
        }
    }

    /// Take one line; events that are complete now go to `done`, in order.
    pub fn push(&mut self, line: OutLine, done: &mut Vec<OutLine>) {
        let at = self.held.iter().position(|h| h.stream == line.stream);
        match at {
            Some(i)
                if !self.start.is_match(&line.text)
                    && self.held[i].text.len() + 1 + line.text.len() <= MAX_EVENT =>
            {
                let h = &mut self.held[i];
                h.text.push('\n');
                h.text.push_str(&line.text);
            }
            Some(i) => {
                // Held events go out in the order they started.
                done.push(self.held.remove(i));
                self.held.push(line);
            }
            None => self.held.push(line),
        }
    }

    /// Whether an event is held (then wait at most `QUIET` for the next line).
    pub fn holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// Everything held goes out (the step ended, or it went quiet).
    pub fn flush(&mut self, done: &mut Vec<OutLine>) {
        done.append(&mut self.held);
    }
}

/// Check a pattern from a job or the config; the error names the fix.
pub fn compile(pattern: &str) -> Result<Regex, String> {
    Regex::new(pattern).map_err(|e| {
        format!("`{pattern}` is not a valid regular expression (Rust `regex` syntax): {e}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(stream: &str, text: &str) -> OutLine {
        OutLine {
            stream: stream.into(),
            text: text.into(),
            ts_ms: 0,
        }
    }

    fn texts(v: &[OutLine]) -> Vec<&str> {
        v.iter().map(|o| o.text.as_str()).collect()
    }

    #[test]
    fn a_stack_trace_stays_one_event_with_its_line_breaks() {
        let mut m = MultiLine::new(compile(r"^\S").unwrap());
        let mut done = Vec::new();
        for t in [
            "starting",
            "Exception in thread \"main\" java.lang.IllegalStateException: boom",
            "\tat com.example.App.run(App.java:42)",
            "\tat com.example.App.main(App.java:7)",
            "done",
        ] {
            m.push(l("out", t), &mut done);
        }
        assert!(m.holding());
        m.flush(&mut done);
        assert_eq!(
            texts(&done),
            [
                "starting",
                "Exception in thread \"main\" java.lang.IllegalStateException: boom\n\tat com.example.App.run(App.java:42)\n\tat com.example.App.main(App.java:7)",
                "done"
            ]
        );
        assert!(!m.holding());
    }

    #[test]
    fn streams_never_mix_and_each_keeps_its_order() {
        let mut m = MultiLine::new(compile(r"^\S").unwrap());
        let mut done = Vec::new();
        m.push(l("out", "o1"), &mut done);
        m.push(l("err", "e1"), &mut done);
        m.push(l("out", "  o1 more"), &mut done);
        m.push(l("err", "  e1 more"), &mut done);
        m.push(l("out", "o2"), &mut done);
        m.flush(&mut done);
        assert_eq!(texts(&done), ["o1\n  o1 more", "e1\n  e1 more", "o2"]);
        assert_eq!(done[1].stream, "err");
    }

    #[test]
    fn an_event_stops_growing_at_the_cap() {
        let mut m = MultiLine::new(compile(r"^START").unwrap());
        let mut done = Vec::new();
        let chunk = "x".repeat(100 << 10);
        for _ in 0..4 {
            m.push(l("out", &chunk), &mut done);
        }
        m.flush(&mut done);
        assert!(done.iter().all(|e| e.text.len() <= MAX_EVENT));
        assert_eq!(
            done.iter().map(|e| e.text.len()).sum::<usize>(),
            4 * (100 << 10) + 2
        );
    }

    #[test]
    fn a_bad_pattern_is_an_error_naming_it() {
        let e = compile("(unclosed").unwrap_err();
        assert!(
            e.contains("`(unclosed` is not a valid regular expression"),
            "{e}"
        );
    }
}
