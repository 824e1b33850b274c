//! The ES sink in its consumer group, with the product's defaults (dynamic
//! membership, three partitions): kill -9 of the daemon never leaves the
//! mirror stale; a sink left without partitions while changes wait says so
//! (log, metric, `/ready`) and rejoins its group; a standalone sink reports
//! its own readiness and lag; sinks scaled out share the partitions, one
//! owner at a time.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgcdc_testkit::daemon::{log_time_us, now_us};
use pgcdc_testkit::oracle::{self, Want};
use tokio_postgres::Client;

use crate::support::{config, get, sample, wait, Broker, Daemon, PgCluster, SearchServer, Tansu};
use wait::Poll;

const INDEX: &str = "cdc_public_items";
const TOPIC: &str = "cdc-events";

/// PostgreSQL with `items`, a broker, the search server and a scratch directory.
struct Rig {
    pg: PgCluster,
    broker: Box<dyn Broker>,
    es: SearchServer,
    dir: tempfile::TempDir,
    db: Client,
}

impl Rig {
    /// The rig on `broker`, whose change topic gets `partitions` partitions.
    async fn on(broker: Box<dyn Broker>, partitions: i32) -> Rig {
        // The mock cluster has no CreateTopics; on tansu the daemon creates them.
        if broker.name() == "mock" {
            broker.create_topic(TOPIC, partitions).unwrap();
            broker.create_topic("pgcdc-dead-letters", 1).unwrap();
        }
        let pg = PgCluster::start().unwrap();
        let db = pg.client().await.unwrap();
        db.batch_execute("CREATE TABLE items (id int PRIMARY KEY, name text, n int)")
            .await
            .unwrap();
        Rig {
            pg,
            broker,
            es: SearchServer::start().unwrap(),
            dir: tempfile::tempdir().unwrap(),
            db,
        }
    }

    /// A configuration with state in `name`, `partitions` per topic,
    /// `/metrics` on `port` (if any) and `sink` as the `[elasticsearch]` keys.
    fn config(&self, name: &str, partitions: i32, port: Option<u16>, sink: &str) -> String {
        let state = self.dir.path().join(name).join("state");
        let listen = port.map_or(String::new(), |p| format!("127.0.0.1:{p}"));
        config(&self.pg, &*self.broker, &state, &["items"], "")
            .replace(
                "topic_partitions = 1\n",
                &format!("topic_partitions = {partitions}\n"),
            )
            .replace(
                "[metrics]\nlisten = \"\"\n",
                &format!("[metrics]\nlisten = {listen:?}\n"),
            )
            + &format!(
                "\n[elasticsearch]\nurl = {:?}\nnumber_of_replicas = 0\n{sink}\n",
                self.es.url
            )
    }

    /// Start `pgcdc <command>` in `name` with `cfg` and `envs`.
    fn start(&self, name: &str, cfg: &str, command: &str, envs: &[(&str, &str)]) -> Daemon {
        crate::support::daemon_cmd(&self.dir.path().join(name), cfg, envs, command)
    }

    /// `pgcdc run` without the sink (`partitions` per topic), once its slot streams.
    async fn streaming(&self, partitions: i32) -> Daemon {
        let mut run = self.start("run", &self.config("run", partitions, None, ""), "run", &[]);
        crate::support::wait_slot_active(&self.db, &mut run, "pgcdc").await;
        run
    }

    /// Wait until the mirror equals the table, within `timeout`.
    async fn mirror_equals_table(&self, timeout: Duration, daemon: &Daemon) {
        let want = Want::Verified {
            pg: &self.pg,
            table: "public.items",
        };
        oracle::mirror_equals(&self.es.url, INDEX, want, timeout, Some(daemon))
            .await
            .unwrap();
    }
}

/// A writer of `items` in a task: inserts, updates and deletes until stopped.
struct Writer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl Writer {
    async fn start(pg: &PgCluster) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(write_until(pg.client().await.unwrap(), stop.clone()));
        Writer { stop, task }
    }

    /// Stop writing; the table no longer changes when this returns.
    async fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let statements = self.task.await.unwrap();
        assert!(statements > 100, "the writer hardly ran: {statements}");
    }
}

