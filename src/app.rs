//! Builds the supervision tree, runs it, and shuts it down in order:
//! stop reading WAL → drain Kafka acknowledgements → checkpoint → confirm the
//! slot → exit 0.
//!
//! Actors never exit the process: a fatal condition is reported on the
//! [`FatalReporter`] every actor's restart budget carries. The first report
//! ends the run like a signal does, with a shorter stop (stop reading WAL,
//! drain what Kafka still acknowledges, no slot confirmation), and its exit
//! code becomes the process's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use pgcdc_actors::canary;
use pgcdc_actors::checkpoint::CheckpointActor;
use pgcdc_actors::error::{Fatal, FatalReceiver, FatalReporter, ProducerError};
use pgcdc_actors::es_writer::{CanaryWatch, EsWriterActor};
use pgcdc_actors::kafka_producer::KafkaProducerActor;
use pgcdc_actors::lsn::Lsn;
use pgcdc_actors::messages::{DrainProducer, GetCheckpoint, StopStreaming};
use pgcdc_actors::metrics::Readiness;
use pgcdc_actors::pg;
use pgcdc_actors::replication::ReplicationActor;
use pgcdc_actors::snapshot::watermark::{MessageKey, Watermarks};
use pgcdc_actors::snapshot::SnapshotActor;
use pgcdc_actors::supervision::RestartBudget;
use tokio::signal::unix::{signal, SignalKind};

use crate::error::AppError;
use crate::http::ReadyRule;
use crate::settings::Settings;

/// Longest stop after a fatal report: what Kafka acknowledges by then is
/// checkpointed, the rest is sent again on the next start.
const FATAL_STOP_MAX: Duration = Duration::from_secs(5);
/// Longest wind-down once the outcome is known (the actors and their
/// clients dropped: a Kafka consumer leaving its group can wait minutes on
/// a broker holding a join): then the process ends with the outcome's exit
/// code anyway. The checkpoint is synced and the sink's offsets committed
/// by then; what is left undone is read or sent again on the next start.
const TEARDOWN_MAX: Duration = Duration::from_secs(10);

/// Why the daemon stops.
enum Stop {
    /// SIGTERM or SIGINT: the full, orderly shutdown.
    Signal,
    /// An actor reported a condition the process cannot continue from.
    Fatal(Fatal),
}

/// Run the daemon until SIGTERM/SIGINT or a fatal report; `Ok` after a clean shutdown.
pub fn run(settings: Settings) -> Result<(), AppError> {
    let system = actix::System::new();
    let result = system.block_on(run_async(settings));
    wind_down(&result);
    result
}

/// Stop the actor system, and end the process with `result`'s exit code
/// should dropping it (on return) take longer than [`TEARDOWN_MAX`].
fn wind_down(result: &Result<(), AppError>) {
    let code = result
        .as_ref()
        .map_or_else(|e| e.exit_code().code(), |()| 0);
    let watch = std::thread::Builder::new()
        .name("teardown watch".into())
        .spawn(move || {
            std::thread::sleep(TEARDOWN_MAX);
            tracing::warn!(
                timeout_secs = TEARDOWN_MAX.as_secs(),
                exit_code = code,
                "closing the clients did not finish in time; exiting without waiting for them"
            );
            std::process::exit(code);
        });
    if let Err(e) = watch {
        tracing::warn!(error = %e, "no watch on the wind-down: the exit waits for every client to close");
    }
    fail::fail_point!(pgcdc_actors::wire::failpoint::TEARDOWN);
    System::current().stop();
}

