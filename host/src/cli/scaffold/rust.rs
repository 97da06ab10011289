//! The Rust templates: a crate on trellis-sdk with the point's world feature.

use super::{NOT_YET, capability_list, manifest, needs, readme, snake};
use crate::points::Point;
use std::path::Path;

pub(super) fn project(name: &str, point: Point, sdk: &Path) -> Vec<(String, String)> {
    let crate_name = snake(name);
    let feature = point.interface();
    let sdk = sdk.display();
    let cargo = format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
crate-type = ["cdylib"]

[dependencies]
trellis-sdk = {{ path = "{sdk}", features = ["{feature}"] }}

# A project of its own, not part of an enclosing workspace.
[workspace]

[profile.release]
opt-level = "s"
strip = true
"#
    );
    let source = match point {
        Point::LoggingMethod => rust_logging(name),
        Point::LogBrowser => rust_browser(name),
        Point::CommandTransport => rust_transport(name),
        Point::FenceAgent => rust_fence(name),
    };
    let needs = needs(name, point);
    let build = format!(
        "```sh\ncargo build --target wasm32-wasip2 --release\ncp target/wasm32-wasip2/release/{crate_name}.wasm .\n```\n\n(`rustup target add wasm32-wasip2` once.) The `.wasm` next to `plugin.toml` is the\nplugin: copy both into the daemon's plugin directory, under `{name}/`."
    );
    vec![
        ("Cargo.toml".into(), cargo),
        (
            "plugin.toml".into(),
            manifest(
                name,
                point,
                &format!("{crate_name}.wasm"),
                &capability_list(needs.capabilities, &[]),
                needs.config,
            ),
        ),
        ("src/lib.rs".into(), source),
        (
            "README.md".into(),
            readme(name, point, &build, &needs.grants, needs.test),
        ),
        (".gitignore".into(), "/target\n*.wasm\n".into()),
    ]
}

