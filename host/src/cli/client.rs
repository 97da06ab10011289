//! CLI commands that talk to a controller's HTTP API: run, runs, logs, cancel, agents,
//! artifacts, cluster status, plugin reload.
//!
//! Requests go through hyper's HTTP/1.1 client, over TLS (rustls) for `https://`
//! servers. The server is `--server` or `$TRELLIS_SERVER` (default
//! http://127.0.0.1:8080); the token `--token` or `$TRELLIS_TOKEN`; extra trusted CAs
//! `--ca` or `$TRELLIS_CA`, beside the public roots. Paths and queries are built from
//! percent-encoded parts: a run id, a step name or a log browser's cursor is data and
//! can never end a request line or start another request.

use bytes::Bytes;
use http::{Method, Request, Response, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

/// A controller to talk to, and how: its URL, the token, the TLS trust.
pub struct Server {
    /// `scheme://authority`, for messages.
    url: String,
    /// The `Host` header.
    authority: String,
    /// Where to connect (an IPv6 address without its brackets).
    host: String,
    port: u16,
    /// Some: speak TLS, trusting these roots.
    tls: Option<Arc<rustls::ClientConfig>>,
    token: Option<http::HeaderValue>,
}

/// Largest JSON answer the CLI reads (a long runs list fits many times).
const MAX_JSON: usize = 64 << 20;
/// Longest line of an event stream.
const MAX_SSE_LINE: usize = 16 << 20;

/// Everything but the unreserved characters (RFC 3986) is percent-encoded.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A request target from path segments (each encoded whole: a `/` in one is data) and
/// query pairs.
pub fn target(segments: &[&str], query: &[(&str, &str)]) -> String {
    let mut t = String::new();
    for s in segments {
        t.push('/');
        if *s == "." || *s == ".." {
            // dot segments would be taken as path navigation: encode them
            t.push_str(&s.replace('.', "%2E"));
        } else {
            t.extend(utf8_percent_encode(s, COMPONENT));
        }
    }
    for (i, (k, v)) in query.iter().enumerate() {
        t.push(if i == 0 { '?' } else { '&' });
        t.extend(utf8_percent_encode(k, COMPONENT));
        t.push('=');
        t.extend(utf8_percent_encode(v, COMPONENT));
    }
    t
}

impl Server {
    /// `given` (or $TRELLIS_SERVER, or http://127.0.0.1:8080), with `token` (or
    /// $TRELLIS_TOKEN) and the CA certificates in `ca` (or $TRELLIS_CA) trusted.
    pub fn new(
        given: Option<String>,
        token: Option<String>,
        ca: Option<PathBuf>,
    ) -> anyhow::Result<Server> {
        let url = given
            .or_else(|| std::env::var("TRELLIS_SERVER").ok())
            .unwrap_or_else(|| "http://127.0.0.1:8080".into());
        let uri: http::Uri = url.trim_end_matches('/').parse().map_err(|e| {
            anyhow::anyhow!("`{url}` is not a URL: {e} (write e.g. https://ci.example.com:8080)")
        })?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => anyhow::bail!("`{url}`: the server must be an http:// or https:// URL"),
        };
        if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
            anyhow::bail!("`{url}`: give the server only (scheme://host:port), no path");
        }
        let authority = uri
            .authority()
            .ok_or_else(|| anyhow::anyhow!("`{url}` names no host"))?
            .to_string();
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let ca = ca.or_else(|| std::env::var_os("TRELLIS_CA").map(PathBuf::from));
        let tls = if https {
            let files: Vec<PathBuf> = ca.into_iter().collect();
            let config = match crate::capabilities::http::trusting(&files)
                .map_err(|(_, e)| anyhow::anyhow!("--ca: {e}"))?
            {
                Some(c) => c,
                None => Arc::new(
                    rustls::ClientConfig::builder()
                        .with_root_certificates(rustls::RootCertStore {
                            roots: webpki_roots::TLS_SERVER_ROOTS.into(),
                        })
                        .with_no_client_auth(),
                ),
            };
            Some(config)
        } else {
            if ca.is_some() {
                tracing::warn!("--ca is ignored for the plain-HTTP server {url}");
            }
            None
        };
        let token = match token.or_else(|| std::env::var("TRELLIS_TOKEN").ok()) {
            Some(t) => Some(
                http::HeaderValue::from_str(&format!("Bearer {}", t.trim())).map_err(|_| {
                    anyhow::anyhow!(
                        "the token has characters no token has: check --token / TRELLIS_TOKEN"
                    )
                })?,
            ),
            None => None,
        };
        Ok(Server {
            url: format!("{}://{authority}", if https { "https" } else { "http" }),
            authority,
            host,
            port,
            tls,
            token,
        })
    }

    /// Send one request (`target` from [`target`]); the response, its body unread.
    async fn send(
        &self,
        method: Method,
        target: &str,
        body: Option<(&'static str, Bytes)>,
    ) -> anyhow::Result<Response<Incoming>> {
        let mut req = Request::builder()
            .method(method)
            .uri(target)
            .header(header::HOST, &self.authority)
            .header(
                header::USER_AGENT,
                concat!("trellis/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, t.clone());
        }
        let body = match body {
            Some((content_type, b)) => {
                req = req.header(header::CONTENT_TYPE, content_type);
                b
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(body))
            .map_err(|e| anyhow::anyhow!("cannot make the request {target}: {e}"))?;
        let unreachable = |e: &dyn std::fmt::Display| {
            anyhow::anyhow!("cannot reach the controller at {}: {e}", self.url)
        };
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| unreachable(&e))?;
        match &self.tls {
            None => exchange(tcp, req).await,
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|e| unreachable(&e))?;
                let stream = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "TLS with {} failed: {e} (a private CA? pass its certificate with --ca or TRELLIS_CA)",
                            self.url
                        )
                    })?;
                exchange(stream, req).await
            }
        }
        .map_err(|e| anyhow::anyhow!("{}: {e}", self.url))
    }

    /// A request whose answer is JSON: (status, body).
    async fn request(
        &self,
        method: Method,
        target: &str,
        body: Option<(&'static str, Bytes)>,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let resp = self.send(method, target, body).await?;
        let status = resp.status().as_u16();
        let bytes = Limited::new(resp.into_body(), MAX_JSON)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the answer from {}: {e}", self.url))?
            .to_bytes();
        let text = String::from_utf8_lossy(&bytes);
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|_| serde_json::Value::String(text.into_owned()));
        Ok((status, json))
    }

    async fn get(&self, target: &str) -> anyhow::Result<(u16, serde_json::Value)> {
        self.request(Method::GET, target, None).await
    }

    /// A POST with no body of its own (cancel, reload): still `application/json`, as
    /// the API asks of every change.
    async fn post_empty(&self, target: &str) -> anyhow::Result<(u16, serde_json::Value)> {
        self.request(
            Method::POST,
            target,
            Some(("application/json", Bytes::from_static(b"{}"))),
        )
        .await
    }
}

