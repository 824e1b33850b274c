//! The freshness canary end to end: the Kafka stage (its record
//! acknowledged) and the search stage (everything before it searchable),
//! their ages while a leg is frozen, and `/ready` naming the stale stage.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgcdc_testkit::oracle::{self, Want};

use crate::support::{
    config, get, histogram_count, read_all, read_until, sample, wait, Broker, Daemon, PgCluster,
    Probe, SearchServer, Tansu,
};
use wait::Poll;

/// `canary.max_lag_secs` of these tests (canaries every second).
const MAX_LAG: f64 = 4.0;
/// The `[canary]` section: a canary every second, `/ready` bound at [`MAX_LAG`].
const CANARY: &str = "[canary]\ninterval_secs = 1\nmax_lag_secs = 4\n";
/// The change topic (the default single topic).
const TOPIC: &str = "cdc-events";
/// The canary topic of the default `topic_prefix`.
const CANARY_TOPIC: &str = "__pgcdc-canary.pgcdc";
/// The mirror index of `t`.
const INDEX: &str = "cdc_public_t";
/// How often the writer changes a row.
const WRITE_EVERY: Duration = Duration::from_millis(50);

/// PostgreSQL with table `t (id int PRIMARY KEY, v int)`, tansu, a daemon
/// streaming `t` with canaries every second, its metrics endpoint, and
/// (with `search`) the sink in the daemon writing to a search server.
struct Rig {
    pg: PgCluster,
    tansu: Tansu,
    es: Option<SearchServer>,
    dir: tempfile::TempDir,
    db: Arc<tokio_postgres::Client>,
    daemon: Daemon,
    probe: Probe,
}

impl Rig {
    /// Wait until canaries reach Kafka and the daemon is ready.
    async fn kafka_canaries_ready(&mut self) {
        self.probe
            .until(
                "canaries reach kafka, ready",
                &mut self.daemon,
                |text, ready| reached(text, "kafka") >= 2.0 && fresh(text, "kafka") && ready == 200,
            )
            .await;
    }

    /// With Kafka frozen: the kafka canary ages past the limit and `/ready`
    /// is 503 naming the stage; after thawing it, fresh and ready again.
    async fn kafka_canary_goes_stale_then_recovers(&mut self) {
        self.probe
            .until(
                "the kafka canary ages past the limit: not ready",
                &mut self.daemon,
                |text, ready| !fresh(text, "kafka") && ready == 503,
            )
            .await;
        let (_, why) = self.probe.ready().await;
        assert!(why.contains("stage kafka"), "{why}");
        self.tansu.signal("CONT").unwrap();
        self.probe
            .until("fresh and ready again", &mut self.daemon, |text, ready| {
                fresh(text, "kafka") && ready == 200
            })
            .await;
    }

    async fn start(search: bool) -> Rig {
        Rig::start_on(search, 1).await
    }

    /// The rig with `partitions` partitions in the change topic.
    async fn start_on(search: bool, partitions: i32) -> Rig {
        let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
        db.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
            .await
            .unwrap();
        let es = search.then(|| SearchServer::start().unwrap());
        let port = crate::support::free_port();
        let state = dir.path().join("state");
        let mut cfg = with_metrics(config(&pg, &tansu, &state, &["t"], ""), port, CANARY).replace(
            "topic_partitions = 1\n",
            &format!("topic_partitions = {partitions}\n"),
        );
        if let Some(es) = &es {
            cfg += &sink_section(es, "run_in_daemon = true\n");
        }
        let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
        crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
        Rig {
            pg,
            tansu,
            es,
            dir,
            db: Arc::new(db),
            daemon,
            probe: Probe::on(port),
        }
    }

    /// Start `pgcdc es-sink` in `name`, writing to `es`, with metrics on
    /// `port` and the `canary` section; the operator copied the daemon's
    /// message key into its state directory.
    fn standalone_sink(&self, name: &str, es: &SearchServer, port: u16, canary: &str) -> Daemon {
        let state = self.dir.path().join(name).join("state");
        std::fs::create_dir_all(&state).unwrap();
        let key = self.dir.path().join("state").join("message.key");
        std::fs::copy(key, state.join("message.key")).unwrap();
        let cfg = with_metrics(
            config(&self.pg, &self.tansu, &state, &["t"], ""),
            port,
            canary,
        ) + &sink_section(es, "");
        crate::support::daemon_cmd(&self.dir.path().join(name), &cfg, &[], "es-sink")
    }
}

