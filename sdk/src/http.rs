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
    let mut fields: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_vec()))
        .collect();
    // The body is known whole: say its length, so it goes out as is rather than in
    // chunked transfer encoding (which costs the server a parse per 4 KiB piece).
    if !body.is_empty()
        && !fields
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        fields.push(("content-length".into(), body.len().to_string().into_bytes()));
    }
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
        // As much as the host takes at a time (blocking_write_and_flush is limited to
        // 4 KiB a call, and each piece costs a trip through the host).
        let failed = |e| format!("{url}: sending the body: {e:?}");
        let mut rest = body;
        while !rest.is_empty() {
            let permit = stream.check_write().map_err(failed)? as usize;
            if permit == 0 {
                stream.subscribe().block();
                continue;
            }
            let n = permit.min(rest.len());
            stream.write(&rest[..n]).map_err(failed)?;
            rest = &rest[n..];
        }
        // With the length known, the host may close the stream as soon as the last
        // byte is in: `Closed` here is the end of the body, not a failure.
        match stream.blocking_flush() {
            Ok(()) | Err(StreamError::Closed) => Ok(()),
            Err(e) => Err(failed(e)),
        }
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

/// The `Authorization` header value for HTTP Basic auth (RFC 7617): `Basic ` and the
/// base64 of `user:password`. Read the password from the secrets store; never log it.
pub fn basic_auth(user: &str, password: &str) -> String {
    format!("Basic {}", base64(format!("{user}:{password}").as_bytes()))
}

/// Standard base64 with padding (RFC 4648).
fn base64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
