//! The packed event batch (`trellis:plugin/types.event-batch`): encoding and borrowed
//! decoding. Plain Rust with no WebAssembly dependencies, so the host, native tests and
//! benchmarks use the very same code as plugins.
//!
//! Layout (little-endian; `str` is a u32 byte length then UTF-8 bytes):
//!
//! ```text
//! batch := count:u32 event{count}
//! event := seq:u64 timestamp-ms:i64 step:str message:str data-count:u32 (key:str value:str){data-count}
//! ```

use std::fmt;

/// A batch that does not follow the layout. The host never produces one; a plugin that
/// gets one should answer `permanent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub offset: usize,
    pub what: &'static str,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "malformed event batch at byte {}: {}",
            self.offset, self.what
        )
    }
}

impl std::error::Error for DecodeError {}

/// One event, borrowed from the batch buffer (no copies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventView<'a> {
    pub seq: u64,
    pub timestamp_ms: i64,
    pub step: &'a str,
    pub message: &'a str,
    data: &'a [u8],
    data_count: u32,
}

impl<'a> EventView<'a> {
    /// JEP-212's free-form `data` pairs, in the order they were written.
    pub fn data(&self) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        let mut r = Reader {
            buf: self.data,
            pos: 0,
        };
        (0..self.data_count).map(move |_| {
            // Validated when the batch was decoded.
            let k = r.str().unwrap_or_default();
            let v = r.str().unwrap_or_default();
            (k, v)
        })
    }

    /// The value of one data key, if present.
    pub fn data_value(&self, key: &str) -> Option<&'a str> {
        self.data().find(|(k, _)| *k == key).map(|(_, v)| v)
    }
}

/// Decode a whole batch into borrowed views, validating every length and string.
pub fn decode(buf: &[u8]) -> Result<Vec<EventView<'_>>, DecodeError> {
    let mut r = Reader { buf, pos: 0 };
    let count = r.u32()? as usize;
    // Every event takes at least 28 bytes: refuse counts the buffer cannot hold
    // before reserving memory for them.
    if count > buf.len() / 28 + 1 {
        return Err(DecodeError {
            offset: 0,
            what: "event count larger than the buffer",
        });
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let seq = r.u64()?;
        let timestamp_ms = r.u64()? as i64;
        let step = r.str()?;
        let message = r.str()?;
        let data_count = r.u32()?;
        let data_start = r.pos;
        for _ in 0..data_count {
            r.str()?;
            r.str()?;
        }
        out.push(EventView {
            seq,
            timestamp_ms,
            step,
            message,
            data: &buf[data_start..r.pos],
            data_count,
        });
    }
    if r.pos != buf.len() {
        return Err(DecodeError {
            offset: r.pos,
            what: "trailing bytes after the last event",
        });
    }
    Ok(out)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(DecodeError {
                offset: self.pos,
                what,
            }),
        }
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4, "truncated u32")?;
        Ok(u32::from_le_bytes(b.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8, "truncated u64")?;
        Ok(u64::from_le_bytes(b.try_into().unwrap()))
    }
    fn str(&mut self) -> Result<&'a str, DecodeError> {
        let len = self.u32()? as usize;
        let at = self.pos;
        let b = self.take(len, "string longer than the buffer")?;
        utf8(b).ok_or(DecodeError {
            offset: at,
            what: "string is not UTF-8",
        })
    }
}

/// `b` as text. Log text is mostly ASCII, which is valid UTF-8 by definition: check
/// that 16 bytes at a time, and run the full validation only on strings that are not.
#[inline]
fn utf8(b: &[u8]) -> Option<&str> {
    if is_ascii(b) {
        // SAFETY: every byte is below 0x80, and ASCII is valid UTF-8.
        Some(unsafe { std::str::from_utf8_unchecked(b) })
    } else {
        std::str::from_utf8(b).ok()
    }
}

#[inline]
fn is_ascii(b: &[u8]) -> bool {
    // Advanced 16 bytes at a time on x86_64 only.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::*;
        while i + 16 <= b.len() {
            // SAFETY: SSE2 is part of x86_64; reads b[i..i + 16], in bounds, unaligned.
            let high = unsafe { _mm_movemask_epi8(_mm_loadu_si128(b.as_ptr().add(i).cast())) };
            if high != 0 {
                return false;
            }
            i += 16;
        }
    }
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    {
        use core::arch::wasm32::*;
        while i + 16 <= b.len() {
            // SAFETY: reads b[i..i + 16], in bounds; v128 loads may be unaligned.
            let high = u8x16_bitmask(unsafe { v128_load(b.as_ptr().add(i).cast()) });
            if high != 0 {
                return false;
            }
            i += 16;
        }
    }
    b[i..].is_ascii()
}

