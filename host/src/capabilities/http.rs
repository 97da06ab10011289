//! Outgoing `wasi:http`, allowed per authority. Every request is checked in the
//! `send_request` hook against the plugin's grants on scheme, host *and* port; a miss is
//! answered with `HttpRequestDenied` and logged with the exact line that would allow it.
//! Allowed requests get the host's own timeouts and a cap on the response body, since
//! epoch deadlines do not cover time spent waiting on the network.
//!
//! Requests go out through the host's own HTTP/1.1 client (`send_own`, hyper over tokio
//! and rustls, one connection per request like wasmtime-wasi-http's
//! `default_send_request`, with its three timeouts), for two reasons: `TCP_NODELAY`
//! (a body reaches hyper in pieces; with Nagle's algorithm each piece after the first
//! waited for an ACK: 0.65× → 0.85× of a native writer at small bulk sizes, see
//! PERFORMANCE.md) and the root store. HTTPS trusts the public roots (webpki-roots),
//! plus the CAs an operator grants per plugin (`tls-ca`, for a store or BMC with a
//! private CA). Nothing lets a plugin turn verification off.

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
    /// HTTPS trust with the operator's extra CAs; None: wasmtime-wasi-http's client.
    pub tls: Option<Arc<rustls::ClientConfig>>,
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
        let tls = self.tls.clone();
        let plugin = self.plugin.clone();
        let target = request.uri().authority().map(|a| a.to_string());
        Box::new(async move {
            let sent = send_own(request, tls, options)
                .await
                .map(|(res, io)| (res.map(|b| b.boxed_unsync()), io));
            let (res, io) = sent.inspect_err(|e| {
                // The plugin sees only `TLS-protocol-error`; the operator gets why.
                if let HttpError::Tls(why) = e {
                    tracing::warn!(
                        plugin = %plugin,
                        "TLS with {} failed: {why}; if its certificate comes from a private CA, add the CA's PEM file to `tls-ca` in [plugins.{plugin}]",
                        target.as_deref().unwrap_or("?"),
                    );
                }
            })?;
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

/// A client config trusting the public roots and the CA certificates in `files`
/// (None when there are none). An error names the file's index and the problem.
pub fn trusting(
    files: &[std::path::PathBuf],
) -> Result<Option<Arc<rustls::ClientConfig>>, (usize, String)> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    if files.is_empty() {
        return Ok(None);
    }
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.into(),
    };
    for (i, f) in files.iter().enumerate() {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(f)
            .and_then(|certs| certs.collect())
            .map_err(|e| (i, format!("cannot read {}: {e}", f.display())))?;
        if certs.is_empty() {
            return Err((i, format!("{} holds no PEM certificate", f.display())));
        }
        for c in certs {
            roots.add(c).map_err(|e| {
                (
                    i,
                    format!("{}: not a usable CA certificate: {e}", f.display()),
                )
            })?;
        }
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(Arc::new(config)))
}

/// The future that drives a request's connection until its response body is read.
type IoDriver = std::pin::Pin<Box<dyn Future<Output = Result<(), HttpError>> + Send>>;

type Sent = (
    http::Response<http_body_util::combinators::BoxBody<bytes::Bytes, HttpError>>,
    IoDriver,
);

