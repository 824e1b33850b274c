//! Encoding a batch, handing its records to librdkafka and counting their
//! acknowledgements.
//!
//! Records are encoded and handed over one at a time. Once librdkafka holds
//! its own copy, a record's buffers take the next record (those above 64 KiB
//! are freed), so a batch of wide rows never exists twice in memory; a full
//! local queue (`max_inflight_records`, `max_inflight_bytes`) is waited out.
//! A record above `message.max.bytes` stops the pipeline with an error
//! naming it, or with `kafka.oversized = "dead_letter"` is replaced by a
//! small description of it on the dead-letter topic, counted and audited
//! like any dead letter. A record the broker refuses as too large is named
//! in the delivery error.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext};
use serde_json::json;
use tokio::sync::Notify;

use super::partition::{Partitioning, Pins};
use super::transaction::TxPlan;
use super::{EncodedRecord, Encoder, KafkaConfig};
use crate::error::{OversizedRecord, ProducerError, SizeLimit};
use crate::event::{ChangeEvent, CopiedRows};
use crate::wire::header;

/// Headers on every record: table, op, commit LSN, column types (and a
/// reason on a dead letter).
const HEADERS_PER_RECORD: usize = 5;
/// How long to wait before offering a record again when librdkafka's local
/// queue is full: long enough for its I/O thread to drain some, short enough
/// not to idle the pipeline.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(5);
/// Longest key text quoted in an error or a dead letter; longer keys (a
/// whole-row key of a wide row) are cut.
const KEY_TEXT_MAX: usize = 256;
/// The dead letter's reason for a record above `message.max.bytes`.
const TOO_LARGE: &str = "record too large for kafka";

/// The acknowledgements one batch still waits for. Every record of the batch
/// carries the same `Arc` as its delivery opaque, so an acknowledgement costs
/// a counter decrement instead of a channel per record.
pub(super) struct BatchAck {
    remaining: AtomicUsize,
    /// The first delivery error of the batch.
    error: Mutex<Option<ProducerError>>,
    done: Notify,
}

impl BatchAck {
    /// Waits for `records` acknowledgements.
    pub(super) fn new(records: usize) -> Arc<Self> {
        let ack = Arc::new(Self {
            remaining: AtomicUsize::new(records),
            error: Mutex::new(None),
            done: Notify::new(),
        });
        if records == 0 {
            ack.done.notify_one();
        }
        ack
    }

    /// One record's delivery report; the last one wakes [`BatchAck::wait`].
    pub(super) fn delivered(&self, error: Option<ProducerError>) {
        if let Some(e) = error {
            if let Ok(mut first) = self.error.lock() {
                first.get_or_insert(e);
            }
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_one();
        }
    }

    /// Wait until every record is acknowledged; the first error, if any.
    pub(super) async fn wait(&self) -> Result<(), ProducerError> {
        self.done.notified().await;
        match self.error.lock().map(|mut e| e.take()) {
            Ok(Some(e)) => Err(e),
            Ok(None) => Ok(()),
            Err(_) => Err(KafkaError::Canceled.into()),
        }
    }
}

/// Counts each batch's acknowledgements down (librdkafka's delivery
/// callback, on the producer's polling thread).
pub(super) struct AckContext;

/// The producer's name in refusals.
const CLIENT: &str = "pgcdc";

impl ClientContext for AckContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        super::running_log(CLIENT, level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        super::running_error(CLIENT, &error, reason);
    }
}

impl ProducerContext for AckContext {
    type DeliveryOpaque = Arc<BatchAck>;

    fn delivery(&self, result: &DeliveryResult<'_>, ack: Arc<BatchAck>) {
        ack.delivered(result.as_ref().err().map(|(e, m)| delivery_error(e, m)));
    }
}

/// The producer with its acknowledgement counting.
pub(super) type Producer = super::polled::PolledProducer<AckContext>;

