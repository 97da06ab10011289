//! The default log browser: reads the file store (see the `file-store` crate). Cursors
//! are byte offsets into a run's log, as decimal text.

#[cfg(target_arch = "wasm32")]
mod component {
    use file_store::{Completeness, RunReader};
    use std::path::PathBuf;
    use std::sync::OnceLock;
    use trellis_sdk::config::Config;
    use trellis_sdk::log_browser::{
        Guest, Lifecycle, LogCompleteness, MissingEvents, Page, PageRequest,
    };
    use trellis_sdk::{Error, EventBatch, LogMetadata};

    static ROOT: OnceLock<PathBuf> = OnceLock::new();

    struct FileBrowser;

    impl Lifecycle for FileBrowser {
        fn init(config: String) -> Result<(), Error> {
            let c = Config::parse(&config).map_err(Error::bad_config)?;
            let dir = c.require_string("directory").map_err(Error::bad_config)?;
            if !std::fs::metadata(dir).is_ok_and(|m| m.is_dir()) {
                return Err(Error::denied(format!(
                    "directory `{dir}` is not available: grant it in [[plugins.file-browser.dirs]]"
                )));
            }
            let _ = ROOT.set(PathBuf::from(dir));
            Ok(())
        }
    }

    fn reader(log: &LogMetadata) -> Result<RunReader, Error> {
        let root = ROOT
            .get()
            .ok_or_else(|| Error::permanent("used before init"))?;
        RunReader::new(root, &log.job_id, &log.loggable_id)
            .map_err(|e| Error::permanent(e.to_string()))
    }

    fn io_error(e: std::io::Error) -> Error {
        match e.kind() {
            std::io::ErrorKind::InvalidData => Error::permanent(e.to_string()),
            std::io::ErrorKind::PermissionDenied => Error::denied(e.to_string()),
            _ => Error::retryable(e.to_string()),
        }
    }

    impl Guest for FileBrowser {
        fn read(log: LogMetadata, request: PageRequest) -> Result<Page, Error> {
            let cursor = match request.cursor.as_deref() {
                None | Some("") => 0,
                Some(c) => c.parse().map_err(|_| {
                    Error::permanent(format!("`{c}` is not a cursor of this browser"))
                })?,
            };
            let reader = reader(&log)?;
            let (events, next) = reader
                .page(cursor, request.step.as_deref(), request.limit.max(1))
                .map_err(io_error)?;
            // The whole run's count is its last line's seq; a step's would need a scan
            // of the file, so it is left unknown.
            let total = match request.step {
                None => Some(reader.present().map_err(io_error)?),
                Some(_) => None,
            };
            Ok(Page {
                events,
                next: next.to_string(),
                total,
            })
        }

        fn tail(log: LogMetadata, step: Option<String>, count: u32) -> Result<EventBatch, Error> {
            reader(&log)?.tail(step.as_deref(), count).map_err(io_error)
        }

        fn completeness(log: LogMetadata) -> Result<LogCompleteness, Error> {
            Ok(match reader(&log)?.completeness().map_err(io_error)? {
                Completeness::Open => LogCompleteness::Open,
                Completeness::Complete(n) => LogCompleteness::Complete(n),
                Completeness::Incomplete { expected, present } => {
                    LogCompleteness::Incomplete(MissingEvents { expected, present })
                }
            })
        }
    }

    trellis_sdk::export_log_browser!(FileBrowser);
}
