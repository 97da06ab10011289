//! CLI commands that talk to a controller's HTTP API: run, runs, logs, cancel, agents,
//! artifacts.
//! Plain HTTP/1.1 over loopback or a trusted network; the server is `--server` or
//! `$TRELLIS_SERVER` (default http://127.0.0.1:8080).

use std::process::ExitCode;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

pub struct Server(String);

impl Server {
    pub fn new(given: Option<String>) -> anyhow::Result<Server> {
        let url = given
            .or_else(|| std::env::var("TRELLIS_SERVER").ok())
            .unwrap_or_else(|| "http://127.0.0.1:8080".into());
        let host = url
            .strip_prefix("http://")
            .ok_or_else(|| anyhow::anyhow!("`{url}`: only http:// servers are supported"))?;
        Ok(Server(host.trim_end_matches('/').to_string()))
    }

    async fn connect(&self) -> anyhow::Result<tokio::net::TcpStream> {
        tokio::net::TcpStream::connect(&self.0)
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach the controller at http://{}: {e}", self.0))
    }

    async fn request(
        &self,
        method: &str,
        path: &str,
        body: &str,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let mut s = self.connect().await?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            self.0,
            body.len()
        );
        s.write_all(req.as_bytes()).await?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).await?;
        let text = String::from_utf8_lossy(&resp);
        let status: u16 = text
            .get(9..12)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("not an HTTP response from {}", self.0))?;
        let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
        let json =
            serde_json::from_str(body).unwrap_or(serde_json::Value::String(body.to_string()));
        Ok((status, json))
    }
}

fn fail(status: u16, v: &serde_json::Value) -> anyhow::Error {
    let mut msg = v
        .get("error")
        .and_then(|e| e.as_str())
        .unwrap_or("request failed")
        .to_string();
    if let Some(p) = v.get("problems").and_then(|p| p.as_array()) {
        for i in p {
            msg.push_str(&format!("\n  - {}", i.as_str().unwrap_or_default()));
        }
    }
    anyhow::anyhow!("{msg} (HTTP {status})")
}

