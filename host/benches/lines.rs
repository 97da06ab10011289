//! End-to-end lines benchmark: lines per second from a step's stdout to stored events,
//! through the real path — a controller and an agent in this process, the step's
//! output read and masked by the agent, framed into the session, carried by the
//! `tcp-transport` plugin over loopback TCP, batched by the controller and stored as
//! JSON lines by the `file-logging` plugin — measured from `submit` until the run is
//! final, which is after the log is closed with its final count.
//!
//! The agent link is sealed (`session::seal`) as in the daemons. To show what sealing
//! costs, the same path runs a second time over an unsealed link (a second controller
//! and agent in this process, keyed after `unsealed_links_for_benchmarks`, which only
//! benchmarks can call): "sealed / unsealed" is the price (target: at least 0.90).
//!
//! In the same run, on the same input file, two baselines:
//!
//! * rsyslog (Debian's `rsyslogd`, its own instance and config) shipping the same lines
//!   file to file: `imfile` (inotify) to `omfile` with asynchronous writing and a template
//!   that writes just the message; timed from the moment the input appears in the
//!   watched directory until the output holds every line;
//! * a plain line copy, `grep '' input > output` (`LC_ALL=C`): the physical limit.
//!
//! Everything (input, logs, state, rsyslog's work directory) lives on /dev/shm, so disk
//! does not dominate. Each contender runs `TRELLIS_BENCH_ROUNDS` times (default 3),
//! interleaved so machine noise hits all alike; the median is reported. Every round
//! verifies that all N lines arrived (a benchmark that loses lines is wrong).
//!
//!     cargo xtask bench lines     (builds the bundle, then runs this in release)
//!
//! TRELLIS_BENCH_LINES sets N (default 1,000,000 lines of 100 bytes);
//! TRELLIS_BENCH_ONLY=trellis|unsealed|rsyslog|grep runs one contender alone (for
//! profiling);
//! TRELLIS_BENCH_KEEP=1 keeps the scratch directory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis::capabilities::secrets::SecretStore;
use trellis::config::DaemonConfig;
use trellis::controller::state::RunStatus;
use trellis::controller::{Controller, ControllerConfig};
use trellis::jobs::Job;
use trellis::runtime::Runtime;

/// Bytes per input line, the newline included.
const LINE: usize = 100;

/// One timed round: wall time and CPU time (user + system, all processes involved).
#[derive(Clone, Copy)]
struct Sample {
    wall: Duration,
    cpu: Duration,
}

/// CPU time used so far by this process and by its waited-for children.
fn cpu_now() -> (Duration, Duration) {
    fn get(who: i32) -> Duration {
        // SAFETY: getrusage fills the struct it is given; nothing else is touched.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(who, &mut u) };
        let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        tv(u.ru_utime) + tv(u.ru_stime)
    }
    (get(libc::RUSAGE_SELF), get(libc::RUSAGE_CHILDREN))
}

/// CPU time since `start`: of this process and its children, or of the children only
/// (the baselines run as child processes while this one idles).
fn cpu_since(start: (Duration, Duration), include_self: bool) -> Duration {
    let now = cpu_now();
    let children = now.1 - start.1;
    if include_self {
        (now.0 - start.0) + children
    } else {
        children
    }
}

/// N lines of exactly `LINE` bytes: a line number, then printable ASCII from a fixed
/// pseudo-random sequence (nothing that needs JSON escaping beyond the usual).
fn write_input(path: &Path, n: u64) {
    const ALPHABET: &[u8] =
        b"abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789-=:/.,_()[]";
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut line = Vec::with_capacity(LINE);
    for i in 1..=n {
        line.clear();
        write!(line, "{i:010} ").unwrap();
        while line.len() < LINE - 1 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            line.push(ALPHABET[(x % ALPHABET.len() as u64) as usize]);
        }
        line.push(b'\n');
        f.write_all(&line).unwrap();
    }
    f.flush().unwrap();
}

fn median(v: &[Sample]) -> Sample {
    let mut s = v.to_vec();
    s.sort_by_key(|s| s.wall);
    s[s.len() / 2]
}

