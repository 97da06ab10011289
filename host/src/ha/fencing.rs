//! Fencing a peer before taking over: Pacemaker's fencing topology and its race delay.
//!
//! * **Levels** ([`Topology`]): each level is a list of devices (e.g. level 1 the
//!   node's Redfish BMC, level 2 cutting its storage access). Levels are tried in
//!   order; within a level every device must confirm, in order, or the level has
//!   failed and the next is tried. The peer counts as fenced only once a whole level
//!   succeeded. Nothing else does: no level, or every level failed, is "not fenced",
//!   and the caller must not take over (Pacemaker's rule).
//! * **Race delay** ([`RaceDelay`]): in a two-node partition both sides may try to fence
//!   each other at once, and with a fast device both could die. As Pacemaker's
//!   `pcmk_delay_base`/`pcmk_delay_max` (and `priority-fencing-delay`), fencing the node
//!   that held the active role waits a fixed plus a random delay, while fencing the
//!   standby does not: the active side shoots first and survives.

use crate::points::fence::{FenceDevice, FenceOutcome};
use crate::wit::fence_agent::FenceAction;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

/// Something that can fence one target (a configured fence device, in tests a model).
pub trait Fencer: Send + Sync {
    fn fence(&self, action: FenceAction)
    -> Pin<Box<dyn Future<Output = FenceOutcome> + Send + '_>>;

    /// How many of its `ok` answers its own status did not confirm so far.
    fn unconfirmed(&self) -> u64 {
        0
    }
}

impl Fencer for FenceDevice {
    fn fence(
        &self,
        action: FenceAction,
    ) -> Pin<Box<dyn Future<Output = FenceOutcome> + Send + '_>> {
        Box::pin(FenceDevice::fence(self, action))
    }

    fn unconfirmed(&self) -> u64 {
        FenceDevice::unconfirmed(self)
    }
}

/// One device of a level, named for reports.
pub struct Device {
    pub name: String,
    pub fencer: Box<dyn Fencer>,
}

/// The levels of devices that can fence one target, tried in order.
pub struct Topology {
    pub levels: Vec<Vec<Device>>,
}

/// One device's try.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// 1-based, as Pacemaker numbers levels.
    pub level: usize,
    pub device: String,
    pub outcome: FenceOutcome,
    pub took: Duration,
}

/// What fencing did.
#[derive(Debug, Clone)]
pub struct Report {
    /// The level that fenced the target (1-based); None: not fenced.
    pub fenced_at: Option<usize>,
    pub attempts: Vec<Attempt>,
    pub took: Duration,
}

impl Report {
    pub fn fenced(&self) -> bool {
        self.fenced_at.is_some()
    }

