//! The mirror oracle: a mirror index equals what it mirrors, document for
//! row — a PostgreSQL table compared by `pgcdc verify`'s own code
//! ([`Want::Verified`], the one oracle users also run), or a fixed set of
//! documents (sources and `_version`s compared).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::Duration;

use serde_json::Value;
use tokio_postgres::Client;

use std::sync::Arc;

use pgcdc_actors::es_writer::EsConfig;
use pgcdc_actors::kafka_producer::KafkaConfig;
use pgcdc_actors::pg::{parse_table_name, PostgresConfig};
use pgcdc_actors::verify::{TableReport, Verifier, VerifyConfig};

use crate::daemon::Daemon;
use crate::pg::PgCluster;
use crate::search::{documents, Documents};
use crate::wait::{self, Poll, WaitError};

/// Pause between two reads of the mirror (each reads the whole index: not too often).
const EVERY: Duration = Duration::from_millis(300);
/// Ids named in a difference report.
const SHOWN: usize = 5;

/// What a mirror index must hold.
#[derive(Clone, Copy)]
pub enum Want<'a> {
    /// Exactly these documents, `_version`s included.
    Documents(&'a Documents),
    /// A keyed table, compared by the code of `pgcdc verify` (rendered as
    /// pgcdc renders events, read in one snapshot at every poll); the
    /// table may change meanwhile, as long as the mirror catches up.
    Verified {
        /// The cluster (plain TCP: not a TLS-only one).
        pg: &'a PgCluster,
        /// The table, `schema.table`.
        table: &'a str,
    },
}

/// `pgcdc verify`'s comparison of `table` (`schema.table`) in `pg` with its
/// mirror at `es_url`, once, as they stand (nothing re-checked).
pub async fn verify_now(pg: &PgCluster, es_url: &str, table: &str) -> anyhow::Result<TableReport> {
    verify_now_with(pg, es_url, table, VerifyConfig::default()).await
}

/// [`verify_now`] with `opts` as the `[verify]` section.
pub async fn verify_now_with(
    pg: &PgCluster,
    es_url: &str,
    table: &str,
    opts: VerifyConfig,
) -> anyhow::Result<TableReport> {
    let (schema, name) = parse_table_name(table).map_err(anyhow::Error::msg)?;
    let postgres = PostgresConfig {
        host: "127.0.0.1".into(),
        port: pg.port,
        user: "postgres".into(),
        password: pgcdc_actors::secret::Secret::new(pg.password.clone()),
        database: "postgres".into(),
        ..PostgresConfig::default()
    };
    let es = EsConfig {
        url: es_url.to_owned(),
        ..EsConfig::default()
    };
    let verifier = Verifier::new(
        Arc::new(postgres),
        Arc::new(es),
        Arc::new(KafkaConfig::default()),
        opts,
        None,
    )?;
    Ok(verifier.compare_now(&schema, &name).await?)
}

/// A table's rows as JSON objects, by `id` (as text, like the documents' `_id`).
pub async fn table_rows(db: &Client, table: &str) -> anyhow::Result<BTreeMap<String, Value>> {
    let q = format!("SELECT t.id::text, to_jsonb(t)::text FROM {table} t");
    let mut rows = BTreeMap::new();
    for r in db.query(&q, &[]).await? {
        let json: String = r.get(1);
        rows.insert(r.get(0), serde_json::from_str(&json)?);
    }
    Ok(rows)
}

/// Ids whose entries differ: missing from `got`, different, or extra in it.
pub fn wrong_ids<V: PartialEq>(
    want: &BTreeMap<String, V>,
    got: &BTreeMap<String, V>,
) -> Vec<String> {
    let differ = want
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(*v))
        .map(|(k, _)| k);
    let extra = got.keys().filter(|k| !want.contains_key(*k));
    differ.chain(extra).cloned().collect()
}

/// How two maps differ (counts and the first entries of each kind), or `None` if equal.
pub fn diff<V: PartialEq + Debug>(
    want: &BTreeMap<String, V>,
    got: &BTreeMap<String, V>,
) -> Option<String> {
    if want == got {
        return None;
    }
    let missing: Vec<&String> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<&String> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    let wrong: Vec<(&String, &V, &V)> = want
        .iter()
        .filter_map(|(k, v)| got.get(k).filter(|g| *g != v).map(|g| (k, v, g)))
        .collect();
    Some(format!(
        "{} docs vs {} wanted: {} missing {:?}, {} extra {:?}, {} different (id, want, got) {:?}",
        got.len(),
        want.len(),
        missing.len(),
        &missing[..missing.len().min(SHOWN)],
        extra.len(),
        &extra[..extra.len().min(SHOWN)],
        wrong.len(),
        &wrong[..wrong.len().min(SHOWN)],
    ))
}

/// One look at the mirror: the documents if they match, else what differs.
/// A verified table's documents are read after the comparison found it
/// equal, so they hold at least what it compared.
async fn compare(es_url: &str, index: &str, want: Want<'_>) -> Result<Documents, String> {
    let read = || async {
        documents(es_url, index)
            .await
            .map_err(|e| format!("read {index}: {e:#}"))
    };
    match want {
        Want::Verified { pg, table } => match verify_now(pg, es_url, table).await {
            Ok(r) if !r.drifted() && r.newer.count == 0 => read().await,
            Ok(r) => Err(r.text()),
            Err(e) => Err(format!("verify {table}: {e:#}")),
        },
        Want::Documents(want) => {
            let got = read().await?;
            diff(want, &got).map_or(Ok(got), Err)
        }
    }
}

/// Poll until the mirror `index` equals `want`, for at most `timeout`; the
/// documents. With a `daemon`, stop as soon as it exits and quote its log.
pub async fn mirror_equals(
    es_url: &str,
    index: &str,
    want: Want<'_>,
    timeout: Duration,
    daemon: Option<&Daemon>,
) -> Result<Documents, WaitError> {
    let what = format!("mirror {index} to equal what it mirrors");
    let log = |why: String| match daemon {
        Some(d) => format!("{why}\npgcdc log tail:\n{}", d.log_tail()),
        None => why,
    };
    wait::poll(&what, timeout, EVERY, || async {
        match compare(es_url, index, want).await {
            Ok(docs) => Poll::Ready(docs),
            Err(why) if daemon.is_some_and(|d| !d.is_running()) => {
                Poll::Abort(log(format!("pgcdc exited; {why}")))
            }
            Err(why) => Poll::Pending(log(why)),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_sets_are_compared_by_id_and_values() {
        let mut a = BTreeMap::new();
        a.insert("1".to_owned(), 1);
        let mut b = a.clone();
        assert!(diff(&a, &b).is_none());
        b.insert("1".into(), 2);
        b.insert("2".into(), 2);
        let d = diff(&a, &b).unwrap_or_default();
        assert!(d.contains("1 extra") && d.contains("1 different"), "{d}");
        assert_eq!(wrong_ids(&a, &b), ["1", "2"]);
    }
}