async fn run_async(settings: Settings) -> Result<(), AppError> {
    settings.create_state_dir()?;
    let brokers = crate::topics::reach(&settings)?;
    if settings.kafka.create_topics {
        crate::topics::create_topics(&settings, brokers).await?;
    }
    let sink = settings.elasticsearch.run_in_daemon;
    serve_metrics(&settings, Readiness::Pipeline { sink }).await?;
    actix::spawn(crate::topics::heal_refusals(settings.kafka.clone()));
    let (fatal, mut fatal_rx) = FatalReporter::channel();
    let budget_of = |actor| budget(&settings, actor, &fatal);
    let checkpoint = CheckpointActor::start(settings.checkpoint_dir(), budget_of("checkpoint"));
    let partitioning = crate::topics::pin_partitions(&settings, checkpoint.clone()).await?;
    let kafka = Arc::new(settings.kafka.clone());
    let (db, cp) = (settings.postgres.database.clone(), checkpoint.clone());
    let producer_budget = budget_of("kafka_producer");
    let dead_letters = settings.elasticsearch.dead_letter_topic.clone();
    let heartbeat_every = Duration::from_secs(settings.wal.heartbeat_secs);
    let producer = Supervisor::start(move |_| {
        KafkaProducerActor::new(kafka, &db, cp, producer_budget)
            .with_partitioning(partitioning.clone())
            .with_dead_letter_topic(&dead_letters)
            .with_heartbeats(heartbeat_every)
    });
    let pg = Arc::new(settings.postgres.clone());
    let (wal_pg, wal) = (pg.clone(), settings.wal.clone());
    let wal_budget = budget_of("wal_monitor");
    let _wal_monitor = Supervisor::start(move |_| {
        pgcdc_actors::wal_monitor::WalMonitorActor::new(wal_pg, wal, wal_budget)
    });
    let snapshot = Arc::new(settings.snapshot.clone());
    let key_path = settings.message_key_path();
    let key = MessageKey::load_or_create(&key_path)
        .map_err(|e| AppError::LocalIo(format!("{}: {e}", key_path.display())))?;
    start_canary(&settings, &pg, &key);
    let watch = canary_watch(&settings, Some(&key));
    start_continuous_verify(&settings, &key)?;
    let marks = Watermarks::new(key);
    let (pg2, snap2, m, cp) = (
        pg.clone(),
        snapshot.clone(),
        marks.clone(),
        checkpoint.clone(),
    );
    let snap_budget = budget_of("snapshot");
    let snapshots = Supervisor::start(move |_| SnapshotActor::new(pg2, snap2, m, cp, snap_budget));
    let (p, cp) = (producer.clone(), checkpoint.clone());
    let repl_budget = budget_of("replication");
    let replication = Supervisor::start(move |_| {
        ReplicationActor::new(pg, snapshot, (snapshots, marks), p, cp, repl_budget)
    });
    // The sink stops with the process: its offsets are committed after every written batch.
    let _sink = sink.then(|| start_es_sink(&settings, &fatal, watch));

    match wait_for_stop(&mut fatal_rx).await {
        Stop::Signal => {
            tracing::info!("shutting down: stopping the stream and draining kafka");
            shutdown(&settings, replication, producer, checkpoint).await
        }
        Stop::Fatal(f) => {
            stop_after_fatal(&settings, replication, producer).await;
            Err(AppError::Fatal(f))
        }
    }
}

/// Verify samples of the configured tables if `verify.interval_secs` asks for it.
fn start_continuous_verify(settings: &Settings, key: &MessageKey) -> Result<(), AppError> {
    let tables = crate::check::configured_tables(settings, &settings.postgres.tables)?;
    pgcdc_actors::verify::continuous::spawn(
        Arc::new(settings.postgres.clone()),
        Arc::new(settings.elasticsearch.clone()),
        Arc::new(settings.kafka.clone()),
        settings.verify.clone(),
        (tables, key.clone()),
    );
    Ok(())
}

/// Write freshness canaries and publish their records if
/// `canary.interval_secs` asks for them.
fn start_canary(settings: &Settings, pg: &Arc<pgcdc_actors::pg::PostgresConfig>, key: &MessageKey) {
    let canary = &settings.canary;
    if canary.interval_secs == 0 {
        return;
    }
    pgcdc_actors::metrics::metrics()
        .freshness
        .set_max_lag(canary.max_lag_secs);
    let kafka = Arc::new(settings.kafka.clone());
    if let Err(e) = canary::spawn_publisher(kafka, key.clone(), &pg.slot) {
        tracing::warn!(error = %e, "canary records cannot be published; freshness stages age");
    }
    let interval = Duration::from_secs(canary.interval_secs);
    canary::spawn_writer(pg.clone(), key.clone(), interval);
}

