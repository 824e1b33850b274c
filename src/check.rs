//! `pgcdc check` and `pgcdc status`: what a person needs to see before and
//! while pgcdc runs.

use pgcdc_actors::error::ConfigError;
use std::sync::Arc;
use std::time::Duration;

use pgcdc_actors::checkpoint::{Checkpoint, CheckpointStore, SlotIdentity};
use pgcdc_actors::event::{KeySource, TableRef};
use pgcdc_actors::kafka_producer::{metadata_or_refusal, prober};
use pgcdc_actors::lsn::Lsn;
use pgcdc_actors::pg::{
    catalog, connect as pg_connect, connect_replication, parse_table_name, sql_security, waits,
    PgError,
};
use pgcdc_actors::replication::{slot, ReplicationError};
use pgcdc_actors::snapshot::watermark::{MessageKey, Signal};

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
    let mut report = |what: &str, res: Result<Scope, AppError>| match res {
        Ok(Scope::Matches(detail)) => println!("ok    {what}: {detail}"),
        Ok(Scope::Mismatch(detail)) => println!("WARN  {what}: {detail}"),
        Err(e) => {
            println!("FAIL  {what}: {e}");
            first_failure.get_or_insert(e);
        }
    };
    report(
        "postgresql",
        rt.block_on(check_postgres(&settings)).map(Scope::Matches),
    );
    report(
        "postgresql replication connection",
        rt.block_on(check_replication(&settings))
            .map(Scope::Matches),
    );
    report("slot", rt.block_on(check_slot(&settings)));
    report("publication", rt.block_on(check_publication(&settings)));
    report("privileges", rt.block_on(check_privileges(&settings)));
    report("kafka", check_kafka(&settings));
    first_failure.map_or(Ok(()), Err)
}

/// An engine error as the daemon's error ([`AppError::classified`]).
fn classified(e: impl Into<ReplicationError>) -> AppError {
    let e = e.into();
    AppError::classified(e.class(), e.to_string())
}

async fn check_postgres(settings: &Settings) -> Result<String, AppError> {
    let pg = &settings.postgres;
    let sql = pg_connect(pg).await.map_err(classified)?;
    let security = sql_security(&sql, pg).await.map_err(classified)?;
    catalog::check_server(&sql).await.map_err(classified)?;
    let tables = catalog::resolve_tables(&sql, &pg.tables)
        .await
        .map_err(classified)?;
    let identity = SlotIdentity {
        system_id: catalog::system_id(&sql).await.map_err(classified)?,
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
        "{}:{}/{}, {} tables with keys, start: {start:?}; sql connection {security}",
        pg.host,
        pg.port,
        pg.database,
        tables.len()
    ))
}

/// A SQL connection and the configured tables with their keys.
async fn resolved_tables(
    settings: &Settings,
) -> Result<(tokio_postgres::Client, Vec<Arc<TableRef>>), AppError> {
    let pg = &settings.postgres;
    let sql = pg_connect(pg).await.map_err(classified)?;
    let tables = catalog::resolve_tables(&sql, &pg.tables)
        .await
        .map_err(classified)?;
    Ok((sql, tables))
}

/// Whether the role may read every configured table, every row of it:
/// streaming works without, the initial snapshot, backfills, repairs and
/// verify do not.
async fn check_privileges(settings: &Settings) -> Result<Scope, AppError> {
    let (sql, tables) = resolved_tables(settings).await?;
    let (role, unreadable) = catalog::unreadable_tables(&sql, &tables)
        .await
        .map_err(classified)?;
    let limited = catalog::rls_limited(&sql, &tables)
        .await
        .map_err(classified)?;
    let mut notes = Vec::new();
    if !unreadable.is_empty() {
        let list = unreadable.join(", ");
        notes.push(format!("{role} may not read {list}: the initial snapshot, backfills, repairs and verify would fail; run GRANT SELECT ON {list} TO {role}"));
    }
    if !limited.is_empty() {
        let list = limited.join(", ");
        notes.push(format!("row-level security filters the rows of {list} for {role}: the initial snapshot, backfills, repairs and verify would fail; run ALTER ROLE {role} BYPASSRLS"));
    }
    Ok(match notes.is_empty() {
        true => Scope::Matches(format!("{role} may read every table")),
        false => Scope::Mismatch(notes.join("; ")),
    })
}

/// Open a replication session (nothing streams) and say what it negotiated.
async fn check_replication(settings: &Settings) -> Result<String, AppError> {
    let (_session, security) = connect_replication(&settings.postgres, Lsn::ZERO)
        .await
        .map_err(classified)?;
    Ok(security.to_string())
}

