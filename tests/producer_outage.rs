//! The Kafka producer actor against librdkafka's mock cluster: a broker
//! outage pauses acknowledgements (the checkpoint does not move), nothing is
//! lost, and delivery resumes when the brokers return; produce requests that
//! fail with retriable errors are retried without loss or duplicates.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use pgcdc_actors::checkpoint::{CheckpointActor, SlotIdentity};
use pgcdc_actors::event::{ChangeEvent, Op, TableRef, TxMeta};
use pgcdc_actors::kafka_producer::{KafkaConfig, KafkaProducerActor, ProducerError};
use pgcdc_actors::lsn::Lsn;
use pgcdc_actors::messages::{
    LsnPersisted, OpenSession, PersistSlotIdentity, PublishBatch, SessionBroken,
};
use pgcdc_actors::supervision::{RestartBudget, SupervisionConfig};
use pgcdc_testkit::wait::{self, Poll};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::json;

/// Records what the producer reports back.
#[derive(Default, Clone)]
struct Seen {
    persisted: Arc<Mutex<Vec<Lsn>>>,
    broken: Arc<Mutex<Vec<u64>>>,
}

struct Probe(Seen);

impl Actor for Probe {
    type Context = Context<Self>;
}

impl Handler<LsnPersisted> for Probe {
    type Result = ();
    fn handle(&mut self, msg: LsnPersisted, _: &mut Context<Self>) {
        self.0.persisted.lock().unwrap().push(msg.lsn);
    }
}

impl Handler<SessionBroken> for Probe {
    type Result = ();
    fn handle(&mut self, msg: SessionBroken, _: &mut Context<Self>) {
        self.0.broken.lock().unwrap().push(msg.session);
    }
}

impl Seen {
    fn last(&self) -> Lsn {
        self.persisted
            .lock()
            .unwrap()
            .last()
            .copied()
            .unwrap_or_default()
    }
}

fn events(from: u64, n: u64, commit: Lsn) -> Vec<ChangeEvent> {
    let table = Arc::new(TableRef {
        schema: "public".into(),
        name: "t".into(),
        key_columns: vec!["id".into()],
        key_source: Default::default(),
        column_types: String::new(),
    });
    (from..from + n)
        .map(|id| ChangeEvent {
            op: Op::Create,
            table: table.clone(),
            key: json!({ "id": id }).as_object().cloned().map(Into::into),
            before: None,
            after: json!({ "id": id }).as_object().cloned().map(Into::into),
            unchanged_toast: vec![],
            lsn: commit,
            seq: (id - from) as u32,
            tx: TxMeta {
                xid: 1,
                commit_lsn: commit,
                commit_time_us: 0,
            },
            snapshot: false,
        })
        .collect()
}

async fn wait_for(what: &str, timeout: Duration, cond: impl Fn() -> bool) {
    let every = Duration::from_millis(50);
    wait::poll(what, timeout, every, || async {
        Poll::when(cond(), (), || "not yet".into())
    })
    .await
    .unwrap();
}

struct Rig {
    _dir: tempfile::TempDir,
    producer: Addr<KafkaProducerActor>,
    seen: Seen,
    probe: Addr<Probe>,
}

async fn rig(cluster: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let sup = SupervisionConfig::default();
    let checkpoint = CheckpointActor::start(
        dir.path().join("cp"),
        RestartBudget::new("checkpoint", sup.clone()),
    );
    let identity = SlotIdentity {
        system_id: "1".into(),
        database: "db".into(),
        slot_name: "s".into(),
    };
    checkpoint
        .send(PersistSlotIdentity {
            identity,
            lsn: Lsn(1),
            progress: vec![],
        })
        .await
        .unwrap()
        .unwrap();
    let config = Arc::new(KafkaConfig {
        brokers: cluster.bootstrap_servers(),
        delivery_timeout_ms: 120_000,
        max_inflight_records: 10_000,
        ..Default::default()
    });
    let budget = RestartBudget::new("kafka_producer", sup);
    let producer =
        Supervisor::start(move |_| KafkaProducerActor::new(config, "db", checkpoint, budget));
    let seen = Seen::default();
    let probe = Probe(seen.clone()).start();
    let open = OpenSession {
        session: 1,
        on_broken: probe.clone().recipient(),
        on_persisted: probe.clone().recipient(),
    };
    producer.send(open).await.unwrap();
    Rig {
        _dir: dir,
        producer,
        seen,
        probe,
    }
}

async fn publish(rig: &Rig, seq: u64) -> Result<(), ProducerError> {
    let commit = Lsn(100 * (seq + 1));
    let msg = PublishBatch {
        session: 1,
        seq,
        events: events(seq * 100, 100, commit),
        rows: None,
        commit_end: Some(commit),
        progress: vec![],
    };
    rig.producer.send(msg).await.unwrap()
}

