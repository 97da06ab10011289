//! The HA role of `trellis controller` with `[ha]`: campaign for the leader key; the
//! winner starts serving (with the key's revision as its fencing token) and stops the
//! process the moment it may have lost the lease; the others stand by, watch the key,
//! and when it goes vacant fence the old active through its levels, and only once a
//! level confirmed, campaign. If fencing fails there is no takeover (Pacemaker's rule):
//! the standby says so loudly and tries fencing again.
//!
//! Every failover is logged with its parts, as wall-clock times so that a test or an
//! operator can line them up with the death: `vacant_at_ms` (the standby saw the key
//! gone: detection), `fenced_at_ms` (the device confirmed: fencing), `serving_at_ms`
//! (the controller serves: takeover). The same is kept in [`ClusterStatus`] for
//! `GET /api/cluster` and `/metrics`.
//!
//! The controller's own record in the shared state (`cluster/<name>.json`: role, token,
//! time) is written through the state's fencing-token gate: when it becomes active, and
//! when it steps down because its lease is lost. A controller that was paused and
//! replaced meanwhile finds that last write refused (and says so): the gate at work.

use crate::ha::fencing::{RaceDelay, Topology};
use crate::ha::leader::{Etcd, Leader, campaign, wait_vacant};
use crate::ha::status::{ClusterStatus, Failover, Role};
use crate::ha::token::StateGate;
use crate::wit::fence_agent::FenceAction;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Ha {
    pub name: String,
    pub etcd: Etcd,
    pub key: String,
    pub lease_ttl: Duration,
    pub watch_every: Duration,
    pub race: RaceDelay,
    /// Per peer name, how to fence it.
    pub fencing: HashMap<String, Topology>,
    /// The shared state directory (for this controller's record in it).
    pub state_dir: PathBuf,
    pub status: Arc<ClusterStatus>,
}

fn now_ms() -> i64 {
    crate::protocol::now_ms()
}

