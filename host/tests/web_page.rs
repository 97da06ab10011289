//! The web page in a real browser: a controller and an agent in-process with the HTTP API
//! on loopback, Debian's `chromium` headless, driven over the Chrome DevTools Protocol.
//! The job waits on gate files, so the log is sampled while the run is certainly live.
//! Needs `chromium` on PATH (`./scripts/setup.sh` installs it); fails without it.
//!
//! The page signs in with a token (a session cookie), and another origin's page (a
//! second HTTP server on another port, so the same *site*: the cookie goes along) tries
//! a form POST, a `no-cors` `text/plain` fetch, and a DNS-rebound `Host`: no run.

mod common;

use common::*;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis::api::access::{Access, AccessConfig, Role, TokenStore};
use trellis::api::{Api, serve};
use trellis::controller::Controller;
use trellis::points::browser::LogReader;

/// One HTTP/1.1 request with `headers` (lines ending in CRLF); returns (status,
/// lower-cased headers, body).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\n{headers}connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let (mut status, mut headers, mut len) = (String::new(), String::new(), 0usize);
    r.read_line(&mut status).unwrap();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        let line = line.to_ascii_lowercase();
        if let Some(v) = line.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
        headers.push_str(&line);
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).unwrap();
    (
        status[9..12].parse().unwrap(),
        headers,
        String::from_utf8(body).unwrap(),
    )
}

fn find_chromium() -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("chromium"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("`chromium` is not on PATH: run ./scripts/setup.sh (it installs Debian's chromium), then run this test again")
        })
}

/// A headless chromium in its own process group with a throwaway profile; the whole
/// group is killed when this is dropped, panics included.
struct Browser {
    child: Child,
    profile: tempfile::TempDir,
    port: u16,
}

