//! The durable log buffer: events on disk between a step's output and the
//! `logging-method` plugin, until the plugin confirms them.
//!
//! One write-ahead file per open log (`<dir>/<key>.wal`) holds every batch the host
//! accepted, and at the end the log's close with its final count; a small `<key>.ack`
//! says how far the plugin has confirmed. A batch is on disk (fsync'd) before the host
//! acknowledges the output to the agent, so a store that is down, a plugin that traps or
//! a daemon killed in between loses nothing: on reopen the unconfirmed batches, and the
//! close if there was one, are delivered again. Events carry stable sequence numbers,
//! so a batch delivered twice (the confirm was lost with the process) is written once by
//! any store that keys events by loggable + sequence, as the contract asks of plugins.
//!
//! The buffer is bounded per plugin ([`Budget`]): when it is full, the controller stops
//! taking output from its agents (their links stay up; the agents' own bound on
//! unacknowledged messages then pauses the steps) until deliveries make room — output
//! is held back, never dropped. A batch the disk refuses (it is full) is held in the
//! writer's memory instead (see `logging.rs`), counted here as [`Budget::held`] against
//! the same bound, and at most [`HELD_MAX`], so memory too is bounded and output is held
//! back once it is reached.
//!
//! File layout: `TRLWAL1\n`, then records `kind:u8 len:u32 crc32:u32 payload{len}`
//! (little-endian; kind 1 = a packed event batch, 2 = close, payload the final count as
//! u64; 3 = the log's description, written first, so a process that finds the file
//! after a crash knows what it belongs to without asking anyone). A record cut short by
//! a crash (bad length or checksum at the tail) is dropped on reopen: it was never
//! acknowledged to anyone.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

const MAGIC: &[u8; 8] = b"TRLWAL1\n";
const BATCH: u8 = 1;
const CLOSE: u8 = 2;
const META: u8 = 3;
const RECORD_HEADER: u64 = 9;

/// How many bytes of output one plugin's logs may hold in memory when the disk refuses
/// it (a full disk), within the budget's limit: memory is dearer than disk, and what is
/// held there is lost if the process dies before the disk takes it.
pub const HELD_MAX: u64 = 8 << 20;

/// How many bytes of unconfirmed batches one plugin's logs may hold on disk.
#[derive(Debug)]
pub struct Budget {
    pub limit: u64,
    used: AtomicU64,
    /// Bytes of batches the disk refused, held in memory until it takes them.
    held: AtomicU64,
}

impl Budget {
    pub fn new(limit: u64) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            used: AtomicU64::new(0),
            held: AtomicU64::new(0),
        })
    }

    /// Bytes buffered and not yet confirmed (the `/metrics` depth).
    pub fn used(&self) -> u64 {
        self.used.load(Relaxed)
    }

    /// Bytes held in memory because the disk refused them (the `/metrics` depth).
    pub fn held(&self) -> u64 {
        self.held.load(Relaxed)
    }

    /// Whether more output may be taken: while what is on disk and what is held in
    /// memory (a full disk) together are under the limit, and what is held is under
    /// [`HELD_MAX`]. What was already taken is appended (or held) whatever its size, so
    /// the bound is passed by at most that.
    pub fn has_room(&self) -> bool {
        let held = self.held();
        self.used() + held < self.limit && held < HELD_MAX
    }

    /// `bytes` refused by the disk are held in memory.
    pub fn hold(&self, bytes: u64) {
        self.held.fetch_add(bytes, Relaxed);
    }

    /// `bytes` held in memory reached the disk (or were given up).
    pub fn release(&self, bytes: u64) {
        self.held.fetch_sub(bytes, Relaxed);
    }

    fn take(&self, bytes: u64) {
        self.used.fetch_add(bytes, Relaxed);
    }

    fn give_back(&self, bytes: u64) {
        self.used.fetch_sub(bytes, Relaxed);
    }
}

/// What a reopened buffer still owes the plugin.
#[derive(Debug, Default)]
pub struct Owed {
    /// Batches not confirmed, oldest first.
    pub batches: Vec<Arc<Vec<u8>>>,
    /// The log was closed with this final count, and the close was not confirmed.
    pub closed: Option<u64>,
    /// The description written with [`LogBuffer::describe`], if any.
    pub meta: Option<Vec<u8>>,
    /// The highest event seq in any batch on file, confirmed or not (0: none): the
    /// count to close a log with whose writer died before its close.
    pub last_seq: u64,
}

/// One log's write-ahead file.
#[derive(Debug)]
pub struct LogBuffer {
    wal: PathBuf,
    ack: PathBuf,
    file: File,
    /// Unconfirmed batches, oldest first: (end offset of its record in the file, its
    /// size). The batches themselves are the writer's to keep.
    pending: VecDeque<(u64, u64)>,
    /// The file offset confirmed so far.
    confirmed: u64,
    budget: Arc<Budget>,
}

