//! Drop-in for Debezium's consumers: records land on the partitions the
//! Java client would choose (checked against murmur2 computed here, from
//! its definition, not with pgcdc's or librdkafka's code).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use crate::support::{config, pg_and_tansu, wait_slot_active};

const TOPIC: &str = "cdc-events";

/// Kafka's murmur2 as the Java client defines it (`Utils.murmur2`): seed
/// 0x9747b28c, m 0x5bd1e995, r 24, little-endian 4-byte blocks.
fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let blocks = data.chunks_exact(4);
    let tail = blocks.remainder();
    for b in blocks {
        let mut k = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    if !tail.is_empty() {
        for (i, byte) in tail.iter().enumerate().rev() {
            h ^= u32::from(*byte) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^ (h >> 15)
}

/// The Java client's partition of `key` among `n`: the positive part of
/// murmur2 (`hash & 0x7fffffff`) modulo `n`.
fn java_partition(key: &[u8], n: u32) -> i32 {
    ((murmur2(key) & 0x7fff_ffff) % n) as i32
}

#[test]
fn the_reference_murmur2_matches_the_java_clients_published_values() {
    // Values from the Java client's own unit test of Utils.murmur2.
    for (text, expected) in [
        ("21", -973_932_308),
        ("foobar", -790_332_482),
        ("a-little-bit-long-string", -985_981_536),
        ("a-little-bit-longer-string", -1_486_304_829),
        ("abc", 479_470_107),
    ] {
        assert_eq!(murmur2(text.as_bytes()) as i32, expected, "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_land_on_the_partitions_the_java_client_would_choose() {
    let (pg, tansu, dir, db) = pg_and_tansu().await;
    db.batch_execute("CREATE TABLE accounts (id int PRIMARY KEY, region text, note text)")
        .await
        .unwrap();
    let state = dir.path().join("state");
    let cfg = config(&pg, &tansu, &state, &["accounts"], "")
        .replace("topic_partitions = 1\n", "topic_partitions = 3\n");
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute(
        "INSERT INTO accounts SELECT g, 'r' || (g % 7), md5(g::text) FROM generate_series(1, 60) g",
    )
    .await
    .unwrap();
    let records =
        crate::support::read_until(&tansu, TOPIC, Duration::from_secs(60), |r| r.len() >= 60);
    assert_eq!(records.len(), 60);
    let mut used = BTreeSet::new();
    for r in &records {
        let key = r.key_bytes.as_deref().unwrap();
        assert_eq!(
            r.partition,
            java_partition(key, 3),
            "key {}",
            String::from_utf8_lossy(key)
        );
        used.insert(r.partition);
    }
    assert_eq!(used.len(), 3, "60 keys should use every partition");
    let status = daemon.terminate(Duration::from_secs(30)).unwrap();
    assert_eq!(status.code(), Some(0), "log:\n{}", daemon.log_text());
}
