//! `pgcdc check` and `pgcdc status`: what a person needs to see before and
//! while pgcdc runs.

use std::time::Duration;

use pgcdc_actors::checkpoint::{Checkpoint, CheckpointStore, SlotIdentity};
use pgcdc_actors::error::ErrorClass;
use pgcdc_actors::replication::{slot, ReplicationError};
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::error::{AppError, ExitCode};
use crate::settings::Settings;

/// Check configuration (already loaded), PostgreSQL, the slot against the checkpoint, and Kafka.
pub fn run(settings: Settings) -> Result<(), AppError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| AppError::LocalIo(e.to_string()))?;
    println!("ok    configuration");
    let mut first_failure = None;
    let mut report = |what: &str, res: Result<String, AppError>| match res {
        Ok(detail) => println!("ok    {what}: {detail}"),
        Err(e) => {
            println!("FAIL  {what}: {e}");
            first_failure.get_or_insert(e);
        }
    };
    report("postgresql", rt.block_on(check_postgres(&settings)));
    report("kafka", check_kafka(&settings));
    first_failure.map_or(Ok(()), Err)
}

fn classified(e: ReplicationError) -> AppError {
    let code = match e.class() {
        ErrorClass::Fatal(code) => code,
        ErrorClass::Transient => ExitCode::Upstream,
    };
    AppError::Classified {
        code,
        message: e.to_string(),
    }
}

async fn check_postgres(settings: &Settings) -> Result<String, AppError> {
    let pg = &settings.postgres;
    let sql = slot::connect(pg).await.map_err(classified)?;
    slot::check_server(&sql).await.map_err(classified)?;
    let tables = slot::resolve_tables(&sql, &pg.tables)
        .await
        .map_err(classified)?;
    let identity = SlotIdentity {
        system_id: slot::system_id(&sql).await.map_err(classified)?,
        database: pg.database.clone(),
        slot_name: pg.slot.clone(),
    };
    let checkpoint = read_checkpoint(settings)?;
    let state = slot::inspect_slot(&sql, &pg.slot)
        .await
        .map_err(classified)?;
    let start = slot::decide_start(
        &checkpoint,
        state.as_ref(),
        &identity,
        settings.snapshot.mode == pgcdc_actors::snapshot::SnapshotMode::Initial,
    )
    .map_err(classified)?;
    Ok(format!(
        "{}:{}/{}, {} tables with keys, start: {start:?}",
        pg.host,
        pg.port,
        pg.database,
        tables.len()
    ))
}

fn read_checkpoint(settings: &Settings) -> Result<Checkpoint, AppError> {
    let dir = settings.checkpoint_dir();
    if !dir.join("CURRENT").exists() {
        return Ok(Checkpoint::default());
    }
    let store =
        CheckpointStore::open_read_only(&dir).map_err(|e| AppError::LocalIo(e.to_string()))?;
    store.load().map_err(|e| AppError::LocalIo(e.to_string()))
}

fn check_kafka(settings: &Settings) -> Result<String, AppError> {
    let consumer: BaseConsumer = settings
        .kafka
        .client_config()
        .create()
        .map_err(|e| AppError::Config(vec![format!("kafka: {e}")]))?;
    let md = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(|e| AppError::Upstream(format!("{}: {e}", settings.kafka.brokers)))?;
    Ok(format!(
        "{} brokers, {} topics",
        md.brokers().len(),
        md.topics().len()
    ))
}

/// Print the checkpoint and the slot.
pub fn status(settings: Settings) -> Result<(), AppError> {
    let checkpoint = read_checkpoint(&settings)?;
    println!("checkpoint lsn:      {}", checkpoint.lsn);
    match &checkpoint.slot {
        Some(s) => println!(
            "checkpoint slot:     {} on system {} database {}",
            s.slot_name, s.system_id, s.database
        ),
        None => println!("checkpoint slot:     none (never started)"),
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| AppError::LocalIo(e.to_string()))?;
    rt.block_on(async {
        let sql = slot::connect(&settings.postgres)
            .await
            .map_err(classified)?;
        match slot::inspect_slot(&sql, &settings.postgres.slot)
            .await
            .map_err(classified)?
        {
            Some(s) => println!(
                "slot confirmed lsn:  {} (wal_status {})",
                s.confirmed_flush, s.wal_status
            ),
            None => println!("slot:                missing"),
        }
        Ok(())
    })
}
