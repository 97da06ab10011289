//! The controller's HTTP API (JSON), with live log following as Server-Sent Events, and
//! a small web page over it.
//!
//! | method, path | what |
//! |---|---|
//! | `GET /`, `GET /runs/{id}` | the web page (`page.html`): the runs list, or one run with its live log |
//! | `GET /app.js` | the page's script (`app.js`; separate so the page's CSP can say `script-src 'self'`) |
//! | `GET /api/runs` | every run, oldest first |
//! | `POST /api/runs` (body: a job file, TOML) | submit: 201 with the run; 400 naming each mistake; 409 when no agent can take it |
//! | `GET /api/runs/{id}` | one run with its steps |
//! | `POST /api/runs/{id}/cancel` | 202; 409 if it already ended |
//! | `GET /api/runs/{id}/log?cursor=&limit=&step=&tail=` | a page of events and the cursor to continue from, with completeness |
//! | `GET /api/runs/{id}/log/follow?step=&cursor=` | SSE: `line` events (from `cursor`, a page's `next`, if given) until the run ended and its log is complete, then `end` |
//! | `GET /api/runs/{id}/artifacts` | the run's artifacts: name, step, size, sha256 |
//! | `GET /api/runs/{id}/artifacts/{name}` | download one (`name` may contain `/`); `x-checksum-sha256` header |
//! | `GET /api/agents` | connected agents and their labels |
//! | `GET /api/plugins` | loaded plugins: points, version serving new work, generation, health, call counts |
//! | `POST /api/plugins/{name}/reload` | hot reload: the new code is tried on a canary first; 200 with the new version, 422 naming why it is refused (the old one keeps serving) |
//! | `GET /metrics` | Prometheus text: per-plugin metrics (and the HA role's) |
//! | `GET /api/cluster` | HA: this controller's role, token, last fencing and failover, and the leader lease as etcd has it |
//!
//! With `[ha]` the listener is bound at start: a standby serves `/api/cluster` and
//! `/metrics`, and answers 503 (naming its role) to the rest until it is active.
//!
//! Logs are read through the configured log browser, so following works the same for
//! any logging method, and a finished run is never shown complete before it is.

use crate::controller::Controller;
use crate::controller::state::RunRecord;
use crate::ha::status::ClusterStatus;
use crate::jobs::Job;
use crate::points::bindings::log_browser::{LogCompleteness, PageRequest};
use crate::points::bindings::types::LogMetadata;
use crate::points::browser::LogReader;
use crate::runtime::Runtime;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
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

pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/runs/{id}", get(page))
        .route("/app.js", get(app_js))
        .route("/api/runs", get(list_runs).post(submit))
        .route("/api/runs/{id}", get(show_run))
        .route("/api/runs/{id}/cancel", post(cancel))
        .route("/api/runs/{id}/log", get(log_page))
        .route("/api/runs/{id}/log/follow", get(follow))
        .route("/api/runs/{id}/artifacts", get(list_artifacts))
        .route("/api/runs/{id}/artifacts/{*name}", get(download_artifact))
        .route("/api/agents", get(agents))
        .route("/api/plugins", get(plugins))
        .route("/api/plugins/{name}/reload", post(reload_plugin))
        .with_state(api)
}

/// Serve on `addr` (port 0: any free port). Returns the bound address.
pub async fn serve(addr: SocketAddr, api: Arc<Api>) -> std::io::Result<SocketAddr> {
    let listener = listen(addr, None).await?;
    listener.activate(api);
    Ok(listener.addr)
}

/// A controller's HTTP listener, bound before the controller may serve (an HA standby).
pub struct Listener {
    pub addr: SocketAddr,
    front: Arc<Front>,
}

struct Front {
    api: OnceLock<(Arc<Api>, Router)>,
    cluster: Option<Arc<ClusterStatus>>,
}

/// Bind `addr`; until [`Listener::activate`], only `/api/cluster` and `/metrics` answer.
pub async fn listen(
    addr: SocketAddr,
    cluster: Option<Arc<ClusterStatus>>,
) -> std::io::Result<Listener> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let front = Arc::new(Front {
        api: OnceLock::new(),
        cluster,
    });
    let app = Router::new()
        .route("/api/cluster", get(cluster_status))
        .route("/metrics", get(metrics))
        .fallback(forward)
        .with_state(front.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("HTTP API stopped: {e}");
        }
    });
    Ok(Listener { addr: bound, front })
}