/// A failed delivery as a [`ProducerError`]; a record the broker found too
/// large is named.
fn delivery_error(error: &KafkaError, msg: &BorrowedMessage<'_>) -> ProducerError {
    let too_large = matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge)
    );
    if !too_large {
        return error.clone().into();
    }
    let text = |name: &str| {
        let headers = msg.headers()?;
        let h = headers.iter().find(|h| h.key == name)?;
        h.value.map(|v| String::from_utf8_lossy(v).into_owned())
    };
    let headers: usize = msg.headers().map_or(0, |hs| {
        hs.iter()
            .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len))
            .sum()
    });
    ProducerError::TooLarge(Box::new(OversizedRecord {
        table: text(header::TABLE).unwrap_or_default(),
        key: key_text(msg.key()),
        commit_lsn: text(header::COMMIT_LSN).unwrap_or_default(),
        size: msg.key().map_or(0, <[u8]>::len) + msg.payload_len() + headers,
        limit: SizeLimit::Broker,
    }))
}

/// A key as text for an error or a dead letter, cut to [`KEY_TEXT_MAX`] bytes.
fn key_text(key: Option<&[u8]>) -> String {
    let Some(key) = key else {
        return "(none)".into();
    };
    let cut = &key[..key.len().min(KEY_TEXT_MAX)];
    let mut text = String::from_utf8_lossy(cut).into_owned();
    if cut.len() < key.len() {
        text.push('…');
    }
    text
}

/// Key, value and header bytes of `r`, as librdkafka counts a record against
/// `message.max.bytes` (without its fixed framing).
fn record_size(r: &EncodedRecord) -> usize {
    let headers = header::TABLE.len()
        + r.table.len()
        + header::OP.len()
        + r.op.len()
        + header::COMMIT_LSN.len()
        + r.commit_lsn.len()
        + header::TYPES.len()
        + r.types.len();
    r.key.as_ref().map_or(0, Vec::len) + r.value.as_ref().map_or(0, Vec::len) + headers
}

/// One batch to encode and hand over, owned by its future.
pub(super) struct BatchJob {
    /// The producer.
    pub producer: Arc<Producer>,
    /// The `[kafka]` section.
    pub config: Arc<KafkaConfig>,
    /// The partition of each change record.
    pub partitioning: Arc<Partitioning>,
    /// The database name, for the envelopes.
    pub database: Arc<str>,
    /// Where records above `message.max.bytes` go; `None`: they are fatal.
    pub dead_letters: Option<Arc<str>>,
    /// The records' timestamp (when the batch was received).
    pub now_ms: i64,
    /// The replication session, for errors.
    pub session: u64,
    /// The batch's changes.
    pub events: Vec<ChangeEvent>,
    /// Snapshot rows, published after `events`.
    pub rows: Option<CopiedRows>,
    /// How many records `events`, `rows` and `tx` make.
    pub records: usize,
    /// Transaction metadata of `events` (empty unless `kafka.transaction_metadata`).
    pub tx: TxPlan,
}

impl BatchJob {
    /// Encode every change and row and hand the records over one at a
    /// time, each change dropped once encoded; the batch's acknowledgement
    /// counter once every record is with librdkafka.
    pub async fn enqueue(self) -> Result<Arc<BatchAck>, ProducerError> {
        let ack = BatchAck::new(self.records);
        let out = Enqueue {
            producer: &self.producer,
            ack: &ack,
            now_ms: self.now_ms,
            dead_letters: self.dead_letters.as_deref(),
            limit: self.config.max_message_bytes().unwrap_or_default(),
            place: Some((&*self.partitioning, self.partitioning.pins())),
        };
        let mut encoder = Encoder::new(&self.config, &self.database, self.now_ms);
        let mut records = Vec::with_capacity(2);
        let mut tx = self.tx;
        let total = self.events.len();
        let huge = self.config.queue_bytes() / 2;
        for (i, event) in self.events.into_iter().enumerate() {
            if event.row_bytes() > huge {
                // Its record cannot sit beside another of its size: encode
                // it once librdkafka has room, not while it holds the last.
                self.producer.emptied(QUEUE_FULL_WAIT).await;
            }
            records.extend(tx.marks_before(i));
            encoder.event(&event, tx.block(i), &mut records);
            drop(event); // its row, before the encoded copy goes to librdkafka
            for r in records.drain(..) {
                encoder.recycle(out.record(r).await?);
            }
        }
        for r in tx.marks_before(total) {
            out.record(r).await?;
        }
        if let Some(rows) = self.rows {
            let (config, database) = (self.config.clone(), self.database.clone());
            for r in encode_rows(config, database, self.now_ms, rows, self.session).await? {
                out.record(r).await?;
            }
        }
        Ok(ack)
    }
}

