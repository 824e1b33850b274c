//! Continuous verification in the daemon (`verify.interval_secs`): every
//! interval, a random sample (`verify.sample`) of each configured table is
//! verified as `pgcdc verify --sample` would, the results counted in
//! `pgcdc_verify_rows_total{table,result}`, the last drift kept in
//! `pgcdc_verify_drift_rows{table}`, and drift logged at ERROR with its
//! first keys. A table found drifted makes `/ready` 503 naming it; with
//! `verify.repair` (the default) the daemon copies its drifted rows again,
//! as `pgcdc verify --repair` has it do, and once the mirror shows them
//! repaired `/ready` no longer names the table. Without, it is named until
//! a round finds the table's sample without drift.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::MissedTickBehavior;

use super::{TableReport, Verifier, VerifyConfig};
use crate::es_writer::EsConfig;
use crate::kafka_producer::KafkaConfig;
use crate::metrics::metrics;
use crate::pg::PostgresConfig;
use crate::snapshot::watermark::MessageKey;

/// Start verifying `tables` (schema, name) every `verify.interval_secs`,
/// if set, signing repair requests with `key`; the task runs until the
/// process ends.
pub fn spawn(
    pg: Arc<PostgresConfig>,
    es: Arc<EsConfig>,
    kafka: Arc<KafkaConfig>,
    opts: VerifyConfig,
    (tables, key): (Vec<(String, String)>, MessageKey),
) {
    let Some(every) = opts.interval() else {
        return;
    };
    let key = opts.repair.then_some(key);
    let sample = Some(opts.sample);
    let verifier = match Verifier::new(pg, es, kafka, opts, sample) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "continuous verification not started");
            return;
        }
    };
    tracing::info!(
        interval_secs = every.as_secs(),
        tables = tables.len(),
        "continuous verification started"
    );
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            round(&verifier, &tables, key.as_ref()).await;
        }
    });
}

/// Verify every table once, repairing drift with `key`'s signature if
/// given; a failure is logged and counts for nothing.
async fn round(verifier: &Verifier, tables: &[(String, String)], key: Option<&MessageKey>) {
    for (schema, table) in tables {
        match verifier.table(schema, table).await {
            Ok(report) => {
                record(&report);
                settle(verifier, key, (schema, table), &report).await;
            }
            Err(e) => {
                tracing::warn!(table = %format!("{schema}.{table}"), error = %e, "continuous verification failed; trying again next interval")
            }
        }
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    metrics()
        .verify_last_run
        .set(i64::try_from(now).unwrap_or(i64::MAX));
}

/// Count what `report` found; log drift.
fn record(report: &TableReport) {
    let m = metrics();
    for (result, n) in results(report) {
        m.verify_rows
            .with_label_values(&[&report.table, result])
            .inc_by(n);
    }
    let drift = report.missing.count + report.extra.count + report.stale.count;
    m.verify_drift
        .with_label_values(&[&report.table])
        .set(i64::try_from(drift).unwrap_or(i64::MAX));
    if drift > 0 {
        let first: Vec<&str> = [&report.missing, &report.extra, &report.stale]
            .iter()
            .flat_map(|t| t.first.iter().map(|f| f.id.as_str()))
            .collect();
        tracing::error!(table = %report.table, missing = report.missing.count, extra = report.extra.count, stale = report.stale.count, first_ids = ?first, "continuous verification found drift");
    }
}

/// Name `report`'s drift in `/ready` and, with `key`, have the daemon copy
/// the drifted rows again; the name goes once the mirror shows them
/// repaired (or a round finds none).
async fn settle(
    verifier: &Verifier,
    key: Option<&MessageKey>,
    table: (&str, &str),
    report: &TableReport,
) {
    let m = metrics();
    let (missing, extra, stale) = (report.missing.count, report.extra.count, report.stale.count);
    if missing + extra + stale == 0 {
        m.verify_drifted(&report.table, None);
        return;
    }
    let what = format!("{missing} missing, {extra} extra, {stale} stale");
    let Some(key) = key else {
        m.verify_drifted(
            &report.table,
            Some(format!("{what}; run pgcdc verify --repair")),
        );
        return;
    };
    m.verify_drifted(&report.table, Some(format!("{what}; being repaired")));
    let since = match verifier.request_repair(key, table, report).await {
        Ok(Some(since)) => since,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(table = %report.table, error = %e, "continuous verification could not request a repair; trying again next interval");
            return;
        }
    };
    match verifier.await_repair(report, since).await {
        Ok(true) => {
            let rows = report.drift.iter().filter(|(_, f)| f.key.is_some()).count();
            m.verify_repaired
                .with_label_values(&[&report.table])
                .inc_by(rows as u64);
            m.verify_drifted(&report.table, None);
            tracing::info!(table = %report.table, rows, "continuous verification: drift repaired");
        }
        Ok(false) => {
            tracing::warn!(table = %report.table, "continuous verification: repair not seen in the mirror within verify.fence_timeout_secs; verifying again next interval")
        }
        Err(e) => {
            tracing::warn!(table = %report.table, error = %e, "continuous verification: repair not confirmed; verifying again next interval")
        }
    }
}

/// Counts by result: `equal` is the rows compared less those with a finding.
fn results(r: &TableReport) -> [(&'static str, u64); 6] {
    let differ = r.missing.count + r.stale.count + r.newer.count + r.unconfirmed.count;
    [
        ("equal", r.compared.saturating_sub(differ)),
        ("missing", r.missing.count),
        ("extra", r.extra.count),
        ("stale", r.stale.count),
        ("newer", r.newer.count),
        ("unconfirmed", r.unconfirmed.count),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::{Finding, Kind};

    #[test]
    fn results_count_every_kind_and_the_equal_rest() {
        let mut r = TableReport {
            compared: 10,
            ..TableReport::default()
        };
        let f = |id: &str| Finding {
            id: id.into(),
            columns: Vec::new(),
            key: None,
        };
        r.add(Kind::Missing, f("1"));
        r.add(Kind::Stale, f("2"));
        r.add(Kind::Extra, f("99"));
        let got: Vec<(&str, u64)> = results(&r).into_iter().filter(|(_, n)| *n > 0).collect();
        assert_eq!(
            got,
            [("equal", 8), ("missing", 1), ("extra", 1), ("stale", 1)]
        );
    }
}