fn rate(n: u64, s: Sample) -> f64 {
    n as f64 / s.wall.as_secs_f64()
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

// ---------------------------------------------------------------------------------
// Trellis

struct Stack {
    controller: Arc<Controller>,
    dir: PathBuf,
    _stop: tokio::sync::watch::Sender<bool>,
}

async fn trellis_stack(bundle: &Path, dir: &Path) -> Stack {
    std::fs::create_dir_all(dir.join("state/logs")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = format!(
        r#"
        [plugins.tcp-transport]
        sockets = {{ bind = ["127.0.0.1:{port}"], connect = ["127.0.0.1:{port}"] }}
        config = {{ address = "127.0.0.1:{port}" }}
        [plugins.file-logging]
        dirs = [{{ host = "state/logs", guest = "/logs", mode = "read-write" }}]
        "#
    );
    let cfg = DaemonConfig::parse(&config, "bench.toml", dir).unwrap();
    let rt = Runtime::with_secrets(cfg, SecretStore::default()).unwrap();
    let tcp = rt.load(&bundle.join("tcp-transport")).await.unwrap();
    let logging = rt.load(&bundle.join("file-logging")).await.unwrap();
    let controller = Controller::start(
        ControllerConfig {
            instance_id: "bench".into(),
            state_dir: dir.join("state"),
            agents: [("agent-1".to_string(), "agent-secret".to_string())].into(),
            secrets: Default::default(),
            // The daemons' defaults.
            heartbeat: trellis::session::link::DEFAULT_HEARTBEAT,
            agent_lost_after: trellis::controller::DEFAULT_AGENT_LOST_AFTER,
            log_buffer_limit: trellis::controller::DEFAULT_LOG_BUFFER_LIMIT,
            multiline_start: None,
            fencing_token: 0,
            retention: Default::default(),
        },
        tcp.clone(),
        logging,
    )
    .await
    .unwrap();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(trellis::agent::worker::run_agent(
        tcp,
        trellis::agent::worker::AgentConfig {
            name: "agent-1".into(),
            labels: vec!["linux".into()],
            secret: "agent-secret".into(),
            workspace: dir.join("work"),
            heartbeat: trellis::session::link::DEFAULT_HEARTBEAT,
            logs: None,
            state_dir: None,
            executors: 1,
        },
        stop,
    ));
    for _ in 0..400 {
        if !controller.connected_agents().is_empty() {
            return Stack {
                controller,
                dir: dir.to_path_buf(),
                _stop: stop_tx,
            };
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the agent never connected");
}

/// Run `cat <input>` (or `head -n N`) as a one-step job; verify every line was stored.
/// Polls the run's record rather than subscribing to updates: a subscriber makes the
/// controller copy every line for followers, which is not the path being measured.
async fn trellis_round(s: &Stack, command: &str, n: u64) -> Sample {
    let job = Job::parse(
        &format!(
            "name = \"lines\"\nagent = \"linux\"\n[[step]]\nname = \"cat\"\nrun = \"{command}\"\ntimeout = \"10m\"\n"
        ),
        "lines.toml",
    )
    .unwrap();
    let cpu = cpu_now();
    let t = Instant::now();
    let run = s.controller.submit(&job).unwrap();
    let r = loop {
        if let Some(r) = s.controller.run(&run.id).filter(|r| r.status.is_final()) {
            break r;
        }
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "the run did not finish"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let sample = Sample {
        wall: t.elapsed(),
        cpu: cpu_since(cpu, true),
    };
    assert_eq!(r.status, RunStatus::Succeeded, "{r:?}");
    assert_eq!(r.events, n, "the run recorded {} events, not {n}", r.events);
    let logs = s.dir.join("state/logs/lines");
    let count = std::fs::read_to_string(logs.join(format!("{}.count", run.id))).unwrap();
    assert_eq!(count.trim(), n.to_string(), "the log's final count");
    let log = logs.join(format!("{}.jsonl", run.id));
    let text = std::fs::read(&log).unwrap();
    let stored = text.iter().filter(|&&b| b == b'\n').count() as u64;
    assert_eq!(stored, n, "lines stored in {}", log.display());
    // The last event is the input's last line, with seq N.
    let last = text[..text.len() - 1]
        .rsplit(|&b| b == b'\n')
        .next()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(last).unwrap();
    assert_eq!(v["seq"], n);
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{n:010} ")),
        "{v}"
    );
    let _ = std::fs::remove_file(&log);
    sample
}

// ---------------------------------------------------------------------------------
// rsyslog

fn find_rsyslogd() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join("rsyslogd"))
        .find(|p| p.is_file())
}

/// The rsyslog configuration: documented in docs/PERFORMANCE.md, keep them in step.
/// One main-queue worker: with the default two, batches are written concurrently and
/// lines come out reordered (Trellis keeps order; so must the baseline), and one is no
/// slower here. `flushOnTXEnd="on"` hands each batch to the async writer at once; with
/// it off, the last buffer waits for `flushInterval` (at least a second), and timing it
/// would charge rsyslog for an idle timer. Both were measured; see PERFORMANCE.md.
fn rsyslog_conf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"global(workDirectory="{d}/work")
module(load="imfile" mode="inotify")
template(name="line" type="string" string="%rawmsg%\n")
main_queue(queue.workerThreads="1")
ruleset(name="copy") {{
  action(type="omfile" file="{d}/out.log" template="line"
         asyncWriting="on" flushOnTXEnd="on" ioBufferSize="256k")
}}
input(type="imfile" file="{d}/watch/in.log" tag="bench" ruleset="copy"
      readMode="0" maxSubmitAtOnce="1024" freshStartTail="off")
input(type="imfile" file="{d}/probe.log" tag="probe" ruleset="probe")
ruleset(name="probe") {{
  action(type="omfile" file="{d}/probe.out" template="line")
}}
"#
    )
}