/// Builds a batch. Reuse one builder (`clear`) to avoid reallocating per batch.
#[derive(Debug, Default, Clone)]
pub struct BatchBuilder {
    buf: Vec<u8>,
    count: u32,
}

impl BatchBuilder {
    pub fn new() -> Self {
        Self {
            buf: vec![0; 4],
            count: 0,
        }
    }

    pub fn with_capacity(bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(bytes.max(4));
        buf.extend_from_slice(&[0; 4]);
        Self { buf, count: 0 }
    }

    pub fn push(
        &mut self,
        seq: u64,
        timestamp_ms: i64,
        step: &str,
        message: &str,
        data: &[(&str, &str)],
    ) {
        if self.buf.is_empty() {
            self.buf.extend_from_slice(&[0; 4]);
        }
        self.buf.extend_from_slice(&seq.to_le_bytes());
        self.buf.extend_from_slice(&timestamp_ms.to_le_bytes());
        self.put_str(step);
        self.put_str(message);
        self.buf
            .extend_from_slice(&(data.len() as u32).to_le_bytes());
        for (k, v) in data {
            self.put_str(k);
            self.put_str(v);
        }
        self.count += 1;
    }

    /// Copy an event from another batch.
    pub fn push_view(&mut self, e: &EventView<'_>) {
        let data: Vec<(&str, &str)> = e.data().collect();
        self.push(e.seq, e.timestamp_ms, e.step, e.message, &data);
    }

    fn put_str(&mut self, s: &str) {
        self.buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(s.as_bytes());
    }

    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes encoded so far (for sizing batches).
    pub fn encoded_len(&self) -> usize {
        self.buf.len().max(4)
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.buf.extend_from_slice(&[0; 4]);
        self.count = 0;
    }

    /// The finished batch; the builder is left empty.
    pub fn finish(&mut self) -> Vec<u8> {
        if self.buf.is_empty() {
            self.buf.extend_from_slice(&[0; 4]);
        }
        self.buf[..4].copy_from_slice(&self.count.to_le_bytes());
        let out = std::mem::take(&mut self.buf);
        self.count = 0;
        out
    }
}

/// The JEP-212 metadata, borrowed (see `trellis:plugin/types.log-metadata`).
#[derive(Debug, Clone, Copy)]
pub struct LogMeta<'a> {
    pub instance_id: &'a str,
    pub loggable_type: &'a str,
    pub loggable_id: &'a str,
    pub job_id: &'a str,
}

/// Append one event as a JEP-212 JSON line (with the metadata fields and a trailing
/// newline): `{"id":…,"seq":…,"timestamp":…,"message":…,"data":{…},"instance_id":…,
/// "loggable_type":…,"loggable_id":…,"job_id":…,"step_id":…}`.
///
/// For many events of one log, build a [`JsonLineFormat`] once instead: it escapes the
/// metadata once, not on every line.
pub fn write_json_line(out: &mut Vec<u8>, meta: &LogMeta<'_>, e: &EventView<'_>) {
    JsonLineFormat::new(meta).write(out, e)
}

/// JEP-212 JSON lines for one log, with the log's metadata escaped once.
#[derive(Debug, Clone)]
pub struct JsonLineFormat {
    /// `{"id":"<loggable-id>:`
    head: Vec<u8>,
    /// `},"instance_id":"…","loggable_type":"…","loggable_id":"…","job_id":"…","step_id":"`
    meta: Vec<u8>,
}

impl JsonLineFormat {
    pub fn new(meta: &LogMeta<'_>) -> JsonLineFormat {
        let mut head = b"{\"id\":\"".to_vec();
        escape_into(&mut head, meta.loggable_id);
        head.push(b':');
        let mut m = b"},\"instance_id\":\"".to_vec();
        escape_into(&mut m, meta.instance_id);
        m.extend_from_slice(b"\",\"loggable_type\":\"");
        escape_into(&mut m, meta.loggable_type);
        m.extend_from_slice(b"\",\"loggable_id\":\"");
        escape_into(&mut m, meta.loggable_id);
        m.extend_from_slice(b"\",\"job_id\":\"");
        escape_into(&mut m, meta.job_id);
        m.extend_from_slice(b"\",\"step_id\":\"");
        JsonLineFormat { head, meta: m }
    }

