//! What both Elasticsearch plugins need: the cluster settings from `init` (URL, index
//! template, credentials from the secrets store) and one HTTP call with errors of the
//! right kind, shared by `elasticsearch-logging` and `elasticsearch-browser`.

use crate::Meta;
use std::sync::OnceLock;
use trellis_sdk::config::Config;
use trellis_sdk::{Error, LogMetadata, http, secrets};

/// The host's log metadata as the store names it.
pub fn meta(m: &LogMetadata) -> Meta {
    Meta {
        instance_id: m.instance_id.clone(),
        loggable_type: m.loggable_type.clone(),
        loggable_id: m.loggable_id.clone(),
        job_id: m.job_id.clone(),
    }
}

pub struct Settings {
    pub url: String,
    pub index: String,
    /// The Authorization header value, if any (read from the secrets store at init).
    auth: Option<String>,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

pub fn settings() -> Result<&'static Settings, Error> {
    SETTINGS
        .get()
        .ok_or_else(|| Error::permanent("used before init"))
}

/// Read the plugin's config (`plugin` names it in errors).
pub fn init(config: &str, plugin: &'static str) -> Result<(), Error> {
    PLUGIN.get_or_init(|| plugin);
    let c = Config::parse(config).map_err(Error::bad_config)?;
    let url = c
        .require_string("url")
        .map_err(Error::bad_config)?
        .trim_end_matches('/')
        .to_string();
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(Error::bad_config(format!(
            "config key `url`: `{url}` is not an http:// or https:// URL"
        )));
    }
    let index = c
        .string("index")
        .map_err(Error::bad_config)?
        .unwrap_or("trellis-logs-{job}")
        .to_string();
    let user = c.string("username").map_err(Error::bad_config)?;
    let password = c.string("password-secret").map_err(Error::bad_config)?;
    let api_key = c.string("api-key-secret").map_err(Error::bad_config)?;
    let auth = match (user, password, api_key) {
        (_, _, Some(k)) => Some(format!("ApiKey {}", secrets::get(k)?)),
        (Some(u), Some(p), None) => {
            let pw = secrets::get(p)?;
            Some(http::basic_auth(u, &pw))
        }
        (None, None, None) => None,
        _ => {
            return Err(Error::bad_config(
                "basic auth needs both `username` and `password-secret`",
            ));
        }
    };
    let _ = SETTINGS.set(Settings { url, index, auth });
    Ok(())
}

static PLUGIN: OnceLock<&'static str> = OnceLock::new();

/// One request; the status and body. Transport failures are `retryable`.
pub fn call(method: &str, path: &str, ctype: &str, body: &[u8]) -> Result<http::Response, Error> {
    let s = settings()?;
    let mut headers: Vec<(&str, &[u8])> = vec![("content-type", ctype.as_bytes())];
    if let Some(a) = &s.auth {
        headers.push(("authorization", a.as_bytes()));
    }
    http::request(method, &format!("{}{path}", s.url), &headers, body).map_err(|e| {
        if e.contains("HttpRequestDenied") {
            Error::denied(format!(
                "{e}: grant it in [plugins.{}] http = [\"{}\"]",
                PLUGIN.get().copied().unwrap_or("elasticsearch-logging"),
                s.url
            ))
        } else {
            Error::retryable(e)
        }
    })
}

/// An HTTP status other than success, as an error of the right kind.
pub fn refused(what: &str, r: &http::Response) -> Error {
    let body = String::from_utf8_lossy(&r.body);
    let text = format!(
        "{what}: HTTP {}: {}",
        r.status,
        body.chars().take(300).collect::<String>()
    );
    match r.status {
        401 | 403 => Error::denied(text),
        408 | 429 | 500..=599 => Error::retryable(text),
        _ => Error::permanent(text),
    }
}