fn outcome_code(run: &serde_json::Value) -> ExitCode {
    if run["status"] == "succeeded" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

pub async fn run(server: &Server, job: &std::path::Path, follow: bool) -> anyhow::Result<ExitCode> {
    let text =
        std::fs::read_to_string(job).map_err(|e| anyhow::anyhow!("{}: {e}", job.display()))?;
    let (status, v) = server.request("POST", "/api/runs", &text).await?;
    if status != 201 {
        return Err(fail(status, &v));
    }
    let id = v["id"].as_str().unwrap_or_default().to_string();
    eprintln!(
        "trellis: run {id} of job `{}` on {}",
        v["job"].as_str().unwrap_or_default(),
        v["agent"].as_str().unwrap_or_default()
    );
    if !follow {
        println!("{id}");
        return Ok(ExitCode::SUCCESS);
    }
    follow_log(server, &id, None).await
}

/// Stream a run's log until it ended and the log is complete; exit with its status.
pub async fn follow_log(server: &Server, id: &str, step: Option<&str>) -> anyhow::Result<ExitCode> {
    let mut s = server.connect().await?;
    let q = step.map(|s| format!("?step={s}")).unwrap_or_default();
    s.write_all(format!("GET /api/runs/{id}/log/follow{q} HTTP/1.1\r\nhost: {}\r\naccept: text/event-stream\r\n\r\n", server.0).as_bytes()).await?;
    let mut lines = BufReader::new(s).lines();
    let first = lines.next_line().await?.unwrap_or_default();
    if !first.contains(" 200 ") {
        anyhow::bail!("cannot follow run `{id}`: {first}");
    }
    let mut event = String::new();
    let mut step_shown = String::new();
    while let Some(line) = lines.next_line().await? {
        if let Some(e) = line.strip_prefix("event: ") {
            event = e.to_string();
        } else if let Some(d) = line.strip_prefix("data: ") {
            let v: serde_json::Value = serde_json::from_str(d).unwrap_or_default();
            match event.as_str() {
                "line" => {
                    let st = v["step"].as_str().unwrap_or_default();
                    if st != step_shown {
                        eprintln!("trellis: ── step {st}");
                        step_shown = st.to_string();
                    }
                    println!("{}", v["message"].as_str().unwrap_or_default());
                }
                "error" => eprintln!("trellis: {d}"),
                "end" => {
                    eprintln!(
                        "trellis: run {id} {}",
                        v["status"].as_str().unwrap_or_default()
                    );
                    return Ok(outcome_code(&v));
                }
                _ => {}
            }
        }
    }
    anyhow::bail!("the controller closed the stream before run {id} ended")
}

pub async fn runs(server: &Server) -> anyhow::Result<ExitCode> {
    let (status, v) = server.request("GET", "/api/runs", "").await?;
    if status != 200 {
        return Err(fail(status, &v));
    }
    println!(
        "{:<10} {:<24} {:<12} {:<10} EVENTS",
        "RUN", "JOB", "AGENT", "STATUS"
    );
    for r in v.as_array().into_iter().flatten() {
        println!(
            "{:<10} {:<24} {:<12} {:<10} {}",
            r["id"].as_str().unwrap_or_default(),
            r["job"].as_str().unwrap_or_default(),
            r["agent"].as_str().unwrap_or_default(),
            r["status"].as_str().unwrap_or_default(),
            r["events"]
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn logs(
    server: &Server,
    id: &str,
    step: Option<String>,
    tail: Option<u32>,
    follow: bool,
) -> anyhow::Result<ExitCode> {
    if follow {
        return follow_log(server, id, step.as_deref()).await;
    }
    let mut q = Vec::new();
    if let Some(s) = &step {
        q.push(format!("step={s}"));
    }
    if let Some(n) = tail {
        q.push(format!("tail={n}"));
    }
    let mut cursor: Option<String> = None;
    loop {
        let mut qq = q.clone();
        if let Some(c) = &cursor {
            qq.push(format!("cursor={c}"));
        }
        let path = format!(
            "/api/runs/{id}/log{}{}",
            if qq.is_empty() { "" } else { "?" },
            qq.join("&")
        );
        let (status, v) = server.request("GET", &path, "").await?;
        if status != 200 {
            return Err(fail(status, &v));
        }
        let events = v["events"].as_array().cloned().unwrap_or_default();
        for e in &events {
            println!("{}", e["message"].as_str().unwrap_or_default());
        }
        if tail.is_some() || events.is_empty() {
            match v["completeness"]["state"].as_str() {
                Some("incomplete") => eprintln!(
                    "trellis: the log store has {} of {} events so far",
                    v["completeness"]["present"], v["completeness"]["expected"]
                ),
                Some("open") => eprintln!(
                    "trellis: the log is still open: more may come (--follow waits for it)"
                ),
                _ => {}
            }
            return Ok(ExitCode::SUCCESS);
        }
        cursor = v["next"].as_str().map(str::to_string);
    }
}

pub async fn cancel(server: &Server, id: &str) -> anyhow::Result<ExitCode> {
    let (status, v) = server
        .request("POST", &format!("/api/runs/{id}/cancel"), "")
        .await?;
    if status != 202 {
        return Err(fail(status, &v));
    }
    eprintln!("trellis: cancelling {id}");
    Ok(ExitCode::SUCCESS)
}

pub async fn agents(server: &Server) -> anyhow::Result<ExitCode> {
    let (status, v) = server.request("GET", "/api/agents", "").await?;
    if status != 200 {
        return Err(fail(status, &v));
    }
    println!("{:<16} LABELS", "AGENT");
    for a in v.as_array().into_iter().flatten() {
        let labels: Vec<_> = a["labels"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l.as_str())
            .collect();
        println!(
            "{:<16} {}",
            a["name"].as_str().unwrap_or_default(),
            labels.join(",")
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn artifacts(server: &Server, id: &str) -> anyhow::Result<ExitCode> {
    let (status, v) = server
        .request("GET", &format!("/api/runs/{id}/artifacts"), "")
        .await?;
    if status != 200 {
        return Err(fail(status, &v));
    }
    let list = v.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        eprintln!("trellis: run {id} has no artifacts");
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:>12}  {:<16} {:<16} NAME", "SIZE", "STEP", "SHA256");
    for a in &list {
        let sha = a["sha256"].as_str().unwrap_or_default();
        println!(
            "{:>12}  {:<16} {:<16} {}",
            a["size"].as_u64().unwrap_or_default(),
            a["step"].as_str().unwrap_or("(run)"),
            sha.get(..16).unwrap_or(sha),
            a["name"].as_str().unwrap_or_default(),
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Percent-encode a path, keeping its `/` separators.
fn encode_path(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    for b in p.bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Download one artifact, streaming it to `output` (default: its file name here), and
/// check it against the SHA-256 the controller recorded; a mismatch removes the file.
pub async fn get_artifact(
    server: &Server,
    id: &str,
    name: &str,
    output: Option<std::path::PathBuf>,
) -> anyhow::Result<ExitCode> {
    use sha2::Digest;
    let mut s = server.connect().await?;
    let req = format!(
        "GET /api/runs/{id}/artifacts/{} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n",
        encode_path(name),
        server.0
    );
    s.write_all(req.as_bytes()).await?;
    let mut r = BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let status: u16 = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    if status != 200 {
        let mut body = String::new();
        r.read_to_string(&mut body).await?;
        let v = serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body));
        return Err(fail(status, &v));
    }
    let header = |h: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(h).then(|| v.trim().to_string())
        })
    };
    let expected = header("x-checksum-sha256").unwrap_or_default();
    let size: u64 = header("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let to_stdout = output.as_deref() == Some(std::path::Path::new("-"));
    let path = output.unwrap_or_else(|| name.rsplit('/').next().unwrap_or(name).into());
    let mut sink: Box<dyn tokio::io::AsyncWrite + Unpin> = if to_stdout {
        Box::new(tokio::io::stdout())
    } else {
        Box::new(
            tokio::fs::File::create(&path)
                .await
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
        )
    };
    let mut hash = sha2::Sha256::new();
    let mut got = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    let mut body = r.take(size);
    loop {
        let n = body.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        sink.write_all(&buf[..n]).await?;
        got += n as u64;
    }
    sink.flush().await?;
    let actual = hex::encode(hash.finalize());
    if got != size || actual != expected {
        if !to_stdout {
            let _ = std::fs::remove_file(&path);
        }
        anyhow::bail!(
            "artifact `{name}` arrived damaged ({got} of {size} bytes, SHA-256 {actual}, expected {expected}); removed"
        );
    }
    if !to_stdout {
        eprintln!(
            "trellis: {} ({size} bytes, SHA-256 {expected}) checked",
            path.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `trellis cluster status`: each controller's own view (role, token, last fencing),
/// and the leader lease as etcd has it. Exit 0 when a controller reports itself
/// active, 1 otherwise (no active controller is an outage worth a non-zero exit).
pub async fn cluster_status(servers: &[Server], json: bool) -> anyhow::Result<ExitCode> {
    let mut views = Vec::new();
    for s in servers {
        let view = match s.request("GET", "/api/cluster", "").await {
            Ok((200, v)) => v,
            Ok((status, v)) => serde_json::json!({ "error": fail(status, &v).to_string() }),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        };
        views.push((format!("http://{}", s.0), view));
    }
    let any_active = views.iter().any(|(_, v)| v["me"]["role"] == "active");
    if json {
        let list: Vec<_> = views
            .iter()
            .map(|(url, v)| serde_json::json!({ "server": url, "status": v }))
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(if any_active {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let now = crate::protocol::now_ms();
    println!(
        "{:<12} {:<16} {:<10} {:<7} LAST FENCING",
        "CONTROLLER", "ROLE", "SINCE", "TOKEN"
    );
    let mut leader = None;
    for (url, v) in &views {
        if let Some(e) = v["error"].as_str() {
            println!("{url:<12} unreachable: {e}");
            continue;
        }
        let me = &v["me"];
        let since = me["since_ms"]
            .as_i64()
            .map(|t| format!("{}s ago", (now - t).max(0) / 1000))
            .unwrap_or_default();
        let fencing = match &me["last_fencing"] {
            serde_json::Value::Null => "-".to_string(),
            f => format!(
                "{}: {} ({}s ago)",
                f["peer"].as_str().unwrap_or_default(),
                f["result"].as_str().unwrap_or_default(),
                (now - f["ended_at_ms"].as_i64().unwrap_or(now)).max(0) / 1000
            ),
        };
        println!(
            "{:<12} {:<16} {:<10} {:<7} {fencing}",
            me["name"].as_str().unwrap_or(url),
            me["role"].as_str().unwrap_or("?"),
            since,
            me["token"].as_u64().unwrap_or(0),
        );
        if v["ha"] == false {
            println!("  (not an HA controller: no [ha] in its configuration)");
        }
        if leader.is_none() && v.get("leader").is_some() {
            leader = Some((v["key"].clone(), v["leader"].clone()));
        }
    }
    if let Some((key, l)) = leader {
        let key = key.as_str().unwrap_or_default();
        if let Some(e) = l["error"].as_str() {
            println!("leader key {key}: cannot read etcd: {e}");
        } else if l["vacant"] == true {
            println!("leader key {key}: vacant (no active controller holds the lease)");
        } else {
            println!(
                "leader key {key}: held by {}, token {}, lease {} ({} s left)",
                l["holder"].as_str().unwrap_or_default(),
                l["token"],
                l["lease"].as_str().unwrap_or_default(),
                l["ttl_left_s"]
            );
        }
    }
    if !any_active {
        eprintln!("no controller reports itself active");
    }
    Ok(if any_active {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `trellis plugin reload NAME`.
pub async fn reload_plugin(server: &Server, name: &str) -> anyhow::Result<ExitCode> {
    let (status, v) = server
        .request("POST", &format!("/api/plugins/{name}/reload"), "")
        .await?;
    if status != 200 {
        return Err(fail(status, &v));
    }
    println!(
        "{}: reloaded, version {} (generation {}, sha256 {}…); new work uses it, work in flight finishes on the old code",
        v["name"].as_str().unwrap_or(name),
        v["version"].as_str().unwrap_or("?"),
        v["generation"],
        v["sha256"].as_str().unwrap_or("").get(..12).unwrap_or("")
    );
    Ok(ExitCode::SUCCESS)
}
