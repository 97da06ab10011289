//! Leadership on etcd: the active controller is whoever holds the leader key, which is
//! attached to a lease it keeps alive. Nothing here is a consensus protocol of our own:
//! etcd decides (a transaction that creates the key only if it does not exist), and the
//! key's creation revision is the fencing token (it grows with every change of leader;
//! see `ha::token`).
//!
//! etcd v3 is reached through its JSON gateway (`/v3/kv/txn`, `/v3/lease/grant`, ...;
//! served by etcd itself on the client port since 3.3): plain HTTP/1.1 with the hyper
//! client the host already has, so no gRPC stack or `protoc` at build time. Bytes are
//! base64 and 64-bit numbers are strings in that JSON, as the gateway's protobuf
//! mapping says. Each call tries the configured endpoints in turn, so one member down
//! is no outage (a quorum of the rest still answers).
//!
//! * [`campaign`]: one attempt to become leader; `Some(Leadership)` if this process now
//!   holds the key. A background task keeps the lease alive every third of its TTL; if
//!   it cannot for a whole TTL, [`Leadership::lost`] fires and the holder must stop
//!   acting as active at once (its lease may have expired; the standby may be fencing
//!   it already).
//! * [`wait_vacant`]: the standby's watch: returns once the key is gone (the lease
//!   expired or was revoked), with the last holder it saw (whom to fence).

use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long one call to one etcd member may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("no etcd endpoint answered ({0})")]
    Unreachable(String),
    #[error("etcd answered {path} with HTTP {status}: {body}")]
    Refused {
        path: String,
        status: u16,
        body: String,
    },
    #[error("etcd's answer to {path} is not what its API documents: {why}")]
    Unexpected { path: String, why: String },
}

/// An etcd cluster, by its members' client addresses (`127.0.0.1:2379`).
#[derive(Debug, Clone)]
pub struct Etcd {
    endpoints: Vec<String>,
}

impl Etcd {
    pub fn new(endpoints: Vec<String>) -> Etcd {
        Etcd { endpoints }
    }

    /// POST `body` to `path` on the first member that answers.
    async fn call(&self, path: &str, body: Value) -> Result<Value, EtcdError> {
        let body = body.to_string();
        let mut tried = Vec::new();
        for ep in &self.endpoints {
            match tokio::time::timeout(CALL_TIMEOUT, post(ep, path, &body)).await {
                Ok(Ok((200, text))) => {
                    return serde_json::from_slice(&text).map_err(|e| EtcdError::Unexpected {
                        path: path.into(),
                        why: e.to_string(),
                    });
                }
                Ok(Ok((status, text))) => {
                    let body = String::from_utf8_lossy(&text).into_owned();
                    // A member without quorum answers 503: another may do better.
                    if status >= 500 {
                        tried.push(format!("{ep}: HTTP {status} {body}"));
                        continue;
                    }
                    return Err(EtcdError::Refused {
                        path: path.into(),
                        status,
                        body,
                    });
                }
                Ok(Err(e)) => tried.push(format!("{ep}: {e}")),
                Err(_) => tried.push(format!("{ep}: no answer within {CALL_TIMEOUT:?}")),
            }
        }
        Err(EtcdError::Unreachable(tried.join("; ")))
    }
}

/// One HTTP/1.1 POST on a fresh connection; (status, body).
async fn post(addr: &str, path: &str, body: &str) -> std::io::Result<(u16, Vec<u8>)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(wasmtime_wasi_http::io::TokioIo::new(tcp))
            .await
            .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    let req = http::Request::post(path)
        .header("host", addr)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .map_err(std::io::Error::other)?;
    let res = sender
        .send_request(req)
        .await
        .map_err(std::io::Error::other)?;
    let status = res.status().as_u16();
    let bytes = res
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok((status, bytes.to_vec()))
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

/// A 64-bit number as the gateway writes it (a string), or a plain JSON number.
fn number(v: &Value) -> Option<i64> {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| v.as_i64())
}

/// Who holds the leader key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    /// The holder's name (the key's value).
    pub holder: String,
    /// Its fencing token (the key's creation revision).
    pub token: u64,
    /// The lease the key is attached to.
    pub lease: i64,
}

/// The current leader, if any.
pub async fn current(etcd: &Etcd, key: &str) -> Result<Option<Leader>, EtcdError> {
    let r = etcd
        .call("/v3/kv/range", json!({ "key": b64(key.as_bytes()) }))
        .await?;
    Ok(leader_of(&r["kvs"]))
}

fn leader_of(kvs: &Value) -> Option<Leader> {
    let kv = kvs.as_array()?.first()?;
    Some(Leader {
        holder: String::from_utf8_lossy(&unb64(kv["value"].as_str().unwrap_or(""))?).into_owned(),
        token: number(&kv["create_revision"])? as u64,
        lease: number(&kv["lease"]).unwrap_or(0),
    })
}

/// Whole seconds left on a lease as etcd counts them (-1: expired; etcd omits a 0).
pub async fn lease_ttl_left(etcd: &Etcd, lease: i64) -> Result<i64, EtcdError> {
    let r = etcd
        .call("/v3/lease/timetolive", json!({ "ID": lease.to_string() }))
        .await?;
    Ok(number(&r["TTL"]).unwrap_or(0))
}

