//! Outgoing HTTP for plugins, through `wasi:http`, blocking: one call, one response.
//! What a plugin that talks to a web service needs (Elasticsearch's REST API, a Redfish
//! BMC) without a client library of its own.
//!
//! Only what the operator granted is reachable (`http = ["https://es.example:9200"]` in
//! `[plugins.<name>]`): anything else fails with the host's `HttpRequestDenied`, which
//! this returns as an error naming it. The host applies its own timeouts and caps the
//! response body. Enable with the SDK feature `http`.
//!
//! ```ignore
//! use trellis_sdk::http;
//! let r = http::request("POST", "http://127.0.0.1:9200/_bulk",
//!     &[("content-type", b"application/x-ndjson")], body)?;
//! if r.status != 200 { /* ... */ }
//! ```

use wasi::http::outgoing_handler;
use wasi::http::types::{Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, Scheme};
use wasi::io::streams::StreamError;

/// A response, body read whole.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// (name, value) in the order received; names are lower case.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header called `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// `method` `url` (`http://` or `https://`) with `headers` and `body` (empty: none).
/// An error is a transport failure or a refusal (not granted, bad URL); any HTTP status,
/// 4xx and 5xx included, is a `Response`.
pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &[u8])],
    body: &[u8],
) -> Result<Response, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("`{url}` has no scheme (http:// or https://)"))?;
    let scheme = match scheme {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        other => return Err(format!("`{url}`: scheme `{other}` is not http or https")),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let fields: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_vec()))
        .collect();
    let fields = Fields::from_list(&fields).map_err(|e| format!("bad request header: {e:?}"))?;
    let req = OutgoingRequest::new(fields);
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "PATCH" => Method::Patch,
        "OPTIONS" => Method::Options,
        other => Method::Other(other.to_string()),
    };
    req.set_method(&method)
        .map_err(|_| format!("bad method `{method:?}`"))?;
    req.set_scheme(Some(&scheme)).map_err(|_| "bad scheme")?;
    req.set_authority(Some(authority))
        .map_err(|_| format!("bad authority `{authority}`"))?;
    req.set_path_with_query(Some(path))
        .map_err(|_| format!("bad path `{path}`"))?;
    let outgoing = req.body().map_err(|_| "request body already taken")?;
    // Send first, then stream the body: the host reads it as it goes out.
    let pending = outgoing_handler::handle(req, None).map_err(|e| format!("{url}: {e:?}"))?;
    let sent: Result<(), String> = (|| {
        let stream = outgoing.write().map_err(|_| "request body stream taken")?;
        for chunk in body.chunks(4096) {
            stream
                .blocking_write_and_flush(chunk)
                .map_err(|e| format!("{url}: sending the body: {e:?}"))?;
        }
        Ok(())
    })();
    if let Err(e) = sent {
        // The host may have refused the request (not granted, unreachable): its answer
        // says why, the closed body stream does not.
        drop(outgoing);
        pending.subscribe().block();
        return Err(match pending.get() {
            Some(Ok(Err(why))) => format!("{url}: {why:?}"),
            _ => e,
        });
    }
    OutgoingBody::finish(outgoing, None).map_err(|e| format!("{url}: {e:?}"))?;
    pending.subscribe().block();
    let resp = match pending.get() {
        Some(Ok(Ok(r))) => r,
        Some(Ok(Err(e))) => return Err(format!("{url}: {e:?}")),
        Some(Err(())) => return Err(format!("{url}: response already taken")),
        None => return Err(format!("{url}: no response")),
    };
    let status = resp.status();
    let headers = resp.headers().entries();
    let incoming = resp.consume().map_err(|_| "response body already taken")?;
    let mut out = Vec::new();
    {
        let stream = incoming
            .stream()
            .map_err(|_| "response body stream taken")?;
        loop {
            match stream.blocking_read(64 << 10) {
                Ok(bytes) => out.extend_from_slice(&bytes),
                Err(StreamError::Closed) => break,
                Err(e) => return Err(format!("{url}: reading the response: {e:?}")),
            }
        }
    }
    let _ = IncomingBody::finish(incoming);
    Ok(Response {
        status,
        headers,
        body: out,
    })
}
