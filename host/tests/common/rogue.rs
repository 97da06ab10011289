//! A rogue agent: a real process that knows its own valid secret (a configured agent of
//! the controller) and says things about runs that are not its own. Its protocol is
//! the library's agent side (`session::link::introduce`, `exchange`) over the
//! tcp-transport plugin, all in `speak_as_agent`, so that a change of the handshake
//! (sealed links) is adapted in one place.
//!
//! The process is this test binary run again: `rogue_process` starts it with
//! `--exact <entry> --ignored` and the rogue's orders in `ROGUE_ENV`; the entry test
//! calls `rogue_main`.

use std::time::{Duration, Instant};
use trellis::session::link::{AgentSession, Liveness, exchange, introduce};
use trellis::wit::command_transport::Lane;

/// Carries a `RogueOrders` (JSON) to the rogue process.
pub const ROGUE_ENV: &str = "TRELLIS_TEST_ROGUE";

/// What the rogue does: connect to the controller's tcp-transport `port` as agent
/// `name` with `secret`, and send `messages` (encoded agent messages, see
/// `protocol::encode`).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct RogueOrders {
    pub port: u16,
    pub name: String,
    pub secret: String,
    pub messages: Vec<Vec<u8>>,
}

/// Connect, introduce, send every message on the bulk lane and wait until the
/// controller acknowledged them all (it handles each as it takes it).
pub async fn speak_as_agent(o: &RogueOrders) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let rt = super::runtime(
        &format!(
            "[plugins.tcp-transport]\nsockets = {{ connect = [\"127.0.0.1:{0}\"] }}\nconfig = {{ address = \"127.0.0.1:{0}\" }}\n",
            o.port
        ),
        dir.path(),
        &[],
    );
    let tcp = rt
        .load(&super::bundle().join("tcp-transport"))
        .await
        .map_err(|e| e.to_string())?;
    let link = trellis::points::transport::connect(tcp, &o.name)
        .await
        .map_err(|e| e.to_string())?;
    let mut s = AgentSession::new();
    // No labels: nothing is ever placed on the rogue.
    let mut seal = introduce(&link, &o.name, &[], &[], 1, &o.secret, vec![], &mut s)
        .await
        .map_err(|e| e.to_string())?
        .seal;
    for m in &o.messages {
        s.session.queue(Lane::Bulk, m.clone());
    }
    let mut live = Liveness::new(Duration::from_millis(200));
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.session.unacked() > 0 {
        if Instant::now() > deadline {
            return Err(format!(
                "{} messages never acknowledged",
                s.session.unacked()
            ));
        }
        let mut ignored = Vec::new();
        exchange(
            &mut s.session,
            &link,
            &mut seal,
            &mut live,
            20,
            true,
            &mut ignored,
        )
        .await
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The rogue process's body (call from the entry test): nothing unless it was started
/// by `rogue_process`.
pub fn rogue_main() {
    let Ok(orders) = std::env::var(ROGUE_ENV) else {
        eprintln!("not a rogue: {ROGUE_ENV} is not set");
        return;
    };
    let orders: RogueOrders = serde_json::from_str(&orders).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    match rt.block_on(speak_as_agent(&orders)) {
        Ok(()) => println!(
            "ROGUE: {} message(s) sent and acknowledged",
            orders.messages.len()
        ),
        Err(e) => panic!("ROGUE failed: {e}"),
    }
}

/// Run the rogue as its own process: this test binary, running only `entry` (the test
/// that calls `rogue_main`). Its output, once it exited.
pub fn rogue_process(entry: &str, orders: &RogueOrders) -> std::process::Output {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            entry,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROGUE_ENV, serde_json::to_string(orders).unwrap())
        .output()
        .unwrap()
}
