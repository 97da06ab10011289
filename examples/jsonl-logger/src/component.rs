//! The component glue: the `logging-method` world over `JsonlLog`.

use crate::{JsonlLog, Meta};
use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::OnceLock;
use trellis_sdk::config::Config;
use trellis_sdk::logging_method::{Guest, GuestWriter, Lifecycle, Side, Writer};
use trellis_sdk::{Error, EventBatch, LogMetadata, log};

static DIRECTORY: OnceLock<PathBuf> = OnceLock::new();

struct Component;

impl Lifecycle for Component {
    fn init(config: String) -> Result<(), Error> {
        let config = Config::parse(&config).map_err(Error::bad_config)?;
        let dir = config
            .require_string("directory")
            .map_err(Error::bad_config)?;
        // Without a grant the directory does not exist in the sandbox: say so plainly.
        if std::fs::metadata(dir).map(|m| m.is_dir()).unwrap_or(false) {
            let _ = DIRECTORY.set(PathBuf::from(dir));
            Ok(())
        } else {
            Err(Error::denied(format!(
                "directory `{dir}` is not available: grant it read-write in [[plugins.jsonl-logger.dirs]]"
            )))
        }
    }
}

impl Guest for Component {
    type Writer = JsonlWriter;

    fn runs_on() -> Side {
        Side::Controller
    }

    fn open(meta: LogMetadata) -> Result<Writer, Error> {
        let dir = DIRECTORY
            .get()
            .ok_or_else(|| Error::permanent("open before init"))?;
        let meta = Meta {
            instance_id: meta.instance_id,
            loggable_type: meta.loggable_type,
            loggable_id: meta.loggable_id,
            job_id: meta.job_id,
        };
        let log = JsonlLog::open(dir, meta).map_err(|e| io_error("open", e))?;
        Ok(Writer::new(JsonlWriter(RefCell::new(log))))
    }
}

struct JsonlWriter(RefCell<JsonlLog>);

impl GuestWriter for JsonlWriter {
    fn write(&self, batch: EventBatch) -> Result<(), Error> {
        self.0
            .borrow_mut()
            .write(&batch)
            .map_err(|e| io_error("write", e))
    }

    fn flush(&self) -> Result<(), Error> {
        self.0
            .borrow_mut()
            .flush()
            .map_err(|e| io_error("flush", e))
    }

    fn close(&self, final_count: u64) -> Result<(), Error> {
        self.0
            .borrow_mut()
            .close(final_count)
            .map_err(|e| io_error("close", e))
    }
}

fn io_error(what: &str, e: std::io::Error) -> Error {
    log::warn(&format!("{what} failed: {e}"));
    Error::from_io(what, &e)
}

trellis_sdk::export_logging_method!(Component);
