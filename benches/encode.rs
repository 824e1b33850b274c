//! pgcdc's own work per streamed row, in one thread and without any
//! service (not a timed test): pgoutput messages decoded, assembled into
//! change events and encoded as Kafka records, for rows shaped like the
//! `pipeline` benchmark's (bigint key, two texts, an int, a timestamptz),
//! 1,000 rows per transaction. This is the part of the CPU per row that is
//! pgcdc's code rather than librdkafka's or the kernel's, measured without
//! the noise of services sharing the machine.
//!
//! Prints the time per row of decoding alone (the least any pgoutput
//! consumer does) next to the whole path, best of `ROUNDS`.
//!
//! Run with `cargo bench --bench encode` (scripts/bench.sh).

#![allow(clippy::unwrap_used)]

use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use pgcdc_actors::kafka_producer::{Encoder, KafkaConfig};
use pgcdc_actors::lsn::Lsn;
use pgcdc_actors::replication::decode::decode;
use pgcdc_actors::replication::Assembler;
use pgcdc_testkit::bench::{self, Target};

// The daemon's allocator: allocation is a large part of this path.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Rows per round.
const ROWS: u64 = 1_000_000;
/// Rows per transaction, as in the `pipeline` benchmark.
const ROWS_PER_TX: u64 = 1_000;
/// Rounds; the fastest counts.
const ROUNDS: usize = 5;
/// The relation's OID.
const REL: u32 = 16_384;

/// A NUL-terminated string.
fn cstr(b: &mut BytesMut, s: &str) {
    b.put_slice(s.as_bytes());
    b.put_u8(0);
}

/// The Relation message of `public.bench`.
fn relation() -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(b'R');
    b.put_u32(REL);
    cstr(&mut b, "public");
    cstr(&mut b, "bench");
    b.put_u8(b'd');
    let columns: [(&str, u32, bool); 5] = [
        ("id", 20, true),
        ("a", 25, false),
        ("b", 25, false),
        ("n", 23, false),
        ("ts", 1184, false),
    ];
    b.put_u16(columns.len() as u16);
    for (name, oid, key) in columns {
        b.put_u8(u8::from(key));
        cstr(&mut b, name);
        b.put_u32(oid);
        b.put_i32(-1);
    }
    b.freeze()
}

/// The Insert message of row `id`, with values as the pipeline writes them.
fn insert(id: u64) -> Bytes {
    let values = [
        id.to_string(),
        format!(
            "{:032x}",
            u128::from(id).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ),
        format!("row {id}"),
        (id % 1000).to_string(),
        "2026-12-01 10:17:32.123456+00".to_owned(),
    ];
    let mut b = BytesMut::new();
    b.put_u8(b'I');
    b.put_u32(REL);
    b.put_u8(b'N');
    b.put_u16(values.len() as u16);
    for v in values {
        b.put_u8(b't');
        b.put_u32(v.len() as u32);
        b.put_slice(v.as_bytes());
    }
    b.freeze()
}

/// The Begin and Commit messages of transaction `xid` ending at `lsn`.
fn begin_commit(xid: u32, lsn: u64) -> (Bytes, Bytes) {
    let mut b = BytesMut::new();
    b.put_u8(b'B');
    b.put_u64(lsn);
    b.put_i64(850_000_000_000_000);
    b.put_u32(xid);
    let mut c = BytesMut::new();
    c.put_u8(b'C');
    c.put_u8(0);
    c.put_u64(lsn);
    c.put_u64(lsn + 1);
    c.put_i64(850_000_000_000_000);
    (b.freeze(), c.freeze())
}

/// Seconds per row of the fastest of `ROUNDS` runs of `round`.
fn best(mut round: impl FnMut() -> usize) -> f64 {
    let mut fastest = f64::INFINITY;
    for _ in 0..ROUNDS {
        let t0 = Instant::now();
        let n = std::hint::black_box(round());
        assert_eq!(n as u64, ROWS, "every row made one record");
        fastest = fastest.min(t0.elapsed().as_secs_f64());
    }
    fastest / ROWS as f64
}

fn main() {
    let rel = relation();
    let messages: Vec<Bytes> = (0..ROWS / ROWS_PER_TX)
        .flat_map(|t| {
            let (b, c) = begin_commit(t as u32 + 1, (t + 1) * 1_000_000);
            let rows = (t * ROWS_PER_TX..(t + 1) * ROWS_PER_TX).map(insert);
            std::iter::once(b).chain(rows).chain(std::iter::once(c))
        })
        .collect();

    let decoding = best(|| {
        let rows = messages.iter().map(|m| decode(m).unwrap());
        rows.filter(|m| {
            matches!(
                m,
                pgcdc_actors::replication::decode::PgOutputMessage::Insert { .. }
            )
        })
        .count()
    });

    let kafka = KafkaConfig::default();
    let table = pgcdc_actors::event::TableRef {
        schema: "public".into(),
        name: "bench".into(),
        key_columns: vec!["id".into()],
        key_source: Default::default(),
        column_types: String::new(),
    };
    let whole = best(|| {
        let mut assembler = Assembler::new(&[std::sync::Arc::new(table.clone())]);
        assembler
            .apply(decode(&rel).unwrap(), Lsn(1), &mut Vec::new())
            .unwrap();
        let mut events = Vec::with_capacity(ROWS_PER_TX as usize);
        let mut records = Vec::with_capacity(2);
        let mut bytes = 0usize;
        let mut n = 0;
        for (i, m) in messages.iter().enumerate() {
            assembler
                .apply(decode(m).unwrap(), Lsn(i as u64), &mut events)
                .unwrap();
            if events.len() as u64 == ROWS_PER_TX {
                let mut encoder = Encoder::new(&kafka, "bench", 1_700_000_000_000);
                for e in events.drain(..) {
                    encoder.event(&e, None, &mut records);
                    for r in records.drain(..) {
                        bytes += r.value.as_ref().map_or(0, Vec::len);
                        n += 1;
                        encoder.recycle(r); // as the producer does once librdkafka copied it
                    }
                }
            }
        }
        assert!(bytes > 0);
        n
    });

    println!();
    println!("pgcdc's own path per streamed row, one thread, no services, best of {ROUNDS} rounds of {ROWS} rows:");
    println!("{:<62} {:>8}", "", "µs/row");
    println!("{:<62} {:>8.2}", "decoding pgoutput alone", decoding * 1e6);
    println!(
        "{:<62} {:>8.2}",
        "decode + assemble + encode (key, envelope, headers' texts)",
        whole * 1e6
    );
    bench::figure(
        "own path per streamed row, no broker (µs)",
        &format!("{:.2} µs", whole * 1e6),
        &format!("decoding alone {:.2} µs", decoding * 1e6),
        whole * 1e6,
        Target::AtMost(3.0),
    );
}
