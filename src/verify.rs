//! `pgcdc verify`: compare tables with their mirrors, print the reports,
//! repair on request (see `pgcdc_actors::verify` and docs/verify.md).

use std::sync::Arc;

use pgcdc_actors::snapshot::watermark::MessageKey;
use pgcdc_actors::verify::{TableReport, Verifier, VerifyError};

use crate::check::{configured_tables, message_key};
use crate::cli::VerifyArgs;
use crate::error::AppError;
use crate::settings::Settings;

/// Exit code of a verification that found drift (0: equal).
pub const DRIFT_EXIT_CODE: i32 = 1;
/// Exit code of a verification without drift but with differences it could
/// not confirm: the pipeline was behind by more than the fence timeout.
pub const UNCONFIRMED_EXIT_CODE: i32 = 8;

/// Run `pgcdc verify`; its exit code: 0 every table equal,
/// [`DRIFT_EXIT_CODE`] drift remains in some table, else
/// [`UNCONFIRMED_EXIT_CODE`] if some differences could not be confirmed.
pub fn run(settings: Settings, args: &VerifyArgs) -> Result<i32, AppError> {
    let tables = match args.tables.is_empty() {
        true => configured_tables(&settings, &settings.postgres.tables)?,
        false => configured_tables(&settings, &args.tables)?,
    };
    let key = match args.repair {
        true => Some(message_key(&settings)?),
        false => None,
    };
    let verifier = Verifier::new(
        Arc::new(settings.postgres.clone()),
        Arc::new(settings.elasticsearch.clone()),
        Arc::new(settings.kafka.clone()),
        settings.verify.clone(),
        args.sample,
    )
    .map_err(classified)?
    .with_kafka(args.kafka);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| AppError::LocalIo(e.to_string()))?;
    rt.block_on(async {
        let (mut drifted, mut unconfirmed) = (false, false);
        for (schema, table) in &tables {
            let table = (schema.as_str(), table.as_str());
            let report = verifier.table(table.0, table.1).await.map_err(classified)?;
            let json = args.format == "json";
            print(&report, json, "");
            let report = match (&key, report.drifted()) {
                (Some(key), true) => repair(&verifier, key, table, report, json).await?,
                _ => report,
            };
            drifted |= report.drifted();
            unconfirmed |= report.unconfirmed();
        }
        Ok(match (drifted, unconfirmed) {
            (true, _) => DRIFT_EXIT_CODE,
            (false, true) => UNCONFIRMED_EXIT_CODE,
            (false, false) => 0,
        })
    })
}

/// Repair what `report` found, then verify the table again (printed).
async fn repair(
    verifier: &Verifier,
    key: &MessageKey,
    table: (&str, &str),
    report: TableReport,
    json: bool,
) -> Result<TableReport, AppError> {
    let Some(since) = verifier
        .request_repair(key, table, &report)
        .await
        .map_err(classified)?
    else {
        return Ok(report);
    };
    tracing::info!(table = %report.table, lsn = %since, "repair requested");
    if !verifier
        .await_repair(&report, since)
        .await
        .map_err(classified)?
    {
        tracing::warn!(table = %report.table, "repair not seen in the mirror in time (is the daemon running on this slot?); verifying again");
    }
    let again = verifier.table(table.0, table.1).await.map_err(classified)?;
    print(&again, json, "after repair: ");
    Ok(again)
}

/// Print a report as one JSON line, or as text after `prefix`.
fn print(report: &TableReport, json: bool, prefix: &str) {
    match json {
        true => println!("{}", serde_json::to_string(report).unwrap_or_default()),
        false => println!("{prefix}{}", report.text()),
    }
}

/// A verification error as the daemon's error ([`AppError::classified`]).
fn classified(e: VerifyError) -> AppError {
    AppError::classified(e.class(), e.to_string())
}
