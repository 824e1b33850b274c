//! `pgcdc verify`: whether a table's mirror index equals the table, row for
//! row, on a live system.
//!
//! **One snapshot.** The table is read inside one REPEATABLE READ snapshot
//! whose WAL position (`pg_current_wal_lsn()` inside it) is recorded: every
//! change the snapshot sees committed below that position.
//!
//! **Documents first, bounded memory.** Document ids are strings (see
//! [`naming`](crate::es_writer::naming)): `"10"` sorts before `"9"`, so the
//! table's key order and the mirror's `_id` order differ for most key types
//! and a merge of the two streams would need a sort of one side. Instead a
//! full run reads the mirror once, in pages of a scroll with sources, and
//! looks each page's rows up by key in the snapshot, rendered as events
//! render them ([`Shape`](crate::snapshot::shape::Shape)): extra, stale
//! (naming the columns) or newer. If fewer documents found their row than
//! the table has rows, the rows are read in keyset chunks and their
//! documents by id (`_mget`) for the missing ones.
//!
//! **In parallel.** Several connections share the snapshot and look pages
//! up at once ([`passes`]). Memory holds at most `parallelism ×
//! chunk_rows` rows and their documents and the differences found, never
//! the table. A sample (`--sample`, continuous verification) compares
//! random key ranges row first, beside the ids of random mirror slices.
//!
//! **No false drift.** A document whose `_cdc.lsn` is past the snapshot
//! position holds a change the snapshot cannot see: counted as *newer*,
//! not drift. Every other difference is checked again ([`recheck`]); one
//! the pipeline was too far behind to settle is *unconfirmed*.
//!
//! **The Kafka leg** (`--kafka`, [`kafka`]): the change topic folded to
//! each key's last change, judged against the same snapshot.

mod compare;
mod config;
pub mod continuous;
mod fence;
mod fold;
mod kafka;
pub(crate) mod keys;
mod mirror;
mod passes;
mod recheck;
mod repair;
mod report;
mod source;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Map, Value};

pub use compare::{compare, Cut, Kind, Verdict};
pub use config::VerifyConfig;
pub use fence::{Behind, Fence};
pub use kafka::KafkaLeg;
pub use report::{Finding, TableReport, Tally};

use crate::checkpoint::{KeyRange, KeyText};
use crate::error::{ErrorClass, ExitCode};
use crate::es_writer::naming::mirror_index;
use crate::es_writer::{EsClient, EsConfig, EsError};
use crate::kafka_producer::KafkaConfig;
use crate::pg::{waits, PgError, PostgresConfig};
use crate::snapshot::shape::Shape;
use crate::snapshot::SnapshotError;
use mirror::{Mirror, Slice};
use source::{Row, Snapshot};

/// Key ranges a sampled table is split into (a sample picks among them).
const SAMPLE_RANGES: usize = 100;

/// Why a verification could not be done.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// PostgreSQL could not be reached or is not set up.
    #[error(transparent)]
    Pg(#[from] PgError),
    /// A query failed.
    #[error("postgresql: {}", crate::pg::chain(.0))]
    Sql(#[from] tokio_postgres::Error),
    /// The table's shape could not be read.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// Elasticsearch (or Kafka, for the sink's group) failed.
    #[error(transparent)]
    Es(#[from] EsError),
    /// Reading the change topic failed (`--kafka`).
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The table has no unique key.
    #[error("table {0} has no unique key (REPLICA IDENTITY FULL without a primary key): it cannot be compared by key")]
    Keyless(String),
    /// Something pgcdc needs is missing (the slot).
    #[error("{0}")]
    NotReady(String),
    /// An answer pgcdc cannot read.
    #[error("{0}")]
    Internal(String),
}

impl VerifyError {
    /// The one classification point: setup problems are fatal with their
    /// code, anything else is worth running the verification again.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Pg(e) => e.class(),
            Self::Snapshot(e) => e.class(),
            Self::Es(e) => e.class(),
            Self::Keyless(_) | Self::NotReady(_) => ErrorClass::Fatal(ExitCode::SourceNotReady),
            Self::Internal(_) => ErrorClass::Fatal(ExitCode::Internal),
            Self::Sql(_) | Self::Kafka(_) => ErrorClass::Transient,
        }
    }
}

/// Compares tables with their mirrors.
pub struct Verifier {
    /// The `[postgres]` section.
    pg: Arc<PostgresConfig>,
    /// The `[elasticsearch]` section.
    es_cfg: Arc<EsConfig>,
    /// The `[kafka]` section.
    kafka: Arc<KafkaConfig>,
    /// The mirror's cluster.
    es: EsClient,
    /// How to read and wait.
    opts: VerifyConfig,
    /// Compare only this fraction of the key ranges (and mirror slices),
    /// at random; `None`: everything.
    sample: Option<f64>,
    /// Also fold the change topic (`--kafka`).
    kafka_leg: bool,
}

