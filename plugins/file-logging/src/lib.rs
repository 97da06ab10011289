//! The default logging method: a run's events as JSON lines in the file store (see the
//! `file-store` crate for the layout). Runs on the controller; agents stream output to
//! it over the transport.

#[cfg(target_arch = "wasm32")]
mod component {
    use file_store::RunWriter;
    use std::cell::RefCell;
    use std::path::PathBuf;
    use std::sync::OnceLock;
    use trellis_sdk::config::Config;
    use trellis_sdk::logging_method::{Guest, GuestWriter, Lifecycle, Side, Writer};
    use trellis_sdk::{Error, EventBatch, LogMetadata};

    static ROOT: OnceLock<PathBuf> = OnceLock::new();

    struct FileLogging;

    impl Lifecycle for FileLogging {
        fn init(config: String) -> Result<(), Error> {
            let c = Config::parse(&config).map_err(Error::bad_config)?;
            let dir = c.require_string("directory").map_err(Error::bad_config)?;
            if !std::fs::metadata(dir).is_ok_and(|m| m.is_dir()) {
                return Err(Error::denied(format!(
                    "directory `{dir}` is not available: grant it read-write in [[plugins.file-logging.dirs]]"
                )));
            }
            let _ = ROOT.set(PathBuf::from(dir));
            Ok(())
        }
    }

    impl Guest for FileLogging {
        type Writer = FileWriter;

        fn runs_on() -> Side {
            Side::Controller
        }

        fn open(meta: LogMetadata) -> Result<Writer, Error> {
            let root = ROOT
                .get()
                .ok_or_else(|| Error::permanent("open before init"))?;
            let w =
                RunWriter::open(root, &meta.as_meta()).map_err(|e| Error::from_io("open", &e))?;
            Ok(Writer::new(FileWriter(RefCell::new(w))))
        }
    }

    struct FileWriter(RefCell<RunWriter>);

    impl GuestWriter for FileWriter {
        fn write(&self, batch: EventBatch) -> Result<(), Error> {
            self.0
                .borrow_mut()
                .write(&batch)
                .map_err(|e| Error::from_io("write", &e))
        }
        fn flush(&self) -> Result<(), Error> {
            Ok(())
        }
        fn close(&self, final_count: u64) -> Result<(), Error> {
            self.0
                .borrow_mut()
                .close(final_count)
                .map_err(|e| Error::from_io("close", &e))
        }
    }

    trellis_sdk::export_logging_method!(FileLogging);
}
