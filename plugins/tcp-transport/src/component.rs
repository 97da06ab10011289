//! The component: `command-transport` over `wasi:sockets` TCP.

use crate::{MAX_RECORD, PRE_AUTH_RECORD, Record, decode, encode};
use std::cell::{Cell, RefCell};
use std::sync::OnceLock;
use trellis_sdk::command_transport::{
    Channel, Frame, Guest, GuestChannel, GuestListener, Lane, Lifecycle, Listener,
};
use trellis_sdk::config::Config;
use trellis_sdk::{Error, log};
use wasi::clocks::monotonic_clock::subscribe_duration;
use wasi::io::poll::poll;
use wasi::io::streams::{InputStream, OutputStream};
use wasi::sockets::instance_network::instance_network;
use wasi::sockets::network::{
    ErrorCode, IpAddressFamily, IpSocketAddress, Ipv4SocketAddress, Ipv6SocketAddress,
};
use wasi::sockets::tcp::TcpSocket;
use wasi::sockets::tcp_create_socket::create_tcp_socket;

struct Settings {
    address: std::net::SocketAddr,
    connect_timeout_ms: u64,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

fn settings() -> Result<&'static Settings, Error> {
    SETTINGS
        .get()
        .ok_or_else(|| Error::permanent("used before init"))
}

struct Component;

impl Lifecycle for Component {
    fn init(config: String) -> Result<(), Error> {
        let c = Config::parse(&config).map_err(Error::bad_config)?;
        let address = c.require_string("address").map_err(Error::bad_config)?;
        let address = address
            .parse()
            .map_err(|_| Error::bad_config(format!("config key `address`: `{address}` is not an ip:port address (names are not resolved)")))?;
        let connect_timeout_ms = c
            .integer("connect-timeout-ms")
            .map_err(Error::bad_config)?
            .unwrap_or(5000)
            .max(1) as u64;
        let _ = SETTINGS.set(Settings {
            address,
            connect_timeout_ms,
        });
        Ok(())
    }
}

fn wasi_addr(a: std::net::SocketAddr) -> (IpAddressFamily, IpSocketAddress) {
    match a {
        std::net::SocketAddr::V4(v4) => {
            let [a, b, c, d] = v4.ip().octets();
            (
                IpAddressFamily::Ipv4,
                IpSocketAddress::Ipv4(Ipv4SocketAddress {
                    port: v4.port(),
                    address: (a, b, c, d),
                }),
            )
        }
        std::net::SocketAddr::V6(v6) => {
            let s = v6.ip().segments();
            (
                IpAddressFamily::Ipv6,
                IpSocketAddress::Ipv6(Ipv6SocketAddress {
                    port: v6.port(),
                    flow_info: 0,
                    address: (s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]),
                    scope_id: 0,
                }),
            )
        }
    }
}

/// Socket errors, sorted into what the host can act on.
fn socket_error(what: &str, addr: std::net::SocketAddr, e: ErrorCode) -> Error {
    match e {
        ErrorCode::AccessDenied | ErrorCode::NotSupported => Error::denied(format!(
            "{what} {addr}: not granted (grant it in [plugins.tcp-transport] sockets)"
        )),
        ErrorCode::InvalidArgument | ErrorCode::AddressInUse => {
            Error::bad_config(format!("{what} {addr}: {e:?}"))
        }
        _ => Error::retryable(format!("{what} {addr}: {e:?}")),
    }
}

/// Wait until `pollable` is ready or `ms` pass; true if ready.
fn wait(pollable: &wasi::io::poll::Pollable, ms: u64) -> bool {
    let timer = subscribe_duration(ms.saturating_mul(1_000_000));
    let ready = poll(&[pollable, &timer]);
    ready.contains(&0)
}

impl Guest for Component {
    type Channel = TcpChannel;
    type Listener = TcpListener;