/// A difference found and not yet confirmed.
type Apparent = (Kind, Finding);

impl Verifier {
    /// The pipeline stages to wait on (`sql`: a connection outside any
    /// snapshot), for at most `verify.fence_timeout_secs`.
    fn pipeline<'a>(&'a self, sql: &'a tokio_postgres::Client) -> fence::Pipeline<'a> {
        fence::Pipeline {
            sql,
            slot: &self.pg.slot,
            es: &self.es_cfg,
            kafka: &self.kafka,
            timeout: self.opts.fence_timeout(),
        }
    }

    /// A verifier of the tables of `pg` against the mirrors `es_cfg` names.
    pub fn new(
        pg: Arc<PostgresConfig>,
        es_cfg: Arc<EsConfig>,
        kafka: Arc<KafkaConfig>,
        opts: VerifyConfig,
        sample: Option<f64>,
    ) -> Result<Self, VerifyError> {
        let es = EsClient::new(&es_cfg)?;
        Ok(Self {
            pg,
            es_cfg,
            kafka,
            es,
            opts,
            sample,
            kafka_leg: false,
        })
    }

    /// Also fold each table's change topic and judge it against the table
    /// (`--kafka`, see [`KafkaLeg`]).
    pub fn with_kafka(mut self, on: bool) -> Self {
        self.kafka_leg = on;
        self
    }

    /// Verify `schema.table` against its mirror, naming the PostgreSQL
    /// sessions that keep its read waiting.
    pub async fn table(&self, schema: &str, table: &str) -> Result<TableReport, VerifyError> {
        let what = format!("verifying {schema}.{table}");
        waits::reported(&self.pg, &what, self.run(schema, table, true)).await
    }

    /// Compare `schema.table` with its mirror once, as they stand: every
    /// difference counts, none is checked again (the pipeline is not waited
    /// for). The tests' oracle, which polls until they are equal.
    pub async fn compare_now(&self, schema: &str, table: &str) -> Result<TableReport, VerifyError> {
        self.run(schema, table, false).await
    }

    /// Verify `schema.table`, re-checking differences after the pipeline
    /// caught up or not.
    async fn run(
        &self,
        schema: &str,
        table: &str,
        recheck: bool,
    ) -> Result<TableReport, VerifyError> {
        let started = Instant::now();
        let snap = Snapshot::open(&self.pg).await?;
        let shape = snap.shape(schema, table, &self.pg.publication).await?;
        let index = mirror_index(&self.es_cfg.index_prefix, schema, table);
        let mirror = Mirror::new(&self.es, &index);
        mirror.refresh().await?;
        let plan = self.plan(&snap, &shape).await?;
        let mut report = TableReport {
            table: format!("{schema}.{table}"),
            index: index.clone(),
            snapshot_lsn: snap.cut.at.to_string(),
            sample: self.sampled(),
            ..TableReport::default()
        };
        if report.sample.is_some() {
            report.sampled_ranges = plan
                .ranges
                .iter()
                .map(|r| (r.after.clone(), r.upto.clone()))
                .collect();
        }
        let mut apparent = Vec::new();
        let ranges = plan.ranges.clone();
        let snaps = match report.sample {
            None => {
                let shared = snap.share(&self.pg, plan.workers - 1).await?;
                let snaps: Vec<Snapshot> = std::iter::once(snap).chain(shared).collect();
                let (docs, matched) = self.docs_first(&snaps, &shape, &mirror).await?;
                docs.merge_into(&mut report, &mut apparent);
                let rows = snaps[0].count(&shape).await?;
                if matched < rows {
                    let parts = self
                        .rows_pass(&snaps, &shape, &mirror, plan.ranges, true)
                        .await?;
                    parts
                        .into_iter()
                        .for_each(|p| p.merge_into(&mut report, &mut apparent));
                } else {
                    report.compared = rows;
                }
                snaps
            }
            Some(_) => {
                // Both passes at once, each on its own connections.
                let doc_workers = plan.slices.len().clamp(1, self.opts.parallelism.max(1));
                let shared = snap.share(&self.pg, plan.workers + doc_workers - 1).await?;
                let snaps: Vec<Snapshot> = std::iter::once(snap).chain(shared).collect();
                let (row_snaps, doc_snaps) = snaps.split_at(plan.workers);
                let (rows, docs) = tokio::try_join!(
                    self.rows_pass(row_snaps, &shape, &mirror, plan.ranges, false),
                    self.docs_pass(doc_snaps, &shape, &mirror, plan.slices)
                )?;
                for part in rows.into_iter().chain(docs) {
                    part.merge_into(&mut report, &mut apparent);
                }
                snaps
            }
        };
        if self.kafka_leg {
            let (leg, drift) = self.kafka_leg(&snaps, &shape, &ranges).await?;
            report.kafka = Some(leg);
            report.drift.extend(drift);
        }
        futures::future::try_join_all(snaps.into_iter().map(Snapshot::close)).await?;
        match recheck {
            true => self.recheck(&shape, &mirror, apparent, &mut report).await?,
            false => apparent.into_iter().for_each(|(k, f)| report.add(k, f)),
        }
        report.elapsed_secs = started.elapsed().as_secs_f64();
        report.rows_per_sec = report.compared as f64 / report.elapsed_secs.max(1e-6);
        tracing::info!(table = %report.table, compared = report.compared, missing = report.missing.count, extra = report.extra.count, stale = report.stale.count, newer = report.newer.count, unconfirmed = report.unconfirmed.count, "table verified");
        Ok(report)
    }

