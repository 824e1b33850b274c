//! The metrics endpoint of a running daemon: `/metrics` parses as Prometheus
//! text, counts what flowed, and lag and `/ready` follow a stalled Kafka.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crate::support::{config, get, sample, wait, Broker, Daemon, PgCluster, Probe, Tansu};
use wait::Poll;

/// PostgreSQL with table `t (id int PRIMARY KEY[, columns])`, tansu, and a
/// daemon streaming `t` whose metrics endpoint listens on a free port;
/// `extra` follows `listen` in the `[metrics]` section (and may open others).
struct Rig {
    _pg: PgCluster,
    tansu: Tansu,
    _dir: tempfile::TempDir,
    db: tokio_postgres::Client,
    daemon: Daemon,
    probe: Probe,
}

impl Rig {
    async fn start(columns: &str, extra: &str) -> Rig {
        let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
        let columns = match columns {
            "" => String::new(),
            c => format!(", {c}"),
        };
        db.batch_execute(&format!("CREATE TABLE t (id int PRIMARY KEY{columns})"))
            .await
            .unwrap();
        let port = crate::support::free_port();
        let cfg = config(&pg, &tansu, &dir.path().join("state"), &["t"], "").replace(
            "[metrics]\nlisten = \"\"\n",
            &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n{extra}"),
        );
        let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
        crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
        let probe = Probe::on(port);
        Rig {
            _pg: pg,
            tansu,
            _dir: dir,
            db,
            daemon,
            probe,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_changes_and_lag_and_readiness_follow_a_stalled_kafka() {
    let Rig {
        _pg,
        tansu,
        _dir,
        db,
        mut daemon,
        probe,
    } = Rig::start("v text", "ready_window_secs = 3\n").await;
    assert_eq!(
        get(&format!("{}/health", probe.base)).await,
        Some((200, "ok\n".into()))
    );
    assert_eq!(get(&format!("{}/nope", probe.base)).await.unwrap().0, 404);

    db.batch_execute("INSERT INTO t SELECT g, 'x' FROM generate_series(1, 100) g")
        .await
        .unwrap();
    probe
        .until(
            "100 inserts acknowledged, caught up, ready",
            &mut daemon,
            |text, ready| {
                sample(
                    text,
                    "pgcdc_events_out_total",
                    &[("table", "public.t"), ("op", "c")],
                ) == Some(100.0)
                    && sample(
                        text,
                        "pgcdc_events_in_total",
                        &[("table", "public.t"), ("op", "c")],
                    ) == Some(100.0)
                    && sample(text, "pgcdc_replication_lag_bytes", &[]) == Some(0.0)
                    && ready == 200
            },
        )
        .await;

    // Kafka stops answering: lag builds up and /ready turns 503.
    tansu.signal("STOP").unwrap();
    db.batch_execute("INSERT INTO t SELECT g, 'y' FROM generate_series(101, 200) g")
        .await
        .unwrap();
    probe
        .until(
            "lag and not ready while kafka is stalled",
            &mut daemon,
            |text, ready| {
                sample(text, "pgcdc_replication_lag_bytes", &[]).unwrap_or(0.0) > 0.0
                    && ready == 503
            },
        )
        .await;
    assert_eq!(
        sample(
            &probe.metrics().await,
            "pgcdc_events_out_total",
            &[("table", "public.t"), ("op", "c")]
        ),
        Some(100.0),
        "nothing can be acknowledged while kafka is stalled"
    );

    // Kafka back: everything flows, lag falls back to zero, ready again.
    tansu.signal("CONT").unwrap();
    probe
        .until(
            "caught up again after kafka returned",
            &mut daemon,
            |text, ready| {
                sample(
                    text,
                    "pgcdc_events_out_total",
                    &[("table", "public.t"), ("op", "c")],
                )
                .is_some_and(|n| n >= 200.0)
                    && sample(text, "pgcdc_replication_lag_bytes", &[]) == Some(0.0)
                    && ready == 200
            },
        )
        .await;
    let text = probe.metrics().await;
    assert!(
        sample(&text, "pgcdc_slot_retained_wal_bytes", &[]).is_some(),
        "{text}"
    );

    // `pgcdc status` shows the same picture for a person.
    let out = crate::support::pgcdc(&daemon.config, &["status"]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("slot lag:"), "{shown}");
    assert!(
        shown.contains("events public.t:") && shown.contains("out c="),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_wal_over_budget_warns_and_heartbeats_are_written() {
    let Rig {
        _pg,
        tansu: _tansu,
        _dir,
        db,
        mut daemon,
        probe,
    } = Rig::start(
        "",
        "[wal]\nbudget_bytes = 1\ncheck_interval_secs = 1\nheartbeat_secs = 1\n",
    )
    .await;
    // Some WAL the slot must keep until pgcdc confirms it.
    db.batch_execute("INSERT INTO t SELECT g FROM generate_series(1, 1000) g")
        .await
        .unwrap();
    daemon
        .wait_log(
            "retains more WAL than wal.budget_bytes",
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    probe
        .until(
            "over-budget gauge and heartbeats",
            &mut daemon,
            |text, _| {
                sample(text, "pgcdc_slot_retained_wal_over_budget", &[]) == Some(1.0)
                    && sample(text, "pgcdc_slot_retained_wal_bytes", &[]).unwrap_or(0.0) > 1.0
                    && sample(text, "pgcdc_heartbeats_total", &[]).unwrap_or(0.0) >= 2.0
            },
        )
        .await;
}

/// Hold an exclusive lock on the SQLite file at `path` until dropped.
struct SqliteLock(std::process::Child);

impl SqliteLock {
    fn take(path: &std::path::Path) -> SqliteLock {
        use std::io::BufRead;
        let script = "import sqlite3, sys\n\
                      c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)\n\
                      c.execute('BEGIN EXCLUSIVE')\n\
                      print('locked', flush=True)\n\
                      sys.stdin.read()\n";
        let mut child = std::process::Command::new("python3")
            .args(["-c", script, path.to_str().unwrap()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "locked");
        SqliteLock(child)
    }
}

impl Drop for SqliteLock {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warnings_reach_the_audit_log_and_a_locked_audit_log_does_not_stall_the_pipeline() {
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let state = dir.path().join("state");
    let cfg = config(&pg, &tansu, &state, &["t"], "")
        + "[wal]\nbudget_bytes = 1\ncheck_interval_secs = 1\nheartbeat_secs = 0\n";
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;

    // The audit log is locked by another process: changes must keep flowing.
    let lock = SqliteLock::take(&state.join("audit.db"));
    for n in 0..20 {
        db.batch_execute(&format!(
            "INSERT INTO t SELECT g FROM generate_series({}, {}) g",
            n * 100,
            n * 100 + 99
        ))
        .await
        .unwrap();
    }
    let records = crate::support::read_until(&tansu, "cdc-events", Duration::from_secs(60), |rs| {
        rs.iter().filter(|r| r.op() == "c").count() >= 2000
    });
    assert!(records.iter().filter(|r| r.op() == "c").count() >= 2000);
    assert!(daemon.is_running(), "{}", daemon.log_text());
    drop(lock);

    // Once the lock is gone, warnings are written with their fields.
    let every = Duration::from_millis(300);
    let text = wait::poll(
        "an audited warning",
        Duration::from_secs(60),
        every,
        || async {
            let out = crate::support::pgcdc(
                &daemon.config,
                &["logs", "--level", "warn", "--since", "1h"],
            );
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let audited = out.status.success()
                && text.contains("retains more WAL than wal.budget_bytes")
                && text.contains("retained_bytes")
                && text.contains("pgcdc_actors::wal_monitor");
            Poll::when(audited, text.clone(), || {
                format!(
                    "pgcdc logs said:\n{text}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
        },
    )
    .await
    .unwrap();
    assert!(
        !text.contains(" INFO "),
        "--level warn shows only warnings and errors:\n{text}"
    );
}
