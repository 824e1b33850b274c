//! `pgcdc verify`: whether a table's mirror index equals the table, row for
//! row, on a live system.
//!
//! **One snapshot.** The table is read inside one REPEATABLE READ snapshot
//! whose WAL position (`pg_current_wal_lsn()` inside it) is recorded: every
//! change the snapshot sees committed below that position.
//!
//! **Two passes, bounded memory.** Document ids are strings (see
//! [`naming`](crate::es_writer::naming)): `"10"` sorts before `"9"`, so the
//! table's key order and the mirror's `_id` order differ for most key types
//! and a merge of the two streams would need a sort of one side. Instead:
//! 1. the rows, in keyset chunks, are rendered as events render them
//!    ([`Shape`](crate::snapshot::shape::Shape)) and their documents read
//!    by id (`_mget`): missing, stale (naming the columns) or newer;
//! 2. the documents, in pages of a scroll (`_doc` order, key columns
//!    only), are looked up by key in the same snapshot: a document without a row is
//!    extra (or newer, if its `_cdc.lsn` is past the snapshot).
//!
//! Memory holds one chunk and the differences found, never the table.
//!
//! **No false drift.** A document whose `_cdc.lsn` is past the snapshot
//! position holds a change the snapshot cannot see: counted as *newer*,
//! not drift. Every other difference is checked again ([`recheck`]).

mod compare;
mod config;
mod fence;
mod keys;
mod mirror;
mod recheck;
mod repair;
mod report;
mod source;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Map, Value};

pub use compare::{compare, Kind, Verdict};
pub use config::VerifyConfig;
pub use fence::Fence;
pub use report::{Finding, TableReport, Tally};

use crate::checkpoint::{KeyRange, KeyText};
use crate::error::{ErrorClass, ExitCode};
use crate::es_writer::naming::mirror_index;
use crate::es_writer::{EsClient, EsConfig, EsError};
use crate::kafka_producer::KafkaConfig;
use crate::pg::{PgError, PostgresConfig};
use crate::snapshot::shape::Shape;
use crate::snapshot::SnapshotError;
use mirror::Mirror;
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
    #[error("postgresql: {0}")]
    Sql(#[from] tokio_postgres::Error),
    /// The table's shape could not be read.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// Elasticsearch (or Kafka, for the sink's group) failed.
    #[error(transparent)]
    Es(#[from] EsError),
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
            Self::Sql(_) => ErrorClass::Transient,
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
    /// Compare only this fraction of the key ranges, at random (and look
    /// for no extra documents); `None`: everything.
    sample: Option<f64>,
}

/// A difference found and not yet confirmed.
type Apparent = (Kind, Finding);

impl Verifier {
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
        })
    }

    /// Verify `schema.table` against its mirror.
    pub async fn table(&self, schema: &str, table: &str) -> Result<TableReport, VerifyError> {
        self.run(schema, table, true).await
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
        let shape = snap.shape(schema, table).await?;
        let index = mirror_index(&self.es_cfg.index_prefix, schema, table);
        let mirror = Mirror::new(&self.es, &index);
        mirror.refresh().await?;
        let mut report = TableReport {
            table: format!("{schema}.{table}"),
            index: index.clone(),
            snapshot_lsn: snap.at.to_string(),
            sample: self.sample,
            ..TableReport::default()
        };
        let mut apparent = Vec::new();
        self.rows_pass(&snap, &shape, &mirror, &mut report, &mut apparent)
            .await?;
        if self.sample.is_none() {
            self.docs_pass(&snap, &shape, &mirror, &mut report, &mut apparent)
                .await?;
        }
        snap.close().await?;
        match recheck {
            true => self.recheck(&shape, &mirror, apparent, &mut report).await?,
            false => apparent.into_iter().for_each(|(k, f)| report.add(k, f)),
        }
        report.elapsed_secs = started.elapsed().as_secs_f64();
        report.rows_per_sec = report.compared as f64 / report.elapsed_secs.max(1e-6);
        tracing::info!(table = %report.table, compared = report.compared, missing = report.missing.count, extra = report.extra.count, stale = report.stale.count, newer = report.newer.count, "table verified");
        Ok(report)
    }

    /// The key ranges to compare: the whole table, or a random sample.
    async fn ranges(&self, snap: &Snapshot, shape: &Shape) -> Result<Vec<KeyRange>, VerifyError> {
        let Some(fraction) = self.sample else {
            return Ok(vec![KeyRange {
                after: None,
                upto: None,
                done: false,
            }]);
        };
        let all = shape
            .split(&snap.sql, SAMPLE_RANGES, self.opts.chunk_rows)
            .await?;
        let mut picked: Vec<KeyRange> = all
            .iter()
            .filter(|_| random_unit() < fraction)
            .cloned()
            .collect();
        if picked.is_empty() {
            let i = (random_unit() * all.len() as f64) as usize;
            picked.extend(all.get(i.min(all.len().saturating_sub(1))).cloned());
        }
        Ok(picked)
    }

    /// Pass 1: every row (of the sampled ranges) against its document.
    async fn rows_pass(
        &self,
        snap: &Snapshot,
        shape: &Shape,
        mirror: &Mirror<'_>,
        report: &mut TableReport,
        apparent: &mut Vec<Apparent>,
    ) -> Result<(), VerifyError> {
        let limit = self.opts.chunk_rows;
        for mut range in self.ranges(snap, shape).await? {
            let mut rows = snap.chunk(shape, &range, limit).await?;
            // Each chunk's documents are read while the next chunk's rows are.
            while let Some(last) = rows.last() {
                let more = rows.len() >= limit;
                range.after = Some(last.key.clone());
                let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
                let next = async {
                    match more {
                        true => snap.chunk(shape, &range, limit).await,
                        false => Ok(Vec::new()),
                    }
                };
                let (docs, next) = tokio::join!(mirror.get(&ids), next);
                let docs = docs?;
                for row in &rows {
                    let verdict = compare(Some(&row.after), docs.get(&row.id), snap.at);
                    note(report, apparent, verdict, &row.id, Some(row.key.clone()));
                }
                report.compared += rows.len() as u64;
                rows = next?;
            }
        }
        Ok(())
    }

    /// Pass 2: every document against the table, for extra ones.
    async fn docs_pass(
        &self,
        snap: &Snapshot,
        shape: &Shape,
        mirror: &Mirror<'_>,
        report: &mut TableReport,
        apparent: &mut Vec<Apparent>,
    ) -> Result<(), VerifyError> {
        let (names, limit) = (shape.key_names(), self.opts.chunk_rows);
        let (mut page, mut scroll) = mirror.page(None, limit, &names).await?;
        // Each page's rows are looked up while the next page is read.
        while !page.is_empty() {
            let more = page.len() >= limit;
            let keys: Vec<Option<KeyText>> = page
                .iter()
                .map(|(id, source)| keys::key_of_doc(id, source, &names))
                .collect();
            let wanted: Vec<KeyText> = keys.iter().flatten().cloned().collect();
            let next = async {
                match (more, scroll.as_deref()) {
                    (true, Some(id)) => mirror.page(Some(id), limit, &names).await,
                    _ => Ok((Vec::new(), None)),
                }
            };
            let (found, next) = tokio::join!(snap.lookup(shape, &wanted), next);
            let found = by_id(found?);
            for ((id, source), key) in page.iter().zip(keys) {
                if !found.contains_key(id) {
                    let verdict = compare(None, Some(source), snap.at);
                    note(report, apparent, verdict, id, key);
                }
            }
            report.documents += page.len() as u64;
            (page, scroll) = next?;
        }
        Ok(())
    }
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