/// One HTTP/1.1 exchange on `stream`.
async fn exchange<S>(stream: S, req: Request<Full<Bytes>>) -> anyhow::Result<Response<Incoming>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("HTTP connection: {e}");
        }
    });
    Ok(sender.send_request(req).await?)
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

/// Read a response's lines (an event stream) as they arrive.
struct Lines {
    body: Incoming,
    buf: Vec<u8>,
}

impl Lines {
    async fn next(&mut self) -> anyhow::Result<Option<String>> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
            }
            if self.buf.len() > MAX_SSE_LINE {
                anyhow::bail!("an event stream line longer than {MAX_SSE_LINE} bytes");
            }
            match self.body.frame().await {
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                None => return Ok(None),
            }
        }
    }
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
    let (status, v) = server
        .request(
            Method::POST,
            "/api/runs",
            Some(("application/toml", Bytes::from(text))),
        )
        .await?;
    if status != 201 {
        return Err(fail(status, &v));
    }
    let id = v["id"].as_str().unwrap_or_default().to_string();
    let job = v["job"].as_str().unwrap_or_default();
    match v["agent"].as_str().filter(|a| !a.is_empty()) {
        Some(agent) => eprintln!("trellis: run {id} of job `{job}` on {agent}"),
        None => eprintln!(
            "trellis: run {id} of job `{job}` queued for an agent with label `{}` (`trellis queue` says why it waits)",
            v["label"].as_str().unwrap_or_default()
        ),
    }
    if !follow {
        println!("{id}");
        return Ok(ExitCode::SUCCESS);
    }
    follow_log(server, &id, None).await
}