    /// Append `e` as one line, newline included.
    pub fn write(&self, out: &mut Vec<u8>, e: &EventView<'_>) {
        out.extend_from_slice(&self.head);
        push_u64(out, e.seq);
        out.extend_from_slice(b"\",\"seq\":");
        push_u64(out, e.seq);
        out.extend_from_slice(b",\"timestamp\":");
        push_i64(out, e.timestamp_ms);
        out.extend_from_slice(b",\"message\":\"");
        escape_into(out, e.message);
        out.extend_from_slice(b"\",\"data\":{");
        for (i, (k, v)) in e.data().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.push(b'"');
            escape_into(out, k);
            out.extend_from_slice(b"\":\"");
            escape_into(out, v);
            out.push(b'"');
        }
        out.extend_from_slice(&self.meta);
        escape_into(out, e.step);
        out.extend_from_slice(b"\"}\n");
    }
}

fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}

fn push_i64(out: &mut Vec<u8>, v: i64) {
    if v < 0 {
        out.push(b'-');
    }
    push_u64(out, v.unsigned_abs());
}

/// JSON string escaping (RFC 8259): quote, backslash and control characters.
///
/// Finds the next byte that needs escaping 16 (SIMD) or 8 (word) bytes at a time and
/// copies clean runs whole: most log text needs no escaping, and a vector test plus one
/// copy is far cheaper than a branch per byte.
pub fn escape_into(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    let mut start = 0;
    loop {
        let i = start + clean_run(&bytes[start..]);
        out.extend_from_slice(&bytes[start..i]);
        let Some(&b) = bytes.get(i) else { return };
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(b >> 4) as usize]);
                out.push(HEX[(b & 0xf) as usize]);
            }
        }
        start = i + 1;
    }
}

#[inline]
fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// Length of the leading run of `bytes` that needs no escaping.
#[inline]
fn clean_run(bytes: &[u8]) -> usize {
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::*;
        while i + 16 <= bytes.len() {
            // SAFETY: SSE2 is part of x86_64; the load reads bytes[i..i + 16], in bounds,
            // and `loadu` has no alignment requirement.
            let mask = unsafe {
                let v = _mm_loadu_si128(bytes.as_ptr().add(i).cast());
                let low = _mm_cmpeq_epi8(_mm_max_epu8(v, _mm_set1_epi8(0x1f)), _mm_set1_epi8(0x1f));
                let quote = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8));
                let backslash = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8));
                _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(low, quote), backslash)) as u32
            };
            if mask != 0 {
                return i + mask.trailing_zeros() as usize;
            }
            i += 16;
        }
    }
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    {
        use core::arch::wasm32::*;
        while i + 16 <= bytes.len() {
            // SAFETY: the load reads bytes[i..i + 16], in bounds; v128 loads may be unaligned.
            let v = unsafe { v128_load(bytes.as_ptr().add(i).cast()) };
            let hit = v128_or(
                v128_or(
                    u8x16_lt(v, u8x16_splat(0x20)),
                    u8x16_eq(v, u8x16_splat(b'"')),
                ),
                u8x16_eq(v, u8x16_splat(b'\\')),
            );
            let mask = u8x16_bitmask(hit);
            if mask != 0 {
                return i + mask.trailing_zeros() as usize;
            }
            i += 16;
        }
    }
    while let Some(chunk) = bytes.get(i..i + 8) {
        if word_needs_escape(u64::from_le_bytes(chunk.try_into().expect("8 bytes"))) {
            break;
        }
        i += 8;
    }
    while i < bytes.len() && !needs_escape(bytes[i]) {
        i += 1;
    }
    i
}

