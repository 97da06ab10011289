//! Who may call the API, and from where.
//!
//! - **Tokens.** `trellis token create NAME --role ROLE` makes a random 256-bit token,
//!   prints it once and keeps only its SHA-256 in `<state-dir>/api-tokens.json` (mode
//!   0600, written to a temporary file and renamed). The running controller re-reads
//!   the file when it changes, so a new or revoked token counts at the next request.
//!   Requests carry `Authorization: Bearer TOKEN`; hashes are compared in constant time.
//! - **Roles.** `viewer` reads; `operator` also submits and cancels; `admin` also
//!   reloads plugins and manages tokens. Every route has a rule in [`RULES`], enforced
//!   in one place ([`Access::authorize`]); a route without one is refused.
//! - **Browsers.** The web page signs in with a token (`POST /api/session`) and gets an
//!   `HttpOnly; SameSite=Strict` session cookie (`Secure` under TLS). Because a browser
//!   sends cookies by itself, every request is held to [`Access::screen`] first: its
//!   `Host` must be on the allow-list (no DNS rebinding), and a state-changing request
//!   must come from this origin (`Origin`, `Sec-Fetch-Site`) with a content type no
//!   plain HTML form or `no-cors` fetch can send. No CORS headers are ever sent.

use axum::http::{HeaderMap, Method, StatusCode, header};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What a token may do; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            _ => Err(format!(
                "`{s}` is not a role: use viewer (reads), operator (also submits and cancels) or admin (also reloads plugins and manages tokens)"
            )),
        }
    }
}

/// The rule of one route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Anyone: the page, its script, signing in and out.
    Public,
    /// A token (or session) with at least this role.
    Needs(Role),
    /// `/metrics`: viewers, or anyone with `[controller] open-metrics = true` (scrapers).
    Metrics,
}

/// Every route the controller serves, and who may call it. `HEAD` follows `GET`.
/// A route missing here is refused (500) and fails the route table test.
pub const RULES: &[(&str, &str, Rule)] = &[
    ("GET", "/", Rule::Public),
    ("GET", "/runs/{id}", Rule::Public),
    ("GET", "/app.js", Rule::Public),
    ("POST", "/api/session", Rule::Public),
    ("DELETE", "/api/session", Rule::Public),
    ("GET", "/api/session", Rule::Public),
    ("GET", "/api/runs", Rule::Needs(Role::Viewer)),
    ("POST", "/api/runs", Rule::Needs(Role::Operator)),
    ("GET", "/api/runs/{id}", Rule::Needs(Role::Viewer)),
    ("POST", "/api/runs/{id}/cancel", Rule::Needs(Role::Operator)),
    ("GET", "/api/runs/{id}/log", Rule::Needs(Role::Viewer)),
    (
        "GET",
        "/api/runs/{id}/log/follow",
        Rule::Needs(Role::Viewer),
    ),
    ("GET", "/api/runs/{id}/artifacts", Rule::Needs(Role::Viewer)),
    (
        "GET",
        "/api/runs/{id}/artifacts/{*name}",
        Rule::Needs(Role::Viewer),
    ),
    ("GET", "/api/queue", Rule::Needs(Role::Viewer)),
    ("GET", "/api/agents", Rule::Needs(Role::Viewer)),
    ("GET", "/api/plugins", Rule::Needs(Role::Viewer)),
    (
        "POST",
        "/api/plugins/{name}/reload",
        Rule::Needs(Role::Admin),
    ),
    ("GET", "/api/tokens", Rule::Needs(Role::Admin)),
    ("GET", "/api/cluster", Rule::Needs(Role::Viewer)),
    ("GET", "/metrics", Rule::Metrics),
];

/// The rule for `method` on the route pattern `path` (as the router wrote it).
pub fn rule(method: &Method, path: &str) -> Option<Rule> {
    let method = if *method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    RULES
        .iter()
        .find(|(m, p, _)| *m == method && *p == path)
        .map(|r| r.2)
}

/// Who made a request: the token's name (run records' `submitted_by`) and role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

/// The token file's name in the controller's state directory.
pub const TOKEN_FILE: &str = "api-tokens.json";
/// What every token starts with, so a leaked one is recognisable (secret scanners).
pub const TOKEN_PREFIX: &str = "trellis_";

