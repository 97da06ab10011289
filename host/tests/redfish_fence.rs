//! The `redfish-fence` plugin against the sushy-tools Redfish emulator (a real Redfish
//! service with fake systems, on loopback, HTTPS with the test's own CA), side by side
//! with ClusterLabs' own `fence_redfish` (Debian's fence-agents) on the same emulator:
//! they must agree on every action's result. And fail closed: a BMC that is not
//! granted, not trusted or not there is never "fenced".

mod common;

use common::*;
use std::io::Write;
use std::time::{Duration, Instant};
use trellis::points::fence::{FenceDevice, FenceOutcome};
use trellis::wit::fence_agent::{FenceAction, PowerState};

const PASSWORD: &str = "bmc-password-value";

/// The plugin, granted the emulator (and its CA when `trust`), as a device.
async fn device(dir: &std::path::Path, sushy: &Sushy, grant: &str, trust: bool) -> FenceDevice {
    let ca = if trust {
        format!("tls-ca = [\"{}\"]\n", sushy.ca)
    } else {
        String::new()
    };
    let rt = runtime(
        &format!(
            "[plugins.redfish-fence]\nhttp = [\"{grant}\"]\n{ca}secrets = [\"bmc\"]\nlimits = {{ call-timeout = \"90s\" }}\n"
        ),
        dir,
        &[("bmc", PASSWORD)],
    );
    let p = rt.load(&bundle().join("redfish-fence")).await.unwrap();
    let params = [
        ("ip", "127.0.0.1".to_string()),
        ("ipport", sushy.port.to_string()),
        ("username", "admin".into()),
        ("password", "bmc".into()),
        ("ssl-insecure", "1".into()),
    ];
    FenceDevice::new(p, params.map(|(k, v)| (k.to_string(), v)).to_vec()).unwrap()
}

/// ClusterLabs' fence_redfish on the same device, options on stdin as Pacemaker passes
/// them (the password never in argv); (exit code, output).
fn fence_redfish(sushy: &Sushy, action: &str) -> (i32, String) {
    let mut c = std::process::Command::new("fence_redfish")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("fence_redfish (Debian's fence-agents; run ./scripts/setup.sh)");
    write!(
        c.stdin.take().unwrap(),
        "ip=127.0.0.1\nipport={}\nusername=admin\npassword={PASSWORD}\nssl_insecure=1\naction={action}\n",
        sushy.port
    )
    .unwrap();
    let o = c.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    (o.status.code().unwrap_or(-1), text)
}

/// Both agents' view of the system's power: fence_redfish's `status` exits 0 for on,
/// 2 for off.
async fn both_status(d: &FenceDevice, sushy: &Sushy) -> (&'static str, &'static str) {
    let ours = match d.status().await.unwrap() {
        PowerState::On => "on",
        PowerState::Off => "off",
        PowerState::Unknown => "unknown",
    };
    let theirs = match fence_redfish(sushy, "status") {
        (0, _) => "on",
        (2, _) => "off",
        (code, out) => panic!("fence_redfish status exited {code}: {out}"),
    };
    (ours, theirs)
}

async fn fence(d: &FenceDevice, action: FenceAction) -> Duration {
    let t = Instant::now();
    let outcome = d.fence(action).await;
    assert_eq!(outcome, FenceOutcome::Fenced, "{action:?}");
    t.elapsed()
}