/// Hand one record outside any batch to librdkafka and wait for its
/// acknowledgement.
pub(super) async fn send_one(
    producer: &Producer,
    record: EncodedRecord,
    now_ms: i64,
) -> Result<(), ProducerError> {
    let ack = BatchAck::new(1);
    let out = Enqueue {
        producer,
        ack: &ack,
        now_ms,
        dead_letters: None,
        limit: 0,
        place: None,
    };
    out.record(record).await?;
    ack.wait().await
}

/// Encode snapshot rows (one `op=r` record each) on the blocking pool, off
/// the actor's thread, while the readers fetch the next chunks.
async fn encode_rows(
    config: Arc<KafkaConfig>,
    database: Arc<str>,
    now_ms: i64,
    rows: CopiedRows,
    session: u64,
) -> Result<Vec<EncodedRecord>, ProducerError> {
    tokio::task::spawn_blocking(move || {
        let mut records = Vec::new();
        Encoder::new(&config, &database, now_ms).rows(&rows, &mut records);
        records
    })
    .await
    .map_err(|e| {
        tracing::error!(error = %e, "encoding snapshot rows failed");
        ProducerError::SessionClosed(session)
    })
}

/// Where one batch's records go.
struct Enqueue<'a> {
    /// The producer.
    producer: &'a Producer,
    /// The batch's acknowledgement counter.
    ack: &'a Arc<BatchAck>,
    /// The records' timestamp (when the batch was encoded).
    now_ms: i64,
    /// Where records above `message.max.bytes` go; `None`: they are fatal.
    dead_letters: Option<&'a str>,
    /// The producer's `message.max.bytes`.
    limit: usize,
    /// Where change records go among their topic's partitions (`None`:
    /// librdkafka's partitioner places every record).
    place: Option<(&'a Partitioning, Pins)>,
}

impl Enqueue<'_> {
    /// Hand `record` to librdkafka (or its description to the dead-letter
    /// topic if it is too large); what was handed over comes back once
    /// librdkafka copied it, for its buffers to be reused or dropped.
    async fn record(&self, record: EncodedRecord) -> Result<EncodedRecord, ProducerError> {
        match self.offer(&record, None).await {
            Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)) => {
                self.oversized(record).await
            }
            other => {
                other?;
                Ok(record)
            }
        }
    }

    /// A record librdkafka refused as larger than `message.max.bytes`; its
    /// dead letter once handed over.
    async fn oversized(&self, record: EncodedRecord) -> Result<EncodedRecord, ProducerError> {
        let refused = OversizedRecord {
            table: record.table.to_string(),
            key: key_text(record.key.as_deref()),
            commit_lsn: record.commit_lsn.to_string(),
            size: record_size(&record),
            limit: SizeLimit::Producer(self.limit),
        };
        let Some(topic) = self.dead_letters else {
            return Err(ProducerError::TooLarge(Box::new(refused)));
        };
        let letter = dead_letter(record, &refused, topic);
        audit(&refused, &letter, topic);
        self.offer(&letter, Some(TOO_LARGE)).await?;
        crate::metrics::metrics().dead_letters.inc();
        Ok(letter)
    }

    /// Offer `r` to librdkafka until its local queue has room for it.
    async fn offer(&self, r: &EncodedRecord, reason: Option<&str>) -> Result<(), KafkaError> {
        let mut headers = OwnedHeaders::new_with_capacity(HEADERS_PER_RECORD)
            .insert(Header {
                key: header::TABLE,
                value: Some(&*r.table),
            })
            .insert(Header {
                key: header::OP,
                value: Some(r.op),
            })
            .insert(Header {
                key: header::COMMIT_LSN,
                value: Some(&*r.commit_lsn),
            })
            .insert(Header {
                key: header::TYPES,
                value: Some(&*r.types),
            });
        if let Some(reason) = reason {
            headers = headers.insert(Header {
                key: header::REASON,
                value: Some(reason),
            });
        }
        let mut record: BaseRecord<'_, [u8], [u8], Arc<BatchAck>> =
            BaseRecord::with_opaque_to(&r.topic, self.ack.clone())
                .headers(headers)
                .timestamp(self.now_ms);
        if let Some(k) = &r.key {
            record = record.key(k.as_slice());
        }
        if let Some(v) = &r.value {
            record = record.payload(v.as_slice());
        }
        if let Some((partitioning, pins)) = &self.place {
            if let Some(p) = partitioning.partition(pins, &r.topic, r.key.as_deref()) {
                record = record.partition(p);
            }
        }
        self.producer.send(record, QUEUE_FULL_WAIT, None).await
    }
}