impl LogBuffer {
    /// Open (or create) the buffer of log `key` in `dir`, with what it still owes.
    pub fn open(dir: &Path, key: &str, budget: Arc<Budget>) -> io::Result<(LogBuffer, Owed)> {
        std::fs::create_dir_all(dir)?;
        let name = file_name(key);
        let wal = dir.join(format!("{name}.wal"));
        let ack = dir.join(format!("{name}.ack"));
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&wal)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        if bytes.len() < MAGIC.len() {
            if !MAGIC.starts_with(&bytes) {
                return Err(not_ours(&wal));
            }
            // New (or cut short while being created): start it over.
            file.set_len(0)?;
            file.write_all(MAGIC)?;
            file.sync_data()?;
            bytes = MAGIC.to_vec();
        } else if &bytes[..MAGIC.len()] != MAGIC {
            return Err(not_ours(&wal));
        }
        let confirmed = read_ack(&ack)?.clamp(MAGIC.len() as u64, bytes.len() as u64);
        let (records, good_end) = parse(&bytes);
        if good_end < bytes.len() as u64 {
            tracing::warn!(
                file = %wal.display(),
                "dropping {} bytes cut short at the end of the log buffer (a crash while appending; never acknowledged)",
                bytes.len() as u64 - good_end
            );
            file.set_len(good_end)?;
        }
        let mut buffer = LogBuffer {
            wal,
            ack,
            file,
            pending: VecDeque::new(),
            confirmed,
            budget,
        };
        let mut owed = Owed::default();
        for (end, kind, payload) in records {
            if kind == BATCH {
                owed.last_seq = owed.last_seq.max(last_seq(&payload));
            }
            if kind == META {
                owed.meta = Some(payload);
                continue;
            }
            if end <= confirmed {
                continue;
            }
            match kind {
                BATCH => {
                    buffer.budget.take(payload.len() as u64);
                    buffer.pending.push_back((end, payload.len() as u64));
                    owed.batches.push(Arc::new(payload));
                }
                _ => owed.closed = Some(u64::from_le_bytes(payload[..8].try_into().unwrap())),
            }
        }
        Ok((buffer, owed))
    }

    /// Append a batch, durably; it counts against the budget until confirmed. This
    /// does not wait for room: see [`Budget::has_room`].
    pub fn append(&mut self, batch: &[u8]) -> io::Result<()> {
        let end = self.write_record(BATCH, batch)?;
        self.budget.take(batch.len() as u64);
        self.pending.push_back((end, batch.len() as u64));
        Ok(())
    }

    /// The plugin confirmed the oldest pending batch.
    pub fn confirm_oldest(&mut self) -> io::Result<()> {
        let Some((end, len)) = self.pending.pop_front() else {
            return Ok(());
        };
        self.budget.give_back(len);
        self.confirmed = end;
        write_ack(&self.ack, end)
    }

    /// Describe the log (once, when the file is new: see [`Owed::meta`]).
    pub fn describe(&mut self, meta: &[u8]) -> io::Result<()> {
        self.write_record(META, meta).map(|_| ())
    }

    /// Record that the log is closed with `count` events (before asking the plugin).
    pub fn append_close(&mut self, count: u64) -> io::Result<()> {
        self.write_record(CLOSE, &count.to_le_bytes()).map(|_| ())
    }

    /// The plugin confirmed the close: nothing is owed any more; the files go.
    pub fn finish(mut self) -> io::Result<()> {
        while !self.pending.is_empty() {
            self.confirm_oldest()?;
        }
        std::fs::remove_file(&self.wal)?;
        match std::fs::remove_file(&self.ack) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Batches held, not yet confirmed.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    fn write_record(&mut self, kind: u8, payload: &[u8]) -> io::Result<u64> {
        let len =
            u32::try_from(payload.len()).map_err(|_| io::Error::other("a log batch over 4 GiB"))?;
        let mut crc = flate2::Crc::new();
        crc.update(payload);
        let mut head = [0u8; RECORD_HEADER as usize];
        head[0] = kind;
        head[1..5].copy_from_slice(&len.to_le_bytes());
        head[5..9].copy_from_slice(&crc.sum().to_le_bytes());
        let start = self.file.seek(SeekFrom::End(0))?;
        let written = self
            .file
            .write_all(&head)
            .and_then(|_| self.file.write_all(payload))
            .and_then(|_| self.file.sync_data());
        if let Err(e) = written {
            // Leave no half record behind for the next append to follow.
            let _ = self.file.set_len(start);
            return Err(e);
        }
        Ok(start + RECORD_HEADER + payload.len() as u64)
    }
}