/// Holding the leader key. Dropping it stops the keepalive (the lease then expires);
/// [`Leadership::resign`] gives the key up at once.
pub struct Leadership {
    pub token: u64,
    lease: i64,
    etcd: Etcd,
    lost: watch::Receiver<bool>,
    keepalive: tokio::task::JoinHandle<()>,
}

impl Leadership {
    /// Resolves when leadership is lost (or may be): the holder must stop acting.
    pub async fn lost(&mut self) {
        while !*self.lost.borrow() {
            if self.lost.changed().await.is_err() {
                return;
            }
        }
    }

    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Give the key up now (revoking the lease deletes it): a clean handover.
    pub async fn resign(self) -> Result<(), EtcdError> {
        self.keepalive.abort();
        self.etcd
            .call("/v3/lease/revoke", json!({ "ID": self.lease.to_string() }))
            .await
            .map(|_| ())
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.keepalive.abort();
    }
}

/// One attempt to become leader as `me`, with a lease of `ttl`: `Some` if this
/// process now holds `key`, `None` if another does.
pub async fn campaign(
    etcd: &Etcd,
    key: &str,
    me: &str,
    ttl: Duration,
) -> Result<Option<Leadership>, EtcdError> {
    let ttl_s = ttl.as_secs().max(1);
    let granted_at = Instant::now();
    let grant = etcd
        .call("/v3/lease/grant", json!({ "TTL": ttl_s.to_string() }))
        .await?;
    let lease = number(&grant["ID"]).ok_or_else(|| EtcdError::Unexpected {
        path: "/v3/lease/grant".into(),
        why: format!("no lease ID in {grant}"),
    })?;
    let k = b64(key.as_bytes());
    let txn = json!({
        "compare": [{ "key": k, "target": "CREATE", "create_revision": "0" }],
        "success": [{ "request_put": { "key": k, "value": b64(me.as_bytes()), "lease": lease.to_string() } }],
        "failure": [{ "request_range": { "key": k } }],
    });
    let r = etcd.call("/v3/kv/txn", txn).await?;
    if r["succeeded"].as_bool() != Some(true) {
        // Someone else holds it: our lease is of no use.
        let _ = etcd
            .call("/v3/lease/revoke", json!({ "ID": lease.to_string() }))
            .await;
        return Ok(None);
    }
    let token = number(&r["header"]["revision"]).ok_or_else(|| EtcdError::Unexpected {
        path: "/v3/kv/txn".into(),
        why: format!("no revision in {r}"),
    })? as u64;
    let (tx, lost) = watch::channel(false);
    let keepalive = tokio::spawn(keep_alive(
        etcd.clone(),
        lease,
        Duration::from_secs(ttl_s),
        granted_at,
        tx,
    ));
    Ok(Some(Leadership {
        token,
        lease,
        etcd: etcd.clone(),
        lost,
        keepalive,
    }))
}

/// Renew the lease every third of its TTL. The lease is good until a TTL after the
/// last renewal etcd acknowledged, counted from when that renewal was *sent* (so never
/// later than etcd's own expiry); at that moment leadership is lost, even if a renewal
/// is still hanging on a partitioned network. A process that was paused wakes past
/// that moment and learns it at once.
async fn keep_alive(
    etcd: Etcd,
    lease: i64,
    ttl: Duration,
    granted_at: Instant,
    lost: watch::Sender<bool>,
) {
    let mut good_until = granted_at + ttl;
    loop {
        tokio::time::sleep(ttl / 3).await;
        let sent = Instant::now();
        let renew = etcd.call("/v3/lease/keepalive", json!({ "ID": lease.to_string() }));
        match tokio::time::timeout_at(good_until.into(), renew).await {
            Ok(Ok(r)) => {
                let left = number(&r["result"]["TTL"]).unwrap_or(0);
                if left <= 0 {
                    tracing::error!("the leader lease expired: no longer active");
                    let _ = lost.send(true);
                    return;
                }
                good_until = sent + Duration::from_secs(left as u64);
            }
            Ok(Err(e)) if Instant::now() < good_until => {
                tracing::warn!("cannot renew the leader lease (retrying): {e}");
            }
            Ok(Err(_)) | Err(_) => {
                tracing::error!(
                    "the leader lease was not renewed within its TTL ({ttl:?}): no longer active"
                );
                let _ = lost.send(true);
                return;
            }
        }
    }
}

/// The standby's watch: poll the key every `poll` until it is gone; the last holder
/// seen (None if it was vacant from the start).
pub async fn wait_vacant(
    etcd: &Etcd,
    key: &str,
    poll: Duration,
) -> Result<Option<Leader>, EtcdError> {
    let mut last = None;
    loop {
        match current(etcd, key).await {
            Ok(Some(l)) => last = Some(l),
            Ok(None) => return Ok(last),
            Err(e) => tracing::warn!("cannot read the leader key: {e}"),
        }
        tokio::time::sleep(poll).await;
    }
}
