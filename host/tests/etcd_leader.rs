//! Leadership on a real etcd (three members of Debian's etcd-server 3.4 on loopback):
//! one holder at a time, the standby sees the key go when the holder stops renewing
//! (about one TTL), takes over with a newer fencing token, and a member down changes
//! nothing.

mod common;

use common::*;
use std::time::{Duration, Instant};
use trellis::ha::leader::{Etcd, campaign, current, wait_vacant};

const KEY: &str = "trellis/leader";
const TTL: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_and_the_standby_takes_over_with_a_newer_token() {
    let d = tempfile::tempdir().unwrap();
    let mut cluster = EtcdCluster::start(d.path());
    let etcd = Etcd::new(cluster.clients.clone());

    let a = campaign(&etcd, KEY, "controller-a", TTL).await.unwrap();
    let a = a.expect("A is first: it leads");
    assert!(
        campaign(&etcd, KEY, "controller-b", TTL)
            .await
            .unwrap()
            .is_none()
    );
    let leader = current(&etcd, KEY).await.unwrap().unwrap();
    assert_eq!(
        (leader.holder.as_str(), leader.token),
        ("controller-a", a.token)
    );

    // A keeps the lease alive well past its TTL, and with one etcd member down too.
    tokio::time::sleep(TTL * 2).await;
    cluster.kill(0);
    tokio::time::sleep(TTL * 2).await;
    assert!(!a.is_lost());
    assert_eq!(
        current(&etcd, KEY).await.unwrap().unwrap().holder,
        "controller-a"
    );

    // A stops (its process dies: no more renewals). B sees the key go about one TTL
    // later, with A as the last holder, and takes over with a newer token.
    let died = Instant::now();
    drop(a);
    let last = wait_vacant(&etcd, KEY, Duration::from_millis(100))
        .await
        .unwrap();
    let detected = died.elapsed();
    assert_eq!(last.map(|l| l.holder).as_deref(), Some("controller-a"));
    assert!(detected <= TTL + Duration::from_secs(2), "{detected:?}");
    let b = campaign(&etcd, KEY, "controller-b", TTL)
        .await
        .unwrap()
        .unwrap();
    let a_token = leader.token;
    assert!(b.token > a_token, "{} > {a_token}", b.token);
    eprintln!(
        "leader died → key vacant in {detected:?}; tokens {a_token} → {}",
        b.token
    );

    // A clean handover: B resigns, C gets it at once.
    b.resign().await.unwrap();
    let c = campaign(&etcd, KEY, "controller-c", TTL).await.unwrap();
    assert!(c.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_cannot_reach_etcd_knows_it_lost() {
    let d = tempfile::tempdir().unwrap();
    let mut cluster = EtcdCluster::start(d.path());
    let etcd = Etcd::new(cluster.clients.clone());
    let mut a = campaign(&etcd, KEY, "controller-a", TTL)
        .await
        .unwrap()
        .unwrap();
    for i in 0..3 {
        cluster.kill(i); // etcd is gone: A cannot renew
    }
    let t = Instant::now();
    tokio::time::timeout(TTL * 3, a.lost())
        .await
        .expect("A notices within a few TTLs");
    assert!(
        t.elapsed() >= TTL / 2,
        "not before renewals failed: {:?}",
        t.elapsed()
    );
}