/// What the ES sink needs to measure the search stage, if canaries are on:
/// the installation's message `key` (read from the state directory when not
/// given; without it the search stage is not measured).
fn canary_watch(settings: &Settings, key: Option<&MessageKey>) -> Option<Arc<CanaryWatch>> {
    if settings.canary.interval_secs == 0 {
        return None;
    }
    let key = match key {
        Some(k) => k.clone(),
        None => {
            let path = settings.message_key_path();
            match MessageKey::load(&path) {
                Ok(k) => k,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "no message key: canary records cannot be checked, the search stage is not measured (copy the daemon's key here, or set canary.interval_secs = 0)");
                    return None;
                }
            }
        }
    };
    pgcdc_actors::metrics::metrics()
        .freshness
        .set_max_lag(settings.canary.max_lag_secs);
    Some(Arc::new(CanaryWatch {
        key,
        slot: settings.postgres.slot.clone(),
        topic: canary::record::topic(&settings.kafka.topic_prefix),
    }))
}

/// Run only the ES sink (`pgcdc es-sink`) until SIGTERM/SIGINT or a fatal report.
pub fn run_es_sink(settings: Settings) -> Result<(), AppError> {
    let errors = settings.sink_errors();
    if !errors.is_empty() {
        return Err(AppError::Config(errors));
    }
    let system = actix::System::new();
    let result = system.block_on(async {
        let brokers = crate::topics::reach(&settings)?;
        if settings.kafka.create_topics {
            crate::topics::create_topics(&settings, brokers).await?;
        }
        serve_metrics(&settings, Readiness::Sink).await?;
        actix::spawn(crate::topics::heal_refusals(settings.kafka.clone()));
        let (fatal, mut fatal_rx) = FatalReporter::channel();
        let _sink = start_es_sink(&settings, &fatal, canary_watch(&settings, None));
        let stop = wait_for_stop(&mut fatal_rx).await;
        tracing::info!("es sink stopping; uncommitted records are read again on restart");
        match stop {
            Stop::Signal => Ok(()),
            Stop::Fatal(f) => Err(AppError::Fatal(f)),
        }
    });
    wind_down(&result);
    result
}

/// The restart budget of `actor`, reporting fatal conditions to `fatal`.
fn budget(settings: &Settings, actor: &'static str, fatal: &FatalReporter) -> RestartBudget {
    RestartBudget::new(actor, settings.supervision.clone()).reporting_to(fatal.clone())
}

/// Serve `/metrics`, `/health` and `/ready` (judged on `what`) if configured.
async fn serve_metrics(settings: &Settings, what: Readiness) -> Result<(), AppError> {
    match settings.metrics.addr() {
        Some(addr) => {
            let window = Duration::from_secs(settings.metrics.ready_window_secs);
            crate::http::serve(addr, ReadyRule { what, window }).await
        }
        None => Ok(()),
    }
}

/// Start the ES sink; with `canary`, it also measures the search stage.
fn start_es_sink(
    settings: &Settings,
    fatal: &FatalReporter,
    canary: Option<Arc<CanaryWatch>>,
) -> Addr<EsWriterActor> {
    let es = Arc::new(settings.elasticsearch.clone());
    let kafka = Arc::new(settings.kafka.clone());
    let pg = Some(Arc::new(settings.postgres.clone()));
    let budget = budget(settings, "es_writer", fatal);
    Supervisor::start(move |_| {
        let sink = EsWriterActor::new(es, kafka, pg.clone(), budget);
        match canary.clone() {
            Some(watch) => sink.with_canaries(watch),
            None => sink,
        }
    })
}

