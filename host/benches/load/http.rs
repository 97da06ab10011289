//! The few HTTP/1.0 requests the generator makes to the controller's API, over loopback,
//! with its API token: one connection per request, as a CI client would.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A response bigger than this is an error here (the API's answers are small).
const MAX_RESPONSE: usize = 64 << 20;

/// (status, body) of `METHOD path` on `127.0.0.1:port`, with `token` and an optional
/// TOML body.
pub async fn request(
    port: u16,
    token: &str,
    method: &str,
    path: &str,
    toml: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let call = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.set_nodelay(true)?;
        let body = toml.unwrap_or("");
        let content = match toml {
            // A content type a form cannot send: the API's CSRF rule for changes.
            Some(b) => format!(
                "Content-Type: application/toml\r\nContent-Length: {}\r\n",
                b.len()
            ),
            None => String::new(),
        };
        let head = format!(
            "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n{content}\r\n"
        );
        s.write_all(format!("{head}{body}").as_bytes()).await?;
        let mut out = Vec::new();
        let mut chunk = [0u8; 16 << 10];
        loop {
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&chunk[..n]);
            if out.len() > MAX_RESPONSE {
                return Err(std::io::Error::other("response too large"));
            }
        }
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    };
    match tokio::time::timeout(Duration::from_secs(30), call).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::other(format!(
            "{method} {path}: no answer within 30 s"
        ))),
    }
}
