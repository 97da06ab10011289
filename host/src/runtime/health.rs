//! Quarantine with backoff: a plugin whose instances keep crashing is refused for a
//! while (doubling each time) instead of being hammered; one success clears it.

use crate::config::QuarantineConfig;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthState {
    Healthy,
    /// Failed recently but below the quarantine threshold.
    Degraded {
        failures: u32,
    },
    Quarantined {
        until: Instant,
        failures: u32,
    },
}

#[derive(Debug, Default)]
pub struct Health {
    consecutive_failures: u32,
    quarantined_until: Option<Instant>,
    /// How many quarantines in a row (sets the backoff).
    streak: u32,
    pub last_error: Option<String>,
}

impl Health {
    /// May a call go ahead now? Err(time left) while quarantined. After the period a
    /// call is let through as a probe; its outcome decides.
    pub fn admit(&self, now: Instant) -> Result<(), Duration> {
        match self.quarantined_until {
            Some(until) if now < until => Err(until - now),
            _ => Ok(()),
        }
    }

    pub fn on_success(&mut self) {
        self.consecutive_failures = 0;
        self.quarantined_until = None;
        self.streak = 0;
    }

    /// Record a crash. Returns the quarantine period if this failure starts one.
    pub fn on_crash(
        &mut self,
        cfg: &QuarantineConfig,
        now: Instant,
        error: &str,
    ) -> Option<Duration> {
        self.consecutive_failures += 1;
        self.last_error = Some(error.to_string());
        let probe_failed = self.quarantined_until.is_some();
        if self.consecutive_failures >= cfg.after || probe_failed {
            let factor = 1u32.checked_shl(self.streak.min(20)).unwrap_or(u32::MAX);
            let period = cfg.backoff.0.saturating_mul(factor).min(cfg.max_backoff.0);
            self.streak += 1;
            self.quarantined_until = Some(now + period);
            return Some(period);
        }
        None
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    pub fn state(&self, now: Instant) -> HealthState {
        match self.quarantined_until {
            Some(until) if now < until => HealthState::Quarantined {
                until,
                failures: self.consecutive_failures,
            },
            _ if self.consecutive_failures > 0 => HealthState::Degraded {
                failures: self.consecutive_failures,
            },
            _ => HealthState::Healthy,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HumanDuration;

    #[test]
    fn quarantines_after_threshold_and_backs_off() {
        let cfg = QuarantineConfig {
            after: 3,
            backoff: HumanDuration(Duration::from_secs(1)),
            max_backoff: HumanDuration(Duration::from_secs(3)),
        };
        let t0 = Instant::now();
        let mut h = Health::default();
        assert_eq!(h.on_crash(&cfg, t0, "x"), None);
        assert_eq!(h.on_crash(&cfg, t0, "x"), None);
        assert_eq!(h.on_crash(&cfg, t0, "x"), Some(Duration::from_secs(1)));
        assert!(h.admit(t0).is_err());
        let t1 = t0 + Duration::from_secs(1);
        assert!(h.admit(t1).is_ok(), "probe allowed after the period");
        // the probe fails: quarantined again, twice as long
        assert_eq!(h.on_crash(&cfg, t1, "x"), Some(Duration::from_secs(2)));
        let t2 = t1 + Duration::from_secs(2);
        assert_eq!(
            h.on_crash(&cfg, t2, "x"),
            Some(Duration::from_secs(3)),
            "capped at max-backoff"
        );
        h.on_success();
        assert_eq!(h.state(t2), HealthState::Healthy);
        assert!(h.admit(t2).is_ok());
    }
}
