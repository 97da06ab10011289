//! The TCP command transport.
//!
//! One TCP connection per agent. Frames travel as records (little-endian):
//!
//! ```text
//! record := length:u32 lane:u8 seq:u64 payload     (length counts lane+seq+payload)
//! ```
//!
//! The host numbers, acknowledges, resends and de-duplicates frames, runs the mutual
//! handshake and seals every frame; this plugin only moves records while the connection
//! lives and says `retryable` when it breaks.
//!
//! Until the host has answered the peer's handshake, the peer is unauthenticated, so a
//! record longer than [`PRE_AUTH_RECORD`] is refused (the connection is dropped) as soon
//! as its length is read, before anything of it is buffered: an accepted connection is
//! bounded until the host has sent twice on it (its challenge, then its welcome, which
//! it sends only to an agent that proved its secret), a connecting one until the host
//! has sent once (the agent's hello, after the controller's challenge). The record codec is plain Rust (tested natively); the
//! socket code in `component.rs` uses `wasi:sockets` directly, because a transport must
//! wait for data *or* a timeout, which needs WASI's pollables.

#[cfg(target_arch = "wasm32")]
mod component;

/// Largest record accepted from the wire; a larger length means a corrupt stream.
pub const MAX_RECORD: usize = 256 << 20;

/// Largest record accepted before the host answered the peer's handshake (the host's
/// own bound on handshake frames, plus the record header).
pub const PRE_AUTH_RECORD: usize = (64 << 10) + 9;
const HEADER: usize = 4 + 1 + 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// 0 = control, 1 = bulk.
    pub lane: u8,
    pub seq: u64,
    pub payload: Vec<u8>,
}

pub fn encode(lane: u8, seq: u64, payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&((1 + 8 + payload.len()) as u32).to_le_bytes());
    out.push(lane);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(payload);
}

/// Take every complete record off the front of `buf`; a record longer than `max`
/// (`MAX_RECORD`, or `PRE_AUTH_RECORD` before the peer is authenticated) is refused.
pub fn decode(buf: &mut Vec<u8>, out: &mut Vec<Record>, max: usize) -> Result<(), String> {
    let mut at = 0;
    while buf.len() - at >= 4 {
        let len = u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
        if len > max && max < MAX_RECORD {
            return Err(format!(
                "a record of {len} bytes before the peer was authenticated (at most {max}): dropping the connection"
            ));
        }
        if !(9..=max).contains(&len) {
            return Err(format!("corrupt stream: record length {len}"));
        }
        if buf.len() - at < 4 + len {
            break;
        }
        let lane = buf[at + 4];
        let seq = u64::from_le_bytes(buf[at + 5..at + HEADER].try_into().expect("8 bytes"));
        out.push(Record {
            lane,
            seq,
            payload: buf[at + HEADER..at + 4 + len].to_vec(),
        });
        at += 4 + len;
    }
    buf.drain(..at);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_across_any_split() {
        let mut wire = Vec::new();
        encode(0, 1, b"start", &mut wire);
        encode(1, 1, &[7; 1000], &mut wire);
        encode(0, 2, b"", &mut wire);
        for cut in 0..wire.len() {
            let mut buf = wire[..cut].to_vec();
            let mut got = Vec::new();
            decode(&mut buf, &mut got, MAX_RECORD).unwrap();
            buf.extend_from_slice(&wire[cut..]);
            decode(&mut buf, &mut got, MAX_RECORD).unwrap();
            assert!(buf.is_empty());
            assert_eq!(got.len(), 3, "cut {cut}");
            assert_eq!(
                got[1],
                Record {
                    lane: 1,
                    seq: 1,
                    payload: vec![7; 1000]
                }
            );
        }
    }

    #[test]
    fn corrupt_lengths_are_refused() {
        let mut buf = 3u32.to_le_bytes().to_vec();
        assert!(
            decode(&mut buf, &mut Vec::new(), MAX_RECORD)
                .unwrap_err()
                .contains("corrupt")
        );
        let mut buf = u32::MAX.to_le_bytes().to_vec();
        assert!(decode(&mut buf, &mut Vec::new(), MAX_RECORD).is_err());
    }

    #[test]
    fn before_authentication_a_large_record_is_refused_from_its_length_alone() {
        // 250 MiB announced: refused on the 4 bytes of its length.
        let mut buf = (250u32 << 20).to_le_bytes().to_vec();
        let e = decode(&mut buf, &mut Vec::new(), PRE_AUTH_RECORD).unwrap_err();
        assert!(e.contains("before the peer was authenticated"), "{e}");
        let mut ok = Vec::new();
        encode(0, 0, &[1; 64 << 10], &mut ok);
        let mut got = Vec::new();
        decode(&mut ok, &mut got, PRE_AUTH_RECORD).unwrap();
        assert_eq!(got.len(), 1);
        // and the same record once authenticated
        let mut buf = Vec::new();
        encode(1, 1, &[1; 1 << 20], &mut buf);
        decode(&mut buf, &mut got, MAX_RECORD).unwrap();
        assert_eq!(got.len(), 2);
    }
}