/// One token as stored: never the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredToken {
    pub name: String,
    pub role: Role,
    /// SHA-256 of the whole token, hex.
    pub sha256: String,
    pub created_ms: i64,
}

#[derive(Default, Serialize, Deserialize)]
struct TokenFileBody {
    tokens: Vec<StoredToken>,
}

/// The token file, re-read whenever it changes on disk.
pub struct TokenStore {
    path: PathBuf,
    cache: Mutex<Cached>,
}

#[derive(Default)]
struct Cached {
    /// (inode, mtime ns, length) of the file last read; None: not read yet or absent.
    stamp: Option<(u64, i128, u64)>,
    tokens: Vec<StoredToken>,
}

fn stamp(path: &Path) -> Option<(u64, i128, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.ino(),
        m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        m.len(),
    ))
}

/// A token name: what run records and logs show. Letters, digits, `.`, `_`, `-`.
pub fn check_token_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a token name: use 1 to 64 letters, digits, `.`, `_` or `-`, starting with a letter or digit"
        ))
    }
}

fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Equal without telling where the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && std::hint::black_box(a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y))) == 0
}

/// 32 bytes from the operating system's CSPRNG (through rustls' provider).
fn random32() -> std::io::Result<[u8; 32]> {
    let mut b = [0u8; 32];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut b)
        .map_err(|_| std::io::Error::other("the system's random source failed"))?;
    Ok(b)
}

impl TokenStore {
    /// The store in `state_dir` (the controller's `[controller] state-dir`).
    pub fn in_state_dir(state_dir: &Path) -> TokenStore {
        TokenStore {
            path: state_dir.join(TOKEN_FILE),
            cache: Mutex::new(Cached::default()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read_file(&self) -> std::io::Result<Vec<StoredToken>> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice::<TokenFileBody>(&b)
                .map(|f| f.tokens)
                .map_err(|e| {
                    std::io::Error::other(format!("{} is damaged: {e}", self.path.display()))
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(std::io::Error::other(format!(
                "cannot read {}: {e}",
                self.path.display()
            ))),
        }
    }

    /// The tokens as the file has them now (re-read if it changed since last time). A
    /// file that cannot be read means no tokens: nobody gets in (fail closed).
    pub fn tokens(&self) -> Vec<StoredToken> {
        let now = stamp(&self.path);
        let mut c = self.cache.lock().unwrap();
        if c.stamp != now || now.is_none() {
            c.tokens = match self.read_file() {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!("API tokens: {e}; refusing every token until it is fixed");
                    Vec::new()
                }
            };
            c.stamp = now;
        }
        c.tokens.clone()
    }

    /// The token's name and role, if it is one of ours. Every stored hash is compared
    /// (in constant time), so the time taken says nothing about which one matched.
    pub fn verify(&self, token: &str) -> Option<Caller> {
        let h = hash(token);
        let mut found = None;
        for t in self.tokens() {
            let stored = hex::decode(&t.sha256).unwrap_or_default();
            if same(&stored, &h) && found.is_none() {
                found = Some(Caller {
                    name: t.name.clone(),
                    role: t.role,
                });
            }
        }
        found
    }

    /// The current role of the token named `name` (None once revoked).
    pub fn role_of(&self, name: &str) -> Option<Role> {
        self.tokens()
            .into_iter()
            .find(|t| t.name == name)
            .map(|t| t.role)
    }

    /// Read, change and write the file under an exclusive lock (two CLI calls at once
    /// must not lose one's change).
    fn modify<T>(
        &self,
        f: impl FnOnce(&mut Vec<StoredToken>) -> Result<T, String>,
    ) -> Result<T, String> {
        use std::os::unix::fs::OpenOptionsExt;
        use std::os::unix::io::AsRawFd;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let lock_path = self.path.with_extension("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| format!("{}: {e}", lock_path.display()))?;
        // SAFETY: flock on a descriptor we own; released when `lock` is closed.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(format!(
                "cannot lock {}: {}",
                lock_path.display(),
                std::io::Error::last_os_error()
            ));
        }
        let mut tokens = self.read_file().map_err(|e| e.to_string())?;
        let out = f(&mut tokens)?;
        // A full disk may free up (a log rotated, a plugin's files removed): a few
        // tries with backoff (0.1, 0.4, 1.6 s), then an error naming the file and the fix.
        let mut wait = std::time::Duration::from_millis(100);
        let mut tries = 1;
        loop {
            match self.write(&tokens) {
                Ok(()) => break,
                Err(e) if crate::controller::state::is_no_space(&e) && tries < 4 => {
                    std::thread::sleep(wait);
                    wait *= 4;
                    tries += 1;
                }
                Err(e) if crate::controller::state::is_no_space(&e) => {
                    return Err(format!(
                        "cannot write {}: {e} (tried {tries} times): free space on its filesystem, then run the command again",
                        self.path.display()
                    ));
                }
                Err(e) => return Err(format!("cannot write {}: {e}", self.path.display())),
            }
        }
        Ok(out)
    }

