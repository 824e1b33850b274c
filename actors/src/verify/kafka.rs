//! `pgcdc verify --kafka`: the Kafka leg. Once the slot confirmed the
//! snapshot's position (every change below it is in Kafka), the table's
//! topic is read from the beginning up to its high watermarks (direct
//! partition assignment, no consumer group) and folded to each key's last
//! change ([`fold`](super::fold)); then every row of the compared key
//! ranges, encoded as the producer would encode it now (`kafka.format`
//! and its modes), is judged against its key's last change. Keys left over
//! are looked up in the snapshot: a live last change without a row is extra.
//! A last change past the snapshot's position, or of a transaction the
//! snapshot does not see (`source.txId`: it was still committing), is
//! newer; the `row` format carries no transaction id and is judged by
//! position alone.
//!
//! Memory: the fold keeps, per key of the table in the topic, its document
//! id and about 80 bytes (LSN, row hash, map overhead), never rows.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use serde_json::{Map, Value};

use super::compare::Kind;
use super::fence::Fence;
use super::fold::{after_of, judge, read_record, Folded};
use super::keys::key_of_doc;
use super::source::Snapshot;
use super::{Finding, Tally, Verifier, VerifyError};
use crate::checkpoint::{KeyRange, KeyText};
use crate::event::ChangeEvent;
use crate::kafka_producer::{EncodedRecord, Encoder, KafkaConfig};
use crate::lsn::Lsn;
use crate::snapshot::shape::Shape;
use crate::wire::header;

/// Longest wait for metadata, watermarks, or the next record.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);
/// One wait for a record, after which the read positions are looked at.
const POLL: Duration = Duration::from_secs(1);

/// What the Kafka leg found for one table.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KafkaLeg {
    /// The topic read.
    pub topic: String,
    /// Records read (up to the high watermarks).
    pub records: u64,
    /// Keys of the table in the topic.
    pub keys: u64,
    /// Rows of the table judged against their key's last change.
    pub compared: u64,
    /// Rows whose key has no live last change.
    pub missing: Tally,
    /// Keys whose last change is live but have no row.
    pub extra: Tally,
    /// Rows that differ from their key's last change (columns not named:
    /// only hashes are kept).
    pub stale: Tally,
    /// Keys whose last change is past the snapshot: not comparable.
    pub newer: Tally,
    /// Differences found while the slot had not confirmed the snapshot's
    /// position within the fence timeout: Kafka may not hold every change yet.
    pub unconfirmed: Tally,
    /// How the wait for the slot ended.
    pub fence: Option<Fence>,
}

impl KafkaLeg {
    /// Whether the topic drifted from the table.
    pub fn drifted(&self) -> bool {
        self.missing.count + self.extra.count + self.stale.count > 0
    }

    /// Count a finding of `kind` (unconfirmed if the slot was behind).
    fn add(&mut self, kind: Kind, finding: &Finding) {
        let behind = matches!(self.fence, Some(Fence::TimedOut(_)));
        let tally = match kind {
            Kind::Newer => &mut self.newer,
            _ if behind => &mut self.unconfirmed,
            Kind::Missing => &mut self.missing,
            Kind::Extra => &mut self.extra,
            Kind::Stale => &mut self.stale,
            Kind::Unconfirmed => &mut self.unconfirmed,
        };
        tally.add(finding);
    }

    /// One line of text.
    pub fn text(&self) -> String {
        let mut out = format!(
            "kafka {}: {} records, {} keys, {} rows compared; missing {}, extra {}, stale {}, newer {}, unconfirmed {}",
            self.topic, self.records, self.keys, self.compared, self.missing.count,
            self.extra.count, self.stale.count, self.newer.count, self.unconfirmed.count
        );
        if let Some(Fence::TimedOut(b)) = &self.fence {
            out.push_str(&format!("\n    {}", b.text()));
        }
        for (name, tally) in [
            ("missing", &self.missing),
            ("extra", &self.extra),
            ("stale", &self.stale),
        ] {
            for f in &tally.first {
                out.push_str(&format!("\n    kafka {name} {}", f.id));
            }
        }
        out
    }
}