/// Wait for SIGTERM/SIGINT or the first fatal report, whichever comes first.
async fn wait_for_stop(fatal: &mut FatalReceiver) -> Stop {
    let reported = async {
        match fatal.recv().await {
            Some(f) => f,
            // Every reporter is gone without a report: only a signal can stop us.
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = wait_for_signal() => Stop::Signal,
        f = reported => Stop::Fatal(f),
    }
}

async fn wait_for_signal() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// After a fatal report: stop reading WAL and give Kafka a short while to
/// acknowledge what is in flight, so it is checkpointed. Bounded, best
/// effort: the actor that failed may be the one we would wait for.
async fn stop_after_fatal(
    settings: &Settings,
    replication: Addr<ReplicationActor>,
    producer: Addr<KafkaProducerActor>,
) {
    tracing::info!("stopping after a fatal error: stopping the stream and draining kafka");
    let limit = Duration::from_secs(settings.shutdown_timeout_secs).min(FATAL_STOP_MAX);
    let stopped = tokio::time::timeout(limit, async {
        replication.send(StopStreaming).await.ok();
        producer.send(DrainProducer).await.ok();
    })
    .await;
    if stopped.is_err() {
        tracing::warn!(
            timeout_secs = limit.as_secs(),
            "the stream did not stop in time; unacknowledged changes are sent again on the next start"
        );
    }
}

async fn shutdown(
    settings: &Settings,
    replication: Addr<ReplicationActor>,
    producer: Addr<KafkaProducerActor>,
    checkpoint: Addr<CheckpointActor>,
) -> Result<(), AppError> {
    let timeout = Duration::from_secs(settings.shutdown_timeout_secs);
    let drained = tokio::time::timeout(timeout, async {
        loop {
            replication.send(StopStreaming).await.ok();
            match producer.send(DrainProducer).await {
                // The session broke while draining (an actor restarted): what
                // it had in flight is not checkpointed and is sent again on
                // the next start. Stop and drain what is left.
                Ok(Err(ProducerError::SessionClosed(_))) => {
                    tracing::warn!("a restart during shutdown dropped unacknowledged records; they are sent again on the next start");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    })
    .await;
    if !matches!(drained, Ok(Ok(Ok(_)))) {
        return Err(AppError::Upstream(format!(
            "shutdown: kafka did not acknowledge everything within {}s; unacknowledged changes will be re-sent on restart",
            settings.shutdown_timeout_secs
        )));
    }
    let persisted = match checkpoint.send(GetCheckpoint).await {
        Ok(Ok(c)) => c.lsn,
        other => {
            return Err(AppError::LocalIo(format!(
                "shutdown: reading the checkpoint failed: {other:?}"
            )))
        }
    };
    confirm_slot(settings, persisted).await;
    tracing::info!(lsn = %persisted, "shutdown complete");
    Ok(())
}

/// Tell PostgreSQL everything up to `lsn` is flushed, once the walsender has
/// let go of the slot. Best effort: the checkpoint is what restarts use.
async fn confirm_slot(settings: &Settings, lsn: Lsn) {
    if lsn == Lsn::ZERO {
        return;
    }
    let cfg = &settings.postgres;
    let Ok(sql) = pg::connect(cfg).await else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let q = "SELECT active, confirmed_flush_lsn < $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1";
        match sql.query_opt(q, &[&cfg.slot, &lsn.to_string()]).await {
            Ok(Some(row)) if !row.get::<_, bool>(0) => {
                if row.get::<_, Option<bool>>(1) == Some(true) {
                    let advance = "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)";
                    if let Err(e) = sql.execute(advance, &[&cfg.slot, &lsn.to_string()]).await {
                        let e = pg::PgError::from(e);
                        tracing::warn!(error = %e, "could not confirm the final lsn to postgresql");
                    }
                }
                return;
            }
            Ok(Some(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            _ => return,
        }
    }
    tracing::warn!(
        "slot still active after shutdown; final lsn not confirmed (it will be on next start)"
    );
}