    /// Temporary file (0600) in the same directory, synced, then renamed over the old.
    fn write(&self, tokens: &[StoredToken]) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let body = serde_json::to_vec_pretty(&TokenFileBody {
            tokens: tokens.to_vec(),
        })?;
        let tmp = self
            .path
            .with_extension(format!("tmp-{}", std::process::id()));
        let written = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(&body)?;
                f.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            // A full disk: the partial temp file would only take more of what is left.
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        if let Some(dir) = self.path.parent()
            && let Ok(d) = std::fs::File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Make a token named `name`; returns the token, which is not kept anywhere.
    pub fn create(&self, name: &str, role: Role) -> Result<String, String> {
        check_token_name(name)?;
        let token = format!(
            "{TOKEN_PREFIX}{}",
            hex::encode(random32().map_err(|e| e.to_string())?)
        );
        self.modify(|tokens| {
            if tokens.iter().any(|t| t.name == name) {
                return Err(format!(
                    "a token named `{name}` exists already: revoke it first (`trellis token revoke {name}`) or pick another name"
                ));
            }
            tokens.push(StoredToken {
                name: name.to_string(),
                role,
                sha256: hex::encode(hash(&token)),
                created_ms: crate::protocol::now_ms(),
            });
            Ok(())
        })?;
        Ok(token)
    }

    /// Remove the token named `name`; its sessions end with it.
    pub fn revoke(&self, name: &str) -> Result<(), String> {
        self.modify(|tokens| {
            let before = tokens.len();
            tokens.retain(|t| t.name != name);
            if tokens.len() == before {
                let known: Vec<_> = tokens.iter().map(|t| t.name.as_str()).collect();
                return Err(format!("no token named `{name}` (there are: {known:?})"));
            }
            Ok(())
        })
    }
}

/// Signed-in browsers: a random session id (the cookie) -> the token name it was made
/// from. Only the ids' hashes are kept; a revoked token's sessions stop working.
#[derive(Default)]
struct Sessions {
    map: Mutex<HashMap<[u8; 32], (String, Instant)>>,
}

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "trellis_session";
/// How long a browser session lasts.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Most sessions kept at once (the oldest go first).
const MAX_SESSIONS: usize = 10_000;

impl Sessions {
    fn start(&self, name: &str) -> std::io::Result<String> {
        let id = hex::encode(random32()?);
        let mut m = self.map.lock().unwrap();
        let now = Instant::now();
        m.retain(|_, (_, until)| *until > now);
        if m.len() >= MAX_SESSIONS
            && let Some(oldest) = m.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| *k)
        {
            m.remove(&oldest);
        }
        m.insert(hash(&id), (name.to_string(), now + SESSION_TTL));
        Ok(id)
    }

    fn name(&self, id: &str) -> Option<String> {
        let m = self.map.lock().unwrap();
        m.get(&hash(id))
            .filter(|(_, until)| *until > Instant::now())
            .map(|(n, _)| n.clone())
    }

    fn end(&self, id: &str) {
        self.map.lock().unwrap().remove(&hash(id));
    }
}

/// How the API is guarded; one per listener.
pub struct Access {
    pub tokens: TokenStore,
    sessions: Sessions,
    /// Host names (lower case, no port) requests may name in `Host`.
    hosts: Vec<String>,
    /// Any IP literal is a fine `Host` (bound to 0.0.0.0 or ::): rebinding needs a name.
    any_ip_host: bool,
    open_metrics: bool,
    /// Served over TLS: cookies are `Secure`, the origin is https.
    tls: bool,
}

/// What [`Access::new`] needs from the configuration.
pub struct AccessConfig<'a> {
    pub state_dir: &'a Path,
    pub bind: SocketAddr,
    /// `[controller] hosts`: the names clients reach the controller by.
    pub hosts: &'a [String],
    pub open_metrics: bool,
    pub tls: bool,
}