fn consume_ids(bootstrap: &str, expected: usize) -> Vec<u64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "t")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition_offset("cdc-events", p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut ids = Vec::new();
    // Short of `expected` at the deadline: the caller's comparison names what is missing.
    let _ = wait::poll_blocking(
        "the records",
        Duration::from_secs(60),
        Duration::ZERO,
        || {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                let key: serde_json::Value = serde_json::from_slice(m.key().unwrap()).unwrap();
                ids.push(key["id"].as_u64().unwrap());
            }
            Poll::when(ids.len() >= expected, (), || format!("{} ids", ids.len()))
        },
    );
    ids
}

/// After 2,000 records were checkpointed: the checkpoint only moved forward,
/// the session never broke; the ids on the topic, sorted.
fn delivered(rig: &Rig, bootstrap: &str) -> Vec<u64> {
    let persisted = rig.seen.persisted.lock().unwrap().clone();
    assert!(
        persisted.windows(2).all(|w| w[0] <= w[1]),
        "checkpoint went backwards: {persisted:?}"
    );
    assert!(rig.seen.broken.lock().unwrap().is_empty());
    let mut ids = consume_ids(bootstrap, 2000);
    ids.sort_unstable();
    ids
}

#[actix_rt::test]
async fn broker_outage_pauses_the_checkpoint_and_loses_nothing() {
    let cluster = MockCluster::new(3).unwrap();
    cluster.create_topic("cdc-events", 3, 3).unwrap();
    let rig = rig(&cluster).await;
    for seq in 0..10 {
        publish(&rig, seq).await.unwrap();
    }
    wait_for(
        "the first 10 batches to be checkpointed",
        Duration::from_secs(30),
        || rig.seen.last() == Lsn(1000),
    )
    .await;

    for b in 1..=3 {
        cluster.broker_down(b).unwrap();
    }
    for seq in 10..20 {
        publish(&rig, seq).await.unwrap();
    }
    // While every broker is down nothing may be checkpointed.
    let every = Duration::from_millis(50);
    wait::during(
        "the checkpoint to stay",
        Duration::from_secs(2),
        every,
        || async {
            match rig.seen.last() {
                Lsn(1000) => Ok(()),
                moved => Err(format!(
                    "checkpoint moved to {moved:?} while the brokers were down"
                )),
            }
        },
    )
    .await
    .unwrap();
    for b in 1..=3 {
        cluster.broker_up(b).unwrap();
    }
    wait_for(
        "the rest to be checkpointed",
        Duration::from_secs(60),
        || rig.seen.last() == Lsn(2000),
    )
    .await;

    let mut ids = delivered(&rig, &cluster.bootstrap_servers());
    ids.dedup();
    assert_eq!(ids, (0..2000).collect::<Vec<_>>());
    drop(rig.probe);
}

/// Produce requests answered with retriable errors (not leader, timed out,
/// not enough replicas, leader not available) are retried: every record
/// arrives exactly once (the idempotent producer), the checkpoint only moves
/// forward, and the session never breaks.
#[actix_rt::test]
async fn produce_request_errors_are_retried_without_loss_or_duplicates() {
    use RDKafkaRespErr::*;
    let cluster = MockCluster::new(3).unwrap();
    cluster.create_topic("cdc-events", 3, 3).unwrap();
    let rig = rig(&cluster).await;
    let errors = [
        RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE,
    ];
    for seq in 0..20 {
        // Errors for the next produce requests, pushed while batches flow.
        if seq % 4 == 0 {
            cluster.request_errors(RDKafkaApiKey::Produce, &errors);
        }
        publish(&rig, seq).await.unwrap();
    }
    wait_for(
        "every batch to be checkpointed",
        Duration::from_secs(60),
        || rig.seen.last() == Lsn(2000),
    )
    .await;
    let ids = delivered(&rig, &cluster.bootstrap_servers());
    assert_eq!(ids, (0..2000).collect::<Vec<_>>(), "lost or duplicated");
    drop(rig.probe);
}

#[actix_rt::test]
async fn batches_out_of_order_or_of_another_session_are_refused() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("cdc-events", 3, 1).unwrap();
    let rig = rig(&cluster).await;
    publish(&rig, 0).await.unwrap();
    let skipped = publish(&rig, 2).await;
    assert!(
        matches!(
            skipped,
            Err(ProducerError::OutOfOrder {
                got: 2,
                expected: 1,
                ..
            })
        ),
        "{skipped:?}"
    );
    let other = PublishBatch {
        session: 9,
        seq: 1,
        events: vec![],
        rows: None,
        commit_end: None,
        progress: vec![],
    };
    let res = rig.producer.send(other).await.unwrap();
    assert!(
        matches!(res, Err(ProducerError::SessionClosed(9))),
        "{res:?}"
    );
}
