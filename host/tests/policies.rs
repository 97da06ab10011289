//! The failure policy of each extension point, as the host applies it.

mod common;

use common::*;
use trellis::points::fence::{FenceDevice, FenceOutcome};
use trellis::points::logging::{LogError, LogWriter};
use trellis::points::{FailurePolicy, Point};
use trellis::runtime::PluginError;
use trellis::wit::fence_agent::FenceAction;

#[test]
fn policies_are_declared_per_point() {
    assert_eq!(
        Point::FenceAgent.failure_policy(),
        FailurePolicy::FailClosed
    );
    assert_eq!(
        Point::LoggingMethod.failure_policy(),
        FailurePolicy::KeepAndRetry
    );
    assert_eq!(
        Point::CommandTransport.failure_policy(),
        FailurePolicy::Reconnect
    );
    assert_eq!(
        Point::LogBrowser.failure_policy(),
        FailurePolicy::ReportUnavailable
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_fails_closed() {
    let d = tempfile::tempdir().unwrap();
    let rt = runtime(
        "[runtime.limits]\ncall-timeout = \"300ms\"\n[runtime.quarantine]\nafter = 100\n",
        d.path(),
        &[],
    );
    let p = rt.load(&fixtures().join("fence-stub")).await.unwrap();
    let device =
        |b: &str| FenceDevice::new(p.clone(), vec![("behaviour".into(), b.into())]).unwrap();
    // The stub's `ok` is its word only (its status says on: tests/fence_confirmation.rs).
    assert_eq!(
        device("ok").fence_unconfirmed(FenceAction::Off).await,
        FenceOutcome::Fenced
    );
    for (behaviour, expect) in [
        ("error", "device unreachable"),
        ("trap", "trapped"),
        ("hang", "deadline"),
    ] {
        match device(behaviour).fence(FenceAction::Off).await {
            FenceOutcome::NotFenced { reason } => {
                assert!(reason.contains(expect), "{behaviour}: {reason}")
            }
            FenceOutcome::Fenced => panic!("{behaviour}: a failed fence was reported as fenced"),
        }
    }
    // A plugin that is not a fence agent cannot be used as one.
    let logger = rt.load(&fixtures().join("hostile")).await.unwrap();
    assert!(matches!(
        FenceDevice::new(logger, vec![]),
        Err(PluginError::NotImplemented { .. })
    ));
    assert_eq!(device("ok").metadata().await.unwrap().name, "fence_stub");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logging_keeps_events_through_traps_and_delivers_each_once() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("ctl")).unwrap();
    let rt = runtime(
        "[runtime.quarantine]\nafter = 100\n[plugins.hostile]\ndirs = [{ host = \"ctl\", guest = \"/ctl\", mode = \"read-write\" }]\n",
        d.path(),
        &[],
    );
    let p = rt.load(&fixtures().join("hostile")).await.unwrap();
    let fail = d.path().join("ctl/fail");
    let mut w = LogWriter::open(p.clone(), meta("flaky", "r-1"))
        .await
        .unwrap();
    w.write(batch(1, 100)).await.unwrap();
    std::fs::write(&fail, "").unwrap();
    // The store "breaks": the plugin traps on every write; the host keeps the batches.
    for i in 0..3 {
        let e = w.write(batch(101 + i * 100, 100)).await.unwrap_err();
        assert!(
            matches!(e, LogError::Plugin(PluginError::Trap { .. })),
            "{e}"
        );
    }
    assert_eq!(w.pending_batches(), 3);
    std::fs::remove_file(&fail).unwrap();
    // Back: the log is reopened on a fresh instance and the kept batches go out in order.
    w.write(batch(401, 100)).await.unwrap();
    assert_eq!(w.pending_batches(), 0);
    w.close(500).await.unwrap();
    let seen: Vec<u64> = std::fs::read_to_string(d.path().join("ctl/seen"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(
        seen,
        (1..=500).collect::<Vec<_>>(),
        "every event exactly once, in order"
    );
}
