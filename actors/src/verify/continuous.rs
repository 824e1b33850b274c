//! Continuous verification in the daemon (`verify.interval_secs`): every
//! interval, a random sample (`verify.sample`) of each configured table is
//! verified as `pgcdc verify --sample` would, the results counted in
//! `pgcdc_verify_rows_total{table,result}`, the last drift kept in
//! `pgcdc_verify_drift_rows{table}`, and drift logged at ERROR with its
//! first keys. It never touches readiness: drift is an alert, not an outage.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::MissedTickBehavior;

use super::{TableReport, Verifier, VerifyConfig};
use crate::es_writer::EsConfig;
use crate::kafka_producer::KafkaConfig;
use crate::metrics::metrics;
use crate::pg::PostgresConfig;

/// Start verifying `tables` (schema, name) every `verify.interval_secs`,
/// if set; the task runs until the process ends.
pub fn spawn(
    pg: Arc<PostgresConfig>,
    es: Arc<EsConfig>,
    kafka: Arc<KafkaConfig>,
    opts: VerifyConfig,
    tables: Vec<(String, String)>,
) {
    let Some(every) = opts.interval() else {
        return;
    };
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
            round(&verifier, &tables).await;
        }
    });
}

/// Verify every table once; a failure is logged and counts for nothing.
async fn round(verifier: &Verifier, tables: &[(String, String)]) {
    for (schema, table) in tables {
        match verifier.table(schema, table).await {
            Ok(report) => record(&report),
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
        tracing::error!(table = %report.table, missing = report.missing.count, extra = report.extra.count, stale = report.stale.count, first_ids = ?first, "continuous verification found drift: run pgcdc verify --repair");
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
