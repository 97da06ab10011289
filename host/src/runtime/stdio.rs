//! Plugin stdout/stderr go to tracing, a line at a time, tagged with the plugin; they
//! are never inherited from the daemon. Long lines are cut, so a plugin printing
//! without newlines cannot grow the host's memory.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

const MAX_LINE: usize = 4096;

#[derive(Clone)]
pub struct TracingOutput {
    pub plugin: Arc<str>,
    pub stream: &'static str,
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
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches('\r');
        tracing::info!(target: "plugin", plugin = %self.out.plugin, stream = self.out.stream, "{text}");
    }
}

impl AsyncWrite for LineWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        for &b in data {
            if b == b'\n' {
                let line = std::mem::take(&mut this.buf);
                this.emit(&line);
            } else if this.buf.len() < MAX_LINE {
                this.buf.push(b);
            } else {
                let line = std::mem::take(&mut this.buf);
                this.emit(&line);
                this.buf.push(b);
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