impl Drop for LogBuffer {
    fn drop(&mut self) {
        // What is still pending stays on disk for the next open; the budget is this
        // process's accounting and must not keep counting it.
        let held: u64 = self.pending.iter().map(|(_, len)| len).sum();
        if held > 0 {
            self.budget.give_back(held);
        }
    }
}

/// Every log buffer key found in `dir` (buffers a previous process left owing).
pub fn leftovers(dir: &Path) -> io::Result<Vec<String>> {
    let mut keys = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(keys),
        Err(e) => return Err(e),
    };
    for e in entries {
        let name = e?.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".wal")
            && let Some(key) = key_of(stem)
        {
            keys.push(key);
        }
    }
    keys.sort();
    Ok(keys)
}

/// Records (end offset, kind, payload) up to the first damaged one, and where the good
/// part ends.
fn parse(bytes: &[u8]) -> (Vec<(u64, u8, Vec<u8>)>, u64) {
    let mut out = Vec::new();
    let mut pos = MAGIC.len();
    while pos + RECORD_HEADER as usize <= bytes.len() {
        let kind = bytes[pos];
        let len = u32::from_le_bytes(bytes[pos + 1..pos + 5].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(bytes[pos + 5..pos + 9].try_into().unwrap());
        let start = pos + RECORD_HEADER as usize;
        let Some(payload) = bytes.get(start..start + len) else {
            break;
        };
        let mut c = flate2::Crc::new();
        c.update(payload);
        let valid =
            c.sum() == crc && (kind == BATCH || kind == META || (kind == CLOSE && len == 8));
        if !valid {
            break;
        }
        pos = start + len;
        out.push((pos as u64, kind, payload.to_vec()));
    }
    (out, pos as u64)
}

/// The seq of a packed batch's last event (see `event-batch` in wit/types.wit); 0 if
/// the batch is empty or not readable.
fn last_seq(batch: &[u8]) -> u64 {
    fn u32_at(b: &[u8], at: usize) -> Option<usize> {
        Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize)
    }
    fn skip_str(b: &[u8], at: usize) -> Option<usize> {
        Some(at + 4 + u32_at(b, at)?)
    }
    let walk = || -> Option<u64> {
        let count = u32_at(batch, 0)?;
        let (mut at, mut seq) = (4, 0);
        for _ in 0..count {
            seq = u64::from_le_bytes(batch.get(at..at + 8)?.try_into().ok()?);
            at = skip_str(batch, at + 16)?; // seq, timestamp, then step
            at = skip_str(batch, at)?; // message
            let pairs = u32_at(batch, at)?;
            at += 4;
            for _ in 0..pairs * 2 {
                at = skip_str(batch, at)?;
            }
        }
        Some(seq)
    };
    walk().unwrap_or(0)
}