/// Whether any of the eight bytes is `"`, `\\` or below 0x20 (may report a false
/// positive, never a false negative: the caller then checks byte by byte).
#[inline]
fn word_needs_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    let q = w ^ (ONES * b'"' as u64);
    let quote = q.wrapping_sub(ONES) & !q & HIGH;
    let bs = w ^ (ONES * b'\\' as u64);
    let backslash = bs.wrapping_sub(ONES) & !bs & HIGH;
    (below_space | quote | backslash) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut b = BatchBuilder::new();
        b.push(
            1,
            1_700_000_000_000,
            "build",
            "hello \"world\"",
            &[("stream", "stdout")],
        );
        b.push(2, -5, "", "line1\nline2", &[]);
        let buf = b.finish();
        let ev = decode(&buf).unwrap();
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0].seq, 1);
        assert_eq!(ev[0].step, "build");
        assert_eq!(ev[0].data_value("stream"), Some("stdout"));
        assert_eq!(ev[1].message, "line1\nline2");
        assert_eq!(ev[1].timestamp_ms, -5);
        assert!(b.is_empty());
    }

    #[test]
    fn empty_batch() {
        let buf = BatchBuilder::new().finish();
        assert_eq!(buf, vec![0, 0, 0, 0]);
        assert!(decode(&buf).unwrap().is_empty());
    }

    #[test]
    fn malformed_batches_are_refused() {
        assert!(decode(&[]).is_err());
        assert!(decode(&[1, 0, 0, 0]).is_err());
        // count says one million events in 4 bytes
        assert!(decode(&1_000_000u32.to_le_bytes()).is_err());
        let mut b = BatchBuilder::new();
        b.push(1, 0, "s", "m", &[]);
        let mut buf = b.finish();
        buf.push(0);
        assert_eq!(
            decode(&buf).unwrap_err().what,
            "trailing bytes after the last event"
        );
        let mut b = BatchBuilder::new();
        b.push(1, 0, "s", "mm", &[]);
        let mut buf = b.finish();
        let n = buf.len();
        buf[n - 6] = 0xff; // inside the message
        assert_eq!(decode(&buf).unwrap_err().what, "string is not UTF-8");
        // invalid UTF-8 after a long ASCII prefix (the vector path), and valid non-ASCII
        let mut b = BatchBuilder::new();
        b.push(1, 0, "s", &format!("{}é", "a".repeat(40)), &[]);
        let good = b.finish();
        assert_eq!(decode(&good).unwrap()[0].message.chars().last(), Some('é'));
        let mut bad = good.clone();
        let n = bad.len();
        bad[n - 5] = 0xc3; // 'é' is c3 a9: make it c3 c3
        assert_eq!(decode(&bad).unwrap_err().what, "string is not UTF-8");
    }

    #[test]
    fn word_scan_matches_byte_by_byte_escaping() {
        fn reference(s: &str) -> String {
            let mut o = String::new();
            for c in s.chars() {
                match c {
                    '"' => o.push_str("\\\""),
                    '\\' => o.push_str("\\\\"),
                    '\n' => o.push_str("\\n"),
                    '\r' => o.push_str("\\r"),
                    '\t' => o.push_str("\\t"),
                    c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
                    c => o.push(c),
                }
            }
            o
        }
        let samples = [
            "",
            "plain",
            "exactly8",
            "sixteen bytes!!!",
            "a\"b",
            "tab\there and a much longer tail",
            "\u{1}\u{1f}\u{7f}é€𝄞",
            "ends with backslash\\",
            "\"\"\"\"\"\"\"\"\"",
            "0123456\n89abcdef\r",
        ];
        for s in samples {
            let mut out = Vec::new();
            escape_into(&mut out, s);
            assert_eq!(String::from_utf8(out).unwrap(), reference(s), "{s:?}");
        }
        // every byte value below 0x80 at every offset of a 40-byte string (SIMD, word
        // and byte paths all see it)
        for b in 0u8..0x80 {
            for at in 0..40 {
                let mut v = vec![b'x'; 40];
                v[at] = b;
                let s = String::from_utf8(v).unwrap();
                let mut out = Vec::new();
                escape_into(&mut out, &s);
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    reference(&s),
                    "byte {b:#x} at {at}"
                );
            }
        }
    }

    #[test]
    fn json_line_escapes() {
        let mut b = BatchBuilder::new();
        b.push(7, 12, "st\"ep", "a\tb\u{1}c", &[("k", "v\\")]);
        let buf = b.finish();
        let ev = decode(&buf).unwrap();
        let meta = LogMeta {
            instance_id: "i",
            loggable_type: "run",
            loggable_id: "r-1",
            job_id: "j",
        };
        let mut out = Vec::new();
        write_json_line(&mut out, &meta, &ev[0]);
        let line = String::from_utf8(out).unwrap();
        assert!(line.ends_with("}\n"));
        assert!(line.contains(r#""message":"a\tb\u0001c""#), "{line}");
        assert!(line.contains(r#""step_id":"st\"ep""#), "{line}");
        assert!(line.contains(r#""id":"r-1:7""#), "{line}");
        assert!(line.contains(r#""data":{"k":"v\\"}"#), "{line}");
    }
}
