//! The Kafka command transport.
//!
//! Topics (for prefix `P`; readable with any Kafka client):
//!
//! ```text
//! P.connect                  1 partition   agents announce a new link: key = agent name
//! P.<agent>.to-agent         2 partitions  controller -> agent: partition 0 control, 1 bulk
//! P.<agent>.to-controller    2 partitions  agent -> controller: same
//! ```
//!
//! One partition per lane keeps each lane in order and lets control frames overtake
//! bulk ones (a reader takes control first). Every record's key is the agent's name;
//! one header, `trellis-frame`, says which link, lane and frame it carries, as four
//! fields separated by single spaces (readable with any Kafka client):
//!
//! ```text
//! trellis-frame: <link> <lane> <seq> <i>/<n>      e.g. "9f3c…e1 bulk 17 0/1"
//!   link   the link's id (random per connect); records of other links are skipped
//!   lane   "control" or "bulk"
//!   seq    the host's sequence number, decimal
//!   i/n    piece i of n: a frame larger than the host's max payload is split in n records
//! ```
//!
//! (One header rather than four: each header costs an allocation or two per record on
//! both sides, in librdkafka and across the component boundary; docs/PERFORMANCE.md.)
//! Announcements on `P.connect` carry the new link's id in a `trellis-link` header.
//!
//! The host numbers, acknowledges, resends and de-duplicates frames; this plugin moves
//! them and reassembles chunks. The codec here is plain Rust, tested natively; the
//! component (Kafka calls) is in `component.rs`.

#[cfg(target_arch = "wasm32")]
mod component;

/// The header of an announcement on `P.connect`: the new link's id.
pub const LINK: &str = "trellis-link";
/// The header of a frame piece: `<link> <lane> <seq> <i>/<n>`.
pub const FRAME: &str = "trellis-frame";

pub fn connect_topic(prefix: &str) -> String {
    format!("{prefix}.connect")
}
pub fn to_agent_topic(prefix: &str, agent: &str) -> String {
    format!("{prefix}.{agent}.to-agent")
}
pub fn to_controller_topic(prefix: &str, agent: &str) -> String {
    format!("{prefix}.{agent}.to-controller")
}

/// What a record's headers say about the frame piece it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub link: String,
    /// 0 = control, 1 = bulk (also the partition).
    pub lane: u8,
    pub seq: u64,
    /// This piece's index and the frame's number of pieces.
    pub chunk: u32,
    pub chunks: u32,
}

impl Piece {
    pub fn headers(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::with_capacity(1);
        self.each_header(|k, v| out.push((k.to_string(), v.to_vec())));
        out
    }

    /// The headers, one by one, without allocating (the send path's version of
    /// [`headers`](Self::headers)).
    pub fn each_header(&self, f: impl FnMut(&str, &[u8])) {
        piece_headers(&self.link, self.lane, self.seq, self.chunk, self.chunks, f)
    }

    /// Read a record's headers; a record that is not a Trellis frame piece is an error
    /// naming what is wrong. Headers that are not ours (a tracing interceptor's, say)
    /// may hold any bytes and are ignored.
    pub fn parse<'a>(
        headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<Piece, String> {
        let v = headers
            .into_iter()
            .find(|(k, _)| *k == FRAME)
            .map(|(_, v)| v)
            .ok_or_else(|| format!("no {FRAME} header: not a Trellis frame"))?;
        // Bytes, not str: this runs for every record, and only the link is text.
        let bad = || {
            format!(
                "bad {FRAME} `{}`: want `<link> <lane> <seq> <i>/<n>`",
                String::from_utf8_lossy(v)
            )
        };
        let mut fields = v.split(|b| *b == b' ');
        let (Some(link), Some(lane), Some(seq), Some(chunk), None) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            return Err(bad());
        };
        if link.is_empty() {
            return Err(bad());
        }
        let link = std::str::from_utf8(link)
            .map_err(|_| format!("header {FRAME}: the link is not UTF-8"))?;
        let lane = match lane {
            b"control" => 0,
            b"bulk" => 1,
            _ => return Err(format!("unknown lane `{}`", String::from_utf8_lossy(lane))),
        };
        let seq =
            digits(seq).ok_or_else(|| format!("bad seq `{}`", String::from_utf8_lossy(seq)))?;
        let (chunk, chunks) = chunk
            .iter()
            .position(|b| *b == b'/')
            .and_then(|at| {
                let i = u32::try_from(digits(&chunk[..at])?).ok()?;
                let n = u32::try_from(digits(&chunk[at + 1..])?).ok()?;
                (i < n).then_some((i, n))
            })
            .ok_or_else(|| format!("bad chunk `{}`", String::from_utf8_lossy(chunk)))?;
        Ok(Piece {
            link: link.to_string(),
            lane,
            seq,
            chunk,
            chunks,
        })
    }
}