    fn listen() -> Result<Listener, Error> {
        let s = settings()?;
        let (family, addr) = wasi_addr(s.address);
        let socket =
            create_tcp_socket(family).map_err(|e| socket_error("listen on", s.address, e))?;
        let net = instance_network();
        socket
            .start_bind(&net, addr)
            .map_err(|e| socket_error("bind", s.address, e))?;
        let sub = socket.subscribe();
        loop {
            match socket.finish_bind() {
                Err(ErrorCode::WouldBlock) => sub.block(),
                r => break r.map_err(|e| socket_error("bind", s.address, e))?,
            }
        }
        socket
            .start_listen()
            .map_err(|e| socket_error("listen on", s.address, e))?;
        loop {
            match socket.finish_listen() {
                Err(ErrorCode::WouldBlock) => sub.block(),
                r => break r.map_err(|e| socket_error("listen on", s.address, e))?,
            }
        }
        log::info(&format!("listening on {}", s.address));
        Ok(Listener::new(TcpListener { socket }))
    }

    fn connect(agent: String) -> Result<Channel, Error> {
        let s = settings()?;
        let (family, addr) = wasi_addr(s.address);
        let socket =
            create_tcp_socket(family).map_err(|e| socket_error("connect to", s.address, e))?;
        socket
            .start_connect(&instance_network(), addr)
            .map_err(|e| socket_error("connect to", s.address, e))?;
        let sub = socket.subscribe();
        let (input, output) = loop {
            match socket.finish_connect() {
                Err(ErrorCode::WouldBlock) => {
                    if !wait(&sub, s.connect_timeout_ms) {
                        return Err(Error::retryable(format!(
                            "connect to {}: no answer within {} ms",
                            s.address, s.connect_timeout_ms
                        )));
                    }
                }
                r => break r.map_err(|e| socket_error("connect to", s.address, e))?,
            }
        };
        drop(sub);
        log::debug(&format!("agent {agent} connected to {}", s.address));
        // The host's hello is its only send before the controller proved itself.
        Ok(Channel::new(TcpChannel::new(socket, input, output, 1)))
    }
}

pub struct TcpListener {
    socket: TcpSocket,
}

impl GuestListener for TcpListener {
    /// Ready when a connection waits to be accepted (or the socket failed).
    #[cfg(not(feature = "wit-0-1"))]
    fn subscribe(&self) -> wasi::io::poll::Pollable {
        self.socket.subscribe()
    }

