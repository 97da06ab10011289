//! `log-browser` on the host side. Failure policy: report unavailable — a failed read is
//! an error the API passes on ("log store unavailable"); nothing is made up, and a
//! finished log is never presented as complete unless the browser says so.

use crate::points::bindings::log_browser::{LogCompleteness, Page, PageRequest};
use crate::points::bindings::types::LogMetadata;
use crate::runtime::{Plugin, PluginError};
use std::sync::Arc;

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

    pub async fn read(&self, log: &LogMetadata, request: PageRequest) -> Result<Page, PluginError> {
        let p = &self.plugin;
        let (mut inst, r) = pooled_call!(p, browser, "log-browser", "read", |g, store| g
            .read(store, log, &request));
        let page = p.answer("read", r)?;
        p.check_return(&mut inst, "read", page.events.len() + page.next.len())?;
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
        p.checkin(inst);
        Ok(events)
    }

    pub async fn completeness(&self, log: &LogMetadata) -> Result<LogCompleteness, PluginError> {
        let p = &self.plugin;
        let (inst, r) = pooled_call!(p, browser, "log-browser", "completeness", |g, store| g
            .completeness(store, log));
        let c = p.answer("completeness", r)?;
        p.checkin(inst);
        Ok(c)
    }
}