/// A refusal: status and message (JSON `{"error": ...}`).
pub type Refusal = (StatusCode, String);

impl Access {
    pub fn new(c: AccessConfig<'_>) -> Access {
        let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "::1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        hosts.extend(c.hosts.iter().map(|h| h.to_ascii_lowercase()));
        let ip = c.bind.ip();
        if !ip.is_unspecified() {
            hosts.push(ip.to_string());
        }
        Access {
            tokens: TokenStore::in_state_dir(c.state_dir),
            sessions: Sessions::default(),
            hosts,
            any_ip_host: ip.is_unspecified(),
            open_metrics: c.open_metrics,
            tls: c.tls,
        }
    }

    pub fn tls(&self) -> bool {
        self.tls
    }

    fn host_allowed(&self, host: &str) -> bool {
        let name = host_name(host).to_ascii_lowercase();
        if self.hosts.contains(&name) {
            return true;
        }
        self.any_ip_host && name.parse::<IpAddr>().is_ok()
    }

    /// The checks every request passes before routing: the `Host` allow-list, and for
    /// a state-changing request, same origin and a non-simple content type.
    pub fn screen(&self, method: &Method, headers: &HeaderMap) -> Result<(), Refusal> {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        if !self.host_allowed(host) {
            return Err((
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "this controller does not answer to the host `{host}`: reach it by a name in [controller] hosts (add `{}` there if it is really this controller's)",
                    host_name(host)
                ),
            ));
        }
        if *method == Method::GET || *method == Method::HEAD || *method == Method::OPTIONS {
            return Ok(());
        }
        let get = |h: &str| headers.get(h).and_then(|v| v.to_str().ok());
        if let Some(site) = get("sec-fetch-site")
            && site != "same-origin"
            && site != "none"
        {
            return Err((
                StatusCode::FORBIDDEN,
                format!("refused: a {site} request may not change anything here"),
            ));
        }
        if let Some(origin) = get("origin") {
            let scheme = if self.tls { "https" } else { "http" };
            if !origin.eq_ignore_ascii_case(&format!("{scheme}://{host}")) {
                return Err((
                    StatusCode::FORBIDDEN,
                    format!(
                        "refused: a request from the origin `{origin}` may not change anything here"
                    ),
                ));
            }
        }
        let content_type = get("content-type")
            .and_then(|c| c.split(';').next())
            .map(|c| c.trim().to_ascii_lowercase())
            .unwrap_or_default();
        let non_simple = content_type == "application/json" || content_type == "application/toml";
        if !non_simple && get(CSRF_HEADER).is_none() {
            return Err((
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "a request that changes something needs `Content-Type: application/toml` or `application/json` (or an `{CSRF_HEADER}` header); got `{content_type}`"
                ),
            ));
        }
        Ok(())
    }

    /// Who is calling: a bearer token, else a session cookie. A bearer header that does
    /// not name a token is an error, not "nobody".
    pub fn caller(&self, headers: &HeaderMap) -> Result<Option<Caller>, Refusal> {
        if let Some(auth) = headers.get(header::AUTHORIZATION) {
            let token = auth
                .to_str()
                .ok()
                .and_then(|a| a.strip_prefix("Bearer "))
                .map(str::trim);
            return match token.and_then(|t| self.tokens.verify(t)) {
                Some(c) => Ok(Some(c)),
                None => Err((
                    StatusCode::UNAUTHORIZED,
                    format!(
                        "the bearer token is not valid (revoked, or mistyped). {HOW_TO_GET_A_TOKEN}"
                    ),
                )),
            };
        }
        if let Some(id) = cookie(headers, SESSION_COOKIE) {
            // The session names a token; it lasts only as long as the token does.
            if let Some(name) = self.sessions.name(&id)
                && let Some(role) = self.tokens.role_of(&name)
            {
                return Ok(Some(Caller { name, role }));
            }
            return Err((
                StatusCode::UNAUTHORIZED,
                format!("your session has ended: sign in again. {HOW_TO_GET_A_TOKEN}"),
            ));
        }
        Ok(None)
    }

    /// Hold a request to its route's rule; the caller, if any, for the handler.
    pub fn authorize(
        &self,
        method: &Method,
        route: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<Option<Caller>, Refusal> {
        let Some(rule) = route.and_then(|r| rule(method, r)) else {
            return Err((
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                    "{method} {} has no access rule: refused (a bug: add it to api::access::RULES)",
                    route.unwrap_or("(unrouted)")
                ),
            ));
        };
        let need = match rule {
            Rule::Public => return Ok(self.caller(headers).unwrap_or(None)),
            Rule::Metrics if self.open_metrics => return Ok(None),
            Rule::Metrics => Role::Viewer,
            Rule::Needs(r) => r,
        };
        match self.caller(headers)? {
            None => Err((
                StatusCode::UNAUTHORIZED,
                format!("this needs a token (role {need} or above). {HOW_TO_GET_A_TOKEN}"),
            )),
            Some(c) if c.role < need => Err((
                StatusCode::FORBIDDEN,
                format!(
                    "this needs the `{need}` role; token `{}` has `{}` (an admin can make a token with `--role {need}`)",
                    c.name, c.role
                ),
            )),
            Some(c) => Ok(Some(c)),
        }
    }

    /// Sign in with `token`: the `Set-Cookie` value of a new session.
    pub fn sign_in(&self, token: &str) -> Result<(Caller, String), Refusal> {
        let Some(c) = self.tokens.verify(token.trim()) else {
            return Err((
                StatusCode::UNAUTHORIZED,
                format!("that token is not valid. {HOW_TO_GET_A_TOKEN}"),
            ));
        };
        let id = self.sessions.start(&c.name).map_err(|e| {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot start a session: {e}"),
            )
        })?;
        let cookie = format!(
            "{SESSION_COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
            SESSION_TTL.as_secs(),
            if self.tls { "; Secure" } else { "" }
        );
        Ok((c, cookie))
    }

    /// End the request's session, if any: the `Set-Cookie` value that clears it.
    pub fn sign_out(&self, headers: &HeaderMap) -> String {
        if let Some(id) = cookie(headers, SESSION_COOKIE) {
            self.sessions.end(&id);
        }
        format!(
            "{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
            if self.tls { "; Secure" } else { "" }
        )
    }
}

