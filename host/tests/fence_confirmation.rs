//! Fencing is confirmed (issue 18): a fence agent's `ok` counts only once its own
//! `status` reports the end state, polled within `power-timeout` as ClusterLabs'
//! fencing library does. The attacker is `tests/fixtures/disk-fence-liar`: it answers
//! `ok` to `off` at once and does nothing, while its status says `on`.

mod common;

use common::*;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use trellis::points::fence::{Confirm, FenceDevice, FenceOutcome};
use trellis::wit::fence_agent::FenceAction;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ok_that_status_does_not_confirm_is_not_fenced_and_is_counted() {
    let d = tempfile::tempdir().unwrap();
    let rt = runtime("", d.path(), &[]);
    let p = rt.load(&fixtures().join("disk-fence-liar")).await.unwrap();
    let confirm = Confirm {
        timeout: Duration::from_millis(1500),
        every: Duration::from_millis(200),
    };
    let device = FenceDevice::new(p.clone(), vec![])
        .unwrap()
        .with_confirm(confirm);
    // Its word alone says fenced...
    assert_eq!(
        device.fence_unconfirmed(FenceAction::Off).await,
        FenceOutcome::Fenced
    );
    // ...the host does not take it.
    let t = Instant::now();
    match device.fence(FenceAction::Off).await {
        FenceOutcome::NotFenced { reason } => {
            assert!(
                reason.contains("plugin `disk-fence-liar` answered ok to `off`")
                    && reason.contains("did not confirm `off` within 1.5s")
                    && reason.contains("status says `on`"),
                "{reason}"
            );
        }
        FenceOutcome::Fenced => panic!("an unconfirmed ok was taken as fenced"),
    }
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1200) && took < Duration::from_secs(5),
        "status was polled for the timeout, and no longer: {took:?}"
    );
    assert!(
        p.metrics.calls() >= 6,
        "status polled several times: {} calls",
        p.metrics.calls()
    );
    assert_eq!(p.metrics.unconfirmed_fences.load(Relaxed), 1);
    let mut text = String::new();
    p.metrics.render("disk-fence-liar", &mut text);
    assert!(
        text.contains("trellis_plugin_unconfirmed_fences_total{plugin=\"disk-fence-liar\"} 1"),
        "{text}"
    );
    // An on is confirmed by `on`: the liar's status says so, so that one counts.
    assert_eq!(device.fence(FenceAction::On).await, FenceOutcome::Fenced);
}

/// Through real daemons: the standby's only fence device is the liar. When the active
/// dies the standby asks it to fence, gets `ok`, asks `status`, hears `on`, and does
/// not take over; it says why in its log, `trellis cluster status` and `/metrics`.
#[test]
fn a_standby_whose_fence_agent_lies_does_not_take_over() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let etcd = EtcdCluster::start(dir);
    let transport = Transport::Tcp { port: free_port() };
    let (cfg_a, cfg_b, _agent_cfg, _, http_b) =
        ha_configs(dir, &transport, &etcd, Bmc::Dead(free_port()));
    // B fences A with the liar only, and waits 2 s for its status to confirm.
    let text = std::fs::read_to_string(&cfg_b).unwrap();
    let levels = text
        .lines()
        .find(|l| l.starts_with("levels = "))
        .unwrap()
        .to_string();
    let text = text.replace(
        &levels,
        "levels = [[{ plugin = \"disk-fence-liar\", power-timeout = \"2s\" }]]",
    ) + &format!(
        "[plugins.disk-fence-liar]\npath = \"{}\"\n",
        fixtures().join("disk-fence-liar").display()
    );
    std::fs::write(&cfg_b, text).unwrap();

    let daemon_log = dir.join("daemons.log");
    let logs = || std::fs::read_to_string(&daemon_log).unwrap_or_default();
    // it retries, and keeps not taking over
    let _b = active_dies_standby_cannot_fence(&cfg_a, &cfg_b, &daemon_log, Duration::from_secs(5));
    let log = logs();
    assert!(!log.contains("trellis ha: b active"), "{log}");
    assert!(
        log.contains("plugin `disk-fence-liar` answered ok to `off`, but its status did not confirm `off` within 2s (status says `on`)"),
        "{log}"
    );
    let (code, runs) = http_get_status(http_b, "/api/runs");
    assert_eq!(code, 503, "{runs}");
    let server_b = format!("http://127.0.0.1:{http_b}");
    let (_, out, err) = cli(&server_b, &["cluster", "status"]);
    let line = out
        .lines()
        .find(|l| l.starts_with("b "))
        .unwrap_or_default();
    assert!(
        line.contains("not-taking-over") && line.contains("did not confirm `off`"),
        "{out}{err}"
    );
    let metrics = http_get(http_b, "/metrics");
    assert!(
        metrics.contains("trellis_ha_role{name=\"b\",role=\"not-taking-over\"} 1"),
        "{metrics}"
    );
    let unconfirmed = metrics
        .lines()
        .find(|l| l.starts_with("trellis_ha_fencings_unconfirmed_total "))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
    assert!(
        unconfirmed.is_some_and(|n| n >= 1),
        "the unconfirmed fences are counted: {metrics}"
    );
}
