//! The HTTP API over a live controller and agent: submit, show, list, log pages (cursor,
//! step, tail), live follow over SSE to the end, cancel, agents, plugins, metrics; and
//! the route table: every route the router serves has an access rule, and keeps it for
//! each role.

mod common;

use common::*;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use trellis::api::access::{Access, AccessConfig, Role, Rule, TokenStore, rule};
use trellis::api::{Api, serve, served_routes};
use trellis::points::browser::LogReader;

/// The API's address and the token requests carry (none: no `Authorization`).
#[derive(Clone, Copy)]
struct Target {
    addr: SocketAddr,
    token: Option<&'static str>,
}

/// One request, `Connection: close`; returns (status, body).
async fn http(t: Target, method: &str, path: &str, body: &str) -> (u16, String) {
    let addr = t.addr;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = t
        .token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\n{auth}connection: close\r\ncontent-type: application/toml\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    let status = resp[9..12].parse().unwrap();
    let body = resp
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Follow `path` (SSE) to its `end`: the `line` events' messages and the `end` payload.
async fn follow(t: Target, path: &str) -> (Vec<String>, serde_json::Value) {
    let mut stream = tokio::net::TcpStream::connect(t.addr).await.unwrap();
    let auth = t
        .token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    stream
        .write_all(
            format!(
                "GET {path} HTTP/1.1\r\nhost: localhost\r\n{auth}accept: text/event-stream\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut lines = BufReader::new(stream).lines();
    let (mut messages, mut event) = (Vec::new(), String::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .expect("follow stalled")
            .unwrap()
            .expect("stream ended early");
        if let Some(e) = line.strip_prefix("event: ") {
            event = e.to_string();
        } else if let Some(d) = line.strip_prefix("data: ") {
            match event.as_str() {
                "line" => messages.push(json(d)["message"].as_str().unwrap().to_string()),
                "end" => return (messages, json(d)),
                _ => {}
            }
        }
    }
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

const JOB: &str = r#"
name = "api-job"
agent = "linux"
secrets = { TOKEN = "deploy-token" }
[[step]]
name = "one"
run = "for i in $(seq 1 300); do echo line $i; done; echo token=$TOKEN"
[[step]]
name = "two"
run = "sleep 0.3; echo last"
"#;

/// The API of `s` on a free loopback port, guarded by the tokens in its state dir.
async fn serve_api(s: &Stack) -> SocketAddr {
    let reader = LogReader::new(s.runtime.get("file-browser").unwrap()).unwrap();
    let api = Arc::new(Api {
        controller: s.controller.clone(),
        runtime: s.runtime.clone(),
        browsers: reader.into(),
        instance_id: "test-controller".into(),
    });
    let access = Arc::new(Access::new(AccessConfig {
        state_dir: &s.dir.path().join("state"),
        bind: "127.0.0.1:0".parse().unwrap(),
        hosts: &[],
        open_metrics: false,
        tls: false,
    }));
    serve("127.0.0.1:0".parse().unwrap(), api, access, None)
        .await
        .unwrap()
}

/// A token made in `s`'s state dir, leaked for `Target`'s sake (tests only).
fn token(s: &Stack, name: &str, role: Role) -> &'static str {
    let t = TokenStore::in_state_dir(&s.dir.path().join("state"))
        .create(name, role)
        .unwrap();
    Box::leak(t.into_boxed_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_end_to_end() {
    let s = stack().await;
    let (_agent, _stop) = start_agent(&s, "agent-1", "agent-secret");
    wait_connected(&s.controller).await;
    let addr = Target {
        addr: serve_api(&s).await,
        token: Some(token(&s, "test-operator", Role::Operator)),
    };

    // bad input is named
    let (code, body) = http(
        addr,
        "POST",
        "/api/runs",
        "name = \"x\"\nagent = \"linux\"\n",
    )
    .await;
    assert_eq!(code, 400);
    assert!(body.contains("no steps"), "{body}");

    // submit, then follow live until the end
    let (code, body) = http(addr, "POST", "/api/runs", JOB).await;
    assert_eq!(code, 201, "{body}");
    let id = json(&body)["id"].as_str().unwrap().to_string();
    assert_eq!(json(&body)["submitted_by"], "test-operator", "{body}");
    let (messages, ended) = follow(addr, &format!("/api/runs/{id}/log/follow")).await;
    assert_eq!(ended["status"], "succeeded");
    assert_eq!(messages.len(), 302, "every line once, then the end");
    assert_eq!(messages[0], "line 1");
    assert_eq!(messages[299], "line 300");
    assert_eq!(messages[300], "token=****");
    assert_eq!(messages[301], "last");

    // pages, step filter, tail
    let (code, body) = http(addr, "GET", &format!("/api/runs/{id}/log?limit=100"), "").await;
    assert_eq!(code, 200);
    let page = json(&body);
    assert_eq!(page["events"].as_array().unwrap().len(), 100);
    assert_eq!(page["completeness"]["state"], "complete");
    let next = page["next"].as_str().unwrap();
    let (_, body) = http(
        addr,
        "GET",
        &format!("/api/runs/{id}/log?cursor={next}&limit=1"),
        "",
    )
    .await;
    assert_eq!(json(&body)["events"][0]["message"], "line 101");
    // following from a page's cursor starts there
    let (rest, _) = follow(addr, &format!("/api/runs/{id}/log/follow?cursor={next}")).await;
    assert_eq!(rest.len(), 202);
    assert_eq!(rest[0], "line 101");
    let (_, body) = http(addr, "GET", &format!("/api/runs/{id}/log?step=two"), "").await;
    assert_eq!(json(&body)["events"].as_array().unwrap().len(), 1);
    let (_, body) = http(addr, "GET", &format!("/api/runs/{id}/log?tail=2"), "").await;
    let tail: Vec<_> = json(&body)["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(tail, vec!["token=****", "last"]);

    // show, list, cancel of a finished run, unknown run
    let (code, body) = http(addr, "GET", &format!("/api/runs/{id}"), "").await;
    assert_eq!(code, 200);
    assert_eq!(json(&body)["steps"].as_array().unwrap().len(), 2);
    let (_, body) = http(addr, "GET", "/api/runs", "").await;
    let list = json(&body);
    assert_eq!(list["runs"].as_array().unwrap().len(), 1, "{body}");
    assert_eq!(list["runs"][0]["id"], id.as_str());
    assert_eq!(list["runs"][0]["label"], "linux");
    assert_eq!(list["runs"][0]["status"], "succeeded");
    assert!(list["runs"][0].get("steps").is_none(), "a summary: {body}");
    assert!(list["next"].is_null(), "{body}");
    assert_eq!(
        http(addr, "POST", &format!("/api/runs/{id}/cancel"), "")
            .await
            .0,
        409
    );
    assert_eq!(http(addr, "GET", "/api/runs/r-999999", "").await.0, 404);

    // cancel a running one
    let (_, body) = http(
        addr,
        "POST",
        "/api/runs",
        "name = \"long\"\nagent = \"linux\"\n[[step]]\nname = \"s\"\nrun = \"sleep 30\"\n",
    )
    .await;
    let long = json(&body)["id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        http(addr, "POST", &format!("/api/runs/{long}/cancel"), "")
            .await
            .0,
        202
    );
    let mut status = String::new();
    for _ in 0..100 {
        status = json(&http(addr, "GET", &format!("/api/runs/{long}"), "").await.1)["status"]
            .as_str()
            .unwrap()
            .to_string();
        if status == "cancelled" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, "cancelled");

    // a label no agent has declared: accepted and queued (no 409), the queue says why;
    // cancelled while it waits, it ends at once
    let (code, body) = http(
        addr,
        "POST",
        "/api/runs",
        &JOB.replace("agent = \"linux\"", "agent = \"arm\""),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let arm = json(&body);
    assert_eq!(
        (arm["status"].as_str(), arm["agent"].as_str()),
        (Some("queued"), Some("")),
        "{body}"
    );
    assert_eq!(arm["label"], "arm", "{body}");
    let arm = arm["id"].as_str().unwrap().to_string();
    let (code, body) = http(addr, "GET", "/api/queue", "").await;
    assert_eq!(code, 200, "{body}");
    let q = json(&body);
    assert_eq!(q["waiting"][0]["run"], arm.as_str(), "{body}");
    assert_eq!(q["waiting"][0]["position"], 1, "{body}");
    assert_eq!(q["waiting"][0]["label"], "arm", "{body}");
    let reason = q["waiting"][0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("no agent with label `arm` is connected")
            && reason.contains("labels declared: linux"),
        "{reason}"
    );
    assert_eq!(
        http(addr, "POST", &format!("/api/runs/{arm}/cancel"), "")
            .await
            .0,
        202
    );
    let (_, body) = http(addr, "GET", &format!("/api/runs/{arm}"), "").await;
    assert_eq!(json(&body)["status"], "cancelled", "{body}");
    assert!(
        json(&body)["note"]
            .as_str()
            .unwrap()
            .contains("cancelled while queued"),
        "{body}"
    );
    let (_, body) = http(addr, "GET", "/api/queue", "").await;
    assert_eq!(json(&body)["waiting"], serde_json::json!([]), "{body}");

    // agents, plugins, metrics
    let (_, body) = http(addr, "GET", "/api/agents", "").await;
    assert_eq!(json(&body)[0]["name"], "agent-1");
    assert_eq!(json(&body)[0]["executors"], 1, "{body}");
    assert_eq!(json(&body)[0]["busy"], 0, "{body}");
    let (_, body) = http(addr, "GET", "/api/plugins", "").await;
    let names: Vec<_> = json(&body)
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    assert!(
        names.contains(&"file-logging".to_string()) && names.contains(&"tcp-transport".to_string()),
        "{names:?}"
    );
    let (code, body) = http(addr, "GET", "/metrics", "").await;
    assert_eq!(code, 200);
    assert!(
        body.contains("trellis_plugin_calls_total{plugin=\"file-logging\"}"),
        "{body}"
    );
}

/// `GET /api/runs` pages by cursor, newest first: a page's `next` goes on where it
/// ended however many runs were submitted since; filters; bad parameters are named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runs_list_pages_by_cursor_and_filters() {
    let s = stack().await;
    let (_agent, _stop) = start_agent(&s, "agent-1", "agent-secret");
    wait_connected(&s.controller).await;
    let addr = Target {
        addr: serve_api(&s).await,
        token: Some(token(&s, "pager", Role::Operator)),
    };
    let quick = |name: &str, run: &str| {
        format!("name = \"{name}\"\nagent = \"linux\"\n[[step]]\nname = \"s\"\nrun = \"{run}\"\n")
    };
    let controller = &s.controller;
    let submit = |job: String| async move {
        let (code, body) = http(addr, "POST", "/api/runs", &job).await;
        assert_eq!(code, 201, "{body}");
        let id = json(&body)["id"].as_str().unwrap().to_string();
        wait_final(controller, &id, Duration::from_secs(30)).await;
        id
    };
    let mut ids = Vec::new();
    for i in 0..5 {
        let job = if i % 2 == 0 {
            quick("even", "true")
        } else {
            quick("odd", "exit 1")
        };
        ids.push(submit(job).await);
    }
    let page = |query: String| async move {
        let (code, body) = http(addr, "GET", &format!("/api/runs{query}"), "").await;
        assert_eq!(code, 200, "{body}");
        let v = json(&body);
        let ids: Vec<String> = v["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect();
        (ids, v["next"].as_str().map(str::to_string))
    };
    let (first, next) = page("?limit=2".into()).await;
    assert_eq!(first, [ids[4].clone(), ids[3].clone()]);
    let next = next.expect("more pages");
    // new runs arrive; the next page still goes on where the first ended
    ids.push(submit(quick("even", "true")).await);
    ids.push(submit(quick("odd", "true")).await);
    let (second, next) = page(format!("?limit=2&cursor={next}")).await;
    assert_eq!(second, [ids[2].clone(), ids[1].clone()]);
    let (third, next) = page(format!("?limit=2&cursor={}", next.unwrap())).await;
    assert_eq!(third, [ids[0].clone()]);
    assert_eq!(next, None, "the last page");
    let (all, _) = page(String::new()).await;
    assert_eq!(all.len(), 7, "all within the default limit");
    assert_eq!(all[0], ids[6], "newest first");
    // filters
    let (failed, _) = page("?status=failed".into()).await;
    assert_eq!(failed, [ids[3].clone(), ids[1].clone()]);
    let (odd, _) = page("?job=odd&label=linux&agent=agent-1".into()).await;
    assert_eq!(odd, [ids[6].clone(), ids[3].clone(), ids[1].clone()]);
    let (none, next) = page("?label=gpu".into()).await;
    assert!(none.is_empty() && next.is_none());
    // bad parameters: 400 naming the parameter and what it accepts
    for (query, names) in [
        ("limit=0", "`limit` must be a number from 1 to 500"),
        ("limit=many", "`limit`"),
        (
            "cursor=yesterday",
            "`cursor` must be the `next` of an earlier page",
        ),
        ("status=green", "queued, running, succeeded, failed"),
        ("labels=gpu", "unknown parameter `labels`"),
    ] {
        let (code, body) = http(addr, "GET", &format!("/api/runs?{query}"), "").await;
        assert_eq!(code, 400, "{query}: {body}");
        let e = json(&body)["error"].as_str().unwrap().to_string();
        assert!(e.contains(names), "{query}: {e}");
    }
}

/// Every route the router serves has a rule in `access::RULES`, every rule names a
/// served route, and each route answers each kind of caller as its rule says: nobody
/// 401, too small a role 403, enough of one neither. A new route without a rule fails
/// here (and is refused at run time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_has_a_rule_and_keeps_it() {
    let s = stack().await;
    let addr = serve_api(&s).await;
    let callers = [
        ("nobody", None, None),
        (
            "viewer",
            Some(Role::Viewer),
            Some(token(&s, "v", Role::Viewer)),
        ),
        (
            "operator",
            Some(Role::Operator),
            Some(token(&s, "o", Role::Operator)),
        ),
        (
            "admin",
            Some(Role::Admin),
            Some(token(&s, "a", Role::Admin)),
        ),
    ];
    let served = served_routes();
    for (method, path, _) in trellis::api::access::RULES {
        assert!(
            served
                .iter()
                .any(|(m, p)| m.as_str() == *method && p == path),
            "access::RULES has {method} {path}, which no router serves: remove the rule"
        );
    }
    for (method, path) in &served {
        let rule = rule(method, path).unwrap_or_else(|| {
            panic!("{method} {path} has no rule in api::access::RULES: add one")
        });
        let concrete = path
            .replace("{id}", "r-999999")
            .replace("{*name}", "a/b")
            .replace("{name}", "no-such-plugin");
        for (who, role, token) in callers {
            let body = if method.as_str() == "POST" { "{}" } else { "" };
            let (code, text) = http(Target { addr, token }, method.as_str(), &concrete, body).await;
            let allowed = match rule {
                Rule::Public => true,
                Rule::Metrics | Rule::Needs(Role::Viewer) => role.is_some(),
                Rule::Needs(need) => role.is_some_and(|r| r >= need),
            };
            if allowed {
                assert!(
                    code != 401 && code != 403 && code != 500,
                    "{method} {path} as {who}: {code} {text}"
                );
            } else {
                let want = if role.is_none() { 401 } else { 403 };
                assert_eq!(code, want, "{method} {path} as {who}: {text}");
            }
        }
    }
    // a wrong token is a 401 even on a public route's neighbour
    let (code, text) = http(
        Target {
            addr,
            token: Some("trellis_0000"),
        },
        "GET",
        "/api/runs",
        "",
    )
    .await;
    assert_eq!(code, 401, "{text}");
    assert!(text.contains("trellis token create"), "{text}");
    // a viewer is told which role it needs
    let (code, text) = http(
        Target {
            addr,
            token: callers[1].2,
        },
        "POST",
        "/api/plugins/file-logging/reload",
        "{}",
    )
    .await;
    assert_eq!(code, 403);
    assert!(text.contains("needs the `admin` role"), "{text}");
}
