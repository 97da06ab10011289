//! Elasticsearch logging benchmark: events per second into OpenSearch 2.19.6 (one node
//! in-process, `common::OpenSearch`; `./scripts/setup.sh` fetches it) through the
//! `elasticsearch-logging` plugin, against a native Rust bulk writer making the same
//! requests, in the same run, on the same node.
//!
//! * **plugin**: `elasticsearch-logging` in a `trellis::runtime::Runtime`, driven through
//!   the host adapter (`points::logging::LogWriter`, unbuffered: the durable buffer is
//!   measured by the lines benchmark): `open`, one `write` per batch of B events, `close`.
//!   Its HTTP goes through the host's `wasi:http` (a connection per request).
//! * **native**: the same documents and `_bulk` bodies (`elasticsearch-store`, the crate
//!   the plugin is built from), the same per-item checks, posted with a minimal
//!   HTTP/1.1 client on `std::net::TcpStream`, a connection per request like the
//!   plugin's; the close document too.
//!
//! For each bulk size B in 100, 1000, 5000: `TRELLIS_BENCH_ES_EVENTS` events (default
//! 20,000) per round, `TRELLIS_BENCH_ROUNDS` rounds (default 5), contenders interleaved
//! and the order rotated each round, each round into an index of its own (deleted
//! after). Every round checks the server holds all its events. Medians are reported.
//!
//! The node runs on the same two cores as both writers, with a 512 MB heap: the ratio
//! says whether the plugin keeps up with a native writer against a real engine, not
//! what a production cluster could take.
//!
//!     cargo xtask bench es     (builds the bundle, then runs this in release)

#[path = "../tests/common/mod.rs"]
mod common;

use common::{OpenSearch, batch, bundle, meta, runtime};
use elasticsearch_store::Meta;
use elasticsearch_store::documents::{bulk_body, bulk_outcome, close_document, document};
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis::points::logging::LogWriter;
use trellis::runtime::Plugin;

const SIZES: [u64; 3] = [100, 1000, 5000];

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One request on a fresh connection; (status, body).
fn post(addr: &str, method: &str, path: &str, ctype: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(addr).expect("the OpenSearch node is up");
    s.set_nodelay(true).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP response");
    let status = std::str::from_utf8(&out[..split])
        .unwrap()
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, out[split + 4..].to_vec())
}

/// The native writer: what the plugin does per batch, without the sandbox.
fn native_round(addr: &str, m: &Meta, index: &str, events: u64, size: u64) {
    let mut from = 1;
    while from <= events {
        let n = size.min(events - from + 1);
        let b = batch(from, n);
        let evs = trellis_sdk::events::decode(&b).unwrap();
        let items: Vec<_> = evs
            .iter()
            .map(|e| (m.doc_id(Some(e.seq)), document(m, e)))
            .collect();
        let body = bulk_body(index, "create", &items);
        let (status, resp) = post(addr, "POST", "/_bulk", "application/x-ndjson", &body);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
        let o = bulk_outcome(&resp, items.len()).unwrap();
        assert!(o.retry.is_empty() && o.failed.is_empty(), "{o:?}");
        from += n;
    }
    let close = vec![(m.doc_id(None), close_document(m, events, 0))];
    let (status, _) = post(
        addr,
        "POST",
        "/_bulk",
        "application/x-ndjson",
        &bulk_body(index, "index", &close),
    );
    assert_eq!(status, 200);
}

async fn plugin_round(p: &Arc<Plugin>, job: &str, events: u64, size: u64) {
    let mut w = LogWriter::open(p.clone(), meta(job, "r-1")).await.unwrap();
    let mut from = 1;
    while from <= events {
        let n = size.min(events - from + 1);
        w.write(batch(from, n)).await.unwrap();
        from += n;
    }
    w.close(events).await.unwrap();
}

fn count(es: &OpenSearch, index: &str) -> u64 {
    es.count(index).unwrap_or(0)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let events = env_u64("TRELLIS_BENCH_ES_EVENTS", 20_000);
    let rounds = env_u64("TRELLIS_BENCH_ROUNDS", 5) as usize;
    let d = tempfile::tempdir().unwrap();
    let es = OpenSearch::start(d.path());
    let addr = format!("127.0.0.1:{}", es.port);
    let rt = runtime(
        &format!(
            "[plugins.elasticsearch-logging]\nhttp = [\"{url}\"]\nconfig = {{ url = \"{url}\" }}\n[plugins.elasticsearch-logging.limits]\ncall-timeout = \"60s\"\n",
            url = es.url()
        ),
        d.path(),
        &[],
    );
    let p = rt
        .load(&bundle().join("elasticsearch-logging"))
        .await
        .unwrap();
    // Warm up both (the plugin's first open installs the index template).
    plugin_round(&p, "warmup-plugin", 1000, 100).await;
    let wm = Meta {
        instance_id: "test".into(),
        loggable_type: "run".into(),
        loggable_id: "r-1".into(),
        job_id: "warmup-native".into(),
    };
    native_round(&addr, &wm, "trellis-logs-warmup-native", 1000, 100);

    println!(
        "es: {events} events a round, {rounds} rounds, medians (events/s into OpenSearch 2.19.6)"
    );
    println!("bulk size | plugin ev/s | native ev/s | plugin/native");
    for size in SIZES {
        let (mut plugin, mut native) = (vec![], vec![]);
        for round in 0..rounds {
            for which in [round % 2, (round + 1) % 2] {
                let job = format!("b{size}-r{round}-{}", ["plugin", "native"][which]);
                let index = format!("trellis-logs-{job}");
                let t = Instant::now();
                if which == 0 {
                    plugin_round(&p, &job, events, size).await;
                    plugin.push(t.elapsed());
                } else {
                    let m = Meta {
                        instance_id: "test".into(),
                        loggable_type: "run".into(),
                        loggable_id: "r-1".into(),
                        job_id: job.clone(),
                    };
                    let addr = addr.clone();
                    tokio::task::spawn_blocking(move || {
                        native_round(&addr, &m, &index, events, size)
                    })
                    .await
                    .unwrap();
                    native.push(t.elapsed());
                }
                let index = format!("trellis-logs-{job}");
                assert_eq!(count(&es, &index), events + 1, "{index}: every event, once");
                es.call("DELETE", &format!("/{index}"), "");
            }
        }
        let rate = |d: Duration| events as f64 / d.as_secs_f64();
        let (pr, nr) = (rate(median(plugin)), rate(median(native)));
        println!("{size:>9} | {pr:>11.0} | {nr:>11.0} | {:>12.2}×", pr / nr);
    }
}
