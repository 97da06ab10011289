//! The controller's HTTP API (JSON), with live log following as Server-Sent Events, and
//! a small web page over it.
//!
//! | method, path | what |
//! |---|---|
//! | `GET /`, `GET /runs/{id}` | the web page (`page.html`): the runs list, or one run with its live log |
//! | `GET /app.js` | the page's script (`app.js`; separate so the page's CSP can say `script-src 'self'`) |
//! | `GET /api/runs?limit=&cursor=&status=&job=&agent=&label=` | a page of run summaries (no steps), newest first, and `next`: the cursor of the following page (null: no more); 400 naming a bad parameter and what it accepts |
//! | `POST /api/runs` (body: a job file, TOML) | submit: 201 with the run, `queued` until an agent with the job's label has a free executor (a label no agent has declared waits too: `/api/queue` says so); 400 naming each mistake; 507 when the state directory is full |
//! | `GET /api/runs/{id}` | one run with its steps |
//! | `POST /api/runs/{id}/cancel` | 202 (a queued run ends at once, `cancelled`); 409 if it already ended |
//! | `GET /api/runs/{id}/log?cursor=&limit=&step=&tail=` | a page of events and the cursor to continue from, with completeness |
//! | `GET /api/runs/{id}/log/follow?step=&cursor=` | SSE: `line` events (from `cursor`, a page's `next`, if given) until the run ended and its log is complete, then `end`; at most `FOLLOW_BYTES_PER_SECOND`; `abort` (naming the browser) ends it when the browser's answer cannot be used, e.g. a cursor that does not advance |
//! | `GET /api/runs/{id}/artifacts` | the run's artifacts: name, step, size, sha256 |
//! | `GET /api/runs/{id}/artifacts/{name}` | download one (`name` may contain `/`); `x-checksum-sha256` header |
//! | `GET /api/queue` | the runs waiting for an agent, in the order they will be placed: `{waiting: [{position, run, job, label, priority, queued_at_ms, waited_ms, queue_timeout_ms, reason}], labels: [{label, agents, executors, busy, waiting}]}`; `reason` says why, e.g. "all 3 executors of label `linux` are busy" |
//! | `GET /api/agents` | connected agents: name, labels, executors, busy (executors in use) |
//! | `GET /api/plugins` | loaded plugins: points, version serving new work, generation, health, call counts, budget (instances and memory in use against the caps, refusals per limit) |
//! | `POST /api/plugins/{name}/reload` | hot reload: the new code is tried on a canary first; 200 with the new version, 422 naming why it is refused (the old one keeps serving) |
//! | `GET /metrics` | Prometheus text: per-plugin metrics (and the HA role's) |
//! | `GET /api/cluster` | HA: this controller's role, token, last fencing and failover, and the leader lease as etcd has it |
//! | `POST /api/session` (body `{"token": "..."}`), `GET`, `DELETE` | the web page signs in (a session cookie), asks who it is, signs out |
//! | `GET /api/tokens` | the API tokens: name, role, created (never the token) |
//!
//! Who may call what is in `access::RULES` (see [`access`]): every request is screened
//! (Host allow-list; same origin and a non-simple content type for changes), then held
//! to its route's rule. With `[controller] tls` the listener speaks HTTPS only.
//!
//! With `[ha]` the listener is bound at start: a standby serves `/api/cluster` and
//! `/metrics`, and answers 503 (naming its role) to the rest until it is active.
//!
//! Logs are read through the configured log browser, so following works the same for
//! any logging method, and a finished run is never shown complete before it is.

pub mod access;

