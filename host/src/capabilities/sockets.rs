//! `wasi:sockets`: TCP only, to and from exactly the granted addresses. Name lookup
//! and UDP stay off. A denial is logged with the line that would allow it.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::sockets::SocketAddrUse;

use crate::runtime::metrics::PluginMetrics;

#[derive(Debug, Default, Clone)]
pub struct SocketGrant {
    pub connect: BTreeSet<SocketAddr>,
    pub bind: BTreeSet<SocketAddr>,
}

impl SocketGrant {
    pub fn is_empty(&self) -> bool {
        self.connect.is_empty() && self.bind.is_empty()
    }
}

/// Prepare step: open TCP on the builder only when something is granted.
pub fn prepare(
    builder: &mut WasiCtxBuilder,
    plugin: Arc<str>,
    grant: Arc<SocketGrant>,
    metrics: Arc<PluginMetrics>,
) {
    if grant.is_empty() {
        return;
    }
    builder
        .allow_tcp(true)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    builder.socket_addr_check(move |addr, usage| {
        let ok = match usage {
            SocketAddrUse::TcpConnect => grant.connect.contains(&addr),
            // Before a connect, wasmtime checks the implicit bind to an ephemeral port
            // (0.0.0.0:0 / [::]:0) that the OS will make: allowed with any connect grant.
            SocketAddrUse::TcpBind if addr.ip().is_unspecified() && addr.port() == 0 => !grant.connect.is_empty(),
            SocketAddrUse::TcpBind | SocketAddrUse::TcpListen => grant.bind.contains(&addr),
            // Peers connecting to a granted listener.
            SocketAddrUse::TcpAccept => !grant.bind.is_empty(),
            _ => false,
        };
        if !ok {
            metrics.denials.fetch_add(1, Relaxed);
            let (kind, what) = match usage {
                SocketAddrUse::TcpBind | SocketAddrUse::TcpListen | SocketAddrUse::TcpAccept => ("bind", "listen on"),
                _ => ("connect", "connect to"),
            };
            tracing::warn!(
                plugin = %plugin,
                "denied: {what} {addr} is not granted; to allow it add \"{addr}\" to `sockets.{kind}` in [plugins.{plugin}]"
            );
        }
        Box::pin(async move { ok })
    });
}
