//! Outgoing `wasi:http`, allowed per authority. Every request is checked in the
//! `send_request` hook against the plugin's grants on scheme, host *and* port; a miss is
//! answered with `HttpRequestDenied` and logged with the exact line that would allow it.
//! Allowed requests get the host's own timeouts and a cap on the response body, since
//! epoch deadlines do not cover time spent waiting on the network.

use http_body_util::BodyExt;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

use crate::runtime::metrics::PluginMetrics;

/// One granted authority: scheme, host and port must all match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    pub scheme: String,
    pub host: String,
    pub port: u16,
}

impl Authority {
    /// Parse `scheme://host[:port]` (port defaults to the scheme's).
    pub fn parse(s: &str) -> Result<Authority, String> {
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| format!("`{s}` has no scheme"))?;
        let scheme = scheme.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => return Err(format!("`{s}`: scheme must be http or https")),
        };
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() || rest.contains('/') || rest.contains('@') {
            return Err(format!(
                "`{s}` must be only scheme://host:port, without a path or credentials"
            ));
        }
        let (host, port) = split_host_port(rest).ok_or_else(|| format!("`{s}`: bad port"))?;
        Ok(Authority {
            scheme,
            host: host.to_ascii_lowercase(),
            port: port.unwrap_or(default_port),
        })
    }
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
    }
}

fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        // [v6]:port
        let (h, after) = rest.split_once(']')?;
        return match after.strip_prefix(':') {
            Some(p) => Some((h, Some(p.parse().ok()?))),
            None if after.is_empty() => Some((h, None)),
            None => None,
        };
    }
    match s.rsplit_once(':') {
        Some((h, p)) => Some((h, Some(p.parse().ok()?))),
        None => Some((s, None)),
    }
}

/// The `wasi:http` hooks of one instance.
pub struct HttpGate {
    pub plugin: Arc<str>,
    pub allowed: Arc<Vec<Authority>>,
    pub timeout: Duration,
    pub max_response: u64,
    pub metrics: Arc<PluginMetrics>,
}

impl HttpGate {
    fn check(&self, uri: &http::Uri) -> Result<(), String> {
        let scheme = uri.scheme_str().unwrap_or("").to_ascii_lowercase();
        let host = uri
            .host()
            .unwrap_or("")
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let port = uri
            .port_u16()
            .unwrap_or(if scheme == "https" { 443 } else { 80 });
        let wanted = Authority { scheme, host, port };
        if self.allowed.contains(&wanted) {
            Ok(())
        } else {
            Err(wanted.to_string())
        }
    }
}

impl WasiHttpHooks for HttpGate {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> Box<
        dyn Future<
                Output = Result<
                    (
                        http::Response<WasiBody>,
                        Box<dyn Future<Output = Result<(), HttpError>> + Send>,
                    ),
                    HttpError,
                >,
            > + Send,
    > {
        drop(fut);
        if let Err(wanted) = self.check(request.uri()) {
            self.metrics.denials.fetch_add(1, Relaxed);
            tracing::warn!(
                plugin = %self.plugin,
                "denied: HTTP request to {wanted} is not granted; to allow it add \"{wanted}\" to `http` in [plugins.{}]",
                self.plugin
            );
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        }
        // The plugin may ask for shorter timeouts, never longer ones than the host's.
        let cap = |t: Option<Duration>| Some(t.map_or(self.timeout, |t| t.min(self.timeout)));
        let options = options.unwrap_or_default();
        let options = RequestOptions {
            connect_timeout: cap(options.connect_timeout),
            first_byte_timeout: cap(options.first_byte_timeout),
            between_bytes_timeout: cap(options.between_bytes_timeout),
        };
        let max = self.max_response;
        Box::new(async move {
            let (res, io) =
                wasmtime_wasi_http::default_send_request(request, Some(options)).await?;
            let res = res.map(|body| {
                http_body_util::Limited::new(body, max as usize)
                    .map_err(move |e| match e.downcast::<HttpError>() {
                        Ok(e) => *e,
                        Err(_) => HttpError::HttpResponseBodySize(Some(max)),
                    })
                    .boxed_unsync()
            });
            Ok((
                res,
                Box::new(io) as Box<dyn Future<Output = Result<(), HttpError>> + Send>,
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities() {
        assert_eq!(
            Authority::parse("https://es.local").unwrap().to_string(),
            "https://es.local:443"
        );
        assert_eq!(
            Authority::parse("http://127.0.0.1:9200/").unwrap().port,
            9200
        );
        assert_eq!(Authority::parse("http://[::1]:8080").unwrap().host, "::1");
        assert!(
            Authority::parse("es.local:9200")
                .unwrap_err()
                .contains("no scheme")
        );
        assert!(
            Authority::parse("ftp://x")
                .unwrap_err()
                .contains("http or https")
        );
        assert!(
            Authority::parse("https://x/path")
                .unwrap_err()
                .contains("without a path")
        );
        assert!(Authority::parse("https://user:pw@x").is_err());
    }

    #[test]
    fn gate_matches_scheme_host_and_port() {
        let gate = HttpGate {
            plugin: "p".into(),
            allowed: Arc::new(vec![Authority::parse("http://127.0.0.1:9200").unwrap()]),
            timeout: Duration::from_secs(1),
            max_response: 1,
            metrics: Default::default(),
        };
        assert!(
            gate.check(&"http://127.0.0.1:9200/_bulk".parse().unwrap())
                .is_ok()
        );
        assert!(
            gate.check(&"https://127.0.0.1:9200/".parse().unwrap())
                .is_err()
        );
        assert!(
            gate.check(&"http://127.0.0.1:9201/".parse().unwrap())
                .is_err()
        );
        assert!(
            gate.check(&"http://127.0.0.2:9200/".parse().unwrap())
                .is_err()
        );
    }
}