use crate::controller::Controller;
use crate::controller::state::{RunQuery, RunRecord, RunStatus};
use crate::ha::status::ClusterStatus;
use crate::jobs::Job;
use crate::points::browser::LogReader;
use crate::runtime::Runtime;
use crate::wit::log_browser::{LogCompleteness, PageRequest};
use crate::wit::types::LogMetadata;
use access::{Access, Caller};
use axum::extract::{Extension, MatchedPath, Path, Query, State};
use axum::handler::Handler;
use axum::http::{Method, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub struct Api {
    pub controller: Arc<Controller>,
    pub runtime: Arc<Runtime>,
    pub browsers: Browsers,
    pub instance_id: String,
}

/// The log browsers, by name; the first added is the default, for runs that record
/// none (see `controller::state::LogLocator`).
#[derive(Default)]
pub struct Browsers {
    readers: Vec<LogReader>,
}

impl Browsers {
    pub fn add(&mut self, reader: LogReader) {
        self.readers.push(reader);
    }

    pub fn get(&self, name: &str) -> Option<&LogReader> {
        self.readers.iter().find(|r| r.name() == name)
    }

    /// Their names, the default first.
    pub fn names(&self) -> Vec<&str> {
        self.readers.iter().map(LogReader::name).collect()
    }

    /// The browser `run`'s log is read with.
    pub fn for_run(&self, run: &RunRecord) -> Result<&LogReader, String> {
        let name = &run.log.browser;
        let reader = if name.is_empty() {
            self.readers.first()
        } else {
            self.get(name)
        };
        reader.ok_or_else(|| {
            format!(
                "run `{}` is read with log browser `{name}`, which this controller does not load: add it to [controller] log-browsers",
                run.id
            )
        })
    }
}

impl From<LogReader> for Browsers {
    fn from(reader: LogReader) -> Browsers {
        Browsers {
            readers: vec![reader],
        }
    }
}

/// Most events one page returns.
const MAX_PAGE: u32 = 10_000;

/// Events one read of a follow asks for.
const FOLLOW_PAGE: u32 = 1000;

/// Most bytes per second one follow (SSE) sends, after a burst of as many: a browser
/// serving pages as fast as it is asked cannot make one request cost a core.
pub const FOLLOW_BYTES_PER_SECOND: f64 = (1 << 20) as f64;

/// A router that records each route it serves, so the route table test can hold every
/// one of them to `access::RULES`.
pub struct Routes<S> {
    router: Router<S>,
    pub served: Vec<(Method, &'static str)>,
}

impl<S: Clone + Send + Sync + 'static> Routes<S> {
    fn new() -> Self {
        Routes {
            router: Router::new(),
            served: Vec::new(),
        }
    }

    fn add(mut self, method: Method, path: &'static str, m: MethodRouter<S>) -> Self {
        self.router = self.router.route(path, m);
        self.served.push((method, path));
        self
    }

    fn get<H: Handler<T, S>, T: 'static>(self, path: &'static str, h: H) -> Self {
        self.add(Method::GET, path, get(h))
    }

    fn post<H: Handler<T, S>, T: 'static>(self, path: &'static str, h: H) -> Self {
        self.add(Method::POST, path, post(h))
    }

    fn delete<H: Handler<T, S>, T: 'static>(self, path: &'static str, h: H) -> Self {
        self.add(Method::DELETE, path, delete(h))
    }
}

/// The active controller's routes (the listener's own are in [`front_routes`]).
pub fn api_routes() -> Routes<Arc<Api>> {
    Routes::new()
        .get("/", page)
        .get("/runs/{id}", page)
        .get("/app.js", app_js)
        .get("/api/runs", list_runs)
        .post("/api/runs", submit)
        .get("/api/runs/{id}", show_run)
        .post("/api/runs/{id}/cancel", cancel)
        .get("/api/runs/{id}/log", log_page)
        .get("/api/runs/{id}/log/follow", follow)
        .get("/api/runs/{id}/artifacts", list_artifacts)
        .get("/api/runs/{id}/artifacts/{*name}", download_artifact)
        .get("/api/queue", queue)
        .get("/api/agents", agents)
        .get("/api/plugins", plugins)
        .post("/api/plugins/{name}/reload", reload_plugin)
}

/// The routes the listener answers itself, on a standby too.
pub fn front_routes() -> Routes<Arc<Front>> {
    Routes::new()
        .get("/api/cluster", cluster_status)
        .get("/metrics", metrics)
        .post("/api/session", sign_in)
        .get("/api/session", whoami)
        .delete("/api/session", sign_out)
        .get("/api/tokens", list_tokens)
}

/// Every route the controller serves: method and path pattern.
pub fn served_routes() -> Vec<(Method, &'static str)> {
    let mut all = api_routes().served;
    all.extend(front_routes().served);
    all
}

pub fn router(api: Arc<Api>, access: Arc<Access>) -> Router {
    api_routes()
        .router
        .route_layer(axum::middleware::from_fn_with_state(access, authorize))
        .with_state(api)
}

