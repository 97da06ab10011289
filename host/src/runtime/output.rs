//! Output budgets: what a plugin writes to stdout and stderr and sends through the `log`
//! capability reaches the daemon's log only within a per-plugin budget of bytes and
//! lines per second, shared by all of the plugin's instances and all three streams.
//! Output over budget is dropped and counted (per stream, in `/metrics`), and one
//! summary line per interval says how much was dropped, so a flood costs the host a
//! counter update per line, not a log write.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often, at most, the drops of one plugin are summarised in the daemon's log.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// The bucket holds this many seconds of the rate: a short burst passes whole.
const BURST_SECONDS: f64 = 2.0;

/// Whatever the rate, a bucket holds at least this many bytes: one longest line fits.
const MIN_BURST_BYTES: f64 = 16.0 * 1024.0;

/// Where plugin output comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout = 0,
    Stderr = 1,
    /// `trellis:host/log` messages.
    Log = 2,
}

impl Stream {
    pub const ALL: [Stream; 3] = [Stream::Stdout, Stream::Stderr, Stream::Log];

    /// The metric label, and the name in the summary line.
    pub fn label(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
            Stream::Log => "log",
        }
    }
}

/// A plugin's output rate (from `limits.output-bytes-per-second` and
/// `limits.output-lines-per-second`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputRate {
    pub bytes_per_second: u64,
    pub lines_per_second: u64,
}

/// One plugin's output budget and drop counters (kept in its `PluginMetrics`, so every
/// instance of every generation shares it).
#[derive(Debug, Default)]
pub struct OutputBudget {
    bucket: Mutex<Option<Bucket>>,
    dropped_lines: [AtomicU64; 3],
    dropped_bytes: [AtomicU64; 3],
    /// Drops since the last summary, and whether a summary is due.
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Bucket {
    bytes: f64,
    lines: f64,
    refilled: Instant,
}

#[derive(Debug, Default)]
struct Window {
    lines: [u64; 3],
    bytes: [u64; 3],
    scheduled: bool,
}

impl OutputBudget {
    /// May a line of `bytes` bytes from `stream` go to the daemon's log? If not, it is
    /// counted as dropped, and a summary is scheduled.
    pub fn admit(
        self: &Arc<Self>,
        plugin: &Arc<str>,
        stream: Stream,
        bytes: usize,
        rate: OutputRate,
    ) -> bool {
        let cap_bytes = (rate.bytes_per_second as f64 * BURST_SECONDS).max(MIN_BURST_BYTES);
        let cap_lines = (rate.lines_per_second as f64 * BURST_SECONDS).max(1.0);
        let admitted = {
            let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let b = b.get_or_insert(Bucket {
                bytes: cap_bytes,
                lines: cap_lines,
                refilled: now,
            });
            let dt = now.duration_since(b.refilled).as_secs_f64();
            b.refilled = now;
            b.bytes = (b.bytes + dt * rate.bytes_per_second as f64).min(cap_bytes);
            b.lines = (b.lines + dt * rate.lines_per_second as f64).min(cap_lines);
            let cost = bytes as f64;
            if b.lines >= 1.0 && b.bytes >= cost {
                b.lines -= 1.0;
                b.bytes -= cost;
                true
            } else {
                false
            }
        };
        if !admitted {
            self.dropped(plugin, stream, bytes);
        }
        admitted
    }