impl Ha {
    /// Run the role until leadership is lost (an error: the process must end, so that a
    /// replaced controller does nothing more) or `become_active` fails.
    pub async fn run<F, Fut>(self, become_active: F) -> anyhow::Result<()>
    where
        F: FnOnce(u64) -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        // A peer that held the key and is not fenced yet: no campaign before it is.
        let mut to_fence: Option<Leader> = None;
        let mut vacant_at = None;
        let mut fenced_at = None;
        loop {
            if let Some(old) = &to_fence {
                let Some(at) = self.fence(old).await else {
                    tokio::time::sleep(self.lease_ttl).await;
                    continue;
                };
                tracing::info!(peer = %old.holder, fenced_at_ms = at, "the old active is fenced");
                fenced_at = Some(at);
                to_fence = None;
            }
            match campaign(&self.etcd, &self.key, &self.name, self.lease_ttl).await {
                Ok(Some(mut lead)) => {
                    let token = lead.token;
                    tracing::info!(token, "{}: active (fencing token {token})", self.name);
                    become_active(token).await?;
                    let serving_at = now_ms();
                    let gate = StateGate::open(&self.state_dir, token)?;
                    self.record(&gate, "active", token)?;
                    let failover = vacant_at.zip(fenced_at).map(|(v, f)| Failover {
                        vacant_at_ms: v,
                        fenced_at_ms: f,
                        serving_at_ms: serving_at,
                        fencing_ms: f - v,
                        takeover_ms: serving_at - f,
                    });
                    self.status.active(token, failover);
                    tracing::info!(
                        serving_at_ms = serving_at,
                        vacant_at_ms = vacant_at.unwrap_or(serving_at),
                        "{}: serving as the active controller",
                        self.name
                    );
                    eprintln!(
                        "trellis ha: {} active, fencing token {token}, serving_at_ms={serving_at}",
                        self.name
                    );
                    lead.lost().await;
                    self.status.set_role(Role::Standby);
                    // The last write: a record that this controller stepped down. If a
                    // newer active already wrote to the state, the gate refuses it.
                    match self.record(&gate, "stepped-down", token) {
                        Ok(()) => eprintln!(
                            "trellis ha: {} stepped down (lease lost), recorded with token {token}, stepped_down_at_ms={}",
                            self.name,
                            now_ms()
                        ),
                        Err(e) => eprintln!(
                            "trellis ha: {} stepped down (lease lost); its late write was refused ({} refused), stepped_down_at_ms={}: {e}",
                            self.name,
                            gate.refused(),
                            now_ms()
                        ),
                    }
                    anyhow::bail!(
                        "{}: the leader lease is lost (or may be): stopping at once, since a standby may be fencing this node; restart to rejoin as a standby",
                        self.name
                    );
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!("cannot campaign: {e}");
                    tokio::time::sleep(self.watch_every).await;
                    continue;
                }
            }
            // Standing by.
            let last = match wait_vacant(&self.etcd, &self.key, self.watch_every).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!("cannot watch the leader key: {e}");
                    continue;
                }
            };
            let seen = now_ms();
            if let Some(old) = last.filter(|l| l.holder != self.name) {
                tracing::warn!(peer = %old.holder, vacant_at_ms = seen, "the active controller's lease expired: fencing it before taking over");
                eprintln!(
                    "trellis ha: {} saw the leader key vacant, vacant_at_ms={seen}",
                    self.name
                );
                vacant_at = Some(seen);
                fenced_at = None;
                to_fence = Some(old);
            }
        }
    }

    /// Fence `old` through its levels, after the race delay; the wall-clock time it was
    /// confirmed, or None (logged loudly: no takeover).
    async fn fence(&self, old: &Leader) -> Option<i64> {
        let started = now_ms();
        // A retry after a failure stays `not-taking-over` (and keeps its since).
        if self.status.snapshot().role == Role::Standby {
            self.status.set_role(Role::Fencing);
        }
        let Some(topology) = self.fencing.get(&old.holder) else {
            self.status.fenced(
                &old.holder,
                started,
                Err(&format!(
                    "no fencing is configured for `{}`; add [ha.fencing.{}] levels",
                    old.holder, old.holder
                )),
            );
            tracing::error!(
                peer = %old.holder,
                "NOT TAKING OVER: no fencing is configured for `{}`; add [ha.fencing.{}] levels",
                old.holder,
                old.holder
            );
            eprintln!(
                "trellis ha: NOT TAKING OVER: no fencing configured for {}",
                old.holder
            );
            return None;
        };
        tokio::time::sleep(self.race.before_fencing(true)).await;
        let t = Instant::now();
        let report = topology.fence(FenceAction::Off).await;
        self.status.set_unconfirmed(topology.unconfirmed());
        self.status.fenced(&old.holder, started, Ok(&report));
        if !report.fenced() {
            eprintln!(
                "trellis ha: NOT TAKING OVER: fencing {} failed: {}",
                old.holder,
                report.reasons()
            );
            return None;
        }
        let at = now_ms();
        eprintln!(
            "trellis ha: fenced {} at level {} in {:?}, fenced_at_ms={at}",
            old.holder,
            report.fenced_at.unwrap_or(0),
            t.elapsed()
        );
        Some(at)
    }

    /// Write this controller's record (`cluster/<name>.json`) through the state's gate.
    fn record(&self, gate: &StateGate, role: &str, token: u64) -> std::io::Result<()> {
        let dir = self.state_dir.join("cluster");
        gate.write(|| {
            std::fs::create_dir_all(&dir)?;
            let text = serde_json::json!({ "name": self.name, "role": role, "token": token, "at_ms": now_ms() });
            crate::controller::state::write_atomic(
                &dir.join(format!("{}.json", self.name)),
                text.to_string().as_bytes(),
            )
        })
    }
}