/// Insert, update and delete rows of `items` until `stop` is set; the number of statements.
async fn write_until(db: Client, stop: Arc<AtomicBool>) -> u64 {
    let mut i: u64 = 0;
    while !stop.load(Ordering::SeqCst) {
        let id = (i * 7919) % 500;
        let sql = match i % 5 {
            0 => format!("DELETE FROM items WHERE id = {id}"),
            1 | 2 => format!(
                "INSERT INTO items VALUES ({id}, 'new {i}', {i}) ON CONFLICT (id) DO UPDATE SET name = 'upsert {i}', n = {i}"
            ),
            _ => format!("UPDATE items SET name = 'w{i}', n = n + 1 WHERE id = {id}"),
        };
        db.batch_execute(&sql).await.unwrap();
        i += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    i
}

/// The sum of `metric` over every label set in the Prometheus `text`.
#[cfg(feature = "failpoints")]
fn sum(text: &str, metric: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `/metrics` and `/ready` of a process.
struct Endpoint {
    base: String,
}

impl Endpoint {
    fn on(port: u16) -> Endpoint {
        Endpoint {
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Poll (60 s at most) until `cond(metrics, /ready status, /ready body)` holds.
    async fn until(&self, what: &str, daemon: &Daemon, cond: impl Fn(&str, u16, &str) -> bool) {
        let every = Duration::from_millis(200);
        wait::poll(what, Duration::from_secs(60), every, || async {
            let metrics = get(&format!("{}/metrics", self.base)).await;
            let ready = get(&format!("{}/ready", self.base)).await;
            let (Some((_, text)), Some((status, body))) = (metrics, ready) else {
                return Poll::Pending("the endpoint does not answer yet".into());
            };
            if cond(&text, status, &body) {
                Poll::Ready(())
            } else if !daemon.is_running() {
                Poll::Abort(format!("pgcdc exited:\n{}", daemon.log_text()))
            } else {
                let log = daemon.log_tail();
                Poll::Pending(format!(
                    "/ready {status} {body}metrics:\n{text}\nlog:\n{log}"
                ))
            }
        })
        .await
        .unwrap();
    }
}

/// A writer runs while the daemon (sink inside) is killed with `kill -9`
/// three times within 30 seconds and restarted at once; once the writer
/// stops, the mirror must equal the table within 60 seconds.
async fn three_kills_in_30_seconds_leave_no_stale_mirror(broker: Box<dyn Broker>) {
    let rig = Rig::on(broker, 3).await;
    let cfg = rig.config("run", 3, None, "run_in_daemon = true");
    let mut daemon = rig.start("run", &cfg, "run", &[]);
    crate::support::wait_slot_active(&rig.db, &mut daemon, "pgcdc").await;
    let writer = Writer::start(&rig.pg).await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(8)).await;
        daemon.kill9();
        daemon.spawn().unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    writer.stop().await;
    let stopped = Instant::now();
    rig.mirror_equals_table(Duration::from_secs(60), &daemon)
        .await;
    eprintln!(
        "{}: mirror equal {:?} after the writer stopped",
        rig.broker.name(),
        stopped.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_kills_of_the_daemon_in_30_seconds_leave_no_stale_mirror_on_tansu() {
    three_kills_in_30_seconds_leave_no_stale_mirror(Box::new(Tansu::start().unwrap())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_kills_of_the_daemon_in_30_seconds_leave_no_stale_mirror_on_the_mock_broker() {
    three_kills_in_30_seconds_leave_no_stale_mirror(Box::new(crate::support::mock_broker())).await;
}

/// Failpoint `es-assigned` drops the sink's first assignment: the group
/// counts the partitions as the sink's, the sink reads nothing (what tansu's
/// dead members did to a restarted sink).
#[cfg(feature = "failpoints")]
const DROP_FIRST_ASSIGNMENT: (&str, &str) = ("FAILPOINTS", "es-assigned=1*return");

/// The stall bound of the stall tests (the default is 20 s).
#[cfg(feature = "failpoints")]
const STALL_TIMEOUT: &str = "stall_timeout_secs = 5";

/// A standalone `pgcdc es-sink` whose first assignment is dropped while 100
/// changes wait: `/ready` is 503 (nothing written, then stalled, naming the
/// group and the lag), the lag metrics count the waiting records, an error
/// is logged; the sink rejoins its group, catches up, and `/ready` turns 200
/// with the lag at 0 and the applied LSN at the topic's last commit LSN.
/// On the mock cluster: tansu 0.6 answers a partition's high watermark with
/// its last record batch's first offset + 1, so lag counts are exact only here.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_sink_without_partitions_reports_the_stall_and_rejoins_its_group() {
    let rig = Rig::on(Box::new(crate::support::mock_broker()), 3).await;
    let _run = rig.streaming(3).await;
    for t in 0..20 {
        let sql = format!(
            "INSERT INTO items SELECT g, 'x', g FROM generate_series({0} * 5 + 1, {0} * 5 + 5) g",
            t
        );
        rig.db.batch_execute(&sql).await.unwrap();
    }
    let records = crate::support::read_until(&*rig.broker, TOPIC, Duration::from_secs(60), |r| {
        r.len() >= 100
    });
    let last_lsn = records
        .iter()
        .filter_map(|r| {
            r.header("pgcdc.commit_lsn")
                .parse::<pgcdc_actors::lsn::Lsn>()
                .ok()
        })
        .max()
        .unwrap();

    let port = crate::support::free_port();
    let cfg = rig.config("sink", 3, Some(port), STALL_TIMEOUT);
    let sink = rig.start("sink", &cfg, "es-sink", &[DROP_FIRST_ASSIGNMENT]);
    let ep = Endpoint::on(port);
    ep.until("not ready: nothing written", &sink, |_, status, body| {
        status == 503 && body.contains("not caught up")
    })
    .await;
    ep.until(
        "stalled, with the lag counted",
        &sink,
        |text, status, body| {
            status == 503
                && body.contains(
                    "es sink stalled: 100 records wait in consumer group \"pgcdc-es-sink\"",
                )
                && sample(text, "pgcdc_es_sink_stalled", &[]) == Some(1.0)
                && sum(text, "pgcdc_es_sink_lag_records") == 100.0
                && sample(text, "pgcdc_es_sink_partitions_assigned", &[]) == Some(0.0)
        },
    )
    .await;
    let log = sink.log_text();
    assert!(
        log.contains("ERROR") && log.contains("group=pgcdc-es-sink lag=100"),
        "{log}"
    );
    let first = log
        .lines()
        .find(|l| l.contains("es sink"))
        .unwrap_or_default();
    assert!(
        first.contains("es sink assigned partitions="),
        "the first assignment is logged: {log}"
    );
    let lsn = last_lsn.0 as f64;
    ep.until("rejoined and caught up", &sink, |text, status, _| {
        status == 200
            && sample(text, "pgcdc_es_sink_stalled", &[]) == Some(0.0)
            && sum(text, "pgcdc_es_sink_lag_records") == 0.0
            && sample(text, "pgcdc_es_sink_partitions_assigned", &[]) == Some(3.0)
            && sample(text, "pgcdc_es_sink_rejoins_total", &[]) == Some(1.0)
            && sample(text, "pgcdc_es_applied_lsn", &[("table", "public.items")]) == Some(lsn)
    })
    .await;
    rig.mirror_equals_table(Duration::from_secs(30), &sink)
        .await;
}

/// A sink whose task crashes while it reads directly, outside a group that
/// never works, reads directly again once restarted: it does not join the
/// group again and wait for the stall to be found anew.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_restarted_while_reading_directly_goes_on_reading_directly() {
    let rig = Rig::on(Box::new(crate::support::mock_broker()), 3).await;
    let _run = rig.streaming(3).await;
    rig.db
        .batch_execute("INSERT INTO items SELECT g, 'x', g FROM generate_series(1, 100) g")
        .await
        .unwrap();
    crate::support::read_until(&*rig.broker, TOPIC, Duration::from_secs(60), |r| {
        r.len() >= 100
    });
    let port = crate::support::free_port();
    let cfg = rig.config("sink", 3, Some(port), STALL_TIMEOUT);
    // Every assignment is given up; the first bulk (read directly) panics.
    let faults = ("FAILPOINTS", "es-assigned=return;es-after-bulk=1*panic");
    let sink = rig.start("sink", &cfg, "es-sink", &[faults]);
    let resumed = "es sink restarted while reading directly";
    sink.wait_log(resumed, Duration::from_secs(90))
        .await
        .unwrap();
    rig.mirror_equals_table(Duration::from_secs(30), &sink)
        .await;
    Endpoint::on(port)
        .until("caught up, reading directly", &sink, |text, status, _| {
            status == 200
                && sample(text, "pgcdc_es_sink_reading_directly", &[]) == Some(1.0)
                && sample(text, "pgcdc_es_sink_rejoins_total", &[]) == Some(1.0)
        })
        .await;
    let log = sink.log_text();
    assert!(log.contains("failpoint es-after-bulk panic"), "{log}");
}

/// In `pgcdc run` with the sink inside, `/ready` is 503 while the sink is
/// stalled (replication itself is fine) and 200 once it rejoined.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_is_not_ready_while_its_sink_is_stalled() {
    let rig = Rig::on(Box::new(Tansu::start().unwrap()), 3).await;
    let port = crate::support::free_port();
    let sink = format!("run_in_daemon = true\n{STALL_TIMEOUT}");
    let cfg = rig.config("run", 3, Some(port), &sink);
    let mut daemon = rig.start("run", &cfg, "run", &[DROP_FIRST_ASSIGNMENT]);
    crate::support::wait_slot_active(&rig.db, &mut daemon, "pgcdc").await;
    let writer = Writer::start(&rig.pg).await;
    let ep = Endpoint::on(port);
    ep.until(
        "not ready: the sink is stalled",
        &daemon,
        |_, status, body| status == 503 && body.contains("es sink stalled"),
    )
    .await;
    ep.until("ready: the sink rejoined", &daemon, |text, status, _| {
        status == 200 && sample(text, "pgcdc_es_sink_rejoins_total", &[]) == Some(1.0)
    })
    .await;
    writer.stop().await;
    rig.mirror_equals_table(Duration::from_secs(60), &daemon)
        .await;
}

/// tansu 0.6 keeps a member that left while it led a join as the group's
/// leader for good, and no later member is ever assigned anything. A sink
/// stopped (SIGTERM, exit 0) inside tansu's five-second join window and
/// started again meets such a group; with the product's defaults it must
/// rejoin, then read every partition directly, and the mirror must equal
/// the table. (Should the broker form the group after all, the sink simply
/// consumes: the mirror must equal the table either way.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_whose_group_never_forms_reads_directly_and_the_mirror_catches_up() {
    let rig = Rig::on(Box::new(Tansu::start().unwrap()), 3).await;
    let _run = rig.streaming(3).await;
    let port = crate::support::free_port();
    let cfg = rig.config("sink", 3, Some(port), "");
    let mut sink = rig.start("sink", &cfg, "es-sink", &[]);
    // The fault: a stop while the first join is under way.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let status = sink.terminate(Duration::from_secs(30)).unwrap();
    assert_eq!(status.code(), Some(0));
    sink.spawn().unwrap();
    let writer = Writer::start(&rig.pg).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    writer.stop().await;
    let stopped = Instant::now();
    let ep = Endpoint::on(port);
    ep.until(
        "the sink reads, in its group or directly",
        &sink,
        |text, _, _| sample(text, "pgcdc_es_sink_partitions_assigned", &[]) == Some(3.0),
    )
    .await;
    rig.mirror_equals_table(Duration::from_secs(30), &sink)
        .await;
    let log = sink.log_text();
    if !log.contains("es sink assigned") {
        assert!(log.contains("rejoining did not end the stall"), "{log}");
    }
    eprintln!(
        "mirror equal {:?} after the writer stopped; read directly: {}",
        stopped.elapsed(),
        log.contains("es sink reading directly")
    );
}

/// Which member owned each partition when, read from the sinks' logs:
/// partition → (from, to, member) in microseconds since the epoch.
type Ownership = BTreeMap<String, Vec<(i64, i64, usize)>>;

/// The partitions a sink log line names (`partitions="t[0],t[1]"`).
fn named_partitions(line: &str) -> Vec<String> {
    line.split_once("partitions=\"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(list, _)| {
            list.split(',')
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Add `member`'s ownership from its `log`; every incarnation ends at the
/// next of `ends` after its start (the kills), the last one at `i64::MAX`.
fn read_ownership(owned: &mut Ownership, member: usize, log: &str, ends: &[i64]) {
    let mut open: BTreeMap<String, i64> = BTreeMap::new();
    let mut close = |open: &mut BTreeMap<String, i64>, partition: &str, at: i64| {
        if let Some(from) = open.remove(partition) {
            owned
                .entry(partition.to_owned())
                .or_default()
                .push((from, at, member));
        }
    };
    let mut ends = ends.iter().copied().peekable();
    for line in log.lines() {
        let Some(at) = log_time_us(line) else {
            continue;
        };
        while let Some(end) = ends.next_if(|&end| end <= at) {
            for p in open.keys().cloned().collect::<Vec<_>>() {
                close(&mut open, &p, end);
            }
        }
        if line.contains("es sink assigned") || line.contains("es sink reading directly") {
            for p in named_partitions(line) {
                open.entry(p).or_insert(at);
            }
        } else if line.contains("es sink revoked") {
            for p in named_partitions(line) {
                close(&mut open, &p, at);
            }
        } else if line.contains("es sink consumer closed") {
            for p in open.keys().cloned().collect::<Vec<_>>() {
                close(&mut open, &p, at);
            }
        }
    }
    let end = ends.next().unwrap_or(i64::MAX);
    for p in open.keys().cloned().collect::<Vec<_>>() {
        close(&mut open, &p, end);
    }
}

/// Partitions two members owned at the same time, with the overlapping intervals.
fn overlaps(owned: &Ownership) -> Vec<String> {
    let mut found = Vec::new();
    for (partition, spans) in owned {
        let mut spans = spans.clone();
        spans.sort();
        for pair in spans.windows(2) {
            if pair[1].0 < pair[0].1 {
                found.push(format!("{partition}: {:?} and {:?}", pair[0], pair[1]));
            }
        }
    }
    found
}

#[test]
fn ownership_is_read_from_assignments_revocations_and_kills() {
    let log_a = "1970-01-01T00:00:01Z INFO es sink assigned partitions=\"t[0],t[1]\"\n\
                 1970-01-01T00:00:05Z INFO es sink assigned partitions=\"t[0]\"\n\
                 1970-01-01T00:00:09Z INFO es sink revoked partitions=\"t[0]\"\n";
    let log_b = "1970-01-01T00:00:03Z INFO es sink assigned partitions=\"t[1]\"\n";
    let mut owned = Ownership::new();
    // Member 0 was killed at 4 s, restarted (assigned again at 5 s).
    read_ownership(&mut owned, 0, log_a, &[4_000_000]);
    read_ownership(&mut owned, 1, log_b, &[]);
    assert_eq!(
        owned["t[0]"],
        [(1_000_000, 4_000_000, 0), (5_000_000, 9_000_000, 0)]
    );
    assert_eq!(
        overlaps(&owned),
        ["t[1]: (1000000, 4000000, 0) and (3000000, 9223372036854775807, 1)"]
    );
}

/// Two `pgcdc es-sink` processes share one group over a 6-partition topic
/// while a writer runs; one is killed with `kill -9` and started again later.
/// The mirror ends equal to the table, and no partition had two live owners
/// at once (assignments and revocations as both sinks logged them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sinks_share_six_partitions_one_owner_at_a_time_through_a_kill_9() {
    let rig = Rig::on(Box::new(Tansu::start().unwrap()), 6).await;
    let _run = rig.streaming(6).await;
    let writer = Writer::start(&rig.pg).await;
    let mut sinks: Vec<Daemon> = ["a", "b"]
        .iter()
        .map(|name| rig.start(name, &rig.config(name, 6, None, ""), "es-sink", &[]))
        .collect();
    for s in &sinks {
        s.wait_log("es sink assigned partitions=\"cdc", Duration::from_secs(60))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    sinks[0].kill9();
    let killed_at = now_us();
    tokio::time::sleep(Duration::from_secs(15)).await;
    sinks[0].spawn().unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    writer.stop().await;
    rig.mirror_equals_table(Duration::from_secs(60), &sinks[1])
        .await;
    assert!(sinks.iter().all(Daemon::is_running));

    let mut owned = Ownership::new();
    read_ownership(&mut owned, 0, &sinks[0].log_text(), &[killed_at]);
    read_ownership(&mut owned, 1, &sinks[1].log_text(), &[]);
    assert_eq!(owned.len(), 6, "every partition had an owner: {owned:?}");
    let both = overlaps(&owned);
    assert!(
        both.is_empty(),
        "partitions with two live owners: {both:?}\nsink a:\n{}\nsink b:\n{}",
        sinks[0].log_text(),
        sinks[1].log_text()
    );
}

/// Two `pgcdc es-sink` processes on a two-partition topic, `items` (200
/// rows) mirrored, with the fill's copy held `hold_ms` after its snapshot.
/// `items.n` then changes type (int → text, a new index) and one row
/// changes: one process starts a fill. Returns once its snapshot is taken,
/// with the processes, their `/metrics` ports and which one fills.
#[cfg(feature = "failpoints")]
async fn two_sinks_mid_fill(rig: &Rig, hold_ms: u64) -> (Daemon, Vec<Daemon>, [u16; 2], usize) {
    rig.db
        .batch_execute("INSERT INTO items SELECT g, 'item ' || g, g FROM generate_series(1, 200) g")
        .await
        .unwrap();
    let run = rig.streaming(2).await;
    let hold = format!("es-fill-copy=return({hold_ms})");
    let ports = [crate::support::free_port(), crate::support::free_port()];
    let sinks: Vec<Daemon> = ["a", "b"]
        .iter()
        .zip(ports)
        .map(|(name, port)| {
            let cfg = rig.config(name, 2, Some(port), "");
            rig.start(name, &cfg, "es-sink", &[("FAILPOINTS", hold.as_str())])
        })
        .collect();
    for s in &sinks {
        s.wait_log("es sink assigned partitions=\"cdc", Duration::from_secs(60))
            .await
            .unwrap();
    }
    rig.mirror_equals_table(Duration::from_secs(60), &sinks[1])
        .await;
    rig.db
        .batch_execute(
            "ALTER TABLE items ALTER COLUMN n TYPE text USING n::text; \
             UPDATE items SET name = 'first' WHERE id = 1",
        )
        .await
        .unwrap();
    let every = Duration::from_millis(100);
    let owner = wait::poll(
        "a fill's snapshot",
        Duration::from_secs(60),
        every,
        || async {
            let taken = sinks
                .iter()
                .position(|s| s.log_text().contains("snapshot taken: copying"));
            match taken {
                Some(owner) => Poll::Ready(owner),
                None => Poll::Pending("no fill has taken its snapshot".into()),
            }
        },
    )
    .await
    .unwrap();
    (run, sinks, ports, owner)
}

/// Rows changed on both partitions after a fill's snapshot.
#[cfg(feature = "failpoints")]
const DURING_FILL: &str = "UPDATE items SET name = 'during ' || id, n = 'n' || id; \
     DELETE FROM items WHERE id % 10 = 0; \
     INSERT INTO items SELECT g, 'late ' || g, g::text FROM generate_series(201, 260) g";

/// Wait until a log of `sinks` says `text`.
#[cfg(feature = "failpoints")]
async fn any_log(sinks: &[Daemon], text: &str, timeout: Duration) {
    let every = Duration::from_millis(200);
    wait::poll(text, timeout, every, || async {
        let found = sinks.iter().any(|s| s.log_text().contains(text));
        Poll::when(found, (), || format!("no process logged `{text}`"))
    })
    .await
    .unwrap();
}

/// The fills the process with `/metrics` on `port` started.
#[cfg(feature = "failpoints")]
async fn fills_started(port: u16) -> f64 {
    let (_, text) = get(&format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap();
    sample(&text, "pgcdc_es_reindexes_total", &[("event", "started")]).unwrap_or(0.0)
}

/// The mirror's serving index and the mapping type of `items.n` there.
#[cfg(feature = "failpoints")]
async fn serving(rig: &Rig) -> (String, serde_json::Value) {
    let url = format!("{}/{INDEX}/_mapping", rig.es.url);
    let mapping: serde_json::Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    let (index, m) = mapping.as_object().unwrap().iter().next().unwrap();
    (
        index.clone(),
        m["mappings"]["properties"]["n"]["type"].clone(),
    )
}

/// Two `pgcdc es-sink` processes share a two-partition topic when `items`
/// changes shape incompatibly. The process that reads the first changed
/// record fills the new index; the other writes its partition's changes to
/// that index too (it must not start a fill of its own), also those
/// committed after the fill's snapshot (the failpoint holds the copy 4 s
/// there). Once swapped in, the mirror equals the table.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sinks_fill_one_new_index_together_when_the_table_changes_shape() {
    let rig = Rig::on(Box::new(Tansu::start().unwrap()), 2).await;
    let (_run, sinks, ports, _) = two_sinks_mid_fill(&rig, 4000).await;
    rig.db.batch_execute(DURING_FILL).await.unwrap();
    any_log(
        &sinks,
        "mirror switched to its new index",
        Duration::from_secs(120),
    )
    .await;
    rig.mirror_equals_table(Duration::from_secs(60), &sinks[1])
        .await;

    let logs = || {
        format!(
            "sink a:\n{}\nsink b:\n{}",
            sinks[0].log_text(),
            sinks[1].log_text()
        )
    };
    let started = fills_started(ports[0]).await + fills_started(ports[1]).await;
    assert_eq!(started, 1.0, "one fill for both processes\n{}", logs());
    let followed = "another sink process fills a new index of the mirror";
    assert!(
        sinks.iter().any(|s| s.log_text().contains(followed)),
        "the other process followed the fill\n{}",
        logs()
    );
    let (index, n) = serving(&rig).await;
    assert!(index.ends_with("~2"), "the new index serves: {index}");
    assert_eq!(n, "text");
}

/// The process filling the new index is killed with `kill -9` while its
/// copy is held. The other one must find the fill stopped (no heartbeat
/// for 10 s), drop its index, and fill the mirror itself; once the dead
/// process's partition is its own too, the mirror equals the table.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_whose_sink_process_dies_is_taken_over_by_another() {
    let rig = Rig::on(Box::new(Tansu::start().unwrap()), 2).await;
    let (_run, mut sinks, ports, owner) = two_sinks_mid_fill(&rig, 15_000).await;
    sinks[owner].kill9();
    rig.db.batch_execute(DURING_FILL).await.unwrap();
    let other = 1 - owner;
    let survivor = std::slice::from_ref(&sinks[other]);
    any_log(
        survivor,
        "filling the mirror again here",
        Duration::from_secs(60),
    )
    .await;
    any_log(
        survivor,
        "mirror switched to its new index",
        Duration::from_secs(120),
    )
    .await;
    rig.mirror_equals_table(Duration::from_secs(90), &sinks[other])
        .await;
    assert_eq!(
        fills_started(ports[other]).await,
        1.0,
        "{}",
        sinks[other].log_text()
    );
    let (index, n) = serving(&rig).await;
    assert!(
        index.ends_with("~3"),
        "the survivor's index serves: {index}"
    );
    assert_eq!(n, "text");
}