fn their(sushy: &Sushy, action: &str) {
    let (code, out) = fence_redfish(sushy, action);
    assert_eq!(code, 0, "fence_redfish {action}: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_and_fence_redfish_agree_on_every_action() {
    let d = tempfile::tempdir().unwrap();
    let sushy = Sushy::start(d.path());
    let dev = device(d.path(), &sushy, &sushy.url(), true).await;

    let info = dev.metadata().await.unwrap();
    assert_eq!(info.name, "fence_redfish");
    for p in [
        "ip",
        "ipport",
        "username",
        "password",
        "systems-uri",
        "ssl-insecure",
    ] {
        assert!(info.parameters.iter().any(|x| x.name == p), "{p}");
    }
    assert!(
        info.parameters
            .iter()
            .any(|x| x.name == "password" && x.secret)
    );
    dev.validate().await.unwrap();
    assert_eq!(fence_redfish(&sushy, "validate-all").0, 0);

    let (ours, theirs) = both_status(&dev, &sushy).await;
    assert_eq!(ours, theirs, "the starting state");

    let on = fence(&dev, FenceAction::On).await;
    assert_eq!(both_status(&dev, &sushy).await, ("on", "on"));
    their(&sushy, "off");
    assert_eq!(both_status(&dev, &sushy).await, ("off", "off"));
    // Off when already off: done at once (no reset sent), as fence_redfish does.
    let again = fence(&dev, FenceAction::Off).await;
    assert!(again < Duration::from_secs(1), "{again:?}");
    their(&sushy, "off");
    their(&sushy, "on");
    assert_eq!(both_status(&dev, &sushy).await, ("on", "on"));
    let off = fence(&dev, FenceAction::Off).await;
    assert_eq!(both_status(&dev, &sushy).await, ("off", "off"));
    let reboot = fence(&dev, FenceAction::Reboot).await;
    assert_eq!(both_status(&dev, &sushy).await, ("on", "on"));
    their(&sushy, "reboot");
    assert_eq!(both_status(&dev, &sushy).await, ("on", "on"));

    dev.monitor().await.unwrap();
    assert_eq!(fence_redfish(&sushy, "monitor").0, 0);
    // list: the emulator's one system (fence_redfish says it cannot list).
    let targets = dev.list().await.unwrap();
    assert_eq!(targets.len(), 1, "{targets:?}");
    assert!(
        targets[0].id.starts_with("/redfish/v1/Systems/"),
        "{targets:?}"
    );
    eprintln!("redfish-fence against sushy: on {on:?}, off {off:?}, reboot {reboot:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bmc_not_granted_not_trusted_or_gone_is_never_fenced() {
    let d = tempfile::tempdir().unwrap();
    let sushy = Sushy::start(d.path());

    let untrusted = device(d.path(), &sushy, &sushy.url(), false).await;
    match untrusted.fence(FenceAction::Off).await {
        FenceOutcome::NotFenced { reason } => {
            assert!(reason.contains("TlsProtocolError"), "{reason}")
        }
        o => panic!("{o:?}"),
    }

    let elsewhere = device(d.path(), &sushy, "https://127.0.0.1:1", true).await;
    match elsewhere.fence(FenceAction::Off).await {
        FenceOutcome::NotFenced { reason } => {
            assert!(reason.contains("HttpRequestDenied"), "{reason}")
        }
        o => panic!("{o:?}"),
    }

    let good = device(d.path(), &sushy, &sushy.url(), true).await;
    drop(sushy); // the BMC is gone
    match good.fence(FenceAction::Off).await {
        FenceOutcome::NotFenced { reason } => assert!(!reason.is_empty()),
        o => panic!("{o:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_and_secrets_not_granted_are_named() {
    let d = tempfile::tempdir().unwrap();
    let rt = runtime(
        "[plugins.redfish-fence]\nhttp = [\"https://127.0.0.1:9\"]\n",
        d.path(),
        &[],
    );
    let p = rt.load(&bundle().join("redfish-fence")).await.unwrap();
    let dev = |params: &[(&str, &str)]| {
        FenceDevice::new(
            p.clone(),
            params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
        .unwrap()
    };
    let e = dev(&[("ip", "127.0.0.1"), ("username", "u")])
        .validate()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("`password` is required"), "{e}");
    let e = dev(&[
        ("ip", "127.0.0.1"),
        ("username", "u"),
        ("password", "p"),
        ("pasword", "x"),
    ])
    .validate()
    .await
    .unwrap_err();
    assert!(e.to_string().contains("unknown parameter `pasword`"), "{e}");
    // The password secret was not granted: denied, naming the secret.
    let e = dev(&[
        ("ip", "127.0.0.1"),
        ("ipport", "9"),
        ("username", "u"),
        ("password", "bmc"),
    ])
    .status()
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("denied") && e.contains("bmc"), "{e}");
}

/// `trellis fence`, installed as a fence agent (a `fence_*` wrapper naming the plugin),
/// speaks fence-agents' protocol: metadata XML, options on stdin with the password as
/// a value (never in argv), fence_redfish's exit codes, and the same results as
/// fence_redfish on the same BMC.
#[test]
fn trellis_fence_speaks_the_fence_agents_protocol() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let sushy = Sushy::start(dir);
    let agent = dir.join("fence_trellis_redfish");
    sushy.install_fence_agent(&agent, dir);
    let run = |args: &[&str], stdin: &str| -> (i32, String) {
        let mut c = std::process::Command::new(&agent)
            .args(args)
            .env("TRELLIS_LOG", "warn")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        let o = c.wait_with_output().unwrap();
        let text =
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        (o.status.code().unwrap_or(-1), text)
    };
    let device = format!(
        "ip=127.0.0.1\nipport={}\nusername=admin\npassword={PASSWORD}\nssl_insecure=1\n",
        sushy.port
    );
    let act = |action: &str| run(&[], &format!("{device}action={action}\n"));

    let (code, xml) = run(&["-o", "metadata"], "");
    assert_eq!(code, 0, "{xml}");
    for want in [
        "<resource-agent name=\"fence_trellis_redfish\"",
        "<parameter name=\"ssl_insecure\"",
        "<parameter name=\"password\" unique=\"0\" required=\"1\">",
        "<action name=\"reboot\" />",
        "<action name=\"on\" automatic=\"0\"/>",
    ] {
        assert!(xml.contains(want), "{want} in\n{xml}");
    }

    // Status agrees with fence_redfish's, code for code (0 ON, 2 OFF).
    let (ours, out) = act("status");
    assert_eq!(ours, fence_redfish(&sushy, "status").0, "{out}");
    let (code, out) = act("on");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Success: Powered ON"), "{out}");
    assert_eq!(fence_redfish(&sushy, "status").0, 0);
    let (code, out) = act("off");
    assert_eq!(
        (code, out.contains("Success: Powered OFF")),
        (0, true),
        "{out}"
    );
    assert_eq!(
        fence_redfish(&sushy, "status").0,
        2,
        "fence_redfish sees it off"
    );
    assert_eq!(act("status").0, 2);
    assert_eq!(act("monitor").0, 0);
    let (code, out) = act("list");
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("/redfish/v1/Systems/"), "{out}");

    // Bad input: a password in argv, an unknown action, a missing password.
    let (code, out) = run(&["-o", "status", "-p", PASSWORD], "");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("stdin") && !out.contains("Status"), "{out}");
    let (code, out) = act("explode");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("unknown action `explode`"), "{out}");
    let (code, out) = run(&["-o", "status", "--ip=127.0.0.1", "-l", "admin"], "");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("`password` is required"), "{out}");
}