/// Whether the slot exists; if not, the transactions its creation at the
/// first start would wait for (PostgreSQL starts a logical slot only once
/// every transaction holding a transaction ID has ended).
async fn check_slot(settings: &Settings) -> Result<Scope, AppError> {
    let pg = &settings.postgres;
    let sql = pg_connect(pg).await.map_err(classified)?;
    let existing = slot::inspect_slot(&sql, &pg.slot)
        .await
        .map_err(classified)?;
    if existing.is_some() {
        return Ok(Scope::Matches(format!("{} exists", pg.slot)));
    }
    let open = waits::transactions_holding_ids(&sql)
        .await
        .map_err(classified)?;
    if open.is_empty() {
        return Ok(Scope::Matches(format!(
            "{} does not exist yet; pgcdc creates it at its first start",
            pg.slot
        )));
    }
    let named: Vec<String> = open.iter().map(ToString::to_string).collect();
    Ok(Scope::Mismatch(format!(
        "{} does not exist yet, and creating it at the first start waits until these transactions end: {}",
        pg.slot,
        named.join(", ")
    )))
}

/// The result of a check that passes with or without a warning (an `ok`
/// or a `WARN` line).
enum Scope {
    /// Nothing to warn about; this detail.
    Matches(String),
    /// Something to warn about: the publication differs from the
    /// configuration (tables, operations), the role may not read a table,
    /// a change topic gained partitions, or open transactions would hold
    /// the slot's creation back.
    Mismatch(String),
}

/// Compare the publication with the configured tables: partitions under
/// their root, partitions whose changes it sends as another table's,
/// missing tables, tables that are published but not configured,
/// operations it does not publish, inheritance children sent as
/// themselves, unlogged or foreign partitions (never decoded); which
/// tables it sends only some columns or rows of (column lists, row
/// filters).
async fn check_publication(settings: &Settings) -> Result<Scope, AppError> {
    let pg = &settings.postgres;
    let (sql, tables) = resolved_tables(settings).await?;
    let state = slot::inspect_publication(&sql, &pg.publication)
        .await
        .map_err(classified)?;
    let published = state.as_ref().map_or(&[][..], |s| &s.tables[..]);
    slot::check_configured_partitions(&sql, &pg.publication, published, &tables)
        .await
        .map_err(classified)?;
    let Some(state) = state else {
        return Ok(Scope::Matches(format!(
            "{:?} does not exist yet; created at start",
            pg.publication
        )));
    };
    slot::check_partition_root(&sql, &pg.publication, &state, &tables)
        .await
        .map_err(classified)?;
    let missing: Vec<String> = state
        .missing(&tables)
        .iter()
        .map(|t| format!("{}.{}", t.schema, t.name))
        .collect();
    let extra = state.extra(&tables);
    let mut notes: Vec<String> = state
        .unpublished_note(&pg.publication)
        .into_iter()
        .collect();
    if !missing.is_empty() {
        notes.push(format!(
            "lacks {} (added at start, earlier rows not snapshotted)",
            missing.join(", ")
        ));
    }
    if !extra.is_empty() {
        notes.push(format!(
            "has {}, which postgres.tables does not (their changes are not emitted)",
            extra.join(", ")
        ));
    }
    let children = catalog::inheritance_children(&sql, &tables)
        .await
        .map_err(classified)?;
    for (parent, children) in children {
        notes.push(format!("sends the changes of {parent}'s inheritance children ({children}) under their own names, so {parent}'s records hold only its own rows"));
    }
    let names: Vec<_> = tables
        .iter()
        .map(|t| (t.schema.clone(), t.name.clone()))
        .collect();
    let undecoded = catalog::undecoded_partitions(&sql, &names)
        .await
        .map_err(classified)?;
    for ((schema, name), partitions) in undecoded {
        notes.push(format!("cannot send the changes of {schema}.{name}'s partitions {}: PostgreSQL decodes none of them (ALTER TABLE … SET LOGGED, or detach them)", partitions.join(", ")));
    }
    let mut partial = Vec::new();
    for t in &tables {
        let sent = catalog::published(&sql, &pg.publication, &t.schema, &t.name)
            .await
            .map_err(classified)?;
        let mut parts: Vec<String> = sent
            .columns
            .map(|c| format!("columns ({})", c.join(", ")))
            .into_iter()
            .collect();
        parts.extend(sent.filter.map(|f| format!("rows WHERE {f}")));
        if !parts.is_empty() {
            partial.push(format!(
                "{}.{} only {}",
                t.schema,
                t.name,
                parts.join(" and ")
            ));
        }
    }
    let sends = match partial.is_empty() {
        true => String::new(),
        false => format!("; it sends {}", partial.join("; ")),
    };
    Ok(match notes.is_empty() {
        true => Scope::Matches(format!(
            "{:?} publishes exactly postgres.tables{sends}",
            pg.publication
        )),
        false => Scope::Mismatch(format!("{:?} {}{sends}", pg.publication, notes.join("; "))),
    })
}