fn rust_logging(name: &str) -> String {
    format!(
        r#"//! `{name}`: a logging method. Each run's events as JSON lines in a directory the
//! operator grants, in the default file store's layout (so `file-browser` reads it):
//!
//!     <directory>/<job-id>/<loggable-id>.jsonl   one event per line, in seq order
//!     <directory>/<job-id>/<loggable-id>.count   the final count, written at close
//!
//! The host keeps every batch until `write` returns Ok and sends a batch again after a
//! failure, so each event must be stored at most once: events at or below the highest
//! seq already in the file are skipped.

use std::cell::RefCell;
use std::fs::OpenOptions;
use std::io::{{BufRead, Write}};
use std::path::PathBuf;
use std::sync::OnceLock;
use trellis_sdk::config::Config;
use trellis_sdk::events::{{JsonLineFormat, LogMeta, decode}};
use trellis_sdk::logging_method::{{Guest, GuestWriter, Lifecycle, Side, Writer}};
use trellis_sdk::{{Error, EventBatch, LogMetadata}};

static DIRECTORY: OnceLock<PathBuf> = OnceLock::new();

struct Plugin;

impl Lifecycle for Plugin {{
    fn init(config: String) -> Result<(), Error> {{
        let config = Config::parse(&config).map_err(Error::bad_config)?;
        let dir = config.string("directory").map_err(Error::bad_config)?.unwrap_or("/logs");
        if !std::path::Path::new(dir).is_dir() {{
            return Err(Error::denied(format!(
                "directory `{{dir}}` is not available: grant it read-write in [[plugins.{name}.dirs]]"
            )));
        }}
        let _ = DIRECTORY.set(PathBuf::from(dir));
        Ok(())
    }}
}}

impl Guest for Plugin {{
    type Writer = RunLog;

    fn runs_on() -> Side {{
        Side::Controller
    }}

    fn open(meta: LogMetadata) -> Result<Writer, Error> {{
        let root = DIRECTORY.get().ok_or_else(|| Error::permanent("open before init"))?;
        for part in [&meta.job_id, &meta.loggable_id] {{
            if part.is_empty() || part.contains(['/', '\\', '\0']) || part == "." || part == ".." {{
                return Err(Error::permanent(format!("`{{part}}` cannot be a file name")));
            }}
        }}
        let dir = root.join(&meta.job_id);
        std::fs::create_dir_all(&dir).map_err(|e| Error::from_io("create the job's directory", &e))?;
        let path = dir.join(format!("{{}}.jsonl", meta.loggable_id));
        // Resume after the highest seq already stored.
        let mut last = 0;
        if let Ok(f) = std::fs::File::open(&path) {{
            for line in std::io::BufReader::new(f).lines().map_while(Result::ok) {{
                if let Some(seq) = line
                    .split("\"seq\":")
                    .nth(1)
                    .and_then(|s| s.split(',').next())
                    .and_then(|s| s.parse::<u64>().ok())
                {{
                    last = last.max(seq);
                }}
            }}
        }}
        Ok(Writer::new(RunLog(RefCell::new(State {{ path, meta, last }}))))
    }}
}}

struct State {{
    path: PathBuf,
    meta: LogMetadata,
    last: u64,
}}

struct RunLog(RefCell<State>);

impl GuestWriter for RunLog {{
    fn write(&self, batch: EventBatch) -> Result<(), Error> {{
        let mut s = self.0.borrow_mut();
        let events = decode(&batch).map_err(|e| Error::permanent(e.to_string()))?;
        let meta = LogMeta {{
            instance_id: &s.meta.instance_id,
            loggable_type: &s.meta.loggable_type,
            loggable_id: &s.meta.loggable_id,
            job_id: &s.meta.job_id,
        }};
        let format = JsonLineFormat::new(&meta);
        let mut out = Vec::new();
        let mut last = s.last;
        for e in events.iter().filter(|e| e.seq > s.last) {{
            if e.seq != last + 1 {{
                return Err(Error::permanent(format!("gap: expected seq {{}}, got {{}}", last + 1, e.seq)));
            }}
            format.write(&mut out, e);
            last = e.seq;
        }}
        if !out.is_empty() {{
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&s.path)
                .map_err(|e| Error::from_io("open the log", &e))?;
            f.write_all(&out).map_err(|e| Error::from_io("append", &e))?;
            s.last = last;
        }}
        Ok(())
    }}

    fn flush(&self) -> Result<(), Error> {{
        Ok(())
    }}

    fn close(&self, final_count: u64) -> Result<(), Error> {{
        let s = self.0.borrow();
        if final_count != s.last {{
            return Err(Error::permanent(format!(
                "closing with {{final_count}} events but {{}} are stored",
                s.last
            )));
        }}
        let count = s.path.with_extension("count");
        let tmp = s.path.with_extension("count.tmp");
        std::fs::write(&tmp, final_count.to_string())
            .and_then(|()| std::fs::rename(&tmp, &count))
            .map_err(|e| Error::from_io("record the final count", &e))
    }}
}}

trellis_sdk::export_logging_method!(Plugin);
"#
    )
}

fn rust_browser(name: &str) -> String {
    format!(
        r#"//! `{name}`: a log browser. Read back what your logging method stored; the
//! contract (wit/log-browser.wit) says what each call must return. Start with `read`;
//! `trellis plugin test . --with <your logging method>` shows what is left.

use trellis_sdk::log_browser::{{Guest, Lifecycle, LogCompleteness, Page, PageRequest}};
use trellis_sdk::{{Error, EventBatch, LogMetadata}};

struct Plugin;

impl Lifecycle for Plugin {{
    fn init(_config: String) -> Result<(), Error> {{
        Ok(())
    }}
}}

impl Guest for Plugin {{
    fn read(_log: LogMetadata, _request: PageRequest) -> Result<Page, Error> {{
        Err(Error::permanent("{NOT_YET}: read"))
    }}

    fn tail(_log: LogMetadata, _step: Option<String>, _count: u32) -> Result<EventBatch, Error> {{
        Err(Error::permanent("{NOT_YET}: tail"))
    }}

    fn completeness(_log: LogMetadata) -> Result<LogCompleteness, Error> {{
        // `open` until the final count is recorded; never `complete` before it is.
        Ok(LogCompleteness::Open)
    }}
}}

trellis_sdk::export_log_browser!(Plugin);
"#
    )
}

