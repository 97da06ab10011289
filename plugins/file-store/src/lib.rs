//! The file store: one run's log as JEP-212 JSON lines, written by `file-logging`, read
//! by `file-browser`.
//!
//! ```text
//! <root>/<job-id>/<loggable-id>.jsonl   one event per line, in seq order, no gaps
//! <root>/<job-id>/<loggable-id>.count   the final event count, written at close
//! ```
//!
//! The same layout as the `jsonl-logger` example, so either writer's logs are readable
//! by the browser. Plain Rust over `std::fs`: tested natively, run in the sandbox.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use trellis_sdk::events::{self, BatchBuilder, JsonLineFormat, LogMeta};

/// Where one run's files are.
pub fn paths(root: &Path, job: &str, run: &str) -> io::Result<(PathBuf, PathBuf, PathBuf)> {
    for part in [job, run] {
        if part.is_empty() || part.contains(['/', '\\', '\0']) || part == "." || part == ".." {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("`{part}` cannot be used as a file name"),
            ));
        }
    }
    let dir = root.join(job);
    Ok((
        dir.join(format!("{run}.jsonl")),
        dir.join(format!("{run}.count")),
        dir,
    ))
}

/// Appends a run's events; each seq is stored at most once, a torn last line (a crash
/// mid-write) is cut off when the log is reopened.
pub struct RunWriter {
    file: File,
    count_path: PathBuf,
    format: JsonLineFormat,
    last_seq: u64,
    end: u64,
    buf: Vec<u8>,
}

impl RunWriter {
    pub fn open(root: &Path, meta: &LogMeta<'_>) -> io::Result<RunWriter> {
        let (log, count_path, dir) = paths(root, meta.job_id, meta.loggable_id)?;
        std::fs::create_dir_all(&dir)?;
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&log)?;
        let (last_seq, end) = recover(&mut file)?;
        Ok(RunWriter {
            file,
            count_path,
            format: JsonLineFormat::new(meta),
            last_seq,
            end,
            buf: Vec::with_capacity(64 << 10),
        })
    }

    pub fn write(&mut self, batch: &[u8]) -> io::Result<()> {
        let evs =
            events::decode(batch).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        self.buf.clear();
        let mut last = self.last_seq;
        for e in evs.iter().filter(|e| e.seq > self.last_seq) {
            if e.seq != last + 1 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("gap in the log: expected seq {}, got {}", last + 1, e.seq),
                ));
            }
            self.format.write(&mut self.buf, e);
            last = e.seq;
        }
        if !self.buf.is_empty() {
            trellis_sdk::fs::write_all_at(&self.file, &self.buf, self.end)?;
            // Ok tells the host it may drop these events from its write-ahead buffer,
            // so they must be on the disk, not in a cache: on a network file system
            // (GlusterFS under HA) a written but unsynced batch sits in this node's
            // client, and is lost if the node is fenced before it drains, while the
            // host's buffer already let it go (a failover once lost five lines so).
            self.file.sync_data()?;
            self.end += self.buf.len() as u64;
            self.last_seq = last;
        }
        Ok(())
    }

    pub fn close(&mut self, final_count: u64) -> io::Result<()> {
        if final_count != self.last_seq {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "closing with {final_count} events but {} are stored",
                    self.last_seq
                ),
            ));
        }
        self.file.sync_data()?;
        let tmp = self.count_path.with_extension("count.tmp");
        std::fs::write(&tmp, final_count.to_string())?;
        std::fs::rename(&tmp, &self.count_path)
    }
}

/// The end of a log's complete lines and the last one's seq, read from its final MiB.
struct Tail {
    seq: u64,
    /// Where the last complete line ends; a torn line may follow up to `len`.
    end: u64,
    len: u64,
    /// A file longer than a MiB with no newline in its last MiB.
    overlong: bool,
}