/// The checkpoint store, read-only; `None` if pgcdc never started here.
fn open_checkpoint(settings: &Settings) -> Result<Option<CheckpointStore>, AppError> {
    let dir = settings.checkpoint_dir();
    if !dir.join("CURRENT").exists() {
        return Ok(None);
    }
    let store =
        CheckpointStore::open_read_only(&dir).map_err(|e| AppError::LocalIo(e.to_string()))?;
    Ok(Some(store))
}

fn read_checkpoint(settings: &Settings) -> Result<Checkpoint, AppError> {
    match open_checkpoint(settings)? {
        Some(store) => store.load().map_err(|e| AppError::LocalIo(e.to_string())),
        None => Ok(Checkpoint::default()),
    }
}

/// Reach Kafka; warn about each change topic with partitions added since
/// pgcdc first wrote to it (its records stay on the ones it had).
fn check_kafka(settings: &Settings) -> Result<Scope, AppError> {
    let prober = prober(&settings.kafka, "pgcdc-check").map_err(|e| {
        let message = settings.kafka.properties.redact(&e.to_string());
        AppError::Config(vec![ConfigError::new("kafka", message)])
    })?;
    let md = metadata_or_refusal(&prober, Duration::from_secs(10)).map_err(|e| {
        let message = settings.kafka.properties.redact(&e);
        AppError::Upstream(format!("{}: {message}", settings.kafka.brokers))
    })?;
    let reached = format!(
        "{} brokers, {} topics",
        md.brokers().len(),
        md.topics().len()
    );
    let Some(store) = open_checkpoint(settings)? else {
        return Ok(Scope::Matches(reached));
    };
    let pins = store
        .partition_pins()
        .map_err(|e| AppError::LocalIo(e.to_string()))?;
    let added: Vec<String> = crate::topics::change_topics(settings)
        .iter()
        .filter_map(|topic| {
            let t = md.topics().iter().find(|t| t.name() == topic)?;
            let (now, pinned) = (t.partitions().len(), *pins.get(topic)?);
            (now > pinned as usize).then(|| {
                format!("{topic} has {now} partitions, {pinned} when pgcdc first wrote to it")
            })
        })
        .collect();
    Ok(match added.is_empty() {
        true => Scope::Matches(reached),
        false => Scope::Mismatch(format!(
            "{reached}; partitions were added: {} (see docs/events.md, added partitions)",
            added.join("; ")
        )),
    })
}

/// Print the checkpoint, copy progress, the slot and (from a running
/// daemon's metrics endpoint) per-table counts and lag.
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
    for p in &checkpoint.progress {
        let ranges = p.ranges.len();
        let done = p.ranges.iter().filter(|r| r.done).count();
        let state = if p.done() { "copied" } else { "copying" };
        println!(
            "copy {}.{}: {state}, {} rows, {done}/{ranges} key ranges done",
            p.schema, p.name, p.rows
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| AppError::LocalIo(e.to_string()))?;
    rt.block_on(async {
        let sql = pg_connect(&settings.postgres).await.map_err(classified)?;
        let q = "SELECT confirmed_flush_lsn::text, wal_status, active, \
                        (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint, \
                        (pg_current_wal_lsn() - restart_lsn)::bigint \
                   FROM pg_replication_slots WHERE slot_name = $1";
        match sql.query_opt(q, &[&settings.postgres.slot]).await {
            Ok(Some(r)) => {
                println!(
                    "slot confirmed lsn:  {} (wal_status {}, {})",
                    r.get::<_, Option<String>>(0).unwrap_or_default(),
                    r.get::<_, Option<String>>(1).unwrap_or_default(),
                    if r.get::<_, bool>(2) {
                        "active"
                    } else {
                        "inactive"
                    }
                );
                println!(
                    "slot lag:            {} bytes behind the server's WAL",
                    r.get::<_, Option<i64>>(3).unwrap_or(0)
                );
                println!(
                    "slot retained wal:   {} bytes",
                    r.get::<_, Option<i64>>(4).unwrap_or(0)
                );
            }
            Ok(None) => println!("slot:                missing"),
            Err(e) => return Err(classified(PgError::from(e))),
        }
        Ok::<(), AppError>(())
    })?;
    if let Some(addr) = settings.metrics.addr() {
        match rt.block_on(scrape(addr)) {
            Ok(text) => print_live(&text),
            Err(e) => println!("daemon:              not reachable at http://{addr}/metrics ({e})"),
        }
    }
    Ok(())
}

async fn scrape(addr: std::net::SocketAddr) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connect = tokio::net::TcpStream::connect(addr);
    let mut conn = tokio::time::timeout(Duration::from_secs(3), connect)
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: pgcdc\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = String::new();
    tokio::time::timeout(Duration::from_secs(3), conn.read_to_string(&mut buf))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    buf.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .ok_or_else(|| "not an HTTP response".into())
}