/// One request on a connection of its own, as `default_send_request` does (same
/// timeouts), but with `TCP_NODELAY` (a body that reaches hyper in pieces is not held
/// back by Nagle's algorithm) and, for HTTPS, `tls`'s trust.
async fn send_own(
    request: http::Request<WasiBody>,
    tls: Option<Arc<rustls::ClientConfig>>,
    options: RequestOptions,
) -> Result<Sent, HttpError> {
    use tokio::time::timeout;
    let uri = request.uri();
    let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
    let host = uri
        .host()
        .ok_or(HttpError::HttpRequestUriInvalid)?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let connect = options.connect_timeout.unwrap_or(Duration::from_secs(600));
    let first_byte = options
        .first_byte_timeout
        .unwrap_or(Duration::from_secs(600));
    let between_bytes = options
        .between_bytes_timeout
        .unwrap_or(Duration::from_secs(600))
        .max(Duration::from_millis(1));
    let tcp = timeout(
        connect,
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| HttpError::ConnectionTimeout)?
    .map_err(HttpError::Connect)?;
    let _ = tcp.set_nodelay(true);
    if !https {
        let io = wasmtime_wasi_http::io::TokioIo::new(tcp);
        return exchange(request, io, first_byte, between_bytes).await;
    }
    let tls = tls.unwrap_or_else(public_roots);
    let name = rustls::pki_types::ServerName::try_from(host)
        .map_err(|_| HttpError::HttpRequestUriInvalid)?;
    let stream = timeout(
        connect,
        tokio_rustls::TlsConnector::from(tls).connect(name, tcp),
    )
    .await
    .map_err(|_| HttpError::ConnectionTimeout)?
    .map_err(HttpError::Tls)?;
    let io = wasmtime_wasi_http::io::TokioIo::new(stream);
    exchange(request, io, first_byte, between_bytes).await
}

/// A response body that fails with `ConnectionReadTimeout` when the server goes quiet
/// for longer than `gap` in the middle of it.
struct GapLimited {
    body: hyper::body::Incoming,
    gap: Duration,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl http_body::Body for GapLimited {
    type Data = bytes::Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, HttpError>>> {
        use std::task::Poll;
        match std::pin::Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = tokio::time::Instant::now() + self.gap;
                self.timer.as_mut().reset(deadline);
                Poll::Ready(frame.map(|f| f.map_err(HttpError::from)))
            }
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(HttpError::ConnectionReadTimeout))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
}

/// The public roots only (webpki-roots), built once.
fn public_roots() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.into(),
            };
            Arc::new(
                rustls::ClientConfig::builder()
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            )
        })
        .clone()
}

/// HTTP/1.1 over `io`: the request, then its response's head within `first_byte`, and
/// no more than `between_bytes` between two pieces of its body.
async fn exchange<T>(
    mut request: http::Request<WasiBody>,
    io: T,
    first_byte: Duration,
    between_bytes: Duration,
) -> Result<Sent, HttpError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(HttpError::from)?;
    // The request line carries only the path, as to an origin server.
    *request.uri_mut() = http::Uri::builder()
        .path_and_query(request.uri().path_and_query().map_or("/", |p| p.as_str()))
        .build()
        .map_err(|_| HttpError::HttpRequestUriInvalid)?;
    // The connection is driven by its own task until the response body is read.
    let driver = tokio::spawn(conn);
    let res = tokio::time::timeout(first_byte, sender.send_request(request))
        .await
        .map_err(|_| HttpError::ConnectionReadTimeout)?
        .map_err(HttpError::from)?;
    let res = res.map(|body| {
        GapLimited {
            body,
            gap: between_bytes,
            timer: Box::pin(tokio::time::sleep(between_bytes)),
        }
        .boxed()
    });
    let io = Box::pin(async move {
        match driver.await {
            Ok(r) => r.map_err(HttpError::from),
            Err(_) => Err(HttpError::ConnectionTerminated),
        }
    });
    Ok((res, io))
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
            tls: None,
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

    /// A server that sends the response head and part of the body, then goes quiet:
    /// the body fails with `ConnectionReadTimeout` after the between-bytes gap, rather
    /// than hanging until the plugin's call deadline.
    #[tokio::test]
    async fn a_body_that_stalls_times_out_between_bytes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let request = http::Request::get(format!("http://127.0.0.1:{port}/"))
            .body(
                http_body_util::Empty::<bytes::Bytes>::new()
                    .map_err(|e| match e {})
                    .boxed_unsync(),
            )
            .unwrap();
        let options = RequestOptions {
            connect_timeout: Some(Duration::from_secs(5)),
            first_byte_timeout: Some(Duration::from_secs(5)),
            between_bytes_timeout: Some(Duration::from_millis(200)),
        };
        let (res, _io) = send_own(request, None, options).await.unwrap();
        assert_eq!(res.status(), 200);
        let t = std::time::Instant::now();
        let e = res.into_body().collect().await.expect_err("a stall");
        assert!(matches!(e, HttpError::ConnectionReadTimeout), "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
