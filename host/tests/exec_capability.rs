//! The `exec` capability through a real plugin (the fence-stub fixture with
//! `behaviour = "exec"` runs the granted template `cut-off` with the device's
//! `target`): the program runs without a shell, the value is one argv element; values
//! that could become options or more arguments are denied before anything runs; a
//! plugin granted no such template is denied, naming the grant. (The stub's `status`
//! always says `on`: these tests take the plugin's own answer, unconfirmed.)

mod common;

use common::*;
use trellis::points::fence::{FenceDevice, FenceOutcome};
use trellis::wit::fence_agent::FenceAction;

async fn device(dir: &std::path::Path, grant: &str, target: &str) -> FenceDevice {
    let rt = runtime(&format!("[plugins.fence-stub]\n{grant}"), dir, &[]);
    let p = rt.load(&fixtures().join("fence-stub")).await.unwrap();
    FenceDevice::new(
        p,
        vec![
            ("behaviour".into(), "exec".into()),
            ("target".into(), target.into()),
        ],
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_granted_program_runs_with_its_values_as_single_arguments() {
    let d = tempfile::tempdir().unwrap();
    let record = d.path().join("cut");
    // `sh -c 'script' NAME`: the value arrives as $0, one argument, never parsed by a shell.
    let grant = format!(
        "exec = [{{ name = \"cut-off\", argv = [\"sh\", \"-c\", \"printf '%s|%s\\\\n' \\\"$0\\\" \\\"$PATH\\\" >> {}\", \"{{target}}\"] }}]\n",
        record.display()
    );
    let dev = device(d.path(), &grant, "10.0.0.5").await;
    assert_eq!(
        dev.fence_unconfirmed(FenceAction::Off).await,
        FenceOutcome::Fenced
    );
    assert_eq!(
        std::fs::read_to_string(&record).unwrap(),
        "10.0.0.5|/usr/sbin:/usr/bin:/sbin:/bin\n",
        "the value as one argument, and nothing of the daemon's environment"
    );

    for bad in ["10.0.0.5; rm -rf /", "$(reboot)", "-rf", "a b"] {
        let dev = device(d.path(), &grant, bad).await;
        match dev.fence_unconfirmed(FenceAction::Off).await {
            FenceOutcome::NotFenced { reason } => {
                assert!(reason.contains("is not allowed"), "{bad}: {reason}")
            }
            o => panic!("{bad}: {o:?}"),
        }
    }
    assert_eq!(
        std::fs::read_to_string(&record).unwrap().lines().count(),
        1,
        "nothing ran for the refused values"
    );

    // A plugin granted nothing to run: denied, naming the grant to add.
    let dev = device(d.path(), "", "10.0.0.5").await;
    match dev.fence_unconfirmed(FenceAction::Off).await {
        FenceOutcome::NotFenced { reason } => assert!(
            reason.contains("no program `cut-off` is granted")
                && reason.contains("[plugins.fence-stub]"),
            "{reason}"
        ),
        o => panic!("{o:?}"),
    }
}

#[test]
fn bad_templates_are_named_at_load() {
    let d = tempfile::tempdir().unwrap();
    let rt = runtime(
        "[plugins.fence-stub]\nexec = [{ name = \"x\", argv = [] }, { name = \"x\", argv = [\"{prog}\"] }]\n",
        d.path(),
        &[],
    );
    let p = match rt.prepare(&fixtures().join("fence-stub")) {
        Ok(_) => panic!("expected the grants to be refused"),
        Err(p) => p.to_string(),
    };
    assert!(p.contains("plugins.fence-stub.exec[0].argv"), "{p}");
    assert!(p.contains("plugins.fence-stub.exec[1].argv[0]"), "{p}");
    assert!(p.contains("`x` is granted twice"), "{p}");
}