/// Per-table counts and lag from the daemon's metrics.
fn print_live(text: &str) {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let Ok(scrape) = prometheus_parse::Scrape::parse(lines) else {
        println!("daemon:              metrics did not parse");
        return;
    };
    let mut tables: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for s in &scrape.samples {
        let value = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        match s.metric.as_str() {
            "pgcdc_replication_lag_bytes" => println!("daemon lag:          {value} bytes"),
            "pgcdc_replication_lag_seconds" => println!("daemon lag:          {value} s"),
            "pgcdc_freshness_last_canary_age_seconds" => {
                let stage = s.labels.get("stage").unwrap_or("?");
                let name = format!("freshness {stage}:");
                println!("{name:<21}last canary {value:.1} s old");
            }
            "pgcdc_events_in_total" | "pgcdc_events_out_total" => {
                let dir = if s.metric.contains("_in_") {
                    "in"
                } else {
                    "out"
                };
                let table = s.labels.get("table").unwrap_or("?").to_owned();
                let op = s.labels.get("op").unwrap_or("?");
                tables
                    .entry(table)
                    .or_default()
                    .push(format!("{dir} {op}={value}"));
            }
            _ => {}
        }
    }
    for (table, counts) in tables {
        println!("events {table}: {}", counts.join(" "));
    }
}

/// Refuse a backfill of a table without a unique key (it can only be copied
/// whole, by an initial snapshot): signalled, every restart would find a copy
/// it cannot finish.
async fn refuse_keyless(
    sql: &tokio_postgres::Client,
    wanted: &[(String, String)],
) -> Result<(), AppError> {
    let mut errors = Vec::new();
    for (schema, table) in wanted {
        match catalog::table_key(sql, schema, table).await {
            Ok(t) if t.key_source == KeySource::WholeRow => errors.push(format!(
                "--table {schema}.{table}: has no unique key (REPLICA IDENTITY FULL without a primary key), so it cannot be copied by key while streaming; add a primary key or a REPLICA IDENTITY USING INDEX"
            )),
            Ok(_) => {}
            Err(e) => errors.push(format!("--table {schema}.{table}: {e}")),
        }
    }
    match errors.is_empty() {
        true => Ok(()),
        false => Err(AppError::Classified {
            code: ExitCode::SourceNotReady,
            message: errors.join("; "),
        }),
    }
}

/// The `--table` flags as (schema, table), each one a configured table;
/// every bad flag reported at once.
pub fn configured_tables(
    settings: &Settings,
    tables: &[String],
) -> Result<Vec<(String, String)>, AppError> {
    let mut wanted = Vec::new();
    let mut errors = Vec::new();
    for t in tables {
        match parse_table_name(t) {
            Ok((schema, name)) => {
                let configured = settings
                    .postgres
                    .tables
                    .iter()
                    .filter_map(|c| parse_table_name(c).ok())
                    .any(|(s, n)| (s.as_str(), n.as_str()) == (schema.as_str(), name.as_str()));
                if configured {
                    wanted.push((schema, name));
                } else {
                    errors.push(ConfigError::new(
                        format!("--table {t}"),
                        "not in postgres.tables",
                    ));
                }
            }
            Err(e) => errors.push(ConfigError::new(format!("--table {t}"), e.to_string())),
        }
    }
    match errors.is_empty() {
        true => Ok(wanted),
        false => Err(AppError::Config(errors)),
    }
}

/// The key signals are signed with (`<state_dir>/message.key`).
pub fn message_key(settings: &Settings) -> Result<MessageKey, AppError> {
    let key_path = settings.message_key_path();
    MessageKey::load(&key_path).map_err(|e| {
        AppError::LocalIo(format!(
            "{}: {e}; signals are signed with the key the daemon creates in its state_dir on first start: run this command where the daemon's state_dir is",
            key_path.display()
        ))
    })
}

/// `pgcdc snapshot --table …`: write one signal per table into the WAL
/// (`pg_logical_emit_message`); the daemon streaming this slot backfills them.
pub fn request_backfill(settings: Settings, tables: &[String]) -> Result<(), AppError> {
    let pg = &settings.postgres;
    let wanted = configured_tables(&settings, tables)?;
    let key = message_key(&settings)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| AppError::LocalIo(e.to_string()))?;
    rt.block_on(async {
        let sql = pg_connect(pg).await.map_err(classified)?;
        refuse_keyless(&sql, &wanted).await?;
        for (schema, table) in wanted {
            let signal = Signal::signed(&key, &pg.slot, &schema, &table, false);
            let lsn = signal.write(&sql).await.map_err(classified)?;
            println!("requested backfill of {schema}.{table} at {lsn}; the daemon on slot {} copies it while streaming", pg.slot);
        }
        Ok(())
    })
}