fn read_tail(file: &mut File) -> io::Result<Tail> {
    let len = file.seek(SeekFrom::End(0))?;
    let start = len.saturating_sub(1 << 20);
    let mut tail = Vec::new();
    file.seek(SeekFrom::Start(start))?;
    file.read_to_end(&mut tail)?;
    let keep = match tail.iter().rposition(|&b| b == b'\n') {
        Some(i) => i + 1,
        None if start == 0 => 0,
        None => {
            return Ok(Tail {
                seq: 0,
                end: start,
                len,
                overlong: true,
            });
        }
    };
    let last = tail[..keep.saturating_sub(1)]
        .rsplit(|&b| b == b'\n')
        .next()
        .unwrap_or(&[]);
    let seq = if last.is_empty() {
        0
    } else {
        parse_line(last)?.seq
    };
    Ok(Tail {
        seq,
        end: start + keep as u64,
        len,
        overlong: false,
    })
}

/// The last complete line's seq and the file's usable end; cuts off a torn last line.
fn recover(file: &mut File) -> io::Result<(u64, u64)> {
    let t = read_tail(file)?;
    if t.overlong {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "last line longer than 1 MiB",
        ));
    }
    if t.end < t.len {
        file.set_len(t.end)?;
    }
    Ok((t.seq, t.end))
}

#[derive(Deserialize)]
struct Line {
    seq: u64,
    timestamp: i64,
    message: String,
    #[serde(default)]
    data: BTreeMap<String, String>,
    #[serde(default)]
    step_id: String,
}

fn parse_line(line: &[u8]) -> io::Result<Line> {
    serde_json::from_slice(line)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("corrupt log line: {e}")))
}

fn push(b: &mut BatchBuilder, l: &Line) {
    let data: Vec<(&str, &str)> = l
        .data
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    b.push(l.seq, l.timestamp, &l.step_id, &l.message, &data);
}

/// Whether a log is finished and fully readable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completeness {
    Open,
    Complete(u64),
    Incomplete { expected: u64, present: u64 },
}

/// Reads a run's log.
pub struct RunReader {
    log: PathBuf,
    count: PathBuf,
}

impl RunReader {
    pub fn new(root: &Path, job: &str, run: &str) -> io::Result<RunReader> {
        let (log, count, _) = paths(root, job, run)?;
        Ok(RunReader { log, count })
    }

    fn open(&self) -> io::Result<Option<File>> {
        match File::open(&self.log) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Up to `limit` events from byte offset `cursor` (of `step` only, if given), and
    /// the cursor to continue from. Only complete lines are read.
    pub fn page(&self, cursor: u64, step: Option<&str>, limit: u32) -> io::Result<(Vec<u8>, u64)> {
        let mut batch = BatchBuilder::new();
        let Some(mut f) = self.open()? else {
            return Ok((batch.finish(), cursor));
        };
        f.seek(SeekFrom::Start(cursor))?;
        let mut pos = cursor;
        let mut chunk = vec![0u8; 256 << 10];
        let mut pending: Vec<u8> = Vec::new();
        'read: while (batch.len() as u32) < limit {
            let n = f.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            pending.extend_from_slice(&chunk[..n]);
            let mut start = 0;
            while let Some(nl) = pending[start..].iter().position(|&b| b == b'\n') {
                let line = &pending[start..start + nl];
                let l = parse_line(line)?;
                start += nl + 1;
                pos += (nl + 1) as u64;
                if step.is_none_or(|s| s == l.step_id) {
                    push(&mut batch, &l);
                    if batch.len() as u32 >= limit {
                        break 'read;
                    }
                }
            }
            pending.drain(..start);
        }
        Ok((batch.finish(), pos))
    }