/// Fencing levels with real devices: level 1 a BMC that cannot be reached (the
/// emulator's address, not granted), level 2 the emulator's BMC: fenced at level 2, and
/// the emulator shows the system off. With only the unreachable level: not fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_falls_through_to_the_next_level() {
    use trellis::ha::fencing::{Device, Topology};
    let d = tempfile::tempdir().unwrap();
    let sushy = Sushy::start(d.path());
    let good = device(d.path(), &sushy, &sushy.url(), true).await;
    let ungranted = device(d.path(), &sushy, "https://127.0.0.1:1", true).await;
    fence(&good, FenceAction::On).await;
    let t = Topology {
        levels: vec![
            vec![Device {
                name: "bmc-not-granted".into(),
                fencer: Box::new(ungranted),
            }],
            vec![Device {
                name: "bmc".into(),
                fencer: Box::new(good),
            }],
        ],
    };
    let r = t.fence(FenceAction::Off).await;
    assert_eq!(r.fenced_at, Some(2), "{r:?}");
    assert!(r.reasons().contains("level 1 `bmc-not-granted`"), "{r:?}");
    assert_eq!(
        fence_redfish(&sushy, "status").0,
        2,
        "off, says fence_redfish"
    );
    let only_bad = Topology {
        levels: vec![vec![Device {
            name: "bmc-not-granted".into(),
            fencer: Box::new(device(d.path(), &sushy, "https://127.0.0.1:1", true).await),
        }]],
    };
    assert!(!only_bad.fence(FenceAction::Off).await.fenced());
}
