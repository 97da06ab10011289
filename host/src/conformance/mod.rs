//! The conformance kit behind `trellis plugin test`: what each extension point's
//! contract (the WIT docs) asks of a plugin, checked against the real host runtime and
//! the same adapters the daemon uses. Each check passes or fails with the reason, so a
//! plugin author sees what to fix; nothing is skipped silently (a suite that needs
//! something it was not given says so as a failure naming the option).
//!
//! * `logging`: a logging method with the log browser that reads its store (the same
//!   plugin, or `--with`): round trip, pages and cursors, step filter, tail,
//!   completeness, at-most-once storage when the host retries, separate logs.
//! * `transport`: listen and connect on loopback, frames in order per lane with their
//!   sequence numbers, large frames, control not stuck behind bulk, a fresh link after
//!   a dropped one.
//! * `fence`: metadata, validate, and with a device (`--param`), status, off → status
//!   off, on → status on, monitor and list.

mod fence;
mod logging;
mod transport;

use crate::points::Point;
use crate::runtime::Plugin;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One check: its name, and Ok(detail) or Err(reason).
pub struct Check {
    pub name: String,
    pub result: Result<String, String>,
    pub took: Duration,
}

/// One suite's checks.
pub struct Suite {
    pub title: String,
    pub checks: Vec<Check>,
}

impl Suite {
    fn new(title: impl Into<String>) -> Suite {
        Suite {
            title: title.into(),
            checks: Vec::new(),
        }
    }

    /// Run one check (bounded: a plugin that hangs fails the check, not the kit).
    async fn check<F>(&mut self, name: &str, f: F) -> bool
    where
        F: Future<Output = Result<String, String>>,
    {
        let t = Instant::now();
        let result = match tokio::time::timeout(CHECK_TIMEOUT, f).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
        };
        let ok = result.is_ok();
        self.checks.push(Check {
            name: name.to_string(),
            result,
            took: t.elapsed(),
        });
        ok
    }

    /// A check that cannot run because an earlier one failed.
    fn blocked(&mut self, name: &str, because: &str) {
        self.checks.push(Check {
            name: name.to_string(),
            result: Err(format!("not run: {because}")),
            took: Duration::ZERO,
        });
    }

    pub fn passed(&self) -> usize {
        self.checks.iter().filter(|c| c.result.is_ok()).count()
    }

    pub fn failed(&self) -> usize {
        self.checks.len() - self.passed()
    }

    /// The readable pass/fail list.
    pub fn render(&self) -> String {
        let mut out = format!("{}\n", self.title);
        for c in &self.checks {
            let (word, text) = match &c.result {
                Ok(d) => ("PASS", d.as_str()),
                Err(r) => ("FAIL", r.as_str()),
            };
            out += &format!("  {word}  {}", c.name);
            if !text.is_empty() {
                out += &format!(": {text}");
            }
            if c.took >= Duration::from_millis(100) {
                out += &format!(" ({:.1} s)", c.took.as_secs_f64());
            }
            out.push('\n');
        }
        out
    }
}

const CHECK_TIMEOUT: Duration = Duration::from_secs(60);

/// What the kit is given besides the plugin.
#[derive(Default)]
pub struct Options {
    /// The log browser for a logging method (or the method for a browser).
    pub with: Option<Arc<Plugin>>,
    /// Fence device parameters (`--param key=value`).
    pub params: Vec<(String, String)>,
}

/// Every suite that applies to `plugin`'s extension points.
pub async fn run(plugin: Arc<Plugin>, opts: &Options) -> Vec<Suite> {
    let points = plugin.info.points();
    let partner_points = opts
        .with
        .as_ref()
        .map(|w| w.info.points())
        .unwrap_or_default();
    let mut suites = Vec::new();
    let has = |p: Point| points.contains(&p);
    if has(Point::LoggingMethod) || has(Point::LogBrowser) {
        let (method, browser) = match (has(Point::LoggingMethod), has(Point::LogBrowser)) {
            (true, true) => (Some(plugin.clone()), Some(plugin.clone())),
            (true, false) => (
                Some(plugin.clone()),
                opts.with
                    .clone()
                    .filter(|_| partner_points.contains(&Point::LogBrowser)),
            ),
            (false, _) => (
                opts.with
                    .clone()
                    .filter(|_| partner_points.contains(&Point::LoggingMethod)),
                Some(plugin.clone()),
            ),
        };
        suites.push(logging::suite(method, browser).await);
    }
    if has(Point::CommandTransport) {
        suites.push(transport::suite(plugin.clone()).await);
    }
    if has(Point::FenceAgent) {
        suites.push(fence::suite(plugin.clone(), &opts.params).await);
    }
    suites
}