    /// The last `count` events (of `step` only, if given), oldest first.
    pub fn tail(&self, step: Option<&str>, count: u32) -> io::Result<Vec<u8>> {
        let mut batch = BatchBuilder::new();
        let Some(mut f) = self.open()? else {
            return Ok(batch.finish());
        };
        let mut end = f.seek(SeekFrom::End(0))?;
        let mut found: Vec<Line> = Vec::new();
        let mut carry: Vec<u8> = Vec::new();
        // Read backwards in blocks; complete lines only (a line still being written is
        // not yet part of the log).
        let mut skip_partial = true;
        while end > 0 && (found.len() as u32) < count {
            let start = end.saturating_sub(256 << 10);
            let mut block = vec![0u8; (end - start) as usize];
            f.seek(SeekFrom::Start(start))?;
            f.read_exact(&mut block)?;
            block.extend_from_slice(&carry);
            let mut lines: Vec<&[u8]> = block.split(|&b| b == b'\n').collect();
            if skip_partial {
                // At the end of the file: bytes after the last newline are a line still
                // being written, not yet part of the log.
                skip_partial = false;
                lines.pop();
            }
            let first = if start > 0 {
                lines.remove(0).to_vec()
            } else {
                Vec::new()
            };
            for line in lines.into_iter().rev().filter(|l| !l.is_empty()) {
                let l = parse_line(line)?;
                if step.is_none_or(|s| s == l.step_id) {
                    found.push(l);
                    if found.len() as u32 >= count {
                        break;
                    }
                }
            }
            carry = first;
            if start == 0 && !carry.is_empty() && (found.len() as u32) < count {
                let l = parse_line(&carry)?;
                if step.is_none_or(|s| s == l.step_id) {
                    found.push(l);
                }
            }
            end = start;
        }
        for l in found.iter().rev() {
            push(&mut batch, l);
        }
        Ok(batch.finish())
    }

    /// How many events the log holds now: the seq of its last complete line (the
    /// writer stores seqs 1..=n in order, once each). Reads only the file's end.
    pub fn present(&self) -> io::Result<u64> {
        Ok(match self.open()? {
            None => 0,
            // Without modifying the file: a torn line is simply not counted.
            Some(mut f) => {
                let t = read_tail(&mut f)?;
                if t.overlong { 0 } else { t.seq }
            }
        })
    }

