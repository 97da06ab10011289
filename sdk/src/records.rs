//! Packed Kafka records (`trellis:host/kafka`'s `produce-packed` and `poll-packed`):
//! encoding and borrowed decoding. Plain Rust, shared by the host and plugins.
//!
//! Why: `produce` and `poll` carry each record as about a dozen separate values (topic,
//! key, every header's name and value, payload), and each one is allocated, copied and
//! freed on both sides of the component boundary. At tens of thousands of records a
//! second that was half the transport's CPU (docs/PERFORMANCE.md). A packed batch is one
//! buffer each way; a reader borrows from it without copying.
//!
//! Layout (little-endian; `str` and `bytes` are a u32 byte length then the bytes, `str`
//! being UTF-8; `opt-bytes` uses the length 0xFFFF_FFFF for "none"):
//!
//! ```text
//! batch  := count:u32 record{count}
//! record := topic:str partition:i32 offset:i64 timestamp-ms:i64 key:opt-bytes
//!           header-count:u32 (name:str value:bytes){header-count} payload:bytes
//! ```
//!
//! To produce: `partition` -1 lets the key choose (as Java clients do); `offset` and
//! `timestamp-ms` are ignored (write -1). From a poll: all fields are the broker's, and
//! `timestamp-ms` is -1 when the record has none.

use std::fmt;

/// A buffer that does not follow the layout, with where it went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub offset: usize,
    pub what: &'static str,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "malformed packed records at byte {}: {}",
            self.offset, self.what
        )
    }
}

impl std::error::Error for DecodeError {}

const NONE: u32 = u32::MAX;

/// Builds a packed batch record by record.
#[derive(Debug, Default, Clone)]
pub struct RecordsWriter {
    buf: Vec<u8>,
    count: u32,
    /// Where the current record's header count is, to patch it as headers are added.
    headers_at: Option<usize>,
}

impl RecordsWriter {
    pub fn new() -> RecordsWriter {
        Self::with_capacity(0)
    }

    /// With room for `bytes` of records (payloads plus ~40 bytes and the headers each).
    pub fn with_capacity(bytes: usize) -> RecordsWriter {
        let mut buf = Vec::with_capacity(4 + bytes);
        buf.extend_from_slice(&0u32.to_le_bytes());
        RecordsWriter {
            buf,
            count: 0,
            headers_at: None,
        }
    }

    /// Start a record; add its headers with [`header`](Self::header), then finish it
    /// with [`payload`](Self::payload).
    pub fn record(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        timestamp_ms: i64,
        key: Option<&[u8]>,
    ) -> &mut Self {
        assert!(
            self.headers_at.is_none(),
            "the previous record has no payload"
        );
        self.str(topic);
        self.buf.extend_from_slice(&partition.to_le_bytes());
        self.buf.extend_from_slice(&offset.to_le_bytes());
        self.buf.extend_from_slice(&timestamp_ms.to_le_bytes());
        match key {
            Some(k) => self.bytes(k),
            None => self.buf.extend_from_slice(&NONE.to_le_bytes()),
        }
        self.headers_at = Some(self.buf.len());
        self.buf.extend_from_slice(&0u32.to_le_bytes());
        self
    }

    pub fn header(&mut self, name: &str, value: &[u8]) -> &mut Self {
        let at = self.headers_at.expect("a header outside a record");
        let n = u32::from_le_bytes(self.buf[at..at + 4].try_into().unwrap()) + 1;
        self.buf[at..at + 4].copy_from_slice(&n.to_le_bytes());
        self.str(name);
        self.bytes(value);
        self
    }

    /// The record's payload, which ends it.
    pub fn payload(&mut self, payload: &[u8]) {
        assert!(
            self.headers_at.take().is_some(),
            "a payload outside a record"
        );
        self.bytes(payload);
        self.count += 1;
    }

    pub fn len(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The finished batch.
    pub fn finish(mut self) -> Vec<u8> {
        assert!(self.headers_at.is_none(), "the last record has no payload");
        self.buf[..4].copy_from_slice(&self.count.to_le_bytes());
        self.buf
    }

    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    fn bytes(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(&(b.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(b);
    }
}

/// One record, borrowed from the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordView<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: i64,
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
    headers: &'a [u8],
    header_count: u32,
}

impl<'a> RecordView<'a> {
    /// The headers (name, value), in order.
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + 'a {
        let mut r = Reader {
            buf: self.headers,
            pos: 0,
        };
        (0..self.header_count).map(move |_| {
            // Validated when the batch was decoded.
            let k = r.str().unwrap_or_default();
            let v = r.bytes().unwrap_or_default();
            (k, v)
        })
    }

    /// The first header called `name`.
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers().find(|(k, _)| *k == name).map(|(_, v)| v)
    }
}

