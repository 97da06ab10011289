//! Fuzz the Kafka transport's frame codec: record headers <-> `Piece`, `split`, and
//! `Reassembly`. Run: `cargo +nightly fuzz run frame_codec` (see docs/TESTING.md).
#![no_main]

use arbitrary::Arbitrary;
use kafka_transport::{FRAME, Piece, Reassembly, split};
use libfuzzer_sys::fuzz_target;

/// A header key: mostly the Trellis one, so the fuzzer spends its time on it.
#[derive(Arbitrary, Debug)]
enum Key {
    Frame,
    Other(String),
}

/// One record's worth of piece fields, from small ranges so that pieces collide.
#[derive(Arbitrary, Debug)]
struct Record {
    link: u8,   // one of 3 links
    lane: u8,   // 0..=2: 2 is no lane
    seq: u8,    // 0..=3
    chunk: u8,  // 0..=4
    chunks: u8, // 0..=4: chunk >= chunks happens
    data: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    headers: Vec<(Key, Vec<u8>)>,
    records: Vec<Record>,
    frame: Vec<u8>,
    max: u8,
    bulk: bool,
    seq: u64,
}

fn parse(h: &[(String, Vec<u8>)]) -> Result<Piece, String> {
    Piece::parse(h.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
}

fuzz_target!(|input: Input| {
    parse_round_trips(&input.headers);
    reassembly_follows_its_rules(&input.records);
    split_then_reassemble(
        &input.frame,
        usize::from(input.max) + 1,
        input.bulk,
        input.seq,
    );
});

/// (a) Any header set: `parse` never panics, and what it accepts is a valid piece
/// whose own `headers()` parse back to it.
fn parse_round_trips(headers: &[(Key, Vec<u8>)]) {
    let h: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(k, v)| {
            let k = match k {
                Key::Frame => FRAME,
                Key::Other(k) => k,
            };
            (k.to_string(), v.clone())
        })
        .collect();
    if let Ok(p) = parse(&h) {
        assert!(p.lane <= 1 && p.chunk < p.chunks, "{p:?}");
        assert_eq!(parse(&p.headers()), Ok(p));
    }
}

/// (b) Records as the component receives them. Every piece, even one `parse` would
/// refuse (lane 2, chunk >= chunks, another link), is pushed into `any`: it must not
/// panic, and nothing more is promised. The pieces the component passes on (parsed,
/// of its own link `L0`) go into `ours`, checked against the rule in lib.rs: a lane
/// gives a frame exactly when it has got pieces 0..n of one seq in a row since its
/// last piece 0, and the frame is their payloads joined in order.
fn reassembly_follows_its_rules(records: &[Record]) {
    let (mut any, mut ours) = (Reassembly::default(), Reassembly::default());
    let mut errors = Vec::new();
    // Per lane, the pieces since its last piece 0 (emptied when a frame comes out).
    let mut runs: [Vec<(Piece, &[u8])>; 2] = Default::default();
    for r in records {
        let raw = Piece {
            link: format!("L{}", r.link % 3),
            lane: r.lane % 3,
            seq: u64::from(r.seq % 4),
            chunk: u32::from(r.chunk % 5),
            chunks: u32::from(r.chunks % 5),
        };
        any.push(&raw, &r.data, &mut errors);

        // What the component does: parse the record's headers, skip other links.
        let lane = ["control", "bulk", "other"][raw.lane as usize];
        let headers = [(
            FRAME.to_string(),
            format!("{} {lane} {} {}/{}", raw.link, raw.seq, raw.chunk, raw.chunks).into_bytes(),
        )];
        let Ok(p) = parse(&headers) else { continue };
        if p.link != "L0" {
            continue;
        }

        let run = &mut runs[p.lane as usize];
        // A frame was under way on this lane: a new piece 0 breaks it off (one error).
        let pending = !run.is_empty() && in_order(run);
        if p.chunk == 0 {
            run.clear();
        }
        run.push((p.clone(), &r.data));
        let fine = in_order(run);
        // The frame ends at its last piece (all its pieces agree on how many there are).
        let expected: Option<(u8, u64, Vec<u8>)> = (fine && p.chunk + 1 == p.chunks).then(|| {
            (
                p.lane,
                p.seq,
                run.iter().flat_map(|(_, d)| d.iter().copied()).collect(),
            )
        });

        let before = errors.len();
        let got = ours.push(&p, &r.data, &mut errors);
        assert_eq!(got, expected, "{p:?}");
        let new_errors = usize::from(p.chunk == 0 && pending) + usize::from(!fine);
        assert_eq!(errors.len() - before, new_errors, "{:?}", &errors[before..]);
        if got.is_some() {
            run.clear();
        }
    }
}

/// Pieces 0, 1, 2, ... of one seq, all saying the same number of pieces.
fn in_order(run: &[(Piece, &[u8])]) -> bool {
    run.iter().enumerate().all(|(i, (p, _))| {
        p.chunk as usize == i && p.seq == run[0].0.seq && p.chunks == run[0].0.chunks
    })
}

/// (c) What `send` and `receive` do: split a frame, put each piece's headers on a
/// record, parse them back, reassemble; exactly the frame comes out, once, at the end.
fn split_then_reassemble(frame: &[u8], max: usize, bulk: bool, seq: u64) {
    let pieces = split(frame, max);
    assert!(pieces.iter().all(|d| d.len() <= max));
    let mut r = Reassembly::default();
    let mut errors = Vec::new();
    let mut out = Vec::new();
    for (i, data) in pieces.iter().enumerate() {
        let sent = Piece {
            link: "L0".into(),
            lane: u8::from(bulk),
            seq,
            chunk: i as u32,
            chunks: pieces.len() as u32,
        };
        let p = parse(&sent.headers()).expect("own headers parse");
        out.extend(r.push(&p, data, &mut errors));
    }
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(out, vec![(u8::from(bulk), seq, frame.to_vec())]);
}