/// A decimal number (digits only, no sign), if it fits a u64.
fn digits(b: &[u8]) -> Option<u64> {
    if b.is_empty() {
        return None;
    }
    b.iter().try_fold(0u64, |n, d| {
        d.is_ascii_digit()
            .then(|| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
            .flatten()
    })
}

/// `n` in decimal at the end of `buf`; the digits written.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// A piece's header, without allocating: what [`Piece::headers`] gives, for the send
/// path (no `Piece` to build per record).
pub fn piece_headers(
    link: &str,
    lane: u8,
    seq: u64,
    chunk: u32,
    chunks: u32,
    mut f: impl FnMut(&str, &[u8]),
) {
    // Built by hand: `write!` showed in profiles, and this runs for every record.
    let mut out = Vec::new();
    let mut buf = [0u8; 128];
    let mut len = 0;
    let mut d = [0u8; 20];
    for part in [
        link.as_bytes(),
        b" ",
        if lane == 0 { b"control" } else { b"bulk" },
        b" ",
        decimal(seq, &mut d),
    ] {
        put(&mut buf, &mut len, &mut out, part);
    }
    put(&mut buf, &mut len, &mut out, b" ");
    put(&mut buf, &mut len, &mut out, decimal(chunk.into(), &mut d));
    put(&mut buf, &mut len, &mut out, b"/");
    put(&mut buf, &mut len, &mut out, decimal(chunks.into(), &mut d));
    if out.is_empty() {
        f(FRAME, &buf[..len]);
    } else {
        f(FRAME, &out);
    }
}

/// Append to the stack buffer, or to `spill` once it would overflow (a long link id).
fn put(buf: &mut [u8; 128], len: &mut usize, spill: &mut Vec<u8>, part: &[u8]) {
    if spill.is_empty() && *len + part.len() <= buf.len() {
        buf[*len..*len + part.len()].copy_from_slice(part);
        *len += part.len();
    } else {
        if spill.is_empty() {
            spill.extend_from_slice(&buf[..*len]);
        }
        spill.extend_from_slice(part);
    }
}

/// Split a payload into pieces of at most `max` bytes (an empty payload is one piece).
pub fn split(payload: &[u8], max: usize) -> Vec<&[u8]> {
    if payload.is_empty() {
        return vec![payload];
    }
    payload.chunks(max.max(1)).collect()
}

/// Reassembles frames from pieces, per lane. Pieces of a frame arrive in order on
/// their lane's partition; anything else (a gap, another frame's piece in the middle)
/// is a damaged frame: it is dropped with an error, and the host's resend recovers it.
#[derive(Debug, Default)]
pub struct Reassembly {
    /// Per lane, the frame being put together.
    partial: [Option<Partial>; 2],
    /// The largest frame taken (None: `MAX_FRAME`); see `limit_to`.
    limit: Option<usize>,
}

/// The largest frame put together from pieces.
pub const MAX_FRAME: usize = 256 << 20;

/// The largest frame taken before the host has answered the peer's handshake: until
/// then the peer is unauthenticated, and whoever can write to the topic could make the
/// plugin hold pieces without end.
pub const PRE_AUTH_FRAME: usize = 64 << 10;

/// (seq, next piece expected, pieces in all, bytes so far).
type Partial = (u64, u32, u32, Vec<u8>);

impl Reassembly {
    /// Take no frame longer than `max` bytes from now on (a longer one is dropped, its
    /// pieces not kept).
    pub fn limit_to(&mut self, max: usize) {
        self.limit = Some(max);
    }

    /// Take one piece; the whole frame `(lane, seq, payload)` when it was the last.
    /// Damage found on the way (a frame broken off, a piece out of place) is added to
    /// `errors`; the damaged frame is dropped and the host's resend recovers it.
    pub fn push(
        &mut self,
        p: &Piece,
        data: &[u8],
        errors: &mut Vec<String>,
    ) -> Option<(u8, u64, Vec<u8>)> {
        if p.lane > 1 {
            errors.push(format!("frame {}: no lane {}; dropped", p.seq, p.lane));
            return None;
        }
        let limit = self.limit.unwrap_or(MAX_FRAME);
        let slot = &mut self.partial[p.lane as usize];
        let held = slot.as_ref().map_or(0, |(_, _, _, buf)| buf.len());
        if (if p.chunk == 0 { 0 } else { held }) + data.len() > limit {
            slot.take();
            errors.push(format!(
                "frame {}: longer than {limit} bytes, the most taken now; dropped",
                p.seq
            ));
            return None;
        }
        if p.chunk == 0 {
            if let Some((seq, got, _, _)) = slot.take() {
                errors.push(format!(
                    "frame {seq} broke off after {got} piece(s), frame {} started; dropped",
                    p.seq
                ));
            }
            if p.chunks == 1 {
                return Some((p.lane, p.seq, data.to_vec()));
            }
            *slot = Some((p.seq, 1, p.chunks, data.to_vec()));
            return None;
        }
        match slot {
            Some((seq, next, chunks, buf))
                if *seq == p.seq && *next == p.chunk && *chunks == p.chunks =>
            {
                buf.extend_from_slice(data);
                *next += 1;
                if *next < p.chunks {
                    return None;
                }
                let (seq, _, _, buf) = slot.take().expect("present");
                Some((p.lane, seq, buf))
            }
            _ => {
                errors.push(match slot.take() {
                    Some((seq, next, chunks, _)) => format!(
                        "frame {seq}: expected piece {next} of {chunks}, got piece {}/{} of frame {}; dropped",
                        p.chunk, p.chunks, p.seq
                    ),
                    None => format!(
                        "frame {}: piece {} of {} without its start; dropped",
                        p.seq, p.chunk, p.chunks
                    ),
                });
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(lane: u8, seq: u64, chunk: u32, chunks: u32) -> Piece {
        Piece {
            link: "L1".into(),
            lane,
            seq,
            chunk,
            chunks,
        }
    }

    #[test]
    fn frames_over_the_limit_are_dropped_without_holding_their_pieces() {
        let mut r = Reassembly::default();
        r.limit_to(PRE_AUTH_FRAME);
        let mut errors = Vec::new();
        let piece_of = vec![0u8; 40 << 10];
        assert!(
            r.push(&piece(0, 1, 0, 1000), &piece_of, &mut errors)
                .is_none()
        );
        assert!(
            r.push(&piece(0, 1, 1, 1000), &piece_of, &mut errors)
                .is_none()
        );
        assert!(errors[0].contains("longer than 65536"), "{errors:?}");
        assert!(r.partial[0].is_none(), "nothing held");
        let small = r.push(&piece(0, 2, 0, 1), b"hello", &mut errors);
        assert_eq!(small, Some((0, 2, b"hello".to_vec())));
        r.limit_to(MAX_FRAME);
        assert!(r.push(&piece(0, 3, 0, 2), &piece_of, &mut errors).is_none());
        assert!(r.push(&piece(0, 3, 1, 2), &piece_of, &mut errors).is_some());
    }

    #[test]
    fn headers_round_trip_and_foreign_records_are_named() {
        let p = piece(1, 42, 2, 5);
        let h = p.headers();
        let back = Piece::parse(h.iter().map(|(k, v)| (k.as_str(), v.as_slice()))).unwrap();
        assert_eq!(back, p);
        let e = Piece::parse([("other", &b"x"[..])]).unwrap_err();
        assert!(e.contains("not a Trellis frame"), "{e}");
        let e = Piece::parse([(FRAME, &b"L bulk 1 3/3"[..])]).unwrap_err();
        assert!(e.contains("bad chunk"), "{e}");
        for bad in [
            "",
            "L bulk 1",
            "L bulk 1 0/1 extra",
            " bulk 1 0/1",
            "L  bulk 1 0/1",
        ] {
            let e = Piece::parse([(FRAME, bad.as_bytes())]).unwrap_err();
            assert!(
                e.contains("bad trellis-frame") || e.contains("unknown lane"),
                "{bad}: {e}"
            );
        }
        let e = Piece::parse([(FRAME, &b"L side 1 0/1"[..])]).unwrap_err();
        assert!(e.contains("unknown lane `side`"), "{e}");
        let e = Piece::parse([(FRAME, &b"L bulk +1 0/1"[..])]).unwrap_err();
        assert!(e.contains("bad seq"), "{e}");
        let e = Piece::parse([(FRAME, &b"L bulk 99999999999999999999 0/1"[..])]).unwrap_err();
        assert!(e.contains("bad seq"), "{e}");
        // A link too long for the stack buffer takes the other path, same result.
        let long = Piece {
            link: "x".repeat(200),
            ..piece(0, u64::MAX, 0, u32::MAX)
        };
        let h = long.headers();
        assert_eq!(
            Piece::parse(h.iter().map(|(k, v)| (k.as_str(), v.as_slice()))).unwrap(),
            long
        );
        // The readable form the docs promise.
        assert_eq!(
            p.headers(),
            vec![(FRAME.to_string(), b"L1 bulk 42 2/5".to_vec())]
        );
    }

    #[test]
    fn frames_split_and_reassemble_per_lane() {
        let big: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let parts = split(&big, 3000);
        assert_eq!(parts.len(), 4);
        assert_eq!(split(b"", 10).len(), 1);
        let mut r = Reassembly::default();
        let mut errors = Vec::new();
        let n = parts.len() as u32;
        let mut got = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            // a control frame in the middle of the bulk frame's pieces
            if i == 2 {
                got.extend(r.push(&piece(0, 7, 0, 1), b"cancel", &mut errors));
            }
            got.extend(r.push(&piece(1, 3, i as u32, n), part, &mut errors));
        }
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(got, vec![(0, 7, b"cancel".to_vec()), (1, 3, big)]);
    }

    #[test]
    fn damaged_frames_are_dropped_with_an_error_and_the_next_one_survives() {
        let mut r = Reassembly::default();
        let mut errors = Vec::new();
        // a piece without its start
        assert!(r.push(&piece(1, 1, 1, 2), b"x", &mut errors).is_none());
        // a gap: piece 0, then piece 2
        assert!(r.push(&piece(1, 2, 0, 3), b"a", &mut errors).is_none());
        assert!(r.push(&piece(1, 2, 2, 3), b"c", &mut errors).is_none());
        // broken off: a new frame starts before the last one ended
        assert!(r.push(&piece(1, 3, 0, 2), b"a", &mut errors).is_none());
        let whole = r.push(&piece(1, 4, 0, 1), b"whole", &mut errors);
        assert_eq!(whole, Some((1, 4, b"whole".to_vec())));
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].contains("without its start"));
        assert!(errors[1].contains("expected piece 1 of 3, got piece 2/3"));
        assert!(errors[2].contains("broke off"));
        // a piece that changes the frame's piece count, and a lane that does not exist
        errors.clear();
        assert!(r.push(&piece(1, 5, 0, 3), b"a", &mut errors).is_none());
        assert!(r.push(&piece(1, 5, 1, 2), b"b", &mut errors).is_none());
        assert!(r.push(&piece(2, 6, 0, 1), b"x", &mut errors).is_none());
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[1].contains("no lane 2"), "{errors:?}");
    }

    /// Found by the fuzz target (fuzz/fuzz_targets/frame_codec.rs): a binary header that
    /// is not ours (added by an interceptor, say) must not make a good record unreadable.
    #[test]
    fn headers_that_are_not_ours_may_hold_any_bytes() {
        let p = piece(0, 9, 0, 1);
        let mut h = p.headers();
        h.push(("x-trace".into(), vec![0x92, 0x00]));
        let back = Piece::parse(h.iter().map(|(k, v)| (k.as_str(), v.as_slice()))).unwrap();
        assert_eq!(back, p);
    }
}