/// `cfg` serving metrics on `port`, with the `canary` section.
fn with_metrics(cfg: String, port: u16, canary: &str) -> String {
    cfg.replace(
        "[metrics]\nlisten = \"\"\n",
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\nready_window_secs = 3600\n{canary}"),
    )
}

/// The `[elasticsearch]` section writing to `es`, with `extra` lines.
fn sink_section(es: &SearchServer, extra: &str) -> String {
    format!(
        "[elasticsearch]\n{extra}url = {:?}\nnumber_of_replicas = 0\n",
        es.url
    )
}

/// The age of the newest canary that reached `stage`, if exported.
fn age(text: &str, stage: &str) -> Option<f64> {
    sample(
        text,
        "pgcdc_freshness_last_canary_age_seconds",
        &[("stage", stage)],
    )
}

/// How many canaries reached `stage`.
fn reached(text: &str, stage: &str) -> f64 {
    histogram_count(
        text,
        "pgcdc_freshness_seconds",
        &format!("{{stage=\"{stage}\"}}"),
    )
}

/// Whether `stage` is fresh: its newest canary is younger than [`MAX_LAG`].
fn fresh(text: &str, stage: &str) -> bool {
    age(text, stage).is_some_and(|a| a < MAX_LAG)
}

/// Update rows of `t` every [`WRITE_EVERY`] until `stop`.
fn writer(db: Arc<tokio_postgres::Client>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(WRITE_EVERY);
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) {
            tick.tick().await;
            n += 1;
            let sql = format!(
                "INSERT INTO t VALUES ({}, {n}) ON CONFLICT (id) DO UPDATE SET v = {n}",
                n % 50
            );
            db.batch_execute(&sql).await.unwrap();
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_search_canary_follows_the_sink_and_ready_names_the_search_stage() {
    let mut r = Rig::start(true).await;
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(r.db.clone(), stop.clone());
    r.probe
        .until(
            "canaries searchable under writes, ready",
            &mut r.daemon,
            |text, ready| reached(text, "search") >= 3.0 && fresh(text, "search") && ready == 200,
        )
        .await;

    // The search server stops answering: the search stage ages, Kafka's does not.
    let es = r.es.as_ref().unwrap();
    es.signal("STOP").unwrap();
    r.probe
        .until(
            "the search canary ages past the limit",
            &mut r.daemon,
            |text, ready| !fresh(text, "search") && fresh(text, "kafka") && ready == 503,
        )
        .await;
    let (_, why) = r.probe.ready().await;
    assert!(why.contains("stage search"), "{why}");
    let before = reached(&r.probe.metrics().await, "search");
    es.signal("CONT").unwrap();
    r.probe
        .until("fresh and ready again", &mut r.daemon, |text, ready| {
            reached(text, "search") > before && fresh(text, "search") && ready == 200
        })
        .await;
    stop.store(true, Ordering::SeqCst);
    w.await.unwrap();

    let out = crate::support::pgcdc(&r.daemon.config, &["status"]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("freshness kafka:") && shown.contains("freshness search:"),
        "{shown}"
    );
    // Canaries travel on their own topic; the change topic holds changes only.
    let canaries = read_until(&r.tansu, CANARY_TOPIC, Duration::from_secs(30), |rs| {
        !rs.is_empty()
    });
    assert!(canaries[0].value.as_ref().unwrap()["offsets"][TOPIC].is_object());
    let changes = read_all(&r.tansu, TOPIC);
    assert!(
        changes
            .iter()
            .all(|c| c.value.is_none() || c.header("pgcdc.table") == "public.t"),
        "only changes of t on {TOPIC}"
    );
    mirror_equals_table(&r, es, &r.daemon).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kafka_canary_ages_while_kafka_is_frozen_on_an_idle_database() {
    let mut r = Rig::start(false).await;
    r.kafka_canaries_ready().await;
    assert_eq!(
        age(&r.probe.metrics().await, "search"),
        None,
        "no sink here"
    );
    // No change at all: only the canary's own record waits for Kafka.
    r.tansu.signal("STOP").unwrap();
    r.kafka_canary_goes_stale_then_recovers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kafka_canary_ages_while_a_change_waits_for_a_frozen_kafka() {
    let mut r = Rig::start(false).await;
    r.kafka_canaries_ready().await;
    r.tansu.signal("STOP").unwrap();
    r.db.batch_execute("INSERT INTO t VALUES (1, 1)")
        .await
        .unwrap();
    r.kafka_canary_goes_stale_then_recovers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_sink_with_the_daemons_key_measures_the_search_stage() {
    let r = Rig::start(false).await;
    let es = SearchServer::start().unwrap();
    let port = crate::support::free_port();
    let mut sink = r.standalone_sink("sink", &es, port, CANARY);
    let probe = Probe::on(port);
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(r.db.clone(), stop.clone());
    probe
        .until(
            "the sink's canaries are searchable, ready",
            &mut sink,
            |text, ready| reached(text, "search") >= 3.0 && fresh(text, "search") && ready == 200,
        )
        .await;
    let text = probe.metrics().await;
    assert_eq!(age(&text, "kafka"), None, "the sink measures only search");
    stop.store(true, Ordering::SeqCst);
    w.await.unwrap();
    mirror_equals_table(&r, &es, &sink).await;
    assert!(r.daemon.is_running());
}

/// Wait until the mirror of `t` in `es` equals the table (`pgcdc verify`'s comparison).
async fn mirror_equals_table(r: &Rig, es: &SearchServer, daemon: &Daemon) {
    let want = Want::Verified {
        pg: &r.pg,
        table: "public.t",
    };
    oracle::mirror_equals(&es.url, INDEX, want, Duration::from_secs(60), Some(daemon))
        .await
        .unwrap();
}

/// The search stage as each of `probes` exports it now: (age, canaries counted, /ready status).
async fn search_stages(probes: &[Probe]) -> Option<Vec<(Option<f64>, f64, u16)>> {
    let mut stages = Vec::new();
    for p in probes {
        let (_, text) = get(&format!("{}/metrics", p.base)).await?;
        let (ready, _) = get(&format!("{}/ready", p.base)).await?;
        stages.push((age(&text, "search"), reached(&text, "search"), ready));
    }
    Some(stages)
}

/// Two standalone sinks in one group over two change partitions: the one
/// reading the canary partition measures the search stage (one of the
/// change partitions is the other sink's, seen through the group's
/// committed offsets), the other exports no search age, both are ready.
/// After `kill -9` of the measuring sink, the other takes the canary
/// partition over and measures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_sinks_in_a_group_the_canary_partitions_reader_measures() {
    let r = Rig::start_on(false, 2).await;
    let es = SearchServer::start().unwrap();
    // Partitions the other sink owns are seen at its probes (every 5 s).
    let canary = "[canary]\ninterval_secs = 1\nmax_lag_secs = 15\n";
    let ports = [crate::support::free_port(), crate::support::free_port()];
    let mut sinks = [
        r.standalone_sink("a", &es, ports[0], canary),
        r.standalone_sink("b", &es, ports[1], canary),
    ];
    let probes = ports.map(Probe::on);
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(r.db.clone(), stop.clone());
    let owner = wait::poll(
        "one sink measures search, the other exports no search age",
        Duration::from_secs(90),
        Duration::from_millis(200),
        || async {
            let Some(stages) = search_stages(&probes).await else {
                return Poll::Pending("endpoints not answering".into());
            };
            let measuring: Vec<usize> = (0..2).filter(|&i| stages[i].0.is_some()).collect();
            let settled = measuring.len() == 1
                && stages[measuring[0]].1 >= 3.0
                && stages[measuring[0]].0.is_some_and(|a| a < 15.0)
                && stages.iter().all(|s| s.2 == 200);
            Poll::when(settled, measuring.first().copied().unwrap_or(0), || {
                format!("{stages:?}")
            })
        },
    )
    .await
    .unwrap();
    let log = sinks[owner].log_text();
    assert!(
        log.contains(CANARY_TOPIC),
        "the owner was assigned the canary partition: {log}"
    );
    sinks[owner].kill9();
    let other = 1 - owner;
    probes[other]
        .until(
            "the other sink takes the canary partition over",
            &mut sinks[other],
            |text, ready| {
                reached(text, "search") >= 2.0
                    && age(text, "search").is_some_and(|a| a < 15.0)
                    && ready == 200
            },
        )
        .await;
    stop.store(true, Ordering::SeqCst);
    w.await.unwrap();
    mirror_equals_table(&r, &es, &sinks[other]).await;
}