impl Verifier {
    /// The Kafka leg of `schema.table`: rows of `ranges` (read in `snaps`,
    /// the first one's snapshot) against the topic; the drifted keys too.
    pub(super) async fn kafka_leg(
        &self,
        snaps: &[Snapshot],
        shape: &Shape,
        ranges: &[KeyRange],
    ) -> Result<(KafkaLeg, Vec<(Kind, Finding)>), VerifyError> {
        let at = snaps[0].cut.at;
        let (schema, name) = (&shape.table.schema, &shape.table.name);
        let mut leg = KafkaLeg {
            topic: self.kafka.topic_for(schema, name),
            ..KafkaLeg::default()
        };
        leg.fence = Some(self.slot_fence(at).await?);
        let (kafka, topic, table) = (
            self.kafka.clone(),
            leg.topic.clone(),
            format!("{schema}.{name}"),
        );
        let folded = tokio::task::spawn_blocking(move || read_topic(&kafka, &topic, &table, at))
            .await
            .map_err(|e| VerifyError::Internal(format!("kafka reader: {e}")))??;
        (leg.records, leg.keys) = (folded.records, folded.keys.len() as u64);
        let mut folded = folded;
        let mut found = Vec::new();
        for range in ranges {
            self.judge_range(
                &snaps[0],
                shape,
                range.clone(),
                &mut folded,
                &mut leg,
                &mut found,
            )
            .await?;
        }
        self.judge_left(&snaps[0], shape, folded, &mut leg, &mut found)
            .await?;
        tracing::info!(table = %format!("{schema}.{name}"), topic = %leg.topic, records = leg.records, missing = leg.missing.count, extra = leg.extra.count, stale = leg.stale.count, "kafka leg verified");
        let drift = found
            .into_iter()
            .filter(|(k, _)| *k != Kind::Newer)
            .collect();
        Ok((leg, drift))
    }

    /// Wait until the slot confirmed `at` (everything below it is in Kafka).
    async fn slot_fence(&self, at: Lsn) -> Result<Fence, VerifyError> {
        let sql = crate::pg::connect(&self.pg).await?;
        let pipeline = self.pipeline(&sql);
        let deadline = Instant::now() + self.opts.fence_timeout();
        Ok(match pipeline.slot_reached(at, deadline).await? {
            None => Fence::Reached,
            Some(behind) => Fence::TimedOut(behind),
        })
    }

    /// Judge the rows of `range` against their keys' last changes.
    async fn judge_range(
        &self,
        snap: &Snapshot,
        shape: &Shape,
        mut range: KeyRange,
        folded: &mut Folded,
        leg: &mut KafkaLeg,
        found: &mut Vec<(Kind, Finding)>,
    ) -> Result<(), VerifyError> {
        let limit = self.opts.chunk_rows;
        loop {
            let events = snap.chunk_events(shape, &range, limit).await?;
            let Some((last_key, _)) = events.last() else {
                break;
            };
            let next = Some(last_key.clone());
            let mut encoder = Encoder::new(&self.kafka, &self.pg.database, 0);
            for (key, event) in &events {
                let Some((id, row)) = self.as_produced(&mut encoder, event) else {
                    continue;
                };
                let last = folded.take(&id);
                if let Some(kind) = judge(Some(&row), last.as_ref(), &snap.cut) {
                    note(leg, found, kind, id, Some(key.clone()));
                }
            }
            leg.compared += events.len() as u64;
            if events.len() < limit {
                break;
            }
            range.after = next;
        }
        Ok(())
    }

    /// Keys of the topic no compared row took: extra if their last change
    /// is live and no row has their key (a sampled run compared only some).
    async fn judge_left(
        &self,
        snap: &Snapshot,
        shape: &Shape,
        left: Folded,
        leg: &mut KafkaLeg,
        found: &mut Vec<(Kind, Finding)>,
    ) -> Result<(), VerifyError> {
        let names = shape.key_columns();
        let mut candidates: Vec<(String, Option<KeyText>)> = Vec::new();
        let keys: Vec<_> = left
            .keys
            .iter()
            .map(|(id, l)| (id.clone(), l.clone()))
            .collect();
        for (id, last) in keys {
            let last = left.effective(Some(last));
            match judge(None, last.as_ref(), &snap.cut) {
                Some(Kind::Newer) => note(leg, found, Kind::Newer, id, None),
                Some(_) => {
                    let key = key_of_doc(&id, &Map::new(), &names);
                    candidates.push((id, key));
                }
                None => {}
            }
        }
        for chunk in candidates.chunks(self.opts.chunk_rows) {
            let wanted: Vec<KeyText> = chunk.iter().filter_map(|(_, k)| k.clone()).collect();
            let rows = snap.lookup(shape, &wanted).await?;
            let present: std::collections::HashSet<String> =
                rows.into_iter().map(|r| r.id).collect();
            for (id, key) in chunk {
                let unknown = key.is_none() && self.sample.is_some_and(|f| f < 1.0);
                if !present.contains(id) && !unknown {
                    note(leg, found, Kind::Extra, id.clone(), key.clone());
                }
            }
        }
        Ok(())
    }