    fn dropped(self: &Arc<Self>, plugin: &Arc<str>, stream: Stream, bytes: usize) {
        let i = stream as usize;
        self.dropped_lines[i].fetch_add(1, Relaxed);
        self.dropped_bytes[i].fetch_add(bytes as u64, Relaxed);
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        w.lines[i] += 1;
        w.bytes[i] += bytes as u64;
        if w.scheduled {
            return;
        }
        w.scheduled = true;
        drop(w);
        // The summary comes one interval after the first drop, whether or not the
        // plugin writes again. (Outside a runtime, e.g. in a tool, it is said at once.)
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let (me, plugin) = (self.clone(), plugin.clone());
                rt.spawn(async move {
                    tokio::time::sleep(SUMMARY_INTERVAL).await;
                    me.summarise(&plugin);
                });
            }
            Err(_) => self.summarise(plugin),
        }
    }

    /// Log (at `warn`) what was dropped since the last summary, in one line.
    fn summarise(&self, plugin: &str) {
        let w = std::mem::take(&mut *self.window.lock().unwrap_or_else(|p| p.into_inner()));
        let parts: Vec<String> = Stream::ALL
            .iter()
            .filter(|s| w.lines[**s as usize] > 0)
            .map(|s| {
                let what = match s {
                    Stream::Log => "log messages".to_string(),
                    s => s.label().to_string(),
                };
                format!(
                    "{} lines / {} bytes of {what}",
                    w.lines[*s as usize], w.bytes[*s as usize]
                )
            })
            .collect();
        if !parts.is_empty() {
            tracing::warn!(
                plugin = %plugin,
                "plugin {plugin}: dropped {} in the last {} s (output over limits.output-bytes-per-second / output-lines-per-second)",
                parts.join(", "),
                SUMMARY_INTERVAL.as_secs()
            );
        }
    }

    /// Lines dropped from `stream` so far.
    pub fn dropped_lines(&self, stream: Stream) -> u64 {
        self.dropped_lines[stream as usize].load(Relaxed)
    }

    /// Bytes dropped from `stream` so far.
    pub fn dropped_bytes(&self, stream: Stream) -> u64 {
        self.dropped_bytes[stream as usize].load(Relaxed)
    }
}

/// `text` with control characters (other than tab) escaped, so that plugin output
/// cannot forge log lines or send terminal escapes to whoever reads the log.
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(|c| c.is_control() && c != '\t') {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if c.is_control() && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Text a plugin returned (an error message), made fit for logs and responses: cut
/// at `max` bytes (on a character boundary, saying so) and control characters escaped.
pub fn plugin_text(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("… [truncated]");
    }
    match escape_controls(&text) {
        std::borrow::Cow::Borrowed(_) => text,
        std::borrow::Cow::Owned(o) => o,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: OutputRate = OutputRate {
        bytes_per_second: 1000,
        lines_per_second: 10,
    };

    #[test]
    fn a_burst_passes_then_lines_are_dropped_and_counted() {
        let b = Arc::new(OutputBudget::default());
        let p: Arc<str> = "p".into();
        let admitted = (0..100)
            .filter(|_| b.admit(&p, Stream::Stdout, 10, RATE))
            .count();
        // 2 s of 10 lines/s
        assert!((20..=21).contains(&admitted), "{admitted}");
        assert_eq!(b.dropped_lines(Stream::Stdout), 100 - admitted as u64);
        assert_eq!(
            b.dropped_bytes(Stream::Stdout),
            10 * (100 - admitted as u64)
        );
        assert_eq!(b.dropped_lines(Stream::Log), 0);
    }

    #[test]
    fn bytes_are_limited_too() {
        let b = Arc::new(OutputBudget::default());
        let p: Arc<str> = "p".into();
        // the bucket holds at least 16 KiB: four 4 KiB lines, not five
        let admitted = (0..10)
            .filter(|_| b.admit(&p, Stream::Log, 4096, RATE))
            .count();
        assert_eq!(admitted, 4);
        assert_eq!(b.dropped_bytes(Stream::Log), 6 * 4096);
    }

    #[test]
    fn plugin_text_is_cut_and_escaped() {
        assert_eq!(plugin_text("é".repeat(10), 5), "éé… [truncated]");
        assert_eq!(plugin_text("a\rb".into(), 100), "a\\rb");
    }

    #[test]
    fn controls_are_escaped() {
        assert_eq!(escape_controls("plain\ttext"), "plain\ttext");
        assert_eq!(
            escape_controls("a\nINFO forged\u{1b}[2J"),
            "a\\nINFO forged\\u{1b}[2J"
        );
    }
}
