//! What an HA controller knows about itself, for `GET /api/cluster`, `trellis cluster
//! status` and `/metrics`: its role, its fencing token, the last fencing it did (each
//! device's try and the result) and the last failover's three parts. The standby
//! serves this too, so "fencing failed, not taking over" is visible where operators
//! look, not only in a log line.

use crate::ha::fencing::Report;
use crate::ha::leader::{Etcd, current, lease_ttl_left};
use crate::points::fence::FenceOutcome;
use serde::Serialize;
use std::fmt::Write;
use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Campaigning, or watching the leader key.
    Standby,
    /// The leader key went vacant: fencing its last holder.
    Fencing,
    /// Fencing failed: the controller will not take over (it retries fencing).
    NotTakingOver,
    /// Holds the leader key and serves.
    Active,
}

impl Role {
    const ALL: [Role; 4] = [
        Role::Standby,
        Role::Fencing,
        Role::NotTakingOver,
        Role::Active,
    ];

    fn name(self) -> &'static str {
        match self {
            Role::Standby => "standby",
            Role::Fencing => "fencing",
            Role::NotTakingOver => "not-taking-over",
            Role::Active => "active",
        }
    }
}

/// One device's try, as shown.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceTry {
    pub level: usize,
    pub device: String,
    pub fenced: bool,
    /// Why not, when not.
    pub reason: Option<String>,
    pub took_ms: u128,
}

/// The last fencing this controller did.
#[derive(Debug, Clone, Serialize)]
pub struct Fencing {
    pub peer: String,
    pub started_at_ms: i64,
    pub ended_at_ms: i64,
    /// The level that fenced the peer (1-based); None: fencing failed.
    pub fenced_at_level: Option<usize>,
    /// "fenced at level 1", or why not (every device's reason, or "no fencing configured").
    pub result: String,
    pub devices: Vec<DeviceTry>,
}

/// The last failover this controller made, as wall-clock times and the three parts.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Failover {
    pub vacant_at_ms: i64,
    pub fenced_at_ms: i64,
    pub serving_at_ms: i64,
    /// From seeing the key vacant to the device's confirmation (includes the race delay).
    pub fencing_ms: i64,
    /// From the confirmation to serving.
    pub takeover_ms: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub name: String,
    pub role: Role,
    pub since_ms: i64,
    /// The token this controller serves with (0 until it is active).
    pub token: u64,
    pub last_fencing: Option<Fencing>,
    pub last_failover: Option<Failover>,
    pub fencings_ok: u64,
    pub fencings_failed: u64,
    /// Devices' `ok` answers that their own status did not confirm (points/fence.rs).
    pub fencings_unconfirmed: u64,
}

pub struct ClusterStatus {
    pub etcd: Etcd,
    pub key: String,
    inner: Mutex<Snapshot>,
}

impl ClusterStatus {
    pub fn new(name: &str, etcd: Etcd, key: &str) -> ClusterStatus {
        ClusterStatus {
            etcd,
            key: key.to_string(),
            inner: Mutex::new(Snapshot {
                name: name.to_string(),
                role: Role::Standby,
                since_ms: crate::protocol::now_ms(),
                token: 0,
                last_fencing: None,
                last_failover: None,
                fencings_ok: 0,
                fencings_failed: 0,
                fencings_unconfirmed: 0,
            }),
        }
    }

    fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn snapshot(&self) -> Snapshot {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_role(&self, role: Role) {
        self.update(|s| {
            if s.role != role {
                s.role = role;
                s.since_ms = crate::protocol::now_ms();
            }
        })
    }

    pub fn active(&self, token: u64, failover: Option<Failover>) {
        self.update(|s| {
            s.token = token;
            if failover.is_some() {
                s.last_failover = failover;
            }
        });
        self.set_role(Role::Active);
    }

    /// The fence devices' unconfirmed `ok` answers so far.
    pub fn set_unconfirmed(&self, n: u64) {
        self.update(|s| s.fencings_unconfirmed = n)
    }

    /// Record a fencing's result (a report, or a reason it could not start).
    pub fn fenced(&self, peer: &str, started_at_ms: i64, report: Result<&Report, &str>) {
        let ended_at_ms = crate::protocol::now_ms();
        let fencing = match report {
            Ok(r) => Fencing {
                peer: peer.to_string(),
                started_at_ms,
                ended_at_ms,
                fenced_at_level: r.fenced_at,
                result: match r.fenced_at {
                    Some(l) => format!("fenced at level {l}"),
                    None if r.attempts.is_empty() => "no device to try".into(),
                    None => format!("not fenced: {}", r.reasons()),
                },
                devices: r
                    .attempts
                    .iter()
                    .map(|a| DeviceTry {
                        level: a.level,
                        device: a.device.clone(),
                        fenced: a.outcome == FenceOutcome::Fenced,
                        reason: match &a.outcome {
                            FenceOutcome::NotFenced { reason } => Some(reason.clone()),
                            FenceOutcome::Fenced => None,
                        },
                        took_ms: a.took.as_millis(),
                    })
                    .collect(),
            },
            Err(why) => Fencing {
                peer: peer.to_string(),
                started_at_ms,
                ended_at_ms,
                fenced_at_level: None,
                result: format!("not fenced: {why}"),
                devices: Vec::new(),
            },
        };
        let ok = fencing.fenced_at_level.is_some();
        self.update(|s| {
            if ok {
                s.fencings_ok += 1;
            } else {
                s.fencings_failed += 1;
            }
            s.last_fencing = Some(fencing);
        });
        self.set_role(if ok {
            Role::Fencing
        } else {
            Role::NotTakingOver
        });
    }

    /// The status with the leader key as etcd has it now (or why it cannot be read).
    pub async fn to_json(&self) -> serde_json::Value {
        let me = self.snapshot();
        let leader = match current(&self.etcd, &self.key).await {
            Ok(Some(l)) => serde_json::json!({
                "holder": l.holder,
                "token": l.token,
                "lease": l.lease.to_string(),
                "ttl_left_s": lease_ttl_left(&self.etcd, l.lease).await.ok(),
            }),
            Ok(None) => serde_json::json!({ "vacant": true }),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        };
        serde_json::json!({ "ha": true, "me": me, "key": self.key, "leader": leader })
    }

    /// Prometheus text for the HA parts.
    pub fn render_metrics(&self, out: &mut String) {
        let s = self.snapshot();
        out.push_str("# HELP trellis_ha_role 1 for this controller's current HA role.\n");
        out.push_str("# TYPE trellis_ha_role gauge\n");
        for r in Role::ALL {
            let _ = writeln!(
                out,
                "trellis_ha_role{{name=\"{}\",role=\"{}\"}} {}",
                s.name,
                r.name(),
                u8::from(s.role == r)
            );
        }
        out.push_str("# HELP trellis_ha_fencing_token The fencing token this controller serves with (0: not active).\n");
        out.push_str("# TYPE trellis_ha_fencing_token gauge\n");
        let _ = writeln!(out, "trellis_ha_fencing_token {}", s.token);
        out.push_str("# HELP trellis_ha_fencings_total Fencings of a peer, by result.\n");
        out.push_str("# TYPE trellis_ha_fencings_total counter\n");
        let _ = writeln!(
            out,
            "trellis_ha_fencings_total{{result=\"fenced\"}} {}",
            s.fencings_ok
        );
        let _ = writeln!(
            out,
            "trellis_ha_fencings_total{{result=\"failed\"}} {}",
            s.fencings_failed
        );
        out.push_str("# HELP trellis_ha_fencings_unconfirmed_total Fence devices' ok answers that their own status did not confirm (not fenced).\n");
        out.push_str("# TYPE trellis_ha_fencings_unconfirmed_total counter\n");
        let _ = writeln!(
            out,
            "trellis_ha_fencings_unconfirmed_total {}",
            s.fencings_unconfirmed
        );
        if let Some(f) = s.last_failover {
            out.push_str("# HELP trellis_ha_last_failover_seconds The last failover's parts (detection is measured from the death, which only an observer knows; see docs/HA.md).\n");
            out.push_str("# TYPE trellis_ha_last_failover_seconds gauge\n");
            for (part, ms) in [("fencing", f.fencing_ms), ("takeover", f.takeover_ms)] {
                let _ = writeln!(
                    out,
                    "trellis_ha_last_failover_seconds{{part=\"{part}\"}} {:.3}",
                    ms as f64 / 1000.0
                );
            }
        }
    }
}
