//! `log-browser` on the host side. Failure policy: report unavailable — a failed read is
//! an error the API passes on ("log store unavailable"); nothing is made up, and a
//! finished log is never presented as complete unless the browser says so.
//!
//! What a browser returns is untrusted data. Before anyone uses it, each answer is held
//! to the contract and refused (`PluginError::Invalid`, naming the plugin) when it is
//! not: a page has at most the events asked for and at most `MAX_PAGE_BYTES`, its
//! cursor at most `MAX_CURSOR` bytes; its events decode, in increasing seq order, of the
//! step asked for, with valid step names; a non-empty page does not hand back the cursor
//! it was given; a total is at least the page's events; an incomplete log has fewer
//! events present than expected. (Whether a cursor advances across pages is for the
//! follower to check, which knows the last seq it served: the API's follow and
//! `trellis logs` do.)

use crate::runtime::{Plugin, PluginError};
use crate::wit::log_browser::{LogCompleteness, Page, PageRequest};
use crate::wit::types::LogMetadata;
use std::sync::Arc;
use trellis_sdk::events::EventView;

/// Most bytes one page (events and cursor) may take, whatever `limits.max-return` is.
pub const MAX_PAGE_BYTES: usize = 16 << 20;
/// Longest cursor a browser may hand back: it travels in URLs.
pub const MAX_CURSOR: usize = 4096;

pub struct LogReader {
    plugin: Arc<Plugin>,
}

impl LogReader {
    pub fn new(plugin: Arc<Plugin>) -> Result<LogReader, PluginError> {
        if !plugin
            .info
            .points()
            .contains(&crate::points::Point::LogBrowser)
        {
            return Err(plugin.not_implemented("log-browser"));
        }
        Ok(LogReader { plugin })
    }

    /// The browser plugin's name.
    pub fn name(&self) -> &str {
        &self.plugin.name
    }

    /// A refused answer: counted, logged, and typed (the instance is not reused).
    pub fn invalid(&self, call: &'static str, problem: String) -> PluginError {
        self.plugin.invalid(call, problem)
    }

    pub async fn read(&self, log: &LogMetadata, request: PageRequest) -> Result<Page, PluginError> {
        let p = &self.plugin;
        let (mut inst, r) = pooled_call!(p, browser, "log-browser", "read", |g, store| g
            .read(store, log, &request));
        let page = p.answer("read", r)?;
        p.check_return(&mut inst, "read", page.events.len() + page.next.len())?;
        check_page(&request, &page).map_err(|problem| self.invalid("read", problem))?;
        p.checkin(inst);
        Ok(page)
    }

    pub async fn tail(
        &self,
        log: &LogMetadata,
        step: Option<String>,
        count: u32,
    ) -> Result<Vec<u8>, PluginError> {
        let p = &self.plugin;
        let (mut inst, r) = pooled_call!(p, browser, "log-browser", "tail", |g, store| g.tail(
            store,
            log,
            step.as_deref(),
            count
        ));
        let events = p.answer("tail", r)?;
        p.check_return(&mut inst, "tail", events.len())?;
        check_events(&events, step.as_deref(), count)
            .map_err(|problem| self.invalid("tail", problem))?;
        p.checkin(inst);
        Ok(events)
    }

    pub async fn completeness(&self, log: &LogMetadata) -> Result<LogCompleteness, PluginError> {
        let p = &self.plugin;
        let (inst, r) = pooled_call!(p, browser, "log-browser", "completeness", |g, store| g
            .completeness(store, log));
        let c = p.answer("completeness", r)?;
        if let LogCompleteness::Incomplete(m) = &c
            && m.present >= m.expected
        {
            return Err(self.invalid(
                "completeness",
                format!(
                    "`incomplete` with {} of {} events present: with all present the log is `complete`",
                    m.present, m.expected
                ),
            ));
        }
        p.checkin(inst);
        Ok(c)
    }
}

/// A page held to the contract (see the module's doc).
fn check_page(request: &PageRequest, page: &Page) -> Result<(), String> {
    let size = page.events.len() + page.next.len();
    if size > MAX_PAGE_BYTES {
        return Err(format!(
            "a page of {size} bytes, above the host's cap of {MAX_PAGE_BYTES} (return fewer events per page)"
        ));
    }
    if page.next.len() > MAX_CURSOR {
        return Err(format!(
            "a cursor of {} bytes, above the host's cap of {MAX_CURSOR}",
            page.next.len()
        ));
    }
    let n = check_events(&page.events, request.step.as_deref(), request.limit)?;
    if n > 0 && request.cursor.as_deref() == Some(page.next.as_str()) {
        return Err(
            "a page of events with the cursor it was given as the next one: the cursor does not advance"
                .into(),
        );
    }
    if let Some(total) = page.total
        && total < n as u64
    {
        return Err(format!("a total of {total} events for a page holding {n}"));
    }
    Ok(())
}

