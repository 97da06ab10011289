//! Plugin stdout/stderr go to tracing, a line at a time, tagged with the plugin; they
//! are never inherited from the daemon. Long lines are cut, so a plugin printing
//! without newlines cannot grow the host's memory (WASI's stream in front of this
//! writer holds at most 8 KiB more). Each line must fit the plugin's output budget
//! (`runtime/output.rs`); lines over it are dropped and counted, not written.

use crate::runtime::output::{OutputBudget, OutputRate, Stream, escape_controls};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

const MAX_LINE: usize = 4096;

#[derive(Clone)]
pub struct TracingOutput {
    pub plugin: Arc<str>,
    pub stream: Stream,
    /// The plugin's output budget (shared by its instances) and its rate.
    pub budget: Arc<OutputBudget>,
    pub rate: OutputRate,
}

impl IsTerminal for TracingOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for TracingOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LineWriter {
            out: self.clone(),
            buf: Vec::new(),
        })
    }
}

struct LineWriter {
    out: TracingOutput,
    buf: Vec<u8>,
}

impl LineWriter {
    fn emit(&self, line: &[u8]) {
        let o = &self.out;
        // The newline counts too: an empty line is not free.
        if !o.budget.admit(&o.plugin, o.stream, line.len() + 1, o.rate) {
            return;
        }
        let text = String::from_utf8_lossy(line);
        let text = escape_controls(text.trim_end_matches('\r'));
        tracing::info!(target: "plugin", plugin = %o.plugin, stream = o.stream.label(), "{text}");
    }
}

impl AsyncWrite for LineWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let mut rest = data;
        while let Some(&first) = rest.first() {
            // A full line is cut before more text, or ended by its newline.
            if this.buf.len() >= MAX_LINE && first != b'\n' {
                let line = std::mem::take(&mut this.buf);
                this.emit(&line);
            }
            let room = MAX_LINE - this.buf.len();
            let look = rest.len().min(room + 1);
            match rest[..look].iter().position(|&b| b == b'\n') {
                Some(i) => {
                    this.buf.extend_from_slice(&rest[..i]);
                    let line = std::mem::take(&mut this.buf);
                    this.emit(&line);
                    rest = &rest[i + 1..];
                }
                None => {
                    let n = look.min(room);
                    this.buf.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                }
            }
        }
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.buf.is_empty() {
            let line = std::mem::take(&mut this.buf);
            this.emit(&line);
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            let line = std::mem::take(&mut self.buf);
            self.emit(&line);
        }
    }
}