    pub fn completeness(&self) -> io::Result<Completeness> {
        let expected = match std::fs::read_to_string(&self.count) {
            Ok(s) => s
                .trim()
                .parse::<u64>()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "corrupt count file"))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Completeness::Open),
            Err(e) => return Err(e),
        };
        let present = self.present()?;
        Ok(if present >= expected {
            Completeness::Complete(expected)
        } else {
            Completeness::Incomplete { expected, present }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const META: LogMeta<'static> = LogMeta {
        instance_id: "i",
        loggable_type: "run",
        loggable_id: "r-1",
        job_id: "build",
    };

    fn batch(from: u64, to: u64) -> Vec<u8> {
        let mut b = BatchBuilder::new();
        for s in from..=to {
            let step = if s % 3 == 0 { "test" } else { "build" };
            b.push(
                s,
                s as i64,
                step,
                &format!("line {s}\nwith \"quotes\""),
                &[("stream", "stdout")],
            );
        }
        b.finish()
    }

    fn seqs(buf: &[u8]) -> Vec<u64> {
        events::decode(buf).unwrap().iter().map(|e| e.seq).collect()
    }

    #[test]
    fn write_page_filter_tail_complete() {
        let d = tempfile::tempdir().unwrap();
        let r = RunReader::new(d.path(), "build", "r-1").unwrap();
        assert_eq!(r.completeness().unwrap(), Completeness::Open);
        assert!(
            seqs(&r.page(0, None, 10).unwrap().0).is_empty(),
            "no log yet: empty page"
        );
        let mut w = RunWriter::open(d.path(), &META).unwrap();
        w.write(&batch(1, 50)).unwrap();
        w.write(&batch(40, 100)).unwrap(); // redelivery overlaps
        assert_eq!(r.completeness().unwrap(), Completeness::Open);
        w.close(100).unwrap();
        assert_eq!(r.completeness().unwrap(), Completeness::Complete(100));

        // page through everything with a small limit
        let (mut cursor, mut all) = (0, Vec::new());
        loop {
            let (page, next) = r.page(cursor, None, 7).unwrap();
            let s = seqs(&page);
            if s.is_empty() {
                assert_eq!(next, cursor, "caught up: the cursor stays");
                break;
            }
            all.extend(s);
            cursor = next;
        }
        assert_eq!(all, (1..=100).collect::<Vec<_>>());
        let ev = events::decode(&r.page(0, None, 1).unwrap().0)
            .unwrap()
            .iter()
            .map(|e| (e.message.to_string(), e.step.to_string()))
            .collect::<Vec<_>>();
        assert_eq!(
            ev,
            vec![("line 1\nwith \"quotes\"".to_string(), "build".to_string())]
        );

        let (page, _) = r.page(0, Some("test"), 1000).unwrap();
        assert_eq!(
            seqs(&page),
            (1..=100).filter(|s| s % 3 == 0).collect::<Vec<_>>()
        );
        assert_eq!(seqs(&r.tail(None, 5).unwrap()), vec![96, 97, 98, 99, 100]);
        assert_eq!(seqs(&r.tail(Some("test"), 3).unwrap()), vec![93, 96, 99]);
        assert_eq!(
            seqs(&r.tail(None, 1000).unwrap()),
            (1..=100).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_missing_middle_is_incomplete_and_gaps_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let mut w = RunWriter::open(d.path(), &META).unwrap();
        w.write(&batch(1, 10)).unwrap();
        assert!(w.write(&batch(12, 13)).is_err(), "a gap is refused");
        assert!(w.close(12).is_err(), "closing short is refused");
        // a count written by someone who saw more (e.g. another writer) is reported honestly
        let (_, count, _) = paths(d.path(), "build", "r-1").unwrap();
        std::fs::write(count, "12").unwrap();
        let r = RunReader::new(d.path(), "build", "r-1").unwrap();
        assert_eq!(
            r.completeness().unwrap(),
            Completeness::Incomplete {
                expected: 12,
                present: 10
            }
        );
    }

    #[test]
    fn a_torn_line_is_cut_on_reopen_and_ignored_by_readers() {
        let d = tempfile::tempdir().unwrap();
        let mut w = RunWriter::open(d.path(), &META).unwrap();
        w.write(&batch(1, 3)).unwrap();
        drop(w);
        let (log, _, _) = paths(d.path(), "build", "r-1").unwrap();
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        std::io::Write::write_all(&mut f, b"{\"id\":\"r-1:4\",\"seq\":4,\"mes").unwrap();
        let r = RunReader::new(d.path(), "build", "r-1").unwrap();
        assert_eq!(
            seqs(&r.page(0, None, 100).unwrap().0),
            vec![1, 2, 3],
            "readers skip the unfinished line"
        );
        assert_eq!(seqs(&r.tail(None, 10).unwrap()), vec![1, 2, 3]);
        let mut w = RunWriter::open(d.path(), &META).unwrap();
        w.write(&batch(4, 5)).unwrap();
        assert_eq!(seqs(&r.page(0, None, 100).unwrap().0), vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn tail_and_pages_across_read_blocks() {
        let d = tempfile::tempdir().unwrap();
        let mut w = RunWriter::open(d.path(), &META).unwrap();
        // ~1.3 MB: several 256 KiB blocks for tail, several chunks for page
        for from in (1..=8000).step_by(1000) {
            w.write(&batch(from, from + 999)).unwrap();
        }
        let r = RunReader::new(d.path(), "build", "r-1").unwrap();
        assert_eq!(
            seqs(&r.tail(None, 7000).unwrap()),
            (1001..=8000).collect::<Vec<_>>()
        );
        let tests: Vec<u64> = (1..=8000).filter(|s| s % 3 == 0).collect();
        assert_eq!(
            seqs(&r.tail(Some("test"), 2000).unwrap()),
            tests[tests.len() - 2000..].to_vec()
        );
        let (page, next) = r.page(0, None, 8000).unwrap();
        assert_eq!(seqs(&page), (1..=8000).collect::<Vec<_>>());
        assert_eq!(seqs(&r.page(next, None, 10).unwrap().0), Vec::<u64>::new());
    }

    #[test]
    fn names_cannot_escape_the_root() {
        assert!(paths(Path::new("/logs"), "..", "r").is_err());
        assert!(paths(Path::new("/logs"), "job", "a/b").is_err());
    }
}
