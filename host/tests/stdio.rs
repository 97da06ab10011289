//! Plugin stdout/stderr and `trellis:host/log` messages land in the host's tracing,
//! tagged with the plugin — never on the daemon's own stdout.

mod common;

use common::*;
use std::io::Write;
use std::sync::{Arc, Mutex};
use trellis::points::logging::LogWriter;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn plugin_output_goes_to_tracing_tagged_with_the_plugin() {
    let out = Captured::default();
    let sink = out.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        // One thread: everything the plugin does is seen by this thread's subscriber.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let d = tempfile::tempdir().unwrap();
            let runtime = runtime("", d.path(), &[]);
            let p = runtime.load(&fixtures().join("hostile")).await.unwrap();
            LogWriter::open(p.clone(), meta("stdout", "x"))
                .await
                .unwrap();
            LogWriter::open(p.clone(), meta("log-flood", "x"))
                .await
                .unwrap();
            // let the stdio pipe's writer task run
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        });
    });
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    let stdout_line = text
        .lines()
        .find(|l| l.contains("hostile plugin writes to stdout"))
        .unwrap_or_else(|| panic!("no stdout line in:\n{text}"));
    assert!(
        stdout_line.contains("plugin=hostile") && stdout_line.contains("stream=\"stdout\""),
        "{stdout_line}"
    );
    let stderr_line = text
        .lines()
        .find(|l| l.contains("hostile plugin writes to stderr"))
        .expect("stderr line");
    assert!(stderr_line.contains("stream=\"stderr\""), "{stderr_line}");
    let flood = text
        .lines()
        .filter(|l| l.contains("flood ") && l.contains("plugin=hostile"))
        .count();
    assert!(
        (100..=300).contains(&flood),
        "log messages should be rate-limited to the burst, got {flood}"
    );
    assert!(text.contains("suppressed") || flood < 10_000, "{text}");
}