/// The dead letter standing in for `record`: its key (if short) and a
/// description instead of its value, on `topic`.
fn dead_letter(record: EncodedRecord, refused: &OversizedRecord, topic: &str) -> EncodedRecord {
    let value = json!({
        "reason": TOO_LARGE,
        "error": refused.to_string(),
        "table": refused.table,
        "topic": &*record.topic,
        "key": refused.key,
        "lsn": refused.commit_lsn,
        "op": record.op,
        "size": refused.size,
    });
    let key = record.key.filter(|k| k.len() <= KEY_TEXT_MAX);
    EncodedRecord {
        topic: topic.into(),
        key,
        value: Some(value.to_string().into_bytes()),
        ..record
    }
}

/// Log a dead letter: a console warning without row values, and the audit
/// log's `dead_letters` row (key and description).
fn audit(refused: &OversizedRecord, letter: &EncodedRecord, topic: &str) {
    tracing::warn!(
        table = %refused.table,
        lsn = %refused.commit_lsn,
        size = refused.size,
        topic,
        reason = TOO_LARGE,
        "record dead-lettered"
    );
    let payload = letter.value.as_deref().map(String::from_utf8_lossy);
    tracing::warn!(
        target: crate::audit::DEAD_LETTER_TARGET,
        table = %refused.table,
        key = %refused.key,
        lsn = %refused.commit_lsn,
        reason = TOO_LARGE,
        payload = payload.as_deref(),
        "record dead-lettered"
    );
}