/// Check an event batch from a browser: it decodes, holds at most `limit` events in
/// increasing seq order (from 1), of `step` when one was asked for, with valid step
/// names. Returns how many events it holds.
fn check_events(buf: &[u8], step: Option<&str>, limit: u32) -> Result<usize, String> {
    let events = trellis_sdk::events::decode(buf)
        .map_err(|e| format!("an event batch that does not decode: {e}"))?;
    if events.len() > limit as usize {
        return Err(format!(
            "{} events where at most {limit} were asked for",
            events.len()
        ));
    }
    let mut last = 0;
    for e in &events {
        check_event(e, last, step)?;
        last = e.seq;
    }
    Ok(events.len())
}

fn check_event(e: &EventView<'_>, last: u64, step: Option<&str>) -> Result<(), String> {
    if e.seq <= last {
        return Err(format!(
            "event seq {} after seq {last}: seqs must increase (from 1)",
            e.seq
        ));
    }
    if !e.step.is_empty() && !crate::ids::is_id(e.step) {
        return Err(format!(
            "an event of step `{}`, which is not a valid step name",
            crate::ids::Shown(e.step)
        ));
    }
    if let Some(s) = step
        && e.step != s
    {
        return Err(format!(
            "an event of step `{}` in a page of step `{s}`",
            crate::ids::Shown(e.step)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_sdk::events::BatchBuilder;

    fn batch(events: &[(u64, &str)]) -> Vec<u8> {
        let mut b = BatchBuilder::new();
        for (seq, step) in events {
            b.push(*seq, 0, step, "m", &[]);
        }
        b.finish()
    }

    fn request(cursor: Option<&str>, step: Option<&str>, limit: u32) -> PageRequest {
        PageRequest {
            step: step.map(str::to_string),
            cursor: cursor.map(str::to_string),
            limit,
        }
    }

    fn page(events: Vec<u8>, next: &str, total: Option<u64>) -> Page {
        Page {
            events,
            next: next.into(),
            total,
        }
    }

    #[test]
    fn a_page_is_held_to_the_contract() {
        let ok = page(batch(&[(1, "a"), (2, "b")]), "2", Some(2));
        assert_eq!(check_page(&request(None, None, 10), &ok), Ok(()));
        // an empty page may keep its cursor (caught up)
        let caught_up = page(batch(&[]), "2", Some(2));
        assert_eq!(
            check_page(&request(Some("2"), None, 10), &caught_up),
            Ok(())
        );
        let cases = [
            (request(None, None, 1), ok.clone(), "at most 1"),
            (
                request(Some("2"), None, 10),
                page(batch(&[(3, "a")]), "2", None),
                "does not advance",
            ),
            (
                request(None, None, 10),
                page(batch(&[(2, "a"), (2, "a")]), "x", None),
                "must increase",
            ),
            (
                request(None, None, 10),
                page(batch(&[(0, "a")]), "x", None),
                "must increase",
            ),
            (
                request(None, Some("a"), 10),
                ok.clone(),
                "of step `b` in a page of step `a`",
            ),
            (
                request(None, None, 10),
                page(batch(&[(1, "../x")]), "x", None),
                "not a valid step name",
            ),
            (
                request(None, None, 10),
                page(batch(&[(1, "a\n")]), "x", None),
                "not a valid step name",
            ),
            (
                request(None, None, 10),
                page(batch(&[(1, "a")]), "x", Some(0)),
                "a total of 0",
            ),
            (
                request(None, None, 10),
                page(vec![1, 2, 3], "x", None),
                "does not decode",
            ),
            (
                request(None, None, 10),
                page(batch(&[]), &"c".repeat(MAX_CURSOR + 1), None),
                "cursor of 4097 bytes",
            ),
            (
                request(None, None, 10),
                page(vec![0; MAX_PAGE_BYTES], "x", None),
                "above the host's cap",
            ),
        ];
        for (req, pg, want) in cases {
            let err = check_page(&req, &pg).unwrap_err();
            assert!(err.contains(want), "{err} (wanted: {want})");
        }
    }
}