fn wait_for(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ready() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// A fresh rsyslogd for each round. Ready once it copied a probe line (imfile is
/// watching); the clock starts when the input is hard-linked into the watched
/// directory (instant, no copy) and stops when the output holds N lines.
fn rsyslog_round(rsyslogd: &Path, scratch: &Path, input: &Path, n: u64, round: usize) -> Sample {
    let dir = scratch.join(format!("rsyslog-{round}"));
    std::fs::create_dir_all(dir.join("work")).unwrap();
    std::fs::create_dir_all(dir.join("watch")).unwrap();
    let conf = dir.join("rsyslog.conf");
    std::fs::write(&conf, rsyslog_conf(&dir)).unwrap();
    std::fs::write(dir.join("probe.log"), "ready\n").unwrap();
    let cpu = cpu_now();
    let mut child = Command::new(rsyslogd)
        .arg("-n")
        .arg("-f")
        .arg(&conf)
        .arg("-i")
        .arg(dir.join("rsyslogd.pid"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("rsyslogd.log")).unwrap())
        .spawn()
        .expect("starting rsyslogd");
    wait_for("rsyslogd ready", Duration::from_secs(20), || {
        size(&dir.join("probe.out")) > 0
    });
    std::thread::sleep(Duration::from_millis(100));
    let out = dir.join("out.log");
    let want = n * LINE as u64;
    let t = Instant::now();
    std::fs::hard_link(input, dir.join("watch/in.log")).unwrap();
    wait_for("rsyslog copying", Duration::from_secs(600), || {
        size(&out) >= want
    });
    let wall = t.elapsed();
    // SAFETY: signals the child this function started, by its pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    let sample = Sample {
        wall,
        cpu: cpu_since(cpu, false),
    };
    let copied = std::fs::read(&out).unwrap();
    let original = std::fs::read(input).unwrap();
    if copied != original {
        let line = copied
            .split(|&b| b == b'\n')
            .zip(original.split(|&b| b == b'\n'))
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        panic!(
            "rsyslog's output differs from its input ({} vs {} bytes), from line {}; see {}",
            copied.len(),
            original.len(),
            line + 1,
            dir.display()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    sample
}

// ---------------------------------------------------------------------------------
// The line copy

fn grep_round(scratch: &Path, input: &Path, n: u64) -> Sample {
    let out = scratch.join("grep.out");
    let cpu = cpu_now();
    let t = Instant::now();
    let status = Command::new("grep")
        .arg("")
        .arg(input)
        .env("LC_ALL", "C")
        .stdout(std::fs::File::create(&out).unwrap())
        .status()
        .expect("running grep");
    let sample = Sample {
        wall: t.elapsed(),
        cpu: cpu_since(cpu, false),
    };
    assert!(status.success());
    assert_eq!(size(&out), n * LINE as u64, "grep copied every line");
    let _ = std::fs::remove_file(&out);
    sample
}

// ---------------------------------------------------------------------------------

#[tokio::main]
async fn main() {
    let bundle = std::env::var_os("TRELLIS_BUNDLE_DIR")
        .map(PathBuf::from)
        .expect("run with `cargo xtask bench lines`");
    let n: u64 = std::env::var("TRELLIS_BENCH_LINES")
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(1_000_000);
    let rounds: usize = std::env::var("TRELLIS_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let only = std::env::var("TRELLIS_BENCH_ONLY").unwrap_or_default();
    let runs = |c: &str| only.is_empty() || only == c;
    let shm = Path::new("/dev/shm");
    let scratch = match shm.is_dir() {
        true => tempfile::Builder::new()
            .prefix("trellis-lines-")
            .tempdir_in(shm)
            .unwrap(),
        false => {
            eprintln!("warning: no /dev/shm: using the temp dir; disk may dominate");
            tempfile::tempdir().unwrap()
        }
    };
    // Removed at the end, but left in place when a round fails, for a look.
    let dir = scratch.keep();
    let rsyslogd = find_rsyslogd();

    println!(
        "trellis lines benchmark: {n} lines of {LINE} bytes, step stdout -> stored events \
         (median of {rounds} rounds; same run, same machine)"
    );
    println!(
        "scratch: {}   load average: {}",
        dir.display(),
        load_average()
    );
    if rsyslogd.is_none() && runs("rsyslog") {
        println!(
            "\nrsyslogd not found: run ./scripts/setup.sh (it installs Debian's rsyslog, \
             without starting it as a service); measuring the others only.\n"
        );
    }
    let input = dir.join("input.log");
    write_input(&input, n);

    let warm_up = format!("head -n 10000 '{}'", input.display());
    let stack = if runs("trellis") {
        let s = trellis_stack(&bundle, &dir.join("trellis")).await;
        // Warm-up (not timed): instances, pools and buffers as after the first run.
        trellis_round(&s, &warm_up, 10_000).await;
        Some(s)
    } else {
        None
    };
    // Built after the sealed one: only links keyed from now on are unsealed.
    let unsealed = if runs("unsealed") {
        trellis::session::seal::unsealed_links_for_benchmarks(true);
        let s = trellis_stack(&bundle, &dir.join("unsealed")).await;
        trellis_round(&s, &warm_up, 10_000).await;
        Some(s)
    } else {
        None
    };

    let (mut tr, mut un, mut rs, mut gr) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let show = |name: &str, s: Sample| {
        println!(
            "  {name:<8} {:>8.3} s  {:>6.3} M lines/s   cpu {:>6.2} s",
            s.wall.as_secs_f64(),
            rate(n, s) / 1e6,
            s.cpu.as_secs_f64()
        )
    };
    for round in 0..rounds {
        println!("round {}", round + 1);
        if let Some(s) = &stack {
            let cmd = format!("cat '{}'", input.display());
            let x = trellis_round(s, &cmd, n).await;
            show("trellis", x);
            tr.push(x);
        }
        if let Some(s) = &unsealed {
            let cmd = format!("cat '{}'", input.display());
            let x = trellis_round(s, &cmd, n).await;
            show("unsealed", x);
            un.push(x);
        }
        if let (Some(r), true) = (&rsyslogd, runs("rsyslog")) {
            let (r, dir, input) = (r.clone(), dir.clone(), input.clone());
            let x = tokio::task::spawn_blocking(move || rsyslog_round(&r, &dir, &input, n, round))
                .await
                .unwrap();
            show("rsyslog", x);
            rs.push(x);
        }
        if runs("grep") {
            let x = grep_round(&dir, &input, n);
            show("grep", x);
            gr.push(x);
        }
    }

    println!("\nmedian                wall      lines/s          cpu    cpu µs/line");
    let med = |name: &str, v: &[Sample]| -> Option<f64> {
        if v.is_empty() {
            return None;
        }
        let m = median(v);
        println!(
            "  {name:<16} {:>8.3} s  {:>6.3} M lines/s  {:>6.2} s  {:>6.2}",
            m.wall.as_secs_f64(),
            rate(n, m) / 1e6,
            m.cpu.as_secs_f64(),
            m.cpu.as_secs_f64() * 1e6 / n as f64
        );
        Some(rate(n, m))
    };
    let (t, u, r, g) = (
        med("trellis", &tr),
        med("trellis unsealed", &un),
        med("rsyslog", &rs),
        med("grep (line copy)", &gr),
    );
    println!("load average at the end: {}", load_average());
    if let Some(t) = t {
        println!("\nratios");
        match r {
            Some(r) => println!(
                "  trellis / rsyslog          {:>6.2}x   target >= 2x (3x wanted)   {}",
                t / r,
                if t / r >= 3.0 {
                    "met (3x too)"
                } else if t / r >= 2.0 {
                    "met"
                } else {
                    "NOT MET"
                }
            ),
            None if rsyslogd.is_none() => println!(
                "  trellis / rsyslog          n/a (rsyslogd not found: run ./scripts/setup.sh)"
            ),
            None => {}
        }
        if let Some(g) = g {
            println!(
                "  trellis / grep             {:>6.2}x   (the physical limit)",
                t / g
            );
        }
        if let Some(u) = u {
            println!(
                "  sealed / unsealed          {:>6.2}x   target >= 0.90   {}",
                t / u,
                if t / u >= 0.90 { "met" } else { "NOT MET" }
            );
        }
    }
    if std::env::var_os("TRELLIS_BENCH_KEEP").is_some() {
        println!("kept {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if rsyslogd.is_none() && runs("rsyslog") {
        std::process::exit(2);
    }
}