/// Stream a run's log until it ended and the log is complete; exit with its status.
pub async fn follow_log(server: &Server, id: &str, step: Option<&str>) -> anyhow::Result<ExitCode> {
    let mut query = Vec::new();
    if let Some(s) = step {
        query.push(("step", s));
    }
    let resp = server
        .send(
            Method::GET,
            &target(&["api", "runs", id, "log", "follow"], &query),
            None,
        )
        .await?;
    if resp.status() != 200 {
        let status = resp.status().as_u16();
        let bytes = Limited::new(resp.into_body(), MAX_JSON)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let v = serde_json::from_slice(&bytes).unwrap_or_default();
        return Err(fail(status, &v).context(format!("cannot follow run `{id}`")));
    }
    let mut lines = Lines {
        body: resp.into_body(),
        buf: Vec::new(),
    };
    let mut event = String::new();
    let mut step_shown = String::new();
    while let Some(line) = lines.next().await? {
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
                // The controller gave up on the log browser's answers (it names it).
                "abort" => anyhow::bail!("cannot follow run {id}: {d}"),
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

/// `trellis runs` filters, as `GET /api/runs` takes them.
pub struct RunFilters {
    pub status: Option<String>,
    pub job: Option<String>,
    pub agent: Option<String>,
    pub label: Option<String>,
}

/// List runs, newest first: one page (and how to get the next), or every page.
pub async fn runs(
    server: &Server,
    limit: u32,
    cursor: Option<String>,
    all: bool,
    filters: &RunFilters,
) -> anyhow::Result<ExitCode> {
    let limit = limit.to_string();
    let mut cursor = cursor;
    let mut printed = 0usize;
    println!(
        "{:<10} {:<24} {:<12} {:<10} EVENTS",
        "RUN", "JOB", "AGENT", "STATUS"
    );
    loop {
        let mut query: Vec<(&str, &str)> = vec![("limit", &limit)];
        for (k, v) in [
            ("status", &filters.status),
            ("job", &filters.job),
            ("agent", &filters.agent),
            ("label", &filters.label),
        ] {
            if let Some(v) = v {
                query.push((k, v));
            }
        }
        if let Some(c) = &cursor {
            query.push(("cursor", c));
        }
        let (status, v) = server.get(&target(&["api", "runs"], &query)).await?;
        if status != 200 {
            return Err(fail(status, &v));
        }
        for r in v["runs"].as_array().into_iter().flatten() {
            printed += 1;
            println!(
                "{:<10} {:<24} {:<12} {:<10} {}",
                r["id"].as_str().unwrap_or_default(),
                r["job"].as_str().unwrap_or_default(),
                r["agent"].as_str().unwrap_or_default(),
                r["status"].as_str().unwrap_or_default(),
                r["events"]
            );
        }
        let next = v["next"].as_str().map(str::to_string);
        match next {
            Some(n) if all => {
                if cursor.as_deref() == Some(n.as_str()) {
                    anyhow::bail!("the controller gave the same cursor `{n}` twice; stopping");
                }
                cursor = Some(n);
            }
            Some(n) => {
                eprintln!("(more: trellis runs --cursor {n}, or --all)");
                break;
            }
            None => break,
        }
    }
    if printed == 0 {
        eprintln!("(no runs)");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn queue(server: &Server, json: bool) -> anyhow::Result<ExitCode> {
    let (status, v) = server.get("/api/queue").await?;
    if status != 200 {
        return Err(fail(status, &v));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let waiting = v["waiting"].as_array().cloned().unwrap_or_default();
    if waiting.is_empty() {
        println!("No runs waiting.");
    } else {
        println!(
            "{:<4} {:<10} {:<24} {:<12} {:>8} {:>8}  WHY",
            "POS", "RUN", "JOB", "LABEL", "PRIORITY", "WAITED"
        );
    }
    for w in &waiting {
        println!(
            "{:<4} {:<10} {:<24} {:<12} {:>8} {:>8}  {}",
            w["position"].to_string(),
            w["run"].as_str().unwrap_or_default(),
            w["job"].as_str().unwrap_or_default(),
            w["label"].as_str().unwrap_or_default(),
            w["priority"].to_string(),
            waited(w["waited_ms"].as_i64().unwrap_or(0)),
            w["reason"].as_str().unwrap_or_default()
        );
    }
    let labels = v["labels"].as_array().cloned().unwrap_or_default();
    if !labels.is_empty() {
        println!();
        println!(
            "{:<12} {:>6} {:>9} {:>5} {:>7}",
            "LABEL", "AGENTS", "EXECUTORS", "BUSY", "WAITING"
        );
        for l in &labels {
            println!(
                "{:<12} {:>6} {:>9} {:>5} {:>7}",
                l["label"].as_str().unwrap_or_default(),
                l["agents"].to_string(),
                l["executors"].to_string(),
                l["busy"].to_string(),
                l["waiting"].to_string()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A wait, short: 42s, 3m05s, 2h10m.
fn waited(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s / 60) % 60),
    }
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
    let tail = tail.map(|n| n.to_string());
    let mut cursor: Option<String> = None;
    // The seq of the last event printed: a page must start after it, or the browser's
    // cursor does not advance and reading on would never end.
    let mut last_seq = 0;
    loop {
        // Every value is percent-encoded: the cursor comes from a log browser plugin.
        let mut query: Vec<(&str, &str)> = Vec::new();
        if let Some(s) = &step {
            query.push(("step", s.as_str()));
        }
        if let Some(n) = &tail {
            query.push(("tail", n.as_str()));
        }
        if let Some(c) = &cursor {
            query.push(("cursor", c.as_str()));
        }
        let (status, v) = server
            .get(&target(&["api", "runs", id, "log"], &query))
            .await?;
        if status != 200 {
            return Err(fail(status, &v));
        }
        let events = v["events"].as_array().cloned().unwrap_or_default();
        let browser = v["browser"].as_str().unwrap_or("(unnamed)");
        let stuck = || {
            anyhow::anyhow!(
                "log browser `{browser}`: its cursor does not advance (the same events again); reading on would never end: report it to the plugin's author"
            )
        };
        if tail.is_none()
            && let Some(first) = events.first()
            && first["seq"].as_u64().is_none_or(|seq| seq <= last_seq)
        {
            return Err(stuck());
        }
        for e in &events {
            println!("{}", e["message"].as_str().unwrap_or_default());
            last_seq = e["seq"].as_u64().unwrap_or(last_seq);
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
        let next = v["next"].as_str().map(str::to_string);
        if next.is_none() || next == cursor {
            // A browser that hands back no cursor, or the same one, would loop forever.
            return Err(stuck());
        }
        cursor = next;
    }
}

pub async fn cancel(server: &Server, id: &str) -> anyhow::Result<ExitCode> {
    let (status, v) = server
        .post_empty(&target(&["api", "runs", id, "cancel"], &[]))
        .await?;
    if status != 202 {
        return Err(fail(status, &v));
    }
    eprintln!("trellis: cancelling {id}");
    Ok(ExitCode::SUCCESS)
}

pub async fn agents(server: &Server) -> anyhow::Result<ExitCode> {
    let (status, v) = server.get("/api/agents").await?;
    if status != 200 {
        return Err(fail(status, &v));
    }
    println!("{:<16} {:>9} {:>5}  LABELS", "AGENT", "EXECUTORS", "BUSY");
    for a in v.as_array().into_iter().flatten() {
        let labels: Vec<_> = a["labels"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l.as_str())
            .collect();
        println!(
            "{:<16} {:>9} {:>5}  {}",
            a["name"].as_str().unwrap_or_default(),
            a["executors"].to_string(),
            a["busy"].to_string(),
            labels.join(",")
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn artifacts(server: &Server, id: &str) -> anyhow::Result<ExitCode> {
    let (status, v) = server
        .get(&target(&["api", "runs", id, "artifacts"], &[]))
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

/// Download one artifact, streaming it to `output` (default: its file name here), and
/// check it against the SHA-256 the controller recorded; a mismatch removes the file.
pub async fn get_artifact(
    server: &Server,
    id: &str,
    name: &str,
    output: Option<std::path::PathBuf>,
) -> anyhow::Result<ExitCode> {
    use sha2::Digest;
    // The name's own `/`s separate path segments (the route takes the rest of the
    // path); each part is encoded.
    let mut segments = vec!["api", "runs", id, "artifacts"];
    segments.extend(name.split('/'));
    let resp = server
        .send(Method::GET, &target(&segments, &[]), None)
        .await?;
    let status = resp.status().as_u16();
    if status != 200 {
        let bytes = Limited::new(resp.into_body(), MAX_JSON)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let v = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        return Err(fail(status, &v));
    }
    let header = |h: &str| {
        resp.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_string())
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
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        if got + data.len() as u64 > size {
            got += data.len() as u64;
            break;
        }
        hash.update(&data);
        sink.write_all(&data).await?;
        got += data.len() as u64;
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
        let view = match s.get("/api/cluster").await {
            Ok((200, v)) => v,
            Ok((status, v)) => serde_json::json!({ "error": fail(status, &v).to_string() }),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        };
        views.push((s.url.clone(), view));
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
        .post_empty(&target(&["api", "plugins", name, "reload"], &[]))
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