/// Hold the request to its route's rule (the route as matched, so `{id}` is one rule
/// whatever the id), and hand the caller to the handler.
async fn authorize(
    State(access): State<Arc<Access>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string());
    match access.authorize(req.method(), route.as_deref(), req.headers()) {
        Ok(caller) => {
            if let Some(c) = caller {
                req.extensions_mut().insert(c);
            }
            next.run(req).await
        }
        Err(refusal) => refuse(refusal),
    }
}

/// Before routing: the Host allow-list, and same-origin and content type for changes.
async fn screen(
    State(access): State<Arc<Access>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match access.screen(req.method(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err(refusal) => refuse(refusal),
    }
}

fn refuse((status, msg): access::Refusal) -> Response {
    let mut r = error(status, msg);
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            axum::http::header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer realm=\"trellis\""),
        );
    }
    r
}

/// Serve on `addr` (port 0: any free port), over TLS when `tls` is given. Returns the
/// bound address.
pub async fn serve(
    addr: SocketAddr,
    api: Arc<Api>,
    access: Arc<Access>,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<SocketAddr> {
    let listener = listen(addr, None, access, tls).await?;
    listener.activate(api);
    Ok(listener.addr)
}

/// A controller's HTTP listener, bound before the controller may serve (an HA standby).
pub struct Listener {
    pub addr: SocketAddr,
    front: Arc<Front>,
}

pub struct Front {
    api: OnceLock<(Arc<Api>, Router)>,
    cluster: Option<Arc<ClusterStatus>>,
    access: Arc<Access>,
}

/// Bind `addr`; until [`Listener::activate`], only the front routes (`/api/cluster`,
/// `/metrics`, signing in) answer. With `tls`, only HTTPS is spoken.
pub async fn listen(
    addr: SocketAddr,
    cluster: Option<Arc<ClusterStatus>>,
    access: Arc<Access>,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<Listener> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let front = Arc::new(Front {
        api: OnceLock::new(),
        cluster,
        access: access.clone(),
    });
    let app = front_routes()
        .router
        .route_layer(axum::middleware::from_fn_with_state(
            access.clone(),
            authorize,
        ))
        .fallback(forward)
        .layer(axum::middleware::from_fn_with_state(access, screen))
        .with_state(front.clone());
    match tls {
        None => {
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!("HTTP API stopped: {e}");
                }
            });
        }
        Some(tls) => {
            tokio::spawn(serve_tls(listener, app, tls));
        }
    }
    Ok(Listener { addr: bound, front })
}

/// How long a client may take over its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accept TLS connections and serve HTTP/1.1 on each. A failed handshake ends only
/// that connection.
async fn serve_tls(listener: tokio::net::TcpListener, app: Router, tls: Arc<rustls::ServerConfig>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, say: wait a little rather than spin.
                tracing::warn!("HTTPS accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let stream =
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!("HTTPS handshake with {peer}: {e}");
                        return;
                    }
                    Err(_) => return,
                };
            let service = hyper_util::service::TowerToHyperService::new(app);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("HTTPS connection with {peer}: {e}");
            }
        });
    }
}

/// The server side of `[controller] tls`: its certificate chain and key (PEM files).
pub fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|c| c.collect())
        .map_err(|e| anyhow::anyhow!("controller.tls.cert: cannot read {}: {e}", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!(
            "controller.tls.cert: {} holds no PEM certificate",
            cert.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        anyhow::anyhow!(
            "controller.tls.key: cannot read a PEM private key from {}: {e}",
            key.display()
        )
    })?;
    let mut c = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| {
        anyhow::anyhow!(
            "controller.tls: the certificate and key do not make a server identity: {e}"
        )
    })?;
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(c)
}

impl Listener {
    /// Serve the whole API from now on.
    pub fn activate(&self, api: Arc<Api>) {
        let _ = self
            .front
            .api
            .set((api.clone(), router(api, self.front.access.clone())));
    }
}

async fn forward(State(front): State<Arc<Front>>, req: axum::extract::Request) -> Response {
    use tower_service::Service;
    match front.api.get() {
        Some((_, router)) => match router.clone().call(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        },
        None => {
            let role = front.cluster.as_ref().map(|c| c.snapshot().role).map_or(
                "starting".to_string(),
                |r| {
                    serde_json::to_value(r)
                        .ok()
                        .and_then(|v| v.as_str().map(String::from))
                        .unwrap_or_default()
                },
            );
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "this controller is not active (role: {role}); use the active controller (`trellis cluster status` shows which)"
                ),
            );
            r.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, 1.into());
            r
        }
    }
}

