//! Kafka with SASL/PLAIN: tansu behind a front that demands it (tansu's
//! memory engine keeps no accounts). Every Kafka client pgcdc opens (the
//! producer, the topic admin, the sink's consumer and probe, the canary's
//! producer and offset lookup, `check` and `verify`) authenticates; a
//! password the broker stops accepting while pgcdc runs is logged, makes
//! `/ready` 503 naming it, and heals once accepted again; a wrong one at
//! start is refused and named at once.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use pgcdc_testkit::config::with_metrics;
use pgcdc_testkit::oracle::{self, Want};
use pgcdc_testkit::proxy::sasl::SaslFront;

use crate::support::{
    config, free_port, pgcdc, sample, Broker, Daemon, PgCluster, Probe, SearchServer, Tansu,
    TopicReader,
};

const USER: &str = "pgcdc";
const PASSWORD: &str = "sasl-secret";
const WRONG: &str = "wrong-sasl-secret";

/// `[kafka.properties]` for SASL/PLAIN with `password`.
fn sasl_properties(password: &str) -> String {
    format!(
        "[kafka.properties]\n\"security.protocol\" = \"sasl_plaintext\"\n\
         \"sasl.mechanism\" = \"PLAIN\"\n\"sasl.username\" = \"{USER}\"\n\
         \"sasl.password\" = \"{password}\"\n"
    )
}

/// tansu behind a [`SaslFront`] accepting [`USER`] with [`PASSWORD`],
/// PostgreSQL with table `t` (two rows), a search server.
struct Rig {
    dir: tempfile::TempDir,
    tansu: Tansu,
    front: SaslFront,
    pg: PgCluster,
    db: tokio_postgres::Client,
    es: SearchServer,
}