impl Listener {
    /// Serve the whole API from now on.
    pub fn activate(&self, api: Arc<Api>) {
        let _ = self.front.api.set((api.clone(), router(api)));
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

async fn list_runs(State(api): State<Arc<Api>>) -> Json<Vec<RunRecord>> {
    Json(api.controller.runs())
}

async fn submit(State(api): State<Arc<Api>>, body: String) -> Response {
    let job = match Job::parse(&body, "(request body)") {
        Ok(j) => j,
        Err(p) => return (StatusCode::BAD_REQUEST, Json(serde_json::json!({ "error": "invalid job", "problems": p.items.iter().map(|i| i.to_string()).collect::<Vec<_>>() }))).into_response(),
    };
    match api.controller.submit(&job) {
        Ok(r) => (StatusCode::CREATED, Json(r)).into_response(),
        Err(e @ crate::controller::SubmitError::NoAgent(_)) => {
            error(StatusCode::CONFLICT, e.to_string())
        }
        Err(e @ crate::controller::SubmitError::Secret(_)) => {
            error(StatusCode::BAD_REQUEST, e.to_string())
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

async fn cancel(State(api): State<Arc<Api>>, Path(id): Path<String>) -> Response {
    match api.controller.run(&id) {
        None => error(StatusCode::NOT_FOUND, format!("no run `{id}`")),
        Some(r) if r.status.is_final() => {
            error(StatusCode::CONFLICT, format!("run `{id}` already ended"))
        }
        Some(_) => {
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
            Ok(buf) => Json(serde_json::json!({ "events": events(&buf), "completeness": c }))
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
        Ok(page) => Json(serde_json::json!({ "events": events(&page.events), "next": page.next, "total": page.total, "completeness": c })).into_response(),
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
        pending: std::collections::VecDeque<Event>,
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
        complete: false,
        done: false,
    };
    let stream = futures_util::stream::unfold(s, |mut s| async move {
        loop {
            if let Some(e) = s.pending.pop_front() {
                return Some((Ok::<Event, Infallible>(e), s));
            }
            if s.done {
                return None;
            }
            let req = PageRequest {
                step: s.step.clone(),
                cursor: s.cursor.clone(),
                limit: 1000,
            };
            let reader = s.api.browsers.for_run(&s.run).expect("checked above");
            match reader.read(&s.meta, req).await {
                Ok(page) => {
                    let evs = events(&page.events);
                    s.cursor = Some(page.next);
                    if !evs.is_empty() {
                        for e in evs {
                            s.pending.push_back(
                                Event::default()
                                    .event("line")
                                    .json_data(&e)
                                    .unwrap_or_default(),
                            );
                        }
                        continue;
                    }
                }
                Err(e) => {
                    s.pending.push_back(
                        Event::default()
                            .event("error")
                            .data(format!("log store unavailable: {e}")),
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
            // The page above was empty. Once the run is over and its log complete, one
            // more empty page means everything was served: what became visible between
            // that read and the completeness check is read first.
            if s.complete {
                s.pending.push_back(
                    Event::default()
                        .event("end")
                        .json_data(&s.run)
                        .unwrap_or_default(),
                );
                s.done = true;
                continue;
            }
            if let Some(run) = s.api.controller.run(&s.run.id)
                && run.status.is_final()
            {
                s.run = run;
                if matches!(
                    reader.completeness(&s.meta).await,
                    Ok(LogCompleteness::Complete(_))
                ) {
                    s.complete = true;
                    continue;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn agents(State(api): State<Arc<Api>>) -> Response {
    let list: Vec<_> = api
        .controller
        .connected_agents()
        .into_iter()
        .map(|(name, labels)| serde_json::json!({ "name": name, "labels": labels }))
        .collect();
    Json(list).into_response()
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
            })
        })
        .collect();
    Json(list).into_response()
}

async fn reload_plugin(State(api): State<Arc<Api>>, Path(name): Path<String>) -> Response {
    if api.runtime.get(&name).is_none() {
        return error(
            StatusCode::NOT_FOUND,
            format!("no plugin named `{name}` is loaded"),
        );
    }
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
