//! An example logging method: events as JSON lines, one file per run.
//!
//! The logic is plain Rust over `std::fs`, so it runs natively (tests, the benchmark)
//! and, unchanged, inside the sandbox, where `std::fs` is `wasi:filesystem` limited to
//! the directory the operator granted.

#[cfg(target_arch = "wasm32")]
mod component;

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use trellis_sdk::events::{self, JsonLineFormat, LogMeta};

/// Owned copy of the run's metadata.
#[derive(Debug, Clone)]
pub struct Meta {
    pub instance_id: String,
    pub loggable_type: String,
    pub loggable_id: String,
    pub job_id: String,
}

impl Meta {
    fn view(&self) -> LogMeta<'_> {
        LogMeta {
            instance_id: &self.instance_id,
            loggable_type: &self.loggable_type,
            loggable_id: &self.loggable_id,
            job_id: &self.job_id,
        }
    }
}

/// One run's log file.
pub struct JsonlLog {
    file: File,
    dir: PathBuf,
    meta: Meta,
    /// The JSON line layout, with this log's metadata escaped once.
    format: JsonLineFormat,
    /// Highest seq already in the file: redelivered events at or below it are skipped,
    /// which is how this method stores each event at most once.
    last_seq: u64,
    /// Where the next line goes: lines are appended with positioned writes, which the
    /// sandbox performs inline (see `trellis_sdk::fs::write_all_at`).
    end: u64,
    buf: Vec<u8>,
}

impl JsonlLog {
    /// Open (or resume) the log of `meta` under `root`.
    pub fn open(root: &Path, meta: Meta) -> io::Result<JsonlLog> {
        for part in [&meta.job_id, &meta.loggable_id] {
            if part.is_empty() || part.contains(['/', '\\']) || part == ".." {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("unusable id `{part}` for a file name"),
                ));
            }
        }
        let dir = root.join(&meta.job_id);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{}.jsonl", meta.loggable_id));
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(&path)?;
        let (last_seq, end) = recover_tail(&mut file)?;
        Ok(JsonlLog {
            file,
            dir,
            format: JsonLineFormat::new(&meta.view()),
            meta,
            last_seq,
            end,
            buf: Vec::with_capacity(64 << 10),
        })
    }

    /// Append a packed batch; events already stored are skipped.
    pub fn write(&mut self, batch: &[u8]) -> io::Result<()> {
        let evs =
            events::decode(batch).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        self.buf.clear();
        let mut last = self.last_seq;
        for e in &evs {
            if e.seq <= last {
                continue;
            }
            self.format.write(&mut self.buf, e);
            last = e.seq;
        }
        if !self.buf.is_empty() {
            trellis_sdk::fs::write_all_at(&self.file, &self.buf, self.end)?;
            // Ok lets the host drop the batch from its write-ahead buffer: it must be
            // on the disk by then, not in a cache (see the contract's `write`).
            self.file.sync_data()?;
            self.end += self.buf.len() as u64;
            self.last_seq = last;
        }
        Ok(())
    }

    /// Nothing is buffered in the plugin: each batch is written when it arrives.
    pub fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// Record the final count beside the log (write-temp + rename, so a reader never
    /// sees a half-written count).
    pub fn close(&mut self, final_count: u64) -> io::Result<()> {
        self.file.sync_data()?;
        let tmp = self
            .dir
            .join(format!("{}.count.tmp", self.meta.loggable_id));
        std::fs::write(&tmp, final_count.to_string())?;
        std::fs::rename(
            &tmp,
            self.dir.join(format!("{}.count", self.meta.loggable_id)),
        )
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }
}

/// Find the last complete line's seq and where the file ends, cutting off a torn last
/// line (a crash mid-write).
fn recover_tail(file: &mut File) -> io::Result<(u64, u64)> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok((0, 0));
    }
    let start = len.saturating_sub(1 << 20);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    let keep = match tail.iter().rposition(|&b| b == b'\n') {
        Some(i) => i + 1,
        None if start == 0 => 0,
        None => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "last line longer than 1 MiB",
            ));
        }
    };
    let end = start + keep as u64;
    if end < len {
        file.set_len(end)?;
    }
    let complete = &tail[..keep];
    let last_line = complete[..complete.len().saturating_sub(1)]
        .rsplit(|&b| b == b'\n')
        .next()
        .unwrap_or(&[]);
    Ok((seq_of(last_line).unwrap_or(0), end))
}

fn seq_of(line: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(line).ok()?;
    let at = s.find("\"seq\":")? + 6;
    let digits: String = s[at..].chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_sdk::events::BatchBuilder;

    fn meta() -> Meta {
        Meta {
            instance_id: "i".into(),
            loggable_type: "run".into(),
            loggable_id: "r-1".into(),
            job_id: "build".into(),
        }
    }

    fn batch(seqs: std::ops::RangeInclusive<u64>) -> Vec<u8> {
        let mut b = BatchBuilder::new();
        for s in seqs {
            b.push(
                s,
                1000 + s as i64,
                "step",
                &format!("line {s}"),
                &[("stream", "stdout")],
            );
        }
        b.finish()
    }

    #[test]
    fn appends_skips_redelivered_and_records_count() {
        let d = tempfile::tempdir().unwrap();
        let mut log = JsonlLog::open(d.path(), meta()).unwrap();
        log.write(&batch(1..=3)).unwrap();
        log.write(&batch(2..=5)).unwrap(); // 2 and 3 again
        log.close(5).unwrap();
        let text = std::fs::read_to_string(d.path().join("build/r-1.jsonl")).unwrap();
        let seqs: Vec<u64> = text
            .lines()
            .map(|l| seq_of(l.as_bytes()).unwrap())
            .collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
        assert_eq!(
            std::fs::read_to_string(d.path().join("build/r-1.count")).unwrap(),
            "5"
        );
    }

    #[test]
    fn resumes_after_a_torn_line() {
        let d = tempfile::tempdir().unwrap();
        let mut log = JsonlLog::open(d.path(), meta()).unwrap();
        log.write(&batch(1..=2)).unwrap();
        drop(log);
        let path = d.path().join("build/r-1.jsonl");
        use std::io::Write;
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"id\":\"r-1:3\",\"seq\":3,\"mess").unwrap();
        let mut log = JsonlLog::open(d.path(), meta()).unwrap();
        assert_eq!(log.last_seq(), 2);
        log.write(&batch(3..=3)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(text.lines().all(|l| l.ends_with('}')));
    }

    #[test]
    fn refuses_ids_that_would_escape() {
        let d = tempfile::tempdir().unwrap();
        let mut m = meta();
        m.loggable_id = "../x".into();
        assert!(JsonlLog::open(d.path(), m).is_err());
    }
}