    /// The document id and row of a table event as the producer would write it now.
    fn as_produced(
        &self,
        encoder: &mut Encoder<'_>,
        event: &ChangeEvent,
    ) -> Option<(String, Map<String, Value>)> {
        let mut out: Vec<EncodedRecord> = Vec::with_capacity(1);
        encoder.event(event, None, &mut out);
        let record = out.into_iter().next()?;
        let id = crate::es_writer::doc_id(&event.key.as_ref()?.to_map());
        let (row, _) = after_of(self.kafka.format, record.value.as_deref()?)?;
        Some((id, row))
    }
}

/// Count a finding in `leg`; drift (and newer) in `found` too.
fn note(
    leg: &mut KafkaLeg,
    found: &mut Vec<(Kind, Finding)>,
    kind: Kind,
    id: String,
    key: Option<KeyText>,
) {
    let finding = Finding {
        id,
        columns: Vec::new(),
        key,
    };
    leg.add(kind.clone(), &finding);
    found.push((kind, finding));
}

/// Read `topic` from the beginning, folding the records of `table`
/// (blocking), at least up to its high watermarks as they are now: every
/// change below `at` is there, and records past it are harmless (their
/// commit LSN marks them newer). A partition is done once its watermark
/// was passed and then a change past `at` arrives or the partition goes
/// quiet: some brokers (tansu) report the base offset of the last batch,
/// not its end, as the high watermark.
fn read_topic(
    kafka: &KafkaConfig,
    topic: &str,
    table: &str,
    at: Lsn,
) -> Result<Folded, VerifyError> {
    let consumer = consumer(kafka)?;
    let mut ends = assign_all(&consumer, topic)?;
    let mut reached = HashSet::new();
    let mut folded = Folded::default();
    let mut heard = Instant::now();
    while !ends.is_empty() {
        let Some(message) = consumer.poll(POLL) else {
            // Quiet: a partition whose watermark was passed is done.
            ends.retain(|p, _| !reached.contains(p));
            if heard.elapsed() > KAFKA_TIMEOUT && !ends.is_empty() {
                return Err(VerifyError::Internal(format!(
                    "kafka: no record from {topic} in {KAFKA_TIMEOUT:?}"
                )));
            }
            continue;
        };
        heard = Instant::now();
        let m = message.map_err(VerifyError::Kafka)?;
        let Some(&high) = ends.get(&m.partition()) else {
            continue;
        };
        let text = |name: &str| header_text(&m, name);
        let (t, op, lsn) = (
            text(header::TABLE),
            text(header::OP),
            text(header::COMMIT_LSN),
        );
        if reached.contains(&m.partition()) && lsn.parse::<Lsn>().is_ok_and(|l| l > at) {
            ends.remove(&m.partition());
        }
        folded.add(read_record(
            kafka.format,
            table,
            (&t, &op, &lsn),
            m.key(),
            m.payload(),
        ));
        if m.offset() + 1 >= high {
            reached.insert(m.partition());
        }
    }
    Ok(folded)
}

/// A consumer of the configured cluster for direct assignments.
fn consumer(kafka: &KafkaConfig) -> Result<BaseConsumer, VerifyError> {
    let mut cc = kafka.client_base("pgcdc-verify");
    // librdkafka wants a group id even for a direct assignment; it joins
    // no group and commits nothing with it.
    cc.set("group.id", "pgcdc-verify")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false");
    Ok(cc.create()?)
}

/// Assign every non-empty partition of `topic` from its beginning; their
/// high watermarks.
fn assign_all(consumer: &BaseConsumer, topic: &str) -> Result<HashMap<i32, i64>, VerifyError> {
    let metadata = consumer.fetch_metadata(Some(topic), KAFKA_TIMEOUT)?;
    let mut ends = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
        let (low, high) = consumer.fetch_watermarks(topic, p.id(), KAFKA_TIMEOUT)?;
        tracing::debug!(topic, partition = p.id(), low, high, "kafka leg reads");
        if high > low {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
            ends.insert(p.id(), high);
        }
    }
    if !ends.is_empty() {
        consumer.assign(&tpl)?;
    }
    Ok(ends)
}

/// A header's value as text (empty if absent).
fn header_text<M: Message>(m: &M, name: &str) -> String {
    m.headers()
        .and_then(|h| h.iter().find(|h| h.key == name))
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}