async fn cluster_status(State(front): State<Arc<Front>>) -> Response {
    match &front.cluster {
        Some(c) => Json(c.to_json().await).into_response(),
        None => Json(serde_json::json!({
            "ha": false,
            "me": { "role": if front.api.get().is_some() { "active" } else { "starting" } },
        }))
        .into_response(),
    }
}

/// The web page and its script, embedded. The page reads the JSON API and nothing else.
const PAGE: &str = include_str!("page.html");
const APP_JS: &str = include_str!("app.js");
/// Scripts only from this server (no inline script), the page's own `<style>`, requests
/// only to this server, and no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

async fn page() -> Response {
    use axum::http::header;
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

async fn app_js() -> Response {
    use axum::http::header;
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        APP_JS,
    )
        .into_response()
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": msg.into() }))).into_response()
}

/// Runs on a page of `GET /api/runs` unless `limit` says otherwise.
pub const RUNS_PAGE_DEFAULT: usize = 50;

const RUN_STATUSES: &str = "queued, running, succeeded, failed, timed-out, cancelled, lost";

/// `GET /api/runs`'s parameters; Err names the one that is wrong and what it accepts.
fn run_query(pairs: &[(String, String)]) -> Result<RunQuery, String> {
    use crate::controller::state::{PAGE_MAX, run_number};
    let mut q = RunQuery {
        limit: RUNS_PAGE_DEFAULT,
        ..RunQuery::default()
    };
    let mut seen = std::collections::HashSet::new();
    for (k, v) in pairs {
        if !seen.insert(k.as_str()) {
            return Err(format!("`{k}` is given twice; give it once"));
        }
        let name = || -> Result<Option<String>, String> {
            if v.is_empty() || v.len() > 256 {
                return Err(format!(
                    "`{k}` must be 1 to 256 characters (the exact name to list)"
                ));
            }
            Ok(Some(v.clone()))
        };
        match k.as_str() {
            "limit" => {
                q.limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=PAGE_MAX).contains(n))
                    .ok_or_else(|| format!("`limit` must be a number from 1 to {PAGE_MAX} (default {RUNS_PAGE_DEFAULT}), not `{v}`"))?;
            }
            "cursor" => {
                q.before = Some(run_number(v).ok_or_else(|| {
                    format!("`cursor` must be the `next` of an earlier page, not `{v}`")
                })?);
            }
            "status" => {
                let s: RunStatus = serde_json::from_value(serde_json::Value::String(v.clone()))
                    .map_err(|_| format!("`status` must be one of {RUN_STATUSES}, not `{v}`"))?;
                q.status = Some(s);
            }
            "job" => q.job = name()?,
            "agent" => q.agent = name()?,
            "label" => q.label = name()?,
            other => {
                return Err(format!(
                    "unknown parameter `{other}`; the runs list takes limit, cursor, status, job, agent and label"
                ));
            }
        }
    }
    Ok(q)
}