/// The custom header that also marks a state-changing request as not from a form.
pub const CSRF_HEADER: &str = "x-trellis-request";

/// What a 401 says.
pub const HOW_TO_GET_A_TOKEN: &str = "Get a token from an admin: on the controller's host, `trellis token create NAME --role viewer|operator|admin --config CONTROLLER.toml`; then pass it with --token or TRELLIS_TOKEN (CLI), `Authorization: Bearer TOKEN` (HTTP), or sign in on the web page";

/// `Host` without its port (`[::1]:8080` -> `::1`).
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    }
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(dir: &Path) -> Access {
        Access::new(AccessConfig {
            state_dir: dir,
            bind: "127.0.0.1:8080".parse().unwrap(),
            hosts: &["ci.example.com".to_string()],
            open_metrics: false,
            tls: false,
        })
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn tokens_are_kept_hashed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let a = access(dir.path());
        let t = a.tokens.create("ci-bot", Role::Operator).unwrap();
        assert!(t.starts_with(TOKEN_PREFIX) && t.len() == TOKEN_PREFIX.len() + 64);
        let file = std::fs::read_to_string(dir.path().join(TOKEN_FILE)).unwrap();
        assert!(!file.contains(&t) && file.contains("ci-bot"), "{file}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(TOKEN_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(a.tokens.verify(&t).unwrap().role, Role::Operator);
        assert!(a.tokens.verify("trellis_00").is_none());
        assert!(a.tokens.create("ci-bot", Role::Admin).is_err());
        // another process (the CLI) revokes it: the running store sees it at once
        let other = TokenStore::in_state_dir(dir.path());
        other.revoke("ci-bot").unwrap();
        assert!(a.tokens.verify(&t).is_none());
        assert!(other.revoke("ci-bot").is_err());
        assert!(a.tokens.create("bad name", Role::Viewer).is_err());
    }

    #[test]
    fn roles_and_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let a = access(dir.path());
        let viewer = a.tokens.create("v", Role::Viewer).unwrap();
        let host = ("host", "127.0.0.1:8080");
        let bearer = format!("Bearer {viewer}");
        let h = headers(&[host, ("authorization", &bearer)]);
        let submit = a
            .authorize(&Method::POST, Some("/api/runs"), &h)
            .unwrap_err();
        assert_eq!(submit.0, StatusCode::FORBIDDEN);
        assert!(submit.1.contains("`operator`"), "{}", submit.1);
        assert!(a.authorize(&Method::GET, Some("/api/runs"), &h).is_ok());
        let none = a
            .authorize(&Method::GET, Some("/api/runs"), &headers(&[host]))
            .unwrap_err();
        assert_eq!(none.0, StatusCode::UNAUTHORIZED);
        assert!(none.1.contains("trellis token create"), "{}", none.1);
        let unknown = a
            .authorize(&Method::GET, Some("/api/new-route"), &h)
            .unwrap_err();
        assert_eq!(unknown.0, StatusCode::INTERNAL_SERVER_ERROR);

        let (_, set) = a.sign_in(&viewer).unwrap();
        assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"));
        assert!(!set.contains("Secure"));
        let id = set.split(';').next().unwrap();
        let h = headers(&[host, ("cookie", id)]);
        assert_eq!(
            a.authorize(&Method::GET, Some("/api/runs"), &h)
                .unwrap()
                .unwrap()
                .name,
            "v"
        );
        a.tokens.revoke("v").unwrap();
        assert_eq!(
            a.authorize(&Method::GET, Some("/api/runs"), &h)
                .unwrap_err()
                .0,
            StatusCode::UNAUTHORIZED
        );
    }

    #[test]
    fn under_tls_cookies_are_secure_and_the_origin_is_https() {
        let dir = tempfile::tempdir().unwrap();
        let a = Access::new(AccessConfig {
            state_dir: dir.path(),
            bind: "127.0.0.1:8443".parse().unwrap(),
            hosts: &[],
            open_metrics: true,
            tls: true,
        });
        let t = a.tokens.create("v", Role::Viewer).unwrap();
        let (_, set) = a.sign_in(&t).unwrap();
        assert!(set.ends_with("; Secure"), "{set}");
        let h = |origin: &str| {
            headers(&[
                ("host", "127.0.0.1:8443"),
                ("content-type", "application/json"),
                ("origin", origin),
            ])
        };
        assert!(
            a.screen(&Method::POST, &h("https://127.0.0.1:8443"))
                .is_ok()
        );
        assert!(
            a.screen(&Method::POST, &h("http://127.0.0.1:8443"))
                .is_err()
        );
        // open metrics: no token needed there, and only there
        let none = headers(&[("host", "127.0.0.1:8443")]);
        assert!(a.authorize(&Method::GET, Some("/metrics"), &none).is_ok());
        assert!(a.authorize(&Method::GET, Some("/api/runs"), &none).is_err());
    }

    #[test]
    fn browsers_are_screened() {
        let dir = tempfile::tempdir().unwrap();
        let a = access(dir.path());
        let ok = |m: Method, h: &[(&str, &str)]| a.screen(&m, &headers(h)).map_err(|e| e.0);
        assert!(ok(Method::GET, &[("host", "localhost:8080")]).is_ok());
        assert!(ok(Method::GET, &[("host", "CI.example.com")]).is_ok());
        assert_eq!(
            ok(Method::GET, &[("host", "evil.example:8080")]),
            Err(StatusCode::MISDIRECTED_REQUEST)
        );
        assert_eq!(
            ok(Method::GET, &[("host", "10.1.2.3")]),
            Err(StatusCode::MISDIRECTED_REQUEST)
        );
        let json = ("content-type", "application/json");
        let host = ("host", "127.0.0.1:8080");
        assert!(ok(Method::POST, &[host, json]).is_ok());
        assert!(
            ok(
                Method::POST,
                &[host, json, ("origin", "http://127.0.0.1:8080")]
            )
            .is_ok()
        );
        assert_eq!(
            ok(
                Method::POST,
                &[host, json, ("origin", "http://127.0.0.2:9000")]
            ),
            Err(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            ok(
                Method::POST,
                &[host, json, ("sec-fetch-site", "cross-site")]
            ),
            Err(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            ok(Method::POST, &[host, ("content-type", "text/plain")]),
            Err(StatusCode::UNSUPPORTED_MEDIA_TYPE)
        );
        assert!(ok(Method::POST, &[host, (CSRF_HEADER, "1")]).is_ok());
        assert_eq!(host_name("[::1]:80"), "::1");
        assert_eq!(host_name("a.b:80"), "a.b");
    }
}