/// Wait for every acknowledgement of one batch.
pub(super) async fn await_deliveries(ack: Arc<BatchAck>) -> Result<(), ProducerError> {
    ack.wait().await?;
    fail::fail_point!(crate::wire::failpoint::PRODUCER_AFTER_ACK);
    Ok(())
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    fn kafka(e: KafkaError) -> Option<ProducerError> {
        Some(e.into())
    }

    #[test]
    fn a_batch_is_done_at_its_last_report_with_its_first_error() {
        assert!(matches!(
            BatchAck::new(0).wait().now_or_never(),
            Some(Ok(()))
        ));

        let ack = BatchAck::new(3);
        ack.delivered(None);
        ack.delivered(kafka(KafkaError::Canceled));
        assert!(ack.wait().now_or_never().is_none(), "one report missing");
        ack.delivered(kafka(KafkaError::NoMessageReceived));
        let first = ack.wait().now_or_never();
        assert!(
            matches!(first, Some(Err(ProducerError::Kafka(KafkaError::Canceled)))),
            "{first:?}"
        );

        let ok = BatchAck::new(2);
        ok.delivered(None);
        ok.delivered(None);
        assert!(matches!(ok.wait().now_or_never(), Some(Ok(()))));
    }

    /// An insert into `public.t` whose row holds `len` bytes of text.
    fn insert(id: u64, len: usize) -> ChangeEvent {
        let table = Arc::new(crate::event::TableRef {
            schema: "public".into(),
            name: "t".into(),
            key_columns: vec!["id".into()],
            key_source: Default::default(),
            column_types: String::new(),
        });
        let row = |v: serde_json::Value| v.as_object().cloned().map(Into::into);
        let tx = crate::event::TxMeta {
            xid: 1,
            commit_lsn: crate::lsn::Lsn(100),
            commit_time_us: 0,
        };
        ChangeEvent {
            op: crate::event::Op::Create,
            table,
            key: row(json!({ "id": id })),
            before: None,
            after: row(json!({ "id": id, "body": "x".repeat(len) })),
            unchanged_toast: vec![],
            lsn: tx.commit_lsn,
            seq: id as u32,
            tx,
            snapshot: false,
        }
    }

    #[tokio::test]
    async fn a_change_above_half_the_queue_is_handed_over_once_librdkafka_holds_no_record() {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        cluster.create_topic("cdc-events", 1, 1).unwrap();
        // Each answer takes this long, so the small record's
        // acknowledgement comes well after both could be handed over.
        cluster
            .broker_round_trip_time(1, Duration::from_millis(100))
            .unwrap();
        let config = Arc::new(KafkaConfig {
            brokers: cluster.bootstrap_servers(),
            max_inflight_bytes: 1 << 20,
            ..Default::default()
        });
        let huge = config.queue_bytes() / 2;
        let (small, big) = (insert(1, 100), insert(2, huge + 1000));
        assert!(small.row_bytes() < huge && big.row_bytes() > huge);
        // Held here too: the job drops its handle when it returns, and
        // dropping the last one purges what librdkafka holds.
        let producer: Arc<Producer> = Arc::new(
            config
                .client_config()
                .create_with_context(AckContext)
                .unwrap(),
        );
        let job = BatchJob {
            producer: producer.clone(),
            config,
            partitioning: Partitioning::new(None),
            database: "db".into(),
            dead_letters: None,
            now_ms: 0,
            session: 1,
            events: vec![small, big],
            rows: None,
            records: 2,
            tx: TxPlan::default(),
        };
        let ack = job.enqueue().await.unwrap();
        // Both fit librdkafka's queue together: only the rule held the
        // large one back until the small one was acknowledged.
        assert_eq!(
            ack.remaining.load(Ordering::Acquire),
            1,
            "the large change was handed over before the small one's acknowledgement"
        );
        ack.wait().await.unwrap();
    }

    fn record(key: &[u8], value_len: usize) -> EncodedRecord {
        EncodedRecord {
            topic: "cdc-events".into(),
            key: Some(key.to_vec()),
            value: Some(vec![b'x'; value_len]),
            table: "public.docs".into(),
            op: "c",
            commit_lsn: "0/16B3748".into(),
            types: "{}".into(),
        }
    }

    #[test]
    fn the_error_names_table_key_lsn_size_and_the_setting() {
        let r = record(br#"{"id":7}"#, 2_000_000);
        let refused = OversizedRecord {
            table: r.table.to_string(),
            key: key_text(r.key.as_deref()),
            commit_lsn: r.commit_lsn.to_string(),
            size: record_size(&r),
            limit: SizeLimit::Producer(1_000_000),
        };
        let text = ProducerError::TooLarge(Box::new(refused)).to_string();
        for part in [
            "public.docs",
            r#"key {"id":7}"#,
            "commit lsn 0/16B3748",
            "2000077 bytes",
            r#"kafka.properties."message.max.bytes" (1000000)"#,
            "max.message.bytes",
            r#"kafka.oversized = "dead_letter""#,
        ] {
            assert!(text.contains(part), "{part:?} missing from {text:?}");
        }
    }

    #[test]
    fn a_dead_letter_describes_the_record_instead_of_carrying_it() {
        let long_key = format!(r#"{{"body":"{}"}}"#, "k".repeat(1000));
        for key in [br#"{"id":7}"#.to_vec(), long_key.into_bytes()] {
            let r = record(&key, 5_000_000);
            let refused = OversizedRecord {
                table: r.table.to_string(),
                key: key_text(r.key.as_deref()),
                commit_lsn: r.commit_lsn.to_string(),
                size: record_size(&r),
                limit: SizeLimit::Producer(1_000_000),
            };
            let letter = dead_letter(r, &refused, "pgcdc-dead-letters");
            assert_eq!(&*letter.topic, "pgcdc-dead-letters");
            let value = letter.value.as_deref().unwrap();
            assert!(value.len() < 2048, "{} bytes", value.len());
            let v: serde_json::Value = serde_json::from_slice(value).unwrap();
            assert_eq!(v["reason"], TOO_LARGE);
            assert_eq!(
                (&v["table"], &v["topic"]),
                (&json!("public.docs"), &json!("cdc-events"))
            );
            assert_eq!(
                (&v["lsn"], &v["size"]),
                (&json!("0/16B3748"), &json!(refused.size))
            );
            let short = key.len() <= KEY_TEXT_MAX;
            assert_eq!(
                letter.key.is_some(),
                short,
                "the record key only when short"
            );
            assert_eq!(v["key"].as_str().unwrap().ends_with('…'), !short);
        }
    }
}
