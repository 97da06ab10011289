//! The Elasticsearch stand-in (`tests/es-mock/es_mock.py`) as a child process on a free
//! loopback port, for the faults (429 storms, refused items), auth and TLS that the
//! OpenSearch node (`opensearch.rs`) does not give on demand; and a tiny HTTP/1.1 client
//! for tests to look at either store.

use std::io::{BufRead, Read, Write};

pub struct EsMock {
    /// `127.0.0.1:PORT`, plain HTTP (with TLS: the mock's plain port, for `call`).
    pub addr: String,
    /// With `--tls-cert`: `127.0.0.1:PORT` of the HTTPS side.
    pub tls_addr: Option<String>,
    child: std::process::Child,
}

impl EsMock {
    pub fn start(args: &[&str]) -> EsMock {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut child = std::process::Command::new("python3")
            .arg(root.join("tests/es-mock/es_mock.py"))
            .args(["--port", "0"])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 (run ./scripts/setup.sh)");
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let said = first
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("es-mock said {first:?}"));
        let (addr, tls_addr) = match said.split_once(" tls plain ") {
            Some((tls, plain)) => (plain.to_string(), Some(tls.to_string())),
            None => (said.to_string(), None),
        };
        EsMock {
            addr,
            tls_addr,
            child,
        }
    }

    /// The URL plugins use: HTTPS when the mock speaks TLS.
    pub fn url(&self) -> String {
        match &self.tls_addr {
            Some(a) => format!("https://{a}"),
            None => format!("http://{}", self.addr),
        }
    }

    /// `method path` with a JSON body; (status, body).
    pub fn call(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        es_call(&self.addr, method, path, body)
    }
}

/// `method path` with a JSON body to the store at `addr` (`127.0.0.1:PORT`, plain HTTP);
/// (status, body).
pub fn es_call(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    try_es_call(addr, method, path, body)
        .unwrap_or_else(|e| panic!("{method} http://{addr}{path}: {e}"))
}

/// As [`es_call`], an I/O failure as an error (a store still starting).
pub fn try_es_call(
    addr: &str,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

impl Drop for EsMock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