impl Rig {
    async fn start() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let front_port = listener.local_addr().unwrap().port();
        let tansu = Tansu::start_with(free_port(), front_port).unwrap();
        let front = SaslFront::start(listener, USER, PASSWORD, tansu.port).unwrap();
        let pg = PgCluster::start().unwrap();
        let db = pg.client().await.unwrap();
        db.batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text);
             INSERT INTO t VALUES (1, 'copied'), (2, 'copied');",
        )
        .await
        .unwrap();
        let es = SearchServer::start().unwrap();
        Rig {
            dir,
            tansu,
            front,
            pg,
            db,
            es,
        }
    }

    /// The configuration with the sink in the daemon, logging in with
    /// `password`.
    fn config(&self, password: &str) -> String {
        let state = self.dir.path().join("state");
        let kafka = sasl_properties(password);
        config(&self.pg, &self.tansu, &state, &["public.t"], &kafka) + &self.search()
    }

    fn search(&self) -> String {
        format!(
            "\n[elasticsearch]\nrun_in_daemon = true\nurl = {:?}\nnumber_of_replicas = 0\nflush_interval_ms = 50\n",
            self.es.url
        )
    }

    /// Wait until the mirror of `t` equals the table.
    async fn mirrored(&self, daemon: &Daemon) {
        let want = Want::Verified {
            pg: &self.pg,
            table: "public.t",
        };
        let index = "cdc_public_t";
        let within = Duration::from_secs(90);
        oracle::mirror_equals(&self.es.url, index, want, within, Some(daemon))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kafka_client_authenticates_and_a_refusal_while_running_heals() {
    let rig = Rig::start().await;
    let (dir, db, front) = (&rig.dir, &rig.db, &rig.front);
    let port = free_port();
    let cfg = with_metrics(&rig.config(PASSWORD), port);
    crate::support::check_reaches_kafka(dir.path(), &cfg);

    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(db, &mut daemon, "pgcdc").await;
    db.batch_execute(
        "INSERT INTO t VALUES (3, 'streamed'); UPDATE t SET v = 'changed' WHERE id = 1",
    )
    .await
    .unwrap();
    rig.mirrored(&daemon).await;
    let props = [
        ("security.protocol", "sasl_plaintext"),
        ("sasl.mechanism", "PLAIN"),
        ("sasl.username", USER),
        ("sasl.password", PASSWORD),
    ];
    let reader = TopicReader::with_properties(&rig.tansu.brokers(), &props).unwrap();
    let records = reader
        .read_until("cdc-events", Duration::from_secs(60), |r| {
            r.iter().any(|r| r.after()["v"] == "changed")
        })
        .unwrap();
    assert!(records.iter().any(|r| r.after()["v"] == "streamed"));
    let out = daemon.run(&["verify", "--kafka"]).unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "verify --kafka over SASL:\n{report}"
    );

    let log = front.log();
    let unauthenticated: Vec<_> = log
        .refused
        .iter()
        .filter(|(_, why)| why.contains("authenticat"))
        .collect();
    assert!(unauthenticated.is_empty(), "refused: {unauthenticated:?}");
    for client in [
        "pgcdc",
        "pgcdc-start",
        "pgcdc-admin",
        "pgcdc-check",
        "pgcdc-es-sink",
        "pgcdc-es-sink-probe",
        "pgcdc-canary",
        "pgcdc-canary-offsets",
        "pgcdc-verify",
    ] {
        assert!(
            log.authenticated.iter().any(|c| c == client),
            "{client} never authenticated: {log:?}"
        );
    }

    // The broker stops accepting the password while pgcdc runs: the
    // reconnections are refused, the log says why (ERROR), and `/ready` is
    // 503 naming the refusal; once it is accepted again, `/ready` is 200
    // and the change made meanwhile reaches the mirror.
    let probe = Probe::on(port);
    let refusals = |text: &str| sample(text, "pgcdc_kafka_refusals_total", &[("client", "pgcdc")]);
    probe
        .until("ready, nothing refused", &mut daemon, |text, ready| {
            ready == 200 && refusals(text).is_none()
        })
        .await;
    front.change_password(USER, "changed");
    db.batch_execute("INSERT INTO t VALUES (4, 'while refused')")
        .await
        .unwrap();
    probe
        .until(
            "the producer's refusal counted",
            &mut daemon,
            |text, ready| ready == 503 && refusals(text).is_some_and(|n| n >= 1.0),
        )
        .await;
    let (status, why) = probe.ready().await;
    assert_eq!(status, 503, "{why}");
    assert!(
        why.contains("the kafka broker refuses pgcdc's client")
            && why.contains("SASL authentication error"),
        "{why}"
    );
    let log = daemon.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR librdkafka") && l.contains("SASL authentication error")),
        "{log}"
    );
    front.change_password(USER, PASSWORD);
    rig.mirrored(&daemon).await;
    probe
        .until(
            "ready again, no client refused",
            &mut daemon,
            |text, ready| {
                ready == 200 && sample(text, "pgcdc_kafka_clients_refused", &[]) == Some(0.0)
            },
        )
        .await;
    assert!(daemon
        .log_text()
        .contains("the kafka brokers accept pgcdc again"));
    daemon.terminate(Duration::from_secs(30)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_kafka_password_is_named_at_once_by_check_run_and_the_sink() {
    let rig = Rig::start().await;
    let front = &rig.front;
    let wrong = rig.config(WRONG);
    let path = rig.dir.path().join("pgcdc.toml");
    std::fs::write(&path, &wrong).unwrap();
    // Refused by the front, and `check` names the refusal ...
    let out = pgcdc(&path, &["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("FAIL  kafka"), "{text}");
    assert!(
        front
            .log()
            .refused
            .iter()
            .any(|(c, why)| c == "pgcdc-check" && why.contains("wrong user name or password")),
        "{:?}",
        front.log()
    );
    assert!(text.contains("the broker refused the connection"), "{text}");
    assert!(text.contains("Invalid username or password"), "{text}");

    // ... and `run` stops at once (exit 4), naming the refusal, instead of
    // waiting out the broker for 30 s.
    let started = Instant::now();
    let mut refused = crate::support::daemon(rig.dir.path(), &wrong, &[]);
    exits_at_once_naming_the_refusal(&mut refused, started);

    // The same from the sink alone, with no topics to create.
    let sink_cfg = wrong.replace("[kafka]\n", "[kafka]\ncreate_topics = false\n");
    let sink_dir = rig.dir.path().join("sink");
    let started = Instant::now();
    let mut sink = crate::support::daemon_cmd(&sink_dir, &sink_cfg, &[], "es-sink");
    exits_at_once_naming_the_refusal(&mut sink, started);
}

/// `daemon`, started at `started` with the wrong password, exits 4 within
/// 20 s (not after the 30 s wait for an unreachable broker), its log naming
/// the refusal and not the password.
fn exits_at_once_naming_the_refusal(daemon: &mut Daemon, started: Instant) {
    let status = daemon.wait_exit(Duration::from_secs(60)).unwrap();
    let log = daemon.log_text();
    assert_eq!(status.code(), Some(4), "{log}");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert!(log.contains("SASL authentication error"), "{log}");
    assert!(!log.contains(WRONG), "the password stays out of the log");
}