async fn list_runs(
    State(api): State<Arc<Api>>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Response {
    match run_query(&pairs) {
        Ok(q) => Json(api.controller.runs_page(&q)).into_response(),
        Err(msg) => error(StatusCode::BAD_REQUEST, msg),
    }
}

async fn submit(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
    body: String,
) -> Response {
    let job = match Job::parse(&body, "(request body)") {
        Ok(j) => j,
        Err(p) => return (StatusCode::BAD_REQUEST, Json(serde_json::json!({ "error": "invalid job", "problems": p.items.iter().map(|i| i.to_string()).collect::<Vec<_>>() }))).into_response(),
    };
    match api.controller.submit_as(&job, &caller.name) {
        Ok(r) => (StatusCode::CREATED, Json(r)).into_response(),
        Err(
            e @ (crate::controller::SubmitError::Secret(_)
            | crate::controller::SubmitError::UnknownLogPlugin { .. }
            | crate::controller::SubmitError::NoAgentWithLogMethod { .. }),
        ) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e @ crate::controller::SubmitError::StateFull { .. }) => {
            // 507: the state directory's disk is full; a retry later can succeed.
            let mut r = error(StatusCode::INSUFFICIENT_STORAGE, e.to_string());
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("10"),
            );
            r
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn show_run(State(api): State<Arc<Api>>, Path(id): Path<String>) -> Response {
    match api.controller.run(&id) {
        Some(r) => Json(r).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no run `{id}`")),
    }
}

async fn cancel(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    match api.controller.run(&id) {
        None => error(StatusCode::NOT_FOUND, format!("no run `{id}`")),
        Some(r) if r.status.is_final() => {
            error(StatusCode::CONFLICT, format!("run `{id}` already ended"))
        }
        Some(_) => {
            tracing::info!(run = %id, by = %caller.name, "cancel requested");
            api.controller.cancel(&id);
            (
                StatusCode::ACCEPTED,
                Json(serde_json::json!({ "cancelling": id })),
            )
                .into_response()
        }
    }
}

async fn list_artifacts(State(api): State<Arc<Api>>, Path(id): Path<String>) -> Response {
    match api.controller.run(&id) {
        Some(r) => Json(r.artifacts).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no run `{id}`")),
    }
}

/// Streams the file, with its length and checksum in the headers.
async fn download_artifact(
    State(api): State<Arc<Api>>,
    Path((id, name)): Path<(String, String)>,
) -> Response {
    let Some(run) = api.controller.run(&id) else {
        return error(StatusCode::NOT_FOUND, format!("no run `{id}`"));
    };
    let Some(a) = run.artifacts.iter().find(|a| a.name == name) else {
        let known: Vec<_> = run.artifacts.iter().map(|a| a.name.as_str()).collect();
        return error(
            StatusCode::NOT_FOUND,
            format!("run `{id}` has no artifact `{name}` (it has: {known:?})"),
        );
    };
    let Some(path) = api.controller.artifact_path(&id, &a.name) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("bad artifact name `{name}`"),
        );
    };
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("artifact `{name}` is listed but cannot be read: {e}"),
            );
        }
    };
    let file_name = name.rsplit('/').next().unwrap_or(&name).replace('"', "");
    (
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/octet-stream".to_string(),
            ),
            (axum::http::header::CONTENT_LENGTH, a.size.to_string()),
            (
                axum::http::header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{file_name}\""),
            ),
            (
                axum::http::HeaderName::from_static("x-checksum-sha256"),
                a.sha256.clone(),
            ),
        ],
        axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file)),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct LogQuery {
    cursor: Option<String>,
    limit: Option<u32>,
    step: Option<String>,
    tail: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct LogEvent {
    pub seq: u64,
    pub timestamp_ms: i64,
    pub step: String,
    pub stream: String,
    pub message: String,
}

#[derive(Debug, Serialize)]
struct Completeness {
    state: &'static str,
    expected: Option<u64>,
    present: Option<u64>,
}

fn completeness(c: LogCompleteness) -> Completeness {
    match c {
        LogCompleteness::Open => Completeness {
            state: "open",
            expected: None,
            present: None,
        },
        LogCompleteness::Complete(n) => Completeness {
            state: "complete",
            expected: Some(n),
            present: Some(n),
        },
        LogCompleteness::Incomplete(m) => Completeness {
            state: "incomplete",
            expected: Some(m.expected),
            present: Some(m.present),
        },
    }
}

fn events(buf: &[u8]) -> Vec<LogEvent> {
    trellis_sdk::events::decode(buf)
        .map(|evs| {
            evs.iter()
                .map(|e| LogEvent {
                    seq: e.seq,
                    timestamp_ms: e.timestamp_ms,
                    step: e.step.to_string(),
                    stream: e.data_value("stream").unwrap_or("stdout").to_string(),
                    message: e.message.to_string(),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn meta(api: &Api, run: &RunRecord) -> LogMetadata {
    LogMetadata {
        instance_id: api.instance_id.clone(),
        loggable_type: "run".into(),
        loggable_id: run.id.clone(),
        job_id: run.job.clone(),
    }
}

async fn log_page(
    State(api): State<Arc<Api>>,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> Response {
    let Some(run) = api.controller.run(&id) else {
        return error(StatusCode::NOT_FOUND, format!("no run `{id}`"));
    };
    let m = meta(&api, &run);
    let reader = match api.browsers.for_run(&run) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e),
    };
    let c = match reader.completeness(&m).await {
        Ok(c) => completeness(c),
        Err(e) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("log store unavailable: {e}"),
            );
        }
    };
    if let Some(n) = q.tail {
        return match reader.tail(&m, q.step.clone(), n.min(MAX_PAGE)).await {
            Ok(buf) => Json(serde_json::json!({ "events": events(&buf), "completeness": c, "browser": reader.name() }))
                .into_response(),
            Err(e) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("log store unavailable: {e}"),
            ),
        };
    }
    let req = PageRequest {
        step: q.step,
        cursor: q.cursor,
        limit: q.limit.unwrap_or(1000).clamp(1, MAX_PAGE),
    };
    match reader.read(&m, req).await {
        // `total`: what the request matches in the store, null when the browser cannot
        // count (a 0.1.0 browser never can).
        // `browser`: who made the page (for a reader's error that names it).
        Ok(page) => Json(serde_json::json!({ "events": events(&page.events), "next": page.next, "total": page.total, "completeness": c, "browser": reader.name() })).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("log store unavailable: {e}")),
    }
}

#[derive(Debug, Deserialize)]
struct FollowQuery {
    step: Option<String>,
    /// Start here (a page's `next`) instead of at the beginning.
    cursor: Option<String>,
}

/// Follow a log: pages from the browser as they appear; ends once the run is over and
/// the browser reports the log complete (an eventually consistent store is waited for).
async fn follow(
    State(api): State<Arc<Api>>,
    Path(id): Path<String>,
    Query(q): Query<FollowQuery>,
) -> Response {
    let Some(run) = api.controller.run(&id) else {
        return error(StatusCode::NOT_FOUND, format!("no run `{id}`"));
    };
    if let Err(e) = api.browsers.for_run(&run) {
        return error(StatusCode::SERVICE_UNAVAILABLE, e);
    }
    let m = meta(&api, &run);
    struct S {
        api: Arc<Api>,
        run: RunRecord,
        meta: LogMetadata,
        step: Option<String>,
        cursor: Option<String>,
        /// Events to send, with their size in bytes (at most one page).
        pending: std::collections::VecDeque<(Event, usize)>,
        /// The seq of the last event queued: the next page must start after it.
        last_seq: u64,
        /// The rate cap: bytes that may go out now, refilled at FOLLOW_BYTES_PER_SECOND.
        tokens: f64,
        refilled: tokio::time::Instant,
        /// The run is over and its log complete: end at the next empty page.
        complete: bool,
        done: bool,
    }
    let s = S {
        api,
        run,
        meta: m,
        step: q.step,
        cursor: q.cursor,
        pending: Default::default(),
        last_seq: 0,
        tokens: FOLLOW_BYTES_PER_SECOND,
        refilled: tokio::time::Instant::now(),
        complete: false,
        done: false,
    };
    let stream = futures_util::stream::unfold(s, |mut s| async move {
        loop {
            if let Some((e, size)) = s.pending.pop_front() {
                let now = tokio::time::Instant::now();
                s.tokens = (s.tokens
                    + now.duration_since(s.refilled).as_secs_f64() * FOLLOW_BYTES_PER_SECOND)
                    .min(FOLLOW_BYTES_PER_SECOND);
                s.refilled = now;
                s.tokens -= size as f64;
                if s.tokens < 0.0 {
                    // Over the cap: wait until the debt is paid.
                    let wait = -s.tokens / FOLLOW_BYTES_PER_SECOND;
                    tokio::time::sleep(Duration::from_secs_f64(wait)).await;
                }
                return Some((Ok::<Event, Infallible>(e), s));
            }
            if s.done {
                return None;
            }
            let req = PageRequest {
                step: s.step.clone(),
                cursor: s.cursor.clone(),
                limit: FOLLOW_PAGE,
            };
            let reader = s.api.browsers.for_run(&s.run).expect("checked above");
            match reader.read(&s.meta, req).await {
                Ok(page) => {
                    let evs = events(&page.events);
                    // Pages are checked in order within themselves; across pages, a
                    // cursor that does not advance would serve the same events for ever.
                    if let Some(first) = evs.first()
                        && first.seq <= s.last_seq
                    {
                        let e = reader.invalid(
                            "read",
                            format!(
                                "the cursor does not advance: a page starting at seq {} after seq {} was served",
                                first.seq, s.last_seq
                            ),
                        );
                        s.pending.push_back(abort(&e));
                        s.done = true;
                        continue;
                    }
                    s.cursor = Some(page.next);
                    if let Some(last) = evs.last() {
                        s.last_seq = last.seq;
                        for e in evs {
                            let data = serde_json::to_string(&e).unwrap_or_default();
                            let size = data.len() + 20;
                            s.pending
                                .push_back((Event::default().event("line").data(data), size));
                        }
                        continue;
                    }
                }
                Err(e @ crate::runtime::PluginError::Invalid { .. }) => {
                    s.pending.push_back(abort(&e));
                    s.done = true;
                    continue;
                }
                Err(e) => {
                    let text = format!("log store unavailable: {e}");
                    let size = text.len() + 20;
                    s.pending
                        .push_back((Event::default().event("error").data(text), size));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
            // The page above was empty. Once the run is over and its log complete, one
            // more empty page means everything was served: what became visible between
            // that read and the completeness check is read first.
            if s.complete {
                s.pending.push_back((
                    Event::default()
                        .event("end")
                        .json_data(&s.run)
                        .unwrap_or_default(),
                    0,
                ));
                s.done = true;
                continue;
            }
            if let Some(run) = s.api.controller.run(&s.run.id)
                && run.status.is_final()
            {
                s.run = run;
                match reader.completeness(&s.meta).await {
                    Ok(LogCompleteness::Complete(_)) => {
                        s.complete = true;
                        continue;
                    }
                    Err(e @ crate::runtime::PluginError::Invalid { .. }) => {
                        s.pending.push_back(abort(&e));
                        s.done = true;
                        continue;
                    }
                    _ => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The follow's last event when the browser's answer cannot be used (a cursor that
/// does not advance, a page over its caps): `abort`, naming the plugin. The follow ends.
fn abort(e: &crate::runtime::PluginError) -> (Event, usize) {
    let text = e.to_string();
    let size = text.len() + 20;
    (Event::default().event("abort").data(text), size)
}

async fn agents(State(api): State<Arc<Api>>) -> Response {
    let list: Vec<_> = api
        .controller
        .connected_agents()
        .into_iter()
        .map(|(name, labels)| {
            let (executors, busy) = api.controller.executors_of(&name).unwrap_or((1, 0));
            serde_json::json!({ "name": name, "labels": labels, "executors": executors, "busy": busy })
        })
        .collect();
    Json(list).into_response()
}

/// The runs waiting for an agent, in the order they will be placed, each with why it
/// waits; and the executors of each label.
async fn queue(State(api): State<Arc<Api>>) -> Json<crate::controller::queue::QueueView> {
    Json(api.controller.queue_view())
}

async fn plugins(State(api): State<Arc<Api>>) -> Response {
    use std::sync::atomic::Ordering::Relaxed;
    let list: Vec<_> = api
        .runtime
        .plugins()
        .iter()
        .map(|p| {
            // One read of the generation serving new work, so that its fields agree
            // even while a reload swaps it.
            let (generation, g) = p.current();
            serde_json::json!({
                "name": p.manifest.name,
                "version": g.version,
                "wit": g.wit,
                "generation": generation,
                "limits": {
                    "memory": g.limits.memory,
                    "call_timeout_ms": g.limits.call_timeout.as_millis() as u64,
                },
                "points": p.info.points().iter().map(|x| x.interface()).collect::<Vec<_>>(),
                "health": format!("{:?}", p.health()),
                "calls": p.metrics.calls(),
                "errors": p.metrics.errors.load(Relaxed),
                "traps": p.metrics.traps.load(Relaxed),
                "deadlines": p.metrics.deadlines.load(Relaxed),
                "budget": p.budget.to_json(),
            })
        })
        .collect();
    Json(list).into_response()
}

async fn reload_plugin(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Response {
    if api.runtime.get(&name).is_none() {
        return error(
            StatusCode::NOT_FOUND,
            format!("no plugin named `{name}` is loaded"),
        );
    }
    tracing::info!(plugin = %name, by = %caller.name, "plugin reload requested");
    match api.runtime.reload(&name).await {
        Ok(r) => Json(r).into_response(),
        Err(problems) => {
            let list: Vec<String> = problems.items.iter().map(|p| p.to_string()).collect();
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(serde_json::json!({
                    "error": format!("the new version of `{name}` is refused; the old one keeps serving"),
                    "problems": list,
                })),
            )
                .into_response()
        }
    }
}

#[derive(Deserialize)]
struct SignIn {
    token: String,
}

/// The web page signs in: the token is checked once and exchanged for a session cookie
/// (HttpOnly: page scripts never see it; SameSite=Strict: other sites never send it).
async fn sign_in(State(front): State<Arc<Front>>, body: axum::body::Bytes) -> Response {
    let Ok(SignIn { token }) = serde_json::from_slice(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "send {\"token\": \"...\"} as application/json",
        );
    };
    match front.access.sign_in(&token) {
        Ok((caller, cookie)) => {
            tracing::info!(by = %caller.name, "signed in on the web page");
            (
                [(axum::http::header::SET_COOKIE, cookie)],
                Json(serde_json::json!({ "name": caller.name, "role": caller.role })),
            )
                .into_response()
        }
        Err(refusal) => refuse(refusal),
    }
}

/// Who the request is from (`null` when nobody): the page asks before anything else.
async fn whoami(req: axum::extract::Request) -> Response {
    let caller = req.extensions().get::<Caller>();
    Json(caller.map(|c| serde_json::json!({ "name": c.name, "role": c.role }))).into_response()
}

async fn sign_out(State(front): State<Arc<Front>>, req: axum::extract::Request) -> Response {
    let cookie = front.access.sign_out(req.headers());
    (
        StatusCode::NO_CONTENT,
        [(axum::http::header::SET_COOKIE, cookie)],
    )
        .into_response()
}

/// The tokens' names, roles and ages; the tokens themselves are not kept.
async fn list_tokens(State(front): State<Arc<Front>>) -> Response {
    let list: Vec<_> = front
        .access
        .tokens
        .tokens()
        .into_iter()
        .map(|t| serde_json::json!({ "name": t.name, "role": t.role, "created_ms": t.created_ms }))
        .collect();
    Json(list).into_response()
}

async fn metrics(State(front): State<Arc<Front>>) -> Response {
    let mut text = String::new();
    if let Some((api, _)) = front.api.get() {
        text = api.runtime.render_metrics();
        api.controller.render_metrics(&mut text);
    }
    if let Some(c) = &front.cluster {
        c.render_metrics(&mut text);
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runs_list_names_a_bad_parameter_and_what_it_accepts() {
        let q = |s: &str| {
            let pairs: Vec<(String, String)> = split_query(s);
            run_query(&pairs)
        };
        let ok = q("limit=10&cursor=r-000042&status=timed-out&job=j&agent=a&label=gpu").unwrap();
        assert_eq!(ok.limit, 10);
        assert_eq!(ok.before, Some(42));
        assert_eq!(ok.status, Some(RunStatus::TimedOut));
        assert_eq!(ok.label.as_deref(), Some("gpu"));
        assert_eq!(q("").unwrap().limit, RUNS_PAGE_DEFAULT);
        for (bad, names) in [
            ("limit=0", "`limit` must be a number from 1 to 500"),
            ("limit=501", "`limit` must be a number from 1 to 500"),
            ("limit=x", "not `x`"),
            (
                "cursor=abc",
                "`cursor` must be the `next` of an earlier page",
            ),
            ("status=done", "queued, running, succeeded"),
            ("label=", "`label` must be 1 to 256"),
            ("stauts=failed", "unknown parameter `stauts`"),
            ("job=a&job=b", "`job` is given twice"),
        ] {
            let e = q(bad).unwrap_err();
            assert!(e.contains(names), "{bad}: {e}");
        }
    }

    fn split_query(s: &str) -> Vec<(String, String)> {
        s.split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (k.to_string(), v.to_string())
            })
            .collect()
    }

    /// The route table: every route the routers serve has a rule, and every rule names
    /// a served route. (tests/api.rs also calls each one as each role.)
    #[test]
    fn every_served_route_has_an_access_rule() {
        let served = served_routes();
        for (method, path) in &served {
            assert!(
                access::rule(method, path).is_some(),
                "{method} {path} has no rule in api::access::RULES: add one"
            );
        }
        for (method, path, _) in access::RULES {
            assert!(
                served
                    .iter()
                    .any(|(m, p)| m.as_str() == *method && p == path),
                "access::RULES names {method} {path}, which no router serves"
            );
        }
    }
}