fn rust_transport(name: &str) -> String {
    format!(
        r#"//! `{name}`: a command transport. Move the host's frames between controller and
//! agent (wit/command-transport.wit): in order per lane, control before bulk, keeping
//! each frame's seq; say `retryable` when the link broke. The host does the rest.

use trellis_sdk::command_transport::wasi::clocks::monotonic_clock::subscribe_duration;
use trellis_sdk::command_transport::{{
    Channel, Frame, Guest, GuestChannel, GuestListener, Lane, Lifecycle, Listener, Pollable,
}};
use trellis_sdk::Error;

struct Plugin;

impl Lifecycle for Plugin {{
    fn init(_config: String) -> Result<(), Error> {{
        Ok(())
    }}
}}

impl Guest for Plugin {{
    type Channel = Link;
    type Listener = Accepting;

    fn listen() -> Result<Listener, Error> {{
        Err(Error::permanent("{NOT_YET}: listen"))
    }}

    fn connect(_agent: String) -> Result<Channel, Error> {{
        Err(Error::permanent("{NOT_YET}: connect"))
    }}
}}

struct Accepting;

/// Not ready before this many nanoseconds (about 584 years): for what never is.
const NEVER: u64 = u64::MAX;

impl GuestListener for Accepting {{
    /// Ready when `accept` may return an agent (or an error). The host waits on it
    /// outside the plugin; spurious readiness is fine, missed readiness is not.
    fn subscribe(&self) -> Pollable {{
        subscribe_duration(NEVER)
    }}

    fn accept(&self, _timeout_ms: u32) -> Result<Option<Channel>, Error> {{
        Ok(None)
    }}
}}

struct Link;

impl GuestChannel for Link {{
    /// Ready when `receive` may return frames or an error: e.g. your socket's input
    /// stream's `subscribe()`. Called once per channel; `receive` must then return
    /// every complete frame it holds (see wit/command-transport.wit).
    fn subscribe(&self) -> Pollable {{
        subscribe_duration(NEVER)
    }}

    fn send(&self, _frames: Vec<Frame>) -> Result<(), Error> {{
        Err(Error::retryable("{NOT_YET}: send"))
    }}

    fn receive(&self, _timeout_ms: u32) -> Result<Vec<Frame>, Error> {{
        Ok(Vec::new())
    }}

    fn commit(&self, _lane: Lane, _seq: u64) -> Result<(), Error> {{
        Ok(())
    }}
}}

trellis_sdk::export_command_transport!(Plugin);
"#
    )
}

fn rust_fence(name: &str) -> String {
    format!(
        r#"//! `{name}`: a fence agent (wit/fence-agent.wit), after ClusterLabs' fence-agents:
//! the same parameter names and actions, so `trellis fence` can serve it to Pacemaker.
//! Fail closed: answer Ok from `fence` only once the device confirmed the new state.

use trellis_sdk::fence_agent::{{
    Action, AgentInfo, FenceAction, Guest, Lifecycle, Params, Parameter, PowerState, Target,
}};
use trellis_sdk::Error;

struct Plugin;

fn param<'a>(device: &'a Params, key: &str) -> Result<&'a str, Error> {{
    device
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .ok_or_else(|| Error::bad_config(format!("parameter `{{key}}` is required")))
}}

impl Lifecycle for Plugin {{
    fn init(_config: String) -> Result<(), Error> {{
        Ok(())
    }}
}}

impl Guest for Plugin {{
    fn metadata() -> AgentInfo {{
        let p = |name: &str, description: &str, secret: bool| Parameter {{
            name: name.into(),
            description: description.into(),
            required: true,
            secret,
            default_value: None,
        }};
        AgentInfo {{
            name: "fence_{snake}".into(),
            description: "Fences a node through its device".into(),
            parameters: vec![
                p("ip", "The device's address", false),
                p("username", "Login", false),
                p("password", "The name of a granted secret holding the password", true),
            ],
            actions: vec![Action::On, Action::Off, Action::Reboot, Action::Status, Action::Monitor],
        }}
    }}

    fn validate(device: Params) -> Result<(), Error> {{
        for key in ["ip", "username", "password"] {{
            param(&device, key)?;
        }}
        Ok(())
    }}

    fn status(device: Params) -> Result<PowerState, Error> {{
        Self::validate(device)?;
        Err(Error::retryable("{NOT_YET}: status"))
    }}

    fn fence(device: Params, _action: FenceAction) -> Result<(), Error> {{
        Self::validate(device)?;
        Err(Error::retryable("{NOT_YET}: fence"))
    }}

    fn monitor(device: Params) -> Result<(), Error> {{
        Self::validate(device)?;
        Err(Error::retryable("{NOT_YET}: monitor"))
    }}

    fn list(_device: Params) -> Result<Vec<Target>, Error> {{
        Ok(Vec::new())
    }}
}}

trellis_sdk::export_fence_agent!(Plugin);
"#,
        snake = snake(name)
    )
}