    /// The fraction compared, when it is less than everything.
    fn sampled(&self) -> Option<f64> {
        self.sample.filter(|f| *f < 1.0)
    }

    /// What to compare and with how many connections: the whole table split
    /// in `verify.parallelism` key ranges (for missing rows) and the whole
    /// mirror, or a random sample of [`SAMPLE_RANGES`] ranges and as many
    /// slices.
    async fn plan(&self, snap: &Snapshot, shape: &Shape) -> Result<Plan, VerifyError> {
        let parallelism = self.opts.parallelism.max(1);
        let Some(fraction) = self.sampled() else {
            let ranges = shape
                .split(&snap.sql, parallelism, self.opts.chunk_rows)
                .await?;
            // The whole mirror is one scroll ([`Verifier::docs_first`]):
            // slices cost a search server a scan each.
            return Ok(Plan {
                ranges,
                slices: Vec::new(),
                workers: parallelism,
            });
        };
        let all = shape
            .split(&snap.sql, SAMPLE_RANGES, self.opts.chunk_rows)
            .await?;
        let ranges = pick(all, fraction);
        let slices = (0..SAMPLE_RANGES)
            .map(|id| {
                Some(Slice {
                    id,
                    max: SAMPLE_RANGES,
                })
            })
            .collect();
        let slices = pick(slices, fraction);
        let workers = ranges.len().clamp(1, parallelism);
        Ok(Plan {
            ranges,
            slices,
            workers,
        })
    }
}

/// The key ranges and mirror slices one verification compares.
struct Plan {
    /// Key ranges of the table.
    ranges: Vec<KeyRange>,
    /// Slices of the mirror a sample reads (a full run scrolls all of it).
    slices: Vec<Option<Slice>>,
    /// Connections: a full run's page lookups, or a sample's key ranges
    /// compared at once (as many again, at most, read the slices).
    workers: usize,
}

/// Each of `all` with probability `fraction`, at least one (if any).
fn pick<T>(all: Vec<T>, fraction: f64) -> Vec<T> {
    let n = all.len();
    let lucky = (random_unit() * n as f64) as usize;
    let mut picked: Vec<T> = Vec::new();
    let mut spare = None;
    for (i, item) in all.into_iter().enumerate() {
        if random_unit() < fraction {
            picked.push(item);
        } else if i == lucky.min(n.saturating_sub(1)) {
            spare = Some(item);
        }
    }
    if picked.is_empty() {
        picked.extend(spare);
    }
    picked
}

/// Record a verdict: newer is counted now, any other difference re-checked later.
fn note(
    report: &mut TableReport,
    apparent: &mut Vec<Apparent>,
    verdict: Verdict,
    id: &str,
    key: Option<KeyText>,
) {
    let Verdict::Differs(kind, columns) = verdict else {
        return;
    };
    let finding = Finding {
        id: id.to_owned(),
        columns,
        key,
    };
    match kind {
        Kind::Newer => report.add(kind, finding),
        _ => apparent.push((kind, finding)),
    }
}

/// Rows by document id.
fn by_id(rows: Vec<Row>) -> HashMap<String, Map<String, Value>> {
    rows.into_iter().map(|r| (r.id, r.after)).collect()
}

/// A uniform random number in `[0, 1)`.
fn random_unit() -> f64 {
    let mut b = [0u8; 4];
    let _ = getrandom::getrandom(&mut b);
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}