    fn accept(&self, timeout_ms: u32) -> Result<Option<Channel>, Error> {
        let sub = self.socket.subscribe();
        loop {
            match self.socket.accept() {
                Ok((socket, input, output)) => {
                    // The host's challenge and its welcome, sent once the agent proved
                    // its secret: bounded until then.
                    return Ok(Some(Channel::new(TcpChannel::new(
                        socket, input, output, 2,
                    ))));
                }
                Err(ErrorCode::WouldBlock) => {
                    if !wait(&sub, timeout_ms as u64) {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(Error::retryable(format!("accept: {e:?}"))),
            }
        }
    }
}

pub struct TcpChannel {
    // Field order matters: streams are children of the socket and must drop first.
    input: InputStream,
    output: OutputStream,
    _socket: TcpSocket,
    inbox: RefCell<Vec<u8>>,
    broken: Cell<bool>,
    scratch: RefCell<Vec<u8>>,
    /// Host sends so far, and how many make the peer authenticated (see the crate docs).
    sends: Cell<u32>,
    sends_until_authenticated: u32,
}

impl TcpChannel {
    fn new(
        socket: TcpSocket,
        input: InputStream,
        output: OutputStream,
        sends_until_authenticated: u32,
    ) -> TcpChannel {
        TcpChannel {
            input,
            output,
            _socket: socket,
            inbox: RefCell::default(),
            broken: Cell::new(false),
            scratch: RefCell::default(),
            sends: Cell::new(0),
            sends_until_authenticated,
        }
    }

    /// The largest record taken from the peer now.
    fn max_record(&self) -> usize {
        if self.sends.get() < self.sends_until_authenticated {
            PRE_AUTH_RECORD
        } else {
            MAX_RECORD
        }
    }

    fn broke(&self, what: &str) -> Error {
        self.broken.set(true);
        Error::retryable(format!("connection {what}"))
    }

    fn write_all(&self, mut buf: &[u8]) -> Result<(), Error> {
        let sub = self.output.subscribe();
        while !buf.is_empty() {
            let n = match self.output.check_write() {
                Ok(0) => {
                    sub.block();
                    continue;
                }
                Ok(n) => (n as usize).min(buf.len()),
                Err(_) => return Err(self.broke("closed while sending")),
            };
            self.output
                .write(&buf[..n])
                .map_err(|_| self.broke("closed while sending"))?;
            buf = &buf[n..];
        }
        // Wait until the data is handed to the kernel, so `ok` means "on the wire".
        self.output
            .blocking_flush()
            .map_err(|_| self.broke("closed while flushing"))
    }
}

impl GuestChannel for TcpChannel {
    /// Ready when the socket has bytes (or closed). `receive` returns every complete
    /// record in its inbox, so what it keeps there is only ever a record still on the
    /// way, whose rest makes the stream ready again.
    #[cfg(not(feature = "wit-0-1"))]
    fn subscribe(&self) -> wasi::io::poll::Pollable {
        self.input.subscribe()
    }

    fn send(&self, frames: Vec<Frame>) -> Result<(), Error> {
        if self.broken.get() {
            return Err(Error::retryable("connection already broken"));
        }
        self.sends.set(self.sends.get().saturating_add(1));
        let mut buf = self.scratch.borrow_mut();
        buf.clear();
        // Control frames go first: they must never wait behind bulk data.
        for f in frames
            .iter()
            .filter(|f| f.lane == Lane::Control)
            .chain(frames.iter().filter(|f| f.lane == Lane::Bulk))
        {
            encode(
                if f.lane == Lane::Control { 0 } else { 1 },
                f.seq,
                &f.payload,
                &mut buf,
            );
        }
        self.write_all(&buf)
    }

    fn receive(&self, timeout_ms: u32) -> Result<Vec<Frame>, Error> {
        if self.broken.get() {
            return Err(Error::retryable("connection already broken"));
        }
        let sub = self.input.subscribe();
        let mut records: Vec<Record> = Vec::new();
        let mut waited = false;
        loop {
            {
                let mut inbox = self.inbox.borrow_mut();
                decode(&mut inbox, &mut records, self.max_record()).map_err(|e| {
                    self.broken.set(true);
                    inbox.clear();
                    inbox.shrink_to_fit();
                    Error::retryable(e)
                })?;
            }
            if waited {
                break;
            }
            // Take what is there; wait (once) only if nothing is. Before the peer is
            // authenticated, no more than one record's worth at a time.
            let chunk = self.max_record().min(1 << 20) as u64 + 4;
            // With records in hand, read on until the stream says it has nothing more
            // (within one chunk in the inbox): the host's wait on this channel ends
            // only after a read that found nothing, so stopping at the first read
            // would wake the host once more for every message, only to find nothing.
            let draining = !records.is_empty();
            let want = if draining {
                chunk.saturating_sub(self.inbox.borrow().len() as u64)
            } else {
                chunk
            };
            if want == 0 {
                break;
            }
            match self.input.read(want) {
                Ok(bytes) if !bytes.is_empty() => self.inbox.borrow_mut().extend_from_slice(&bytes),
                // Drained; or closed after these records: the next call finds it so.
                Ok(_) | Err(_) if draining => break,
                Ok(_) => {
                    waited = true;
                    if wait(&sub, timeout_ms as u64) {
                        match self.input.read(chunk) {
                            Ok(bytes) => self.inbox.borrow_mut().extend_from_slice(&bytes),
                            Err(_) => return Err(self.broke("closed by the peer")),
                        }
                    }
                }
                Err(_) => return Err(self.broke("closed by the peer")),
            }
        }
        // Control lane first, each lane in arrival order.
        records.sort_by_key(|r| r.lane);
        Ok(records
            .into_iter()
            .map(|r| Frame {
                lane: if r.lane == 0 {
                    Lane::Control
                } else {
                    Lane::Bulk
                },
                seq: r.seq,
                payload: r.payload,
            })
            .collect())
    }

    fn commit(&self, _lane: Lane, _seq: u64) -> Result<(), Error> {
        // TCP keeps nothing once delivered: the host's own buffer is what resends.
        Ok(())
    }
}

trellis_sdk::export_command_transport!(Component);