/// Every record of a batch, validated; nothing is copied.
pub fn decode(buf: &[u8]) -> Result<Vec<RecordView<'_>>, DecodeError> {
    let mut r = Reader { buf, pos: 0 };
    let count = r.u32()?;
    // Each record takes at least 40 bytes: don't trust a count the buffer can't hold.
    let mut out = Vec::with_capacity((count as usize).min(buf.len() / 40));
    for _ in 0..count {
        let topic = r.str()?;
        let partition = r.u32()? as i32;
        let offset = r.u64()? as i64;
        let timestamp_ms = r.u64()? as i64;
        let key = match r.peek_u32()? {
            NONE => {
                r.pos += 4;
                None
            }
            _ => Some(r.bytes()?),
        };
        let header_count = r.u32()?;
        let start = r.pos;
        for _ in 0..header_count {
            r.str()?;
            r.bytes()?;
        }
        let headers = &buf[start..r.pos];
        let payload = r.bytes()?;
        out.push(RecordView {
            topic,
            partition,
            offset,
            timestamp_ms,
            key,
            payload,
            headers,
            header_count,
        });
    }
    if r.pos != buf.len() {
        return Err(r.err("bytes after the last record"));
    }
    Ok(out)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn err(&self, what: &'static str) -> DecodeError {
        DecodeError {
            offset: self.pos,
            what,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| self.err("cut short"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn peek_u32(&self) -> Result<u32, DecodeError> {
        let b = self
            .buf
            .get(self.pos..self.pos + 4)
            .ok_or_else(|| self.err("cut short"))?;
        Ok(u32::from_le_bytes(b.try_into().unwrap()))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn str(&mut self) -> Result<&'a str, DecodeError> {
        let at = self.pos;
        let b = self.bytes()?;
        std::str::from_utf8(b).map_err(|_| DecodeError {
            offset: at,
            what: "a string is not UTF-8",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_records_with_and_without_keys_and_headers() {
        let mut w = RecordsWriter::new();
        w.record("t.a", 1, -1, -1, Some(b"agent-1"))
            .header("trellis-seq", b"7")
            .header("trellis-lane", b"bulk")
            .payload(b"hello");
        w.record("t.b", -1, 42, 1_700_000_000_000, None)
            .payload(b"");
        w.record("t.c", 0, 0, -1, Some(b"")).payload(&[0xff; 3]);
        assert_eq!(w.len(), 3);
        let buf = w.finish();
        let rs = decode(&buf).unwrap();
        assert_eq!(rs.len(), 3);
        assert_eq!(rs[0].topic, "t.a");
        assert_eq!(rs[0].partition, 1);
        assert_eq!(rs[0].key, Some(&b"agent-1"[..]));
        assert_eq!(
            rs[0].headers().collect::<Vec<_>>(),
            vec![("trellis-seq", &b"7"[..]), ("trellis-lane", &b"bulk"[..])]
        );
        assert_eq!(rs[0].header("trellis-lane"), Some(&b"bulk"[..]));
        assert_eq!(rs[0].payload, b"hello");
        assert_eq!(
            (rs[1].partition, rs[1].offset, rs[1].timestamp_ms),
            (-1, 42, 1_700_000_000_000)
        );
        assert_eq!(rs[1].key, None);
        assert_eq!(rs[1].headers().count(), 0);
        assert_eq!(rs[2].key, Some(&b""[..]), "an empty key is not no key");
        assert_eq!(rs[2].payload, [0xff; 3]);
    }

    #[test]
    fn an_empty_batch_is_four_bytes() {
        let buf = RecordsWriter::new().finish();
        assert_eq!(buf, [0, 0, 0, 0]);
        assert!(decode(&buf).unwrap().is_empty());
    }

    #[test]
    fn damage_is_an_error_naming_the_place_never_a_panic() {
        let mut w = RecordsWriter::new();
        w.record("topic", 0, -1, -1, Some(b"k"))
            .header("h", b"v")
            .payload(b"payload");
        let buf = w.finish();
        // Every truncation fails cleanly.
        for n in 0..buf.len() {
            let e = decode(&buf[..n]).unwrap_err();
            assert!(e.offset <= n, "{e}");
        }
        // Extra bytes, a huge count, a length past the end, bad UTF-8.
        let mut extra = buf.clone();
        extra.push(0);
        assert_eq!(
            decode(&extra).unwrap_err().what,
            "bytes after the last record"
        );
        let mut count = buf.clone();
        count[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&count).is_err());
        let mut long = buf.clone();
        long[4..8].copy_from_slice(&(u32::MAX - 1).to_le_bytes());
        assert_eq!(decode(&long).unwrap_err().what, "cut short");
        let mut utf8 = buf;
        utf8[8] = 0xff;
        assert_eq!(decode(&utf8).unwrap_err().what, "a string is not UTF-8");
    }
}