impl Browser {
    fn launch(chromium: &Path) -> Browser {
        use std::os::unix::process::CommandExt;
        let profile = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(profile.path().join("chromium.log")).unwrap();
        let child = Command::new(chromium)
            .args([
                "--headless",
                // the sandbox needs privileges a test (often root in a container) lacks;
                // the browser only loads this test's loopback page
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--password-store=basic",
                "--remote-debugging-address=127.0.0.1",
                // a DNS name that resolves to the controller: a rebinding attack's view
                "--host-resolver-rules=MAP rebind.test 127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromium.display()));
        let mut b = Browser {
            child,
            profile,
            port: 0,
        };
        // chromium writes the port it picked into the profile
        let file = b.profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(60);
        while b.port == 0 {
            if let Some(port) = std::fs::read_to_string(&file)
                .ok()
                .and_then(|t| t.lines().next()?.parse().ok())
            {
                b.port = port;
            } else if Instant::now() > deadline || b.child.try_wait().unwrap().is_some() {
                let log = std::fs::read_to_string(b.profile.path().join("chromium.log"))
                    .unwrap_or_default();
                panic!("chromium did not open its DevTools port; its output:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        b
    }

    /// A DevTools session with the browser's first tab.
    fn tab(&self) -> Cdp {
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let (code, _, body) = http(addr, "GET", "/json/list", "", "");
        assert_eq!(code, 200, "{body}");
        let targets: Vec<Value> = serde_json::from_str(&body).unwrap();
        let url = targets
            .iter()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .unwrap_or_else(|| panic!("no page target: {body}"))
            .to_string();
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let (ws, _) = tungstenite::client(url.as_str(), stream)
            .unwrap_or_else(|e| panic!("DevTools websocket {url}: {e}"));
        let mut tab = Cdp {
            ws,
            next: 1,
            errors: Vec::new(),
        };
        tab.call("Runtime.enable", json!({}));
        tab.call("Log.enable", json!({}));
        tab
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // the launcher script, the browser and its helpers share this process group
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

struct Cdp {
    ws: tungstenite::WebSocket<TcpStream>,
    next: u64,
    /// Script exceptions and console/browser errors (a CSP violation included).
    errors: Vec<Value>,
}

impl Cdp {
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next;
        self.next += 1;
        let msg = json!({ "id": id, "method": method, "params": params }).to_string();
        self.ws
            .send(tungstenite::Message::text(msg))
            .unwrap_or_else(|e| panic!("DevTools {method}: {e}"));
        loop {
            let msg = self
                .ws
                .read()
                .unwrap_or_else(|e| panic!("DevTools {method}: {e}"));
            let Ok(text) = msg.to_text() else { continue };
            let Ok(v) = serde_json::from_str::<Value>(text) else {
                continue;
            };
            let favicon = v["params"]["entry"]["url"]
                .as_str()
                .is_some_and(|u| u.ends_with("/favicon.ico"));
            match v["method"].as_str() {
                Some("Runtime.exceptionThrown") => self.errors.push(v["params"].clone()),
                Some("Runtime.consoleAPICalled") if v["params"]["type"] == "error" => {
                    self.errors.push(v["params"].clone())
                }
                Some("Log.entryAdded") if v["params"]["entry"]["level"] == "error" && !favicon => {
                    self.errors.push(v["params"].clone())
                }
                _ => {}
            }
            if v["id"] == id {
                if !v["error"].is_null() {
                    panic!("DevTools {method}: {}", v["error"]);
                }
                return v["result"].clone();
            }
        }
    }

    /// Evaluate `expr` in the page: its value as JSON, or what it threw.
    fn try_eval(&mut self, expr: &str) -> Result<Value, Value> {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
        );
        match r["exceptionDetails"].is_null() {
            true => Ok(r["result"]["value"].clone()),
            false => Err(r["exceptionDetails"].clone()),
        }
    }

    fn eval(&mut self, expr: &str) -> Value {
        self.try_eval(expr)
            .unwrap_or_else(|e| panic!("page script `{expr}` threw: {e}"))
    }

    /// Poll `expr` until it is truthy (not false, null, 0, "" or []); returns its value.
    /// Until then it may also throw (a page still loading has no body yet).
    fn wait_for(&mut self, what: &str, expr: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.try_eval(expr) {
                Ok(v) => {
                    let falsy = v.is_null()
                        || v == false
                        || v == 0
                        || v == ""
                        || v.as_array().is_some_and(|a| a.is_empty());
                    if !falsy {
                        return v;
                    }
                    format!("= {v}")
                }
                Err(e) => format!("threw {e}"),
            };
            if Instant::now() > deadline {
                let page = self
                    .try_eval("document.body ? document.body.innerText : ''")
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default();
                panic!("timed out waiting for {what} (`{expr}` {last}); the page shows:\n{page}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url }));
    }
}

fn job(gates: &Path) -> String {
    let g = gates.display();
    // each gate waits at most 60 s, so a failed test leaves nothing running
    let wait = |n: u32| {
        format!(
            "n=0; while [ ! -e {g}/gate{n} ] && [ $n -lt 1200 ]; do sleep 0.05; n=$((n+1)); done"
        )
    };
    format!(
        r#"
name = "web-job"
agent = "linux"
[[step]]
name = "build"
run = '''
for i in $(seq 1 10); do echo line $i; sleep 0.05; done
printf 'plain \033[31mred\033[0m \033[1mbold\033[0m\033[2K \033[38;5;208morange\033[0m done\n'
echo '<b>not bold</b>'
{}
for i in $(seq 11 20); do echo line $i; sleep 0.1; done
{}
for i in $(seq 21 30); do echo line $i; sleep 0.05; done
'''
[[step]]
name = "after"
run = "echo after"
"#,
        wait(1),
        wait(2)
    )
}

const LINES: &str = "document.querySelectorAll('.line').length";

fn live(c: &Controller, id: &str) -> bool {
    !c.run(id).expect("the run exists").status.is_final()
}

/// Sign the tab in on the page at `url` with `token` (a viewer's), through its form.
fn sign_in(tab: &mut Cdp, url: &str, token: &str) {
    sign_in_as(tab, url, token, "viewer")
}

fn sign_in_as(tab: &mut Cdp, url: &str, token: &str, role: &str) {
    let t = Duration::from_secs(30);
    tab.navigate(url);
    tab.wait_for("the sign-in form", "document.getElementById('signin')", t);
    tab.eval(&format!(
        "document.getElementById('token').value = {}; document.querySelector('#signin button').click()",
        json!(token)
    ));
    tab.wait_for(
        "signed in",
        &format!("document.getElementById('who')?.textContent.includes('({role})')"),
        t,
    );
}

/// Serve the API of `s` on a free loopback port, guarded by its state dir's tokens;
/// (address, a viewer's token, an operator's token).
async fn serve_api(s: &Stack) -> (SocketAddr, String, String) {
    let api = Arc::new(Api {
        controller: s.controller.clone(),
        runtime: s.runtime.clone(),
        browsers: LogReader::new(s.runtime.get("file-browser").unwrap())
            .unwrap()
            .into(),
        instance_id: "test-controller".into(),
    });
    let state = s.dir.path().join("state");
    let access = Arc::new(Access::new(AccessConfig {
        state_dir: &state,
        bind: "127.0.0.1:0".parse().unwrap(),
        hosts: &[],
        open_metrics: false,
        tls: false,
    }));
    let tokens = TokenStore::in_state_dir(&state);
    let viewer = tokens.create("web-viewer", Role::Viewer).unwrap();
    let operator = tokens.create("web-operator", Role::Operator).unwrap();
    let addr = serve("127.0.0.1:0".parse().unwrap(), api, access, None)
        .await
        .unwrap();
    (addr, viewer, operator)
}

fn drive(
    chromium: &Path,
    addr: SocketAddr,
    controller: Arc<Controller>,
    gates: &Path,
    (viewer, operator): (&str, &str),
) {
    let t = Duration::from_secs(60);
    let browser = Browser::launch(chromium);
    let mut tab = browser.tab();
    let op = format!("authorization: Bearer {operator}\r\ncontent-type: application/toml\r\n");

    // the page and its script, with their headers
    let (code, headers, body) = http(addr, "GET", "/", "", "");
    assert_eq!(code, 200);
    assert!(
        headers.contains("content-type: text/html; charset=utf-8"),
        "{headers}"
    );
    assert!(
        headers.contains("content-security-policy: default-src 'none'; script-src 'self'"),
        "{headers}"
    );
    assert!(body.contains("<script src=\"/app.js\">"));
    let (code, headers, _) = http(addr, "GET", "/app.js", "", "");
    assert_eq!(code, 200);
    assert!(
        headers.contains("content-type: text/javascript"),
        "{headers}"
    );

    // submit, then sign in on the run's page (the viewer's token for a session cookie)
    // and watch it while the job waits on the first gate
    let (code, _, body) = http(addr, "POST", "/api/runs", &op, &job(gates));
    assert_eq!(code, 201, "{body}");
    let id = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    sign_in(&mut tab, &format!("http://{addr}/runs/{id}"), viewer);
    let cookie = tab.call(
        "Network.getCookies",
        json!({ "urls": [format!("http://{addr}/")] }),
    );
    let cookie = &cookie["cookies"][0];
    assert_eq!(cookie["name"], "trellis_session", "{cookie}");
    assert_eq!(cookie["httpOnly"], true, "{cookie}");
    assert_eq!(cookie["sameSite"], "Strict", "{cookie}");
    assert_eq!(
        tab.eval("document.cookie"),
        "",
        "the page's script cannot read the session"
    );
    tab.wait_for(
        "the run's page",
        "document.querySelector('details[data-step=build]')",
        t,
    );

    // sample 1: everything before the first gate (12 lines), the run still live
    tab.wait_for("the first 12 lines", &format!("{LINES} === 12"), t);
    assert!(
        live(&controller, &id),
        "the run must still be waiting on gate 1"
    );
    // The lines are drawn from the first page read before the page switches to the
    // live follow: wait for the switch (asserting at once failed once in four runs
    // under load, reading `loading`).
    tab.wait_for(
        "the live follow",
        "document.body.dataset.log === 'following'",
        t,
    );

    // the queue panel: with agent-1's one executor busy, a second run waits, and so
    // does one for a label no agent has declared; each row says why
    let queued = |job: &str| {
        let (code, _, body) = http(addr, "POST", "/api/runs", &op, job);
        assert_eq!(code, 201, "{body}");
        let v = serde_json::from_str::<Value>(&body).unwrap();
        assert_eq!(v["status"], "queued", "{body}");
        v["id"].as_str().unwrap().to_string()
    };
    let next =
        queued("name = \"next\"\nagent = \"linux\"\n[[step]]\nname = \"s\"\nrun = \"echo next\"\n");
    let gpu = queued(
        "name = \"on-gpu\"\nagent = \"gpu\"\npriority = 5\n[[step]]\nname = \"s\"\nrun = \"true\"\n",
    );
    tab.navigate(&format!("http://{addr}/"));
    let rows = tab.wait_for(
        "both waiting runs in the queue panel",
        "document.querySelectorAll('#queue-runs tbody tr').length === 2 && \
         [...document.querySelectorAll('#queue-runs tbody tr')].map(r => r.dataset.run + ': ' + r.innerText)",
        t,
    );
    let rows: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    // higher priority first
    assert!(rows[0].starts_with(&format!("{gpu}: 1")), "{rows:?}");
    assert!(
        rows[0].contains("no agent with label `gpu` is connected")
            && rows[0].contains("none has declared it")
            && rows[0].contains("linux"),
        "{rows:?}"
    );
    assert!(rows[1].starts_with(&format!("{next}: 2")), "{rows:?}");
    assert!(
        rows[1].contains("the 1 executor of label `linux` is busy"),
        "{rows:?}"
    );
    let summary = tab.eval("document.getElementById('queue-summary').textContent");
    assert!(
        summary
            .as_str()
            .unwrap()
            .contains("linux: 1/1 executors busy, 1 waiting"),
        "{summary}"
    );
    // back to the run, still waiting on gate 1
    tab.navigate(&format!("http://{addr}/runs/{id}"));
    tab.wait_for("the first 12 lines again", &format!("{LINES} === 12"), t);
    let first = tab.eval(LINES).as_u64().unwrap();
    assert!(live(&controller, &id));
    std::fs::write(gates.join("gate1"), "").unwrap();

    // sample 2: more lines arrived over the live follow, the run still live (gate 2)
    let second = tab
        .wait_for("more lines", &format!("{LINES} > {first} && {LINES}"), t)
        .as_u64()
        .unwrap();
    assert!(
        live(&controller, &id),
        "the run must still be waiting on gate 2"
    );
    assert!(second > first && first > 0, "{first} then {second}");
    std::fs::write(gates.join("gate2"), "").unwrap();

    // the end: every line once, in order, in its step
    tab.wait_for(
        "the end of the log",
        "document.body.dataset.log === 'complete'",
        t,
    );
    let lines = tab.eval(
        "[...document.querySelectorAll('.line')].map(l => ({ step: l.closest('details').dataset.step, \
         id: l.id, href: l.querySelector('a.ln').getAttribute('href'), text: l.querySelector('.msg').textContent }))",
    );
    let lines = lines.as_array().unwrap();
    let texts: Vec<&str> = lines.iter().map(|l| l["text"].as_str().unwrap()).collect();
    let mut want: Vec<String> = (1..=10).map(|i| format!("line {i}")).collect();
    want.push("plain red bold orange done".into());
    want.push("<b>not bold</b>".into());
    want.extend((11..=30).map(|i| format!("line {i}")));
    want.push("after".into());
    assert_eq!(texts, want);
    assert!(lines[..32].iter().all(|l| l["step"] == "build"));
    assert_eq!(lines[32]["step"], "after");

    // each line has its own anchor, which links to it
    for (i, l) in lines.iter().enumerate() {
        let want = if i < 32 {
            format!("build-L{}", i + 1)
        } else {
            "after-L1".into()
        };
        assert_eq!(l["id"], want.as_str());
        assert_eq!(l["href"], format!("#{want}").as_str());
    }

    // colours are elements with a class and a red colour; escapes and markup are text
    let red = tab.eval(
        "(() => { const s = [...document.querySelectorAll('.msg span')].find(s => s.textContent === 'red'); \
         return s && { cls: s.className, color: getComputedStyle(s).color }; })()",
    );
    assert_eq!(red["cls"], "f1", "{red}");
    let rgb: Vec<u32> = red["color"]
        .as_str()
        .unwrap()
        .trim_start_matches("rgb(")
        .trim_end_matches(')')
        .split(',')
        .map(|c| c.trim().parse().unwrap())
        .collect();
    assert!(
        rgb[0] > 200 && rgb[1] < 128 && rgb[2] < 128,
        "not red: {red}"
    );
    let bold = tab.eval("[...document.querySelectorAll('.msg span.b')].map(s => s.textContent)");
    assert_eq!(bold, json!(["bold"]));
    let orange = tab.eval(
        "getComputedStyle([...document.querySelectorAll('.msg span')].find(s => s.textContent === 'orange')).color",
    );
    assert_eq!(orange, "rgb(255, 135, 0)", "xterm colour 208");
    let text = tab.eval("document.getElementById('steps').textContent");
    let text = text.as_str().unwrap();
    assert!(!text.contains('\u{1b}') && !text.contains("[31m") && !text.contains("[2K"));
    assert_eq!(tab.eval("document.querySelectorAll('.log b').length"), 0);

    // the steps' results, and folding
    let summary =
        tab.eval("document.querySelector('details[data-step=build] summary').textContent");
    assert_eq!(summary, "succeededbuildexit 0");
    tab.eval("[...document.querySelectorAll('.tools button')].find(b => b.textContent === 'collapse all').click()");
    assert_eq!(
        tab.eval("document.querySelectorAll('#steps details[open]').length"),
        0
    );
    assert_eq!(
        tab.eval("document.getElementById('build-L3').checkVisibility()"),
        false
    );
    tab.eval("document.querySelector('details[data-step=after] summary').click()");
    assert_eq!(
        tab.eval("document.getElementById('after-L1').checkVisibility()"),
        true
    );
    assert_eq!(
        tab.eval("document.getElementById('build-L3').checkVisibility()"),
        false
    );

    // a click on a line's number highlights it (in a folded step too, once opened) and
    // the URL's hash keeps it across a reload
    tab.eval("document.querySelector('details[data-step=build]').open = true");
    tab.eval("document.querySelector('#build-L5 a').click()");
    tab.wait_for(
        "the clicked line highlighted",
        "location.hash === '#build-L5' && document.querySelector('.line.hl')?.id === 'build-L5'",
        t,
    );
    tab.eval("window.beforeReload = true");
    tab.call("Page.reload", json!({}));
    tab.wait_for(
        "the line highlighted after a reload",
        "!window.beforeReload && document.body.dataset.log === 'complete' && \
         [...document.querySelectorAll('.line.hl')].map(l => l.id).join() === 'build-L5'",
        t,
    );

    // the queued run took the freed executor and ran; the gpu run waits until cancelled
    let placed = Instant::now();
    while controller.run(&next).unwrap().agent.is_empty() {
        assert!(placed.elapsed() < t, "{:?}", controller.run(&next));
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = controller.run(&next).unwrap();
    assert_eq!(r.agent, "agent-1", "{r:?}");
    let (code, _, body) = http(addr, "POST", &format!("/api/runs/{gpu}/cancel"), &op, "");
    assert_eq!(code, 202, "{body}");
    assert_eq!(
        controller.run(&gpu).unwrap().status,
        trellis::controller::state::RunStatus::Cancelled
    );

    // the runs list shows the run, and the queue panel that nothing waits
    tab.navigate(&format!("http://{addr}/"));
    tab.wait_for(
        "an empty queue",
        "document.getElementById('queue-summary')?.textContent.startsWith('Nothing waits')",
        t,
    );
    let row = tab.wait_for(
        "the run in the runs list",
        &format!("document.querySelector('#runs tr[data-run=\"{id}\"]')?.innerText"),
        t,
    );
    let row = row.as_str().unwrap();
    for want in [id.as_str(), "web-job", "succeeded", "agent-1"] {
        assert!(row.contains(want), "{want} missing from the row: {row}");
    }
    assert_eq!(
        tab.eval(&format!(
            "document.querySelector('#runs tr[data-run=\"{id}\"] a').getAttribute('href')"
        )),
        format!("/runs/{id}").as_str()
    );

    // paging: with pages of 2 (`?limit=2`), the newest two runs, then "more" adds the
    // older one below them
    let mut newer = Vec::new();
    for _ in 0..2 {
        let (code, _, body) = http(
            addr,
            "POST",
            "/api/runs",
            &op,
            "name = \"paged\"\nagent = \"linux\"\n[[step]]\nname = \"s\"\nrun = \"true\"\n",
        );
        assert_eq!(code, 201, "{body}");
        newer.push(
            serde_json::from_str::<Value>(&body).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    tab.navigate(&format!("http://{addr}/?limit=2"));
    let rows =
        "[...document.querySelectorAll('#runs tr[data-run]')].map(r => r.dataset.run).join()";
    tab.wait_for(
        "the first page: the newest two",
        &format!(
            "{rows} === '{},{}' && !document.getElementById('more').hidden",
            newer[1], newer[0]
        ),
        t,
    );
    // "more" until there is no more: then the page lists every run, newest first, the
    // same as the API (the runs of the queue checks above included), ending with `id`
    let (code, _, body) = http(addr, "GET", "/api/runs?limit=500", &op, "");
    assert_eq!(code, 200, "{body}");
    let all: Vec<String> = serde_json::from_str::<Value>(&body).unwrap()["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert!(all.len() > 3 && all.starts_with(&[newer[1].clone(), newer[0].clone()]));
    assert_eq!(all.last(), Some(&id));
    tab.wait_for(
        "the older pages below it, and no more",
        &format!(
            "(() => {{ const m = document.getElementById('more'); if (!m.hidden && !m.disabled) m.click(); return {rows} === '{}' && m.hidden; }})()",
            all.join(",")
        ),
        t,
    );
    assert!(
        tab.errors.is_empty(),
        "errors in the page: {:?}",
        tab.errors
    );
    drop(tab);
    drop(browser);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_page_in_chromium() {
    let chromium = find_chromium();
    let s = stack().await;
    let (_agent, _stop) = start_agent(&s, "agent-1", "agent-secret");
    wait_connected(&s.controller).await;
    let (addr, viewer, operator) = serve_api(&s).await;
    let gates = s.dir.path().join("gates");
    std::fs::create_dir_all(&gates).unwrap();
    let controller = s.controller.clone();
    // the DevTools client blocks; the controller and agent keep running on the runtime
    let done = tokio::task::spawn_blocking(move || {
        drive(&chromium, addr, controller, &gates, (&viewer, &operator))
    })
    .await;
    if let Err(e) = done {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// Another origin's page, served on another port of the same host: the same *site*, so
/// the browser sends the SameSite=Strict cookie along. It tries a job submit as a form
/// POST (`text/plain`) and as a `no-cors` `text/plain` fetch, with an operator signed
/// in. Then a DNS name that resolves to the controller (rebinding) is refused by its
/// `Host`. No run is created by any of it; the page's own same-origin submit works.
fn attack(chromium: &Path, addr: SocketAddr, controller: Arc<Controller>, operator: &str) {
    let t = Duration::from_secs(30);
    let api = format!("http://{addr}");
    let job = "name = \"csrf\"\nagent = \"linux\"\n[[step]]\nname = \"s\"\nrun = \"echo pwned\"\n";
    let page = format!(
        r#"<!doctype html><html><body>
<form id="f" method="POST" action="{api}/api/runs" enctype="text/plain"><input type="hidden" name='name = "csrf-form"&#10;agent = "linux"&#10;[[step]]&#10;name = "s"&#10;run = "echo x' value='"'></form>
<script>
fetch("{api}/api/runs", {{ method: "POST", mode: "no-cors", credentials: "include",
  headers: {{ "content-type": "text/plain" }}, body: {job} }})
  .then(() => {{ document.title = "fetch sent"; }}, (e) => {{ document.title = "fetch failed " + e; }})
  .finally(() => setTimeout(() => document.getElementById("f").submit(), 200));
</script></body></html>"#,
        job = json!(job)
    );
    let evil = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let evil_addr = evil.local_addr().unwrap();
    // bounded: a few page loads (and a favicon), then the thread ends
    std::thread::spawn(move || {
        for conn in evil.incoming().take(8) {
            let Ok(mut c) = conn else { continue };
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let _ = write!(
                c,
                "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{page}",
                page.len()
            );
        }
    });

    let browser = Browser::launch(chromium);
    let mut tab = browser.tab();
    sign_in_as(&mut tab, &format!("{api}/"), operator, "operator");

    // 1, 2: the other origin's fetch, then its form
    tab.navigate(&format!("http://{evil_addr}/attack"));
    tab.wait_for(
        "the form's POST to land on the API",
        &format!("location.href === '{api}/api/runs' && document.body && document.body.innerText"),
        t,
    );
    let shown = tab.eval("document.body.innerText");
    assert!(
        shown
            .as_str()
            .unwrap()
            .contains("may not change anything here"),
        "the form POST was not refused as cross-site: {shown}"
    );
    assert!(
        controller.runs().is_empty(),
        "a cross-site request made a run: {:?}",
        controller.runs()
    );

    // 3: DNS rebinding: a name the attacker controls, resolving to the controller
    let rebound = format!("http://rebind.test:{}", addr.port());
    tab.navigate(&format!("{rebound}/"));
    tab.wait_for(
        "the rebound page",
        "document.body && document.body.innerText.includes('does not answer to the host')",
        t,
    );
    let status = tab.eval(&format!(
        "fetch('/api/runs', {{ method: 'POST', headers: {{ 'content-type': 'application/toml' }}, body: {} }}).then(r => r.status)",
        json!(job)
    ));
    assert_eq!(status, 421, "a rebound Host must be refused");
    assert!(controller.runs().is_empty(), "{:?}", controller.runs());

    // the control: the signed-in page itself may submit (so the refusals above came from
    // the cross-site checks, not from a missing session)
    tab.navigate(&format!("{api}/"));
    tab.wait_for("the runs page", "document.getElementById('who')", t);
    let status = tab.eval(&format!(
        "fetch('/api/runs', {{ method: 'POST', headers: {{ 'content-type': 'application/toml' }}, body: {} }}).then(r => r.status)",
        json!(job)
    ));
    assert_eq!(status, 201);
    let runs = controller.runs();
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].job, "csrf");
    assert_eq!(runs[0].submitted_by, "web-operator");
    drop(tab);
    drop(browser);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_origins_cannot_submit_in_chromium() {
    let chromium = find_chromium();
    let s = stack().await;
    let (_agent, _stop) = start_agent(&s, "agent-1", "agent-secret");
    wait_connected(&s.controller).await;
    let (addr, _viewer, operator) = serve_api(&s).await;
    let controller = s.controller.clone();
    let done =
        tokio::task::spawn_blocking(move || attack(&chromium, addr, controller, &operator)).await;
    if let Err(e) = done {
        std::panic::resume_unwind(e.into_panic());
    }
}