fn read_ack(path: &Path) -> io::Result<u64> {
    match std::fs::read(path) {
        Ok(b) if b.len() == 8 => Ok(u64::from_le_bytes(b.try_into().unwrap())),
        Ok(_) => Ok(0), // torn: everything is delivered again (ids make that harmless)
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Replace the ack atomically (write a temporary file, then rename over).
fn write_ack(path: &Path, offset: u64) -> io::Result<()> {
    let tmp = path.with_extension("ack.tmp");
    std::fs::write(&tmp, offset.to_le_bytes())?;
    std::fs::rename(&tmp, path)
}

fn not_ours(path: &Path) -> io::Error {
    io::Error::other(format!(
        "{} is not a Trellis log buffer (no TRLWAL1 header): move it out of the state directory",
        path.display()
    ))
}

/// A key as a file name: letters, digits, `-`, `_` and `.` kept, anything else `%XX`.
fn file_name(key: &str) -> String {
    let mut s = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || (b"-_.".contains(&b) && !(s.is_empty() && b == b'.')) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

fn key_of(name: &str) -> Option<String> {
    let mut out = Vec::with_capacity(name.len());
    let b = name.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path, key: &str, budget: &Arc<Budget>) -> (LogBuffer, Owed) {
        LogBuffer::open(dir, key, budget.clone()).unwrap()
    }

    #[test]
    fn unconfirmed_batches_and_the_close_survive_a_reopen() {
        let d = tempfile::tempdir().unwrap();
        let budget = Budget::new(1 << 20);
        let (mut b, owed) = open(d.path(), "run/1", &budget);
        assert!(owed.batches.is_empty() && owed.closed.is_none());
        b.append(b"one").unwrap();
        b.append(b"two").unwrap();
        b.append(b"three").unwrap();
        b.confirm_oldest().unwrap();
        b.append_close(42).unwrap();
        assert_eq!(budget.used(), 8);
        drop(b); // the process dies
        assert_eq!(budget.used(), 0);
        let (b, owed) = open(d.path(), "run/1", &budget);
        let got: Vec<&[u8]> = owed.batches.iter().map(|b| &b[..]).collect();
        assert_eq!(got, [&b"two"[..], b"three"]);
        assert_eq!(owed.closed, Some(42));
        assert_eq!(b.pending(), 2);
        assert_eq!(budget.used(), 8);
        assert_eq!(leftovers(d.path()).unwrap(), ["run/1"]);
        b.finish().unwrap();
        assert_eq!(budget.used(), 0);
        assert!(leftovers(d.path()).unwrap().is_empty());
    }

    #[test]
    fn the_description_and_the_last_seq_are_found_again() {
        let d = tempfile::tempdir().unwrap();
        let budget = Budget::new(1 << 20);
        let (mut b, _) = open(d.path(), "k", &budget);
        b.describe(b"{\"job\":\"j\"}").unwrap();
        let mut batch = trellis_sdk::events::BatchBuilder::new();
        batch.push(7, 0, "s", "seven", &[("stream", "stdout")]);
        batch.push(8, 0, "s", "eight", &[]);
        b.append(&batch.finish()).unwrap();
        b.confirm_oldest().unwrap();
        drop(b);
        let (_, owed) = open(d.path(), "k", &budget);
        assert_eq!(owed.meta.as_deref(), Some(&b"{\"job\":\"j\"}"[..]));
        assert_eq!(owed.last_seq, 8, "confirmed batches count too");
        assert!(owed.batches.is_empty());
        assert_eq!(last_seq(b"\x01\0\0\0short"), 0);
    }

    #[test]
    fn a_record_cut_short_by_a_crash_is_dropped_and_the_rest_kept() {
        let d = tempfile::tempdir().unwrap();
        let budget = Budget::new(1 << 20);
        let (mut b, _) = open(d.path(), "k", &budget);
        b.append(b"whole").unwrap();
        b.append(b"cut short").unwrap();
        drop(b);
        let wal = d.path().join("k.wal");
        let len = std::fs::metadata(&wal).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&wal)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let (mut b, owed) = open(d.path(), "k", &budget);
        assert_eq!(owed.batches.len(), 1);
        assert_eq!(&owed.batches[0][..], b"whole");
        // Appending after the repair works and survives another reopen.
        b.append(b"after").unwrap();
        drop(b);
        let (_, owed) = open(d.path(), "k", &budget);
        let got: Vec<&[u8]> = owed.batches.iter().map(|b| &b[..]).collect();
        assert_eq!(got, [&b"whole"[..], b"after"]);
    }

    #[test]
    fn a_flipped_bit_ends_the_good_part_there() {
        let d = tempfile::tempdir().unwrap();
        let budget = Budget::new(1 << 20);
        let (mut b, _) = open(d.path(), "k", &budget);
        b.append(b"first").unwrap();
        b.append(b"second").unwrap();
        drop(b);
        let wal = d.path().join("k.wal");
        let mut bytes = std::fs::read(&wal).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&wal, bytes).unwrap();
        let (_, owed) = open(d.path(), "k", &budget);
        assert_eq!(owed.batches.len(), 1);
    }

    #[test]
    fn the_budget_has_room_until_the_limit_is_reached() {
        let budget = Budget::new(10);
        let d = tempfile::tempdir().unwrap();
        let (mut b, _) = open(d.path(), "k", &budget);
        b.append(&[0; 8]).unwrap();
        assert!(budget.has_room());
        b.append(&[0; 100]).unwrap(); // a batch larger than the limit still goes in
        assert!(!budget.has_room());
        b.confirm_oldest().unwrap();
        assert!(!budget.has_room());
        b.confirm_oldest().unwrap();
        assert!(budget.has_room());
        assert_eq!(budget.used(), 0);
        // What is held in memory (the disk refused it) counts against the same limit.
        budget.hold(9);
        assert!(budget.has_room());
        budget.hold(1);
        assert!(!budget.has_room());
        budget.release(10);
        assert!(budget.has_room());
        // And is bounded on its own, below a large limit.
        let large = Budget::new(1 << 40);
        large.hold(HELD_MAX - 1);
        assert!(large.has_room());
        large.hold(1);
        assert!(!large.has_room());
    }

    #[test]
    fn a_file_that_is_not_a_buffer_is_refused_with_the_fix() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("k.wal"), b"hello world, not ours").unwrap();
        let e = LogBuffer::open(d.path(), "k", Budget::new(1)).unwrap_err();
        assert!(e.to_string().contains("not a Trellis log buffer"), "{e}");
    }

    #[test]
    fn keys_round_trip_through_file_names() {
        for k in ["run-1", "a/b c", "..", "ünï", "%41"] {
            let name = file_name(k);
            assert!(!name.contains('/') && name != ".." && !name.starts_with('.'));
            assert_eq!(key_of(&name).as_deref(), Some(k));
        }
    }
}