    /// Why not, device by device (for the log, the metric's labels and the API).
    pub fn reasons(&self) -> String {
        self.attempts
            .iter()
            .filter_map(|a| match &a.outcome {
                FenceOutcome::NotFenced { reason } => {
                    Some(format!("level {} `{}`: {reason}", a.level, a.device))
                }
                FenceOutcome::Fenced => None,
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

impl Topology {
    /// Its devices' unconfirmed `ok` answers so far.
    pub fn unconfirmed(&self) -> u64 {
        self.levels
            .iter()
            .flatten()
            .map(|d| d.fencer.unconfirmed())
            .sum()
    }

    /// Fence the target: level by level until one fully succeeds.
    pub async fn fence(&self, action: FenceAction) -> Report {
        let start = Instant::now();
        let mut attempts = Vec::new();
        for (i, level) in self.levels.iter().enumerate() {
            let mut whole = !level.is_empty();
            for d in level {
                let t = Instant::now();
                let outcome = d.fencer.fence(action).await;
                let ok = outcome == FenceOutcome::Fenced;
                attempts.push(Attempt {
                    level: i + 1,
                    device: d.name.clone(),
                    outcome,
                    took: t.elapsed(),
                });
                if !ok {
                    whole = false;
                    break;
                }
            }
            if whole {
                return Report {
                    fenced_at: Some(i + 1),
                    attempts,
                    took: start.elapsed(),
                };
            }
            tracing::warn!(level = i + 1, "fencing level failed; trying the next");
        }
        let report = Report {
            fenced_at: None,
            attempts,
            took: start.elapsed(),
        };
        tracing::error!(
            "NOT FENCED: no fencing level succeeded ({}); no takeover without fencing",
            report.reasons()
        );
        report
    }
}

/// The delay before fencing a peer, to settle a race in a two-node partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaceDelay {
    /// Always waited before fencing the node that held the active role.
    pub base: Duration,
    /// Up to this much more, at random (0: none).
    pub max: Duration,
}

impl RaceDelay {
    /// How long to wait before fencing a target that `held_active` (or not).
    pub fn before_fencing(&self, target_held_active: bool) -> Duration {
        if !target_held_active {
            return Duration::ZERO;
        }
        let jitter = if self.max.is_zero() {
            Duration::ZERO
        } else {
            let mut b = [0u8; 8];
            random_bytes(&mut b);
            self.max
                .mul_f64((u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64)
        };
        self.base + jitter
    }
}

fn random_bytes(buf: &mut [u8]) {
    // The session's nonce source (OS randomness).
    let n = crate::session::auth::nonce();
    for (b, r) in buf.iter_mut().zip(n.iter()) {
        *b = *r;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Fixed(FenceOutcome);
    impl Fencer for Fixed {
        fn fence(&self, _: FenceAction) -> Pin<Box<dyn Future<Output = FenceOutcome> + Send + '_>> {
            let o = self.0.clone();
            Box::pin(async move { o })
        }
    }
    fn ok(name: &str) -> Device {
        Device {
            name: name.into(),
            fencer: Box::new(Fixed(FenceOutcome::Fenced)),
        }
    }
    fn fails(name: &str) -> Device {
        Device {
            name: name.into(),
            fencer: Box::new(Fixed(FenceOutcome::NotFenced {
                reason: format!("{name} unreachable"),
            })),
        }
    }

    #[tokio::test]
    async fn a_level_counts_only_when_every_device_in_it_confirmed() {
        let t = Topology {
            levels: vec![vec![ok("bmc-a"), fails("bmc-b")], vec![ok("storage")]],
        };
        let r = t.fence(FenceAction::Off).await;
        assert_eq!(r.fenced_at, Some(2));
        let tried: Vec<_> = r
            .attempts
            .iter()
            .map(|a| (a.level, a.device.as_str()))
            .collect();
        assert_eq!(tried, [(1, "bmc-a"), (1, "bmc-b"), (2, "storage")]);

        let t = Topology {
            levels: vec![vec![fails("bmc")], vec![fails("storage")]],
        };
        let r = t.fence(FenceAction::Off).await;
        assert!(!r.fenced());
        assert_eq!(
            r.reasons(),
            "level 1 `bmc`: bmc unreachable; level 2 `storage`: storage unreachable"
        );
        let none = Topology {
            levels: vec![vec![]],
        };
        assert!(
            !none.fence(FenceAction::Off).await.fenced(),
            "an empty level fences nothing"
        );
    }

    #[test]
    fn only_fencing_the_active_node_waits() {
        let d = RaceDelay {
            base: Duration::from_millis(500),
            max: Duration::from_millis(200),
        };
        assert_eq!(d.before_fencing(false), Duration::ZERO);
        for _ in 0..50 {
            let w = d.before_fencing(true);
            assert!(
                w >= Duration::from_millis(500) && w < Duration::from_millis(700),
                "{w:?}"
            );
        }
    }

    /// A node in a model of a two-node partition: powered or not. Its "device" (the
    /// peer's BMC) powers the peer off after a device time; a node that is off does
    /// nothing more (its process is gone).
    struct Node {
        on: AtomicBool,
    }

    struct Bmc {
        target: Arc<Node>,
        requester: Arc<Node>,
        device_time: Duration,
    }
    impl Fencer for Bmc {
        fn fence(&self, _: FenceAction) -> Pin<Box<dyn Future<Output = FenceOutcome> + Send + '_>> {
            Box::pin(async move {
                if !self.requester.on.load(Ordering::SeqCst) {
                    return FenceOutcome::NotFenced {
                        reason: "the requester is off".into(),
                    };
                }
                tokio::time::sleep(self.device_time).await;
                self.target.on.store(false, Ordering::SeqCst);
                FenceOutcome::Fenced
            })
        }
    }

    /// Each side of a partition fences the other at the same moment, 20 times, with
    /// device times of 50-250 ms: with the race delay exactly one node is left on, and
    /// it is the one that held the active role. Without it both die.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn in_a_partition_exactly_one_node_survives_and_it_is_the_active_one() {
        async fn race(delay: RaceDelay, device_time: Duration) -> (bool, bool) {
            let active = Arc::new(Node {
                on: AtomicBool::new(true),
            });
            let standby = Arc::new(Node {
                on: AtomicBool::new(true),
            });
            let side = |me: Arc<Node>, peer: Arc<Node>, peer_held_active: bool| async move {
                tokio::time::sleep(delay.before_fencing(peer_held_active)).await;
                if !me.on.load(Ordering::SeqCst) {
                    return; // fenced while waiting: nothing runs on a node that is off
                }
                let t = Topology {
                    levels: vec![vec![Device {
                        name: "bmc".into(),
                        fencer: Box::new(Bmc {
                            target: peer,
                            requester: me,
                            device_time,
                        }),
                    }]],
                };
                t.fence(FenceAction::Off).await;
            };
            let a = tokio::spawn(side(active.clone(), standby.clone(), false));
            let s = tokio::spawn(side(standby.clone(), active.clone(), true));
            let _ = tokio::join!(a, s);
            (
                active.on.load(Ordering::SeqCst),
                standby.on.load(Ordering::SeqCst),
            )
        }
        let delay = RaceDelay {
            base: Duration::from_millis(400),
            max: Duration::from_millis(200),
        };
        for i in 0..20u64 {
            let device_time = Duration::from_millis(50 + (i * 37) % 200);
            assert_eq!(race(delay, device_time).await, (true, false), "round {i}");
        }
        let none = RaceDelay {
            base: Duration::ZERO,
            max: Duration::ZERO,
        };
        assert_eq!(
            race(none, Duration::from_millis(100)).await,
            (false, false),
            "without the delay both shoot and both die"
        );
    }
}
