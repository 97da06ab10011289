//! The load generator (`cargo xtask bench scale`, host/benches/load) kept from rotting:
//! a few simulated agents against a real controller process for a few seconds, every
//! submit answered and measured.

#[path = "../benches/load/mod.rs"]
#[allow(dead_code)]
mod load;

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_generator_connects_agents_and_measures_every_run() {
    let p = load::Params {
        agents: 5,
        rate: 10.0,
        seconds: 2.0,
        idle_seconds: 1.0,
        connect_within: Duration::from_secs(30),
        wait_ms: 250,
        kafka_agents: 0,
        kafka_commands: 1,
        only: "tcp".into(),
    };
    let setup = load::setup_from_env(env!("CARGO_BIN_EXE_trellis")).unwrap();
    let r = load::run_tcp(&p, &setup).await.unwrap();
    load::print_tcp(&p, &r);
    assert!(r.connect_time.is_some(), "{r:?}");
    assert_eq!((r.connected, r.api_connected), (5, 5), "{r:?}");
    assert_eq!((r.submitted, r.accepted), (20, 20), "{r:?}");
    assert_eq!(r.succeeded, 20, "every run answered and recorded: {r:?}");
    assert_eq!(
        r.to_running.len(),
        20,
        "every order reached an agent: {r:?}"
    );
    assert_eq!(r.to_finished.len(), 20, "{r:?}");
    assert!(
        r.to_running
            .iter()
            .zip(&r.to_finished)
            .all(|(a, b)| *a >= 0 && *b >= 0),
        "{r:?}"
    );
    assert!(r.vm_hwm >= r.vm_rss && r.vm_rss > 0, "{r:?}");
    assert!(r.finished_per_second > 0.0, "{r:?}");
    assert_eq!(r.links_lost, 0, "{r:?}");
}
