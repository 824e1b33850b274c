//! Mirrors served through aliases: a mirror index from before generations
//! is migrated, an added nullable column is mapped in place, and changes the
//! mapping cannot follow (a column added with a default, a column's type,
//! the key) are met with a new index filled beside the old one, while a reader polls
//! the alias every 50 ms and never sees a 404, a half-filled index or a row
//! going back; a mirror whose index is deleted is filled again (a mirror of
//! wide rows in requests bounded by bytes), and one blocked for writes or
//! closed is waited for.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgcdc_testkit::oracle::{self, Want};
use serde_json::{json, Value};

use crate::support::{config, pg_and_tansu, wait, Daemon, SearchServer};
use wait::Poll;

const ROWS: i64 = 200;
const ALIAS: &str = "cdc_public_items";
/// The reader's cadence.
const READ_EVERY: Duration = Duration::from_millis(50);

/// What the reader saw.
#[derive(Default, Debug)]
struct Seen {
    reads: usize,
    /// Answers other than 200, and reads of another document count.
    failures: Vec<String>,
    /// The highest `n` seen per row `id`; a lower one later is a regression.
    highest: BTreeMap<i64, i64>,
}

/// Read the whole mirror through its alias every 50 ms until `stop`;
/// once `armed`, every read must hold exactly [`ROWS`] documents.
fn reader(url: String, stop: Arc<AtomicBool>, armed: Arc<AtomicBool>) -> Arc<Mutex<Seen>> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let out = seen.clone();
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        while !stop.load(Ordering::SeqCst) {
            let read = match http
                .get(format!("{url}/{ALIAS}/_search?size=1000"))
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => {
                    Ok(r.json::<Value>().await.unwrap_or(Value::Null))
                }
                Ok(r) => Err(format!("answer {}", r.status())),
                Err(e) => Err(format!("request failed: {e}")),
            };
            record(&mut out.lock().unwrap(), read, armed.load(Ordering::SeqCst));
            tokio::time::sleep(READ_EVERY).await;
        }
    });
    seen
}

/// Record one read of the mirror.
fn record(seen: &mut Seen, read: Result<Value, String>, armed: bool) {
    seen.reads += 1;
    let body = match read {
        Ok(body) => body,
        Err(failure) => {
            seen.failures.push(failure);
            return;
        }
    };
    let hits = body["hits"]["hits"].as_array().cloned().unwrap_or_default();
    if armed && hits.len() as i64 != ROWS {
        seen.failures.push(format!("{} documents", hits.len()));
    }
    for h in hits {
        let (Some(id), Some(n)) = (h["_source"]["id"].as_i64(), h["_source"]["n"].as_i64()) else {
            continue;
        };
        let high = seen.highest.entry(id).or_insert(n);
        if n < *high {
            let regression = format!("row {id}: n went from {high} to {n}");
            seen.failures.push(regression);
        } else {
            *high = n;
        }
    }
}

/// Update random rows' counters until `stop`.
fn writer(db: Arc<tokio_postgres::Client>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut updates = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let id = ((updates as i64 * 37) % ROWS + 1) as i32;
            db.execute("UPDATE items SET n = n + 1 WHERE id = $1", &[&id])
                .await
                .unwrap();
            updates += 1;
        }
        updates
    })
}

/// The concrete index the alias points at, once it is `want`.
async fn wait_alias(es: &SearchServer, want: &str, daemon: &Daemon) {
    let url = format!("{}/{ALIAS}/_alias", es.url);
    wait::poll(
        &format!("{ALIAS} to point at {want}"),
        Duration::from_secs(90),
        Duration::from_millis(100),
        || async {
            let now: Value = match reqwest::get(&url).await {
                Ok(r) => r.json().await.unwrap_or(Value::Null),
                Err(_) => Value::Null,
            };
            match now.get(want) {
                Some(_) => Poll::Ready(()),
                None if !daemon.is_running() => Poll::Abort(daemon.log_tail()),
                None => Poll::Pending(format!("alias is {now}\n{}", daemon.log_tail())),
            }
        },
    )
    .await
    .unwrap();
}

/// Run `statements` (each its own transaction) while the writer runs, then
/// wait until the alias points at `generation`.
async fn change_under_writer(
    db: &Arc<tokio_postgres::Client>,
    statements: &[&str],
    es: &SearchServer,
    generation: &str,
    daemon: &Daemon,
) {
    let stop_writer = Arc::new(AtomicBool::new(false));
    let w = writer(db.clone(), stop_writer.clone());
    for sql in statements {
        db.batch_execute(sql).await.unwrap();
    }
    wait_alias(es, generation, daemon).await;
    stop_writer.store(true, Ordering::SeqCst);
    assert!(w.await.unwrap() > 0, "the writer ran during the change");
}

/// The mirror's mappings, by concrete index.
async fn mapping(es: &SearchServer) -> Value {
    let url = format!("{}/{ALIAS}/_mapping", es.url);
    let answer = reqwest::get(url).await.unwrap();
    answer.json().await.unwrap_or(Value::Null)
}

/// The table's rows as JSON objects, by the text of `key`.
async fn rows_by(db: &tokio_postgres::Client, key: &str) -> BTreeMap<String, Value> {
    let q = format!("SELECT {key}::text, to_jsonb(t)::text FROM items t");
    let mut rows = BTreeMap::new();
    for r in db.query(&q, &[]).await.unwrap() {
        rows.insert(r.get(0), serde_json::from_str(r.get(1)).unwrap());
    }
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_changes_swap_in_a_filled_index_behind_the_alias_without_a_gap() {
    let (pg, tansu, dir, db) = pg_and_tansu().await;
    let es = SearchServer::start().unwrap();
    let db = Arc::new(db);
    db.batch_execute(&format!(
        "CREATE TABLE items (id int PRIMARY KEY, code int NOT NULL, n int8 NOT NULL DEFAULT 0, note text); \
         INSERT INTO items SELECT i, i * 10, 0, 'row ' || i FROM generate_series(1, {ROWS}) i;"
    ))
    .await
    .unwrap();
    // A mirror index as an older pgcdc made it: concrete, under the mirror's name.
    let http = reqwest::Client::new();
    let made = http
        .put(format!("{}/{ALIAS}", es.url))
        .json(
            &json!({"settings": {"index": {"gc_deletes": "30d", "number_of_replicas": 0}},
            "mappings": {"_meta": {"created_by": "pgcdc"}}}),
        )
        .send()
        .await
        .unwrap();
    assert!(made.status().is_success());
    let stop = Arc::new(AtomicBool::new(false));
    let armed = Arc::new(AtomicBool::new(false));
    let seen = reader(es.url.clone(), stop.clone(), armed.clone());

    let es_section = format!(
        "\n[elasticsearch]\nrun_in_daemon = true\nurl = {:?}\nnumber_of_replicas = 0\nreindex_grace_secs = 1\n",
        es.url
    );
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["items"], "") + &es_section;
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;

    // The old index is migrated to the first generation behind the alias.
    wait_alias(&es, "cdc_public_items~1", &daemon).await;
    let want = Want::Verified {
        pg: &pg,
        table: "public.items",
    };
    oracle::mirror_equals(&es.url, ALIAS, want, Duration::from_secs(60), Some(&daemon))
        .await
        .unwrap();
    armed.store(true, Ordering::SeqCst);

    // A nullable column is added: the generation takes its mapping.
    let stop_writer = Arc::new(AtomicBool::new(false));
    let w = writer(db.clone(), stop_writer.clone());
    db.batch_execute(
        "ALTER TABLE items ADD COLUMN extra int; UPDATE items SET extra = 7 WHERE id = 3",
    )
    .await
    .unwrap();
    wait::poll(
        "the new column's mapping",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async {
            let m = mapping(&es).await;
            match &m["cdc_public_items~1"]["mappings"]["properties"]["extra"]["type"] {
                Value::String(t) if t == "integer" => Poll::Ready(()),
                _ => Poll::Pending(m.to_string()),
            }
        },
    )
    .await
    .unwrap();
    stop_writer.store(true, Ordering::SeqCst);
    assert!(w.await.unwrap() > 0, "the writer ran during the change");

    // A column added with a default: older documents lack a value their
    // rows hold, so a second generation.
    change_under_writer(
        &db,
        &["ALTER TABLE items ADD COLUMN flag bool NOT NULL DEFAULT true; UPDATE items SET n = n + 1 WHERE id = 4"],
        &es,
        "cdc_public_items~2",
        &daemon,
    )
    .await;
    oracle::mirror_equals(&es.url, ALIAS, want, Duration::from_secs(60), Some(&daemon))
        .await
        .unwrap();

    // A column's type changes (integer to text): a third generation.
    change_under_writer(
        &db,
        &[
            "ALTER TABLE items ALTER COLUMN code TYPE text USING 'c' || code",
            "UPDATE items SET n = n + 1 WHERE id = 1",
        ],
        &es,
        "cdc_public_items~3",
        &daemon,
    )
    .await;
    oracle::mirror_equals(&es.url, ALIAS, want, Duration::from_secs(60), Some(&daemon))
        .await
        .unwrap();
    let mapping = mapping(&es).await;
    assert_eq!(
        mapping["cdc_public_items~3"]["mappings"]["properties"]["code"]["type"],
        json!("text"),
        "{mapping}"
    );

    // The key changes (id to code): a fourth generation, keyed by code.
    change_under_writer(
        &db,
        &[
            "ALTER TABLE items DROP CONSTRAINT items_pkey, ADD PRIMARY KEY (code)",
            "UPDATE items SET n = n + 1 WHERE id = 2",
        ],
        &es,
        "cdc_public_items~4",
        &daemon,
    )
    .await;
    let rows = rows_by(&db, "code").await;
    wait::poll(
        "the mirror to hold the table keyed by code",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async {
            let docs = es.documents(ALIAS).await.unwrap_or_default();
            let got: BTreeMap<String, Value> =
                docs.into_iter().map(|(id, (_, doc))| (id, doc)).collect();
            match got == rows {
                true => Poll::Ready(()),
                false => Poll::Pending(format!("{} documents, {} rows", got.len(), rows.len())),
            }
        },
    )
    .await
    .unwrap();

    // Retired generations go after the grace period.
    wait::poll(
        "retired generations to be deleted",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let all: Value = reqwest::get(format!("{}/{ALIAS}~*/_alias", es.url))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let names: Vec<&String> = all
                .as_object()
                .map(|o| o.keys().collect())
                .unwrap_or_default();
            match names.as_slice() {
                [only] if only.as_str() == "cdc_public_items~4" => Poll::Ready(()),
                _ => Poll::Pending(format!("{names:?}")),
            }
        },
    )
    .await
    .unwrap();
    stop.store(true, Ordering::SeqCst);
    let seen = seen.lock().unwrap();
    assert!(seen.reads > 20, "the reader ran: {seen:?}");
    assert!(seen.failures.is_empty(), "{:?}", seen.failures);
    assert!(daemon
        .log_text()
        .contains("mirror switched to its new index"));
    daemon.terminate(Duration::from_secs(30)).unwrap();
}

/// The concrete index `alias` points at now.
async fn serving(es: &SearchServer, alias: &str) -> String {
    let now: Value = reqwest::get(format!("{}/{alias}/_alias", es.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&String> = now.as_object().unwrap().keys().collect();
    assert_eq!(names.len(), 1, "{now}");
    names[0].clone()
}

/// Delete the concrete index behind `alias` (the alias goes with it).
async fn delete_serving(es: &SearchServer, alias: &str) {
    let index = serving(es, alias).await;
    let url = format!("{}/{index}", es.url);
    let gone = reqwest::Client::new().delete(url).send().await.unwrap();
    assert!(gone.status().is_success(), "{index}: {}", gone.status());
}

/// How long a mirror may take to equal its table again.
const MIRRORED: Duration = Duration::from_secs(90);

/// `items` ([`ROWS`] rows) streamed by a daemon with the ES sink inside
/// and its metrics on, once its mirror equals the table.
struct Mirrored {
    pg: crate::support::PgCluster,
    _tansu: crate::support::Tansu,
    _dir: tempfile::TempDir,
    db: tokio_postgres::Client,
    es: SearchServer,
    probe: crate::support::Probe,
    daemon: Daemon,
}

impl Mirrored {
    async fn start() -> Mirrored {
        Self::start_with(None, &[]).await
    }

    /// Started as `role` (a role made here, with `REPLICATION` and `SELECT`
    /// on the table only) instead of the superuser, with `envs` set.
    async fn start_with(role: Option<&str>, envs: &[(&str, &str)]) -> Mirrored {
        let (pg, tansu, dir, db) = pg_and_tansu().await;
        let es = SearchServer::start().unwrap();
        db.batch_execute(&format!(
            "CREATE TABLE items (id int PRIMARY KEY, code int NOT NULL, n int8 NOT NULL DEFAULT 0, note text); \
             INSERT INTO items SELECT i, i * 10, 0, 'row ' || i FROM generate_series(1, {ROWS}) i;"
        ))
        .await
        .unwrap();
        if let Some(role) = role {
            db.batch_execute(&format!(
                "CREATE PUBLICATION pgcdc FOR TABLE items; \
                 CREATE ROLE {role} LOGIN REPLICATION; GRANT SELECT ON items TO {role};"
            ))
            .await
            .unwrap();
        }
        let es_section = format!(
            "\n[elasticsearch]\nrun_in_daemon = true\nurl = {:?}\nnumber_of_replicas = 0\nreindex_grace_secs = 1\n",
            es.url
        );
        let mut cfg = config(&pg, &tansu, &dir.path().join("state"), &["items"], "") + &es_section;
        if let Some(role) = role {
            cfg = cfg.replace("user = \"postgres\"", &format!("user = \"{role}\""));
        }
        let port = crate::support::free_port();
        let cfg = pgcdc_testkit::config::with_metrics(&cfg, port);
        let probe = crate::support::Probe::on(port);
        let mut daemon = crate::support::daemon(dir.path(), &cfg, envs);
        crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
        let m = Mirrored {
            pg,
            _tansu: tansu,
            _dir: dir,
            db,
            es,
            probe,
            daemon,
        };
        m.wait_whole().await;
        m
    }

    /// Run `sql`, then wait until the mirror equals the table again.
    async fn change_and_wait(&self, sql: &str) {
        self.db.batch_execute(sql).await.unwrap();
        self.wait_whole().await;
    }

    /// Wait until the mirror equals the table.
    async fn wait_whole(&self) {
        let want = Want::Verified {
            pg: &self.pg,
            table: "public.items",
        };
        oracle::mirror_equals(&self.es.url, ALIAS, want, MIRRORED, Some(&self.daemon))
            .await
            .unwrap();
    }

    /// A sample of the daemon's metrics.
    async fn sample(&self, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
        crate::support::sample(&self.probe.metrics().await, metric, labels)
    }

    /// Stop the daemon cleanly (exit code 0).
    fn stop(&mut self) {
        let stopped = self.daemon.terminate(Duration::from_secs(30)).unwrap();
        assert_eq!(stopped.code(), Some(0));
    }
}

/// A column added with a default while the sink cannot ask PostgreSQL
/// whether older rows hold one (failpoint `es-column-defaults`, as when
/// PostgreSQL is unreachable): a mapping alone would leave every older
/// document without the value, so the sink fills a new index instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_added_when_its_default_cannot_be_looked_up_is_filled() {
    let envs = [("FAILPOINTS", "es-column-defaults=return")];
    let m = Mirrored::start_with(None, &envs).await;
    m.change_and_wait(
        "ALTER TABLE items ADD COLUMN flag bool NOT NULL DEFAULT true; \
         UPDATE items SET n = n + 1 WHERE id = 4",
    )
    .await;
    wait_alias(&m.es, "cdc_public_items~2", &m.daemon).await;
    let log = m.daemon.log_text();
    assert!(
        log.contains("cannot tell whether added columns have defaults that older rows hold"),
        "{}",
        m.daemon.log_tail()
    );
}

/// A mirror whose index is deleted (by hand, or by a retention policy),
/// while the sink writes to it or while pgcdc is stopped: the changes to
/// come would bring back only the rows they change. The sink's writes go
/// through the alias with `require_alias`, so they do not create an index
/// under the mirror's name; the sink notes each mirror it created, finds
/// the mirror gone and fills it again from PostgreSQL (without its notes,
/// because its group has read records before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_mirror_index_is_filled_again_from_postgres() {
    let mut m = Mirrored::start().await;
    let deleted = [("mirror", ALIAS)];
    let deleted_total = "pgcdc_es_mirrors_deleted_total";

    // Deleted while the sink writes to it: not ready until filled again.
    delete_serving(&m.es, ALIAS).await;
    m.db.batch_execute("UPDATE items SET n = 1 WHERE id = 1")
        .await
        .unwrap();
    let lacking =
        |text: &str, n: u32| text.contains(&format!("pgcdc_es_mirrors_lacking_changes {n}"));
    m.probe
        .until(
            "not ready while the mirror is filled again",
            &mut m.daemon,
            |text, ready| ready == 503 && lacking(text, 1),
        )
        .await;
    m.wait_whole().await;
    m.probe
        .until(
            "ready once the mirror is filled",
            &mut m.daemon,
            |text, ready| ready == 200 && lacking(text, 0),
        )
        .await;
    assert!(m
        .daemon
        .log_text()
        .contains("the mirror's index was deleted while the sink wrote to it"));
    assert_eq!(m.sample(deleted_total, &deleted).await, Some(1.0));

    // Deleted while pgcdc is stopped (a new process: its counter starts at 0).
    m.stop();
    delete_serving(&m.es, ALIAS).await;
    m.daemon.spawn().unwrap();
    m.change_and_wait("UPDATE items SET n = 2 WHERE id = 2")
        .await;
    assert_eq!(m.sample(deleted_total, &deleted).await, Some(1.0));

    // Deleted with the sink's notes (as `DELETE cdc_*` would), while stopped.
    m.stop();
    delete_serving(&m.es, ALIAS).await;
    let notes = format!("{}/cdc__truncations", m.es.url);
    let gone = reqwest::Client::new().delete(notes).send().await.unwrap();
    assert!(gone.status().is_success(), "{}", gone.status());
    m.daemon.spawn().unwrap();
    m.change_and_wait("UPDATE items SET n = 3 WHERE id = 3")
        .await;
    assert_eq!(m.sample(deleted_total, &deleted).await, Some(1.0));
}

/// Rows of the wide mirror: [`WIDE_ROWS`] rows of 512 KiB, 100 MiB, fewer
/// than one fill query reads (1,000 rows). Their values are `jsonb`,
/// mapped but not indexed: osmem-server indexes long texts slowly.
const WIDE_ROWS: i32 = 200;
/// The daemon's peak while it fills that mirror again: the fill reads and
/// writes pieces of `bulk_max_bytes` (5 MiB) of row text.
const WIDE_FILL_PEAK_MAX_MIB: u64 = 200;

/// A mirror of wide rows filled again (its index deleted while pgcdc was
/// stopped): the fill passes its query's rows on in pieces of bounded
/// bytes, each one bulk request, instead of holding the whole query's rows,
/// documents and request body at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_of_wide_rows_is_filled_in_pieces_bounded_by_bytes() {
    let (pg, tansu, dir, db) = pg_and_tansu().await;
    let es = SearchServer::start().unwrap();
    db.batch_execute(&format!(
        "CREATE TABLE docs (id int PRIMARY KEY, body jsonb); \
         INSERT INTO docs SELECT i, jsonb_build_object('t', repeat(md5(i::text), 16384)) \
         FROM generate_series(1, {WIDE_ROWS}) i"
    ))
    .await
    .unwrap();
    let es_section = format!(
        "\n[elasticsearch]\nrun_in_daemon = true\nurl = {:?}\nnumber_of_replicas = 0\n",
        es.url
    );
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["docs"], "") + &es_section;
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    let alias = "cdc_public_docs";
    wait_count(&es, alias, &daemon).await;
    assert_eq!(
        daemon.terminate(Duration::from_secs(60)).unwrap().code(),
        Some(0)
    );

    delete_serving(&es, alias).await;
    daemon.peak_rss_kb = 0;
    daemon.spawn().unwrap();
    // The sink finds the mirror gone at its next change.
    db.batch_execute("UPDATE docs SET body = body WHERE id = 1")
        .await
        .unwrap();
    wait_count(&es, alias, &daemon).await;
    assert_eq!(
        daemon.terminate(Duration::from_secs(60)).unwrap().code(),
        Some(0)
    );
    let peak_mib = daemon.peak_rss_kb / 1024;
    eprintln!("peak rss filling {WIDE_ROWS} rows of 512 KiB again: {peak_mib} MiB");
    assert!(
        peak_mib < WIDE_FILL_PEAK_MAX_MIB,
        "peak rss {peak_mib} MiB, more than {WIDE_FILL_PEAK_MAX_MIB} MiB"
    );
}

/// Wait until `alias` counts [`WIDE_ROWS`] documents.
async fn wait_count(es: &SearchServer, alias: &str, daemon: &Daemon) {
    let url = format!("{}/{alias}/_count", es.url);
    wait::poll(
        &format!("{WIDE_ROWS} documents in {alias}"),
        MIRRORED,
        Duration::from_millis(200),
        || async {
            let now: Value = match reqwest::get(&url).await {
                Ok(r) => r.json().await.unwrap_or(Value::Null),
                Err(_) => Value::Null,
            };
            match now["count"].as_i64() {
                Some(n) if n == i64::from(WIDE_ROWS) => Poll::Ready(()),
                _ if !daemon.is_running() => Poll::Abort(daemon.log_tail()),
                _ => Poll::Pending(format!("{now}\n{}", daemon.log_tail())),
            }
        },
    )
    .await
    .unwrap();
}

/// A commit waiting for a synchronous standby is already on Kafka and
/// applied to the mirror, yet invisible to every snapshot. Deleted now,
/// the mirror is filled from PostgreSQL: the fill's snapshot must wait for
/// that commit, or the row it inserted stays missing from the new index
/// (the sink applied it to the deleted one only, and it does not change
/// again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_waits_for_a_commit_applied_before_it_but_not_yet_visible() {
    fill_waits_for_a_held_commit(Held::Commit).await;
}

/// The same with a `COMMIT PREPARED`: the session that waits holds none of
/// the prepared transaction's locks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_waits_for_a_commit_prepared_applied_before_it_but_not_yet_visible() {
    fill_waits_for_a_held_commit(Held::CommitPrepared).await;
}

/// The same with a `COMMIT PREPARED` that spells the name otherwise than
/// `quote_literal` does (here `E'…'` with an escape): it cannot be told
/// which prepared transaction it commits, so the fill waits for them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_waits_for_a_commit_prepared_naming_it_with_an_escape() {
    fill_waits_for_a_held_commit(Held::CommitPreparedEscaped).await;
}

/// The same when pgcdc's role lacks `pg_read_all_stats`: it cannot see
/// that another role's commit waits, so it waits for that role's
/// transactions, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_waits_for_another_roles_commit_it_cannot_see_waiting() {
    fill_waits_for_a_held_commit(Held::OtherRole).await;
}

/// The commit that holds a fill up in [`fill_waits_for_a_held_commit`].
#[derive(Clone, Copy, PartialEq)]
enum Held {
    /// A commit pgcdc's role (a superuser) sees waiting.
    Commit,
    /// A `COMMIT PREPARED`.
    CommitPrepared,
    /// A `COMMIT PREPARED E'…'`.
    CommitPreparedEscaped,
    /// A commit of a role whose waits pgcdc's role cannot see.
    OtherRole,
}

async fn fill_waits_for_a_held_commit(held: Held) {
    let m = Mirrored::start_with((held == Held::OtherRole).then_some("reader"), &[]).await;
    let stuck = crate::support::waiting_writer(&m.pg, &m.db).await;
    let changes =
        "INSERT INTO items VALUES (100001, 7, 0, 'late'); UPDATE items SET n = 5 WHERE id = 7;";
    let commit = match held {
        Held::CommitPrepared | Held::CommitPreparedEscaped => {
            // Prepared where commits do not wait; committed where they do.
            m.db.batch_execute(&format!("BEGIN; {changes} PREPARE TRANSACTION 'late'"))
                .await
                .unwrap();
            if held == Held::CommitPrepared {
                "COMMIT PREPARED 'late'".to_string()
            } else {
                r"commit prepared E'l\x61te'".to_string()
            }
        }
        Held::Commit | Held::OtherRole => format!("BEGIN; {changes} COMMIT;"),
    };
    let commit = tokio::spawn(async move { stuck.batch_execute(&commit).await });
    let url = format!("{}/{ALIAS}/_doc/100001", m.es.url);
    wait::poll(
        "the waiting commit applied to the mirror",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async {
            let code = crate::support::get(&url).await.map(|(code, _)| code);
            Poll::when(code == Some(200), (), || format!("{code:?}"))
        },
    )
    .await
    .unwrap();

    delete_serving(&m.es, ALIAS).await;
    m.db.batch_execute("UPDATE items SET n = 1 WHERE id = 1")
        .await
        .unwrap();
    m.daemon
        .wait_log("the fill waits before its snapshot", MIRRORED)
        .await
        .unwrap();
    let held_throughout = !commit.is_finished();
    crate::support::release_commits(&m.db).await;
    // Cancelled while waiting: the commit stands.
    commit.await.unwrap().unwrap();
    assert!(
        held_throughout,
        "the commit became visible before the fill waited"
    );
    m.wait_whole().await;
    let log = m.daemon.log_text();
    assert!(
        log.contains("those commits are visible now"),
        "{}",
        m.daemon.log_tail()
    );
    let unseen = "this role cannot see whether other roles' commits wait";
    assert_eq!(log.contains(unseen), held == Held::OtherRole, "{log}");
}

/// Set `index`'s settings.
async fn put_settings(es: &SearchServer, index: &str, settings: Value) {
    let url = format!("{}/{index}/_settings", es.url);
    let put = reqwest::Client::new().put(url).json(&settings).send();
    let answer = put.await.unwrap();
    assert!(answer.status().is_success(), "{}", answer.status());
}

/// `POST <index>/<what>` (`_close`, `_open`).
async fn post(es: &SearchServer, index: &str, what: &str) {
    let url = format!("{}/{index}/{what}", es.url);
    let answer = reqwest::Client::new().post(url).send().await.unwrap();
    assert!(answer.status().is_success(), "{what}: {}", answer.status());
}

/// A mirror index with a write block, or closed, refuses every write
/// until an operator lifts it: the sink retries (saying why), `/ready` is
/// 503 naming it once nothing was written for `metrics.ready_window_secs`,
/// and nothing is parked on the dead-letter topic, so the mirror is whole
/// once it can be written again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_or_closed_mirror_is_waited_for_not_dead_lettered() {
    let mut m = Mirrored::start().await;
    let index = serving(&m.es, ALIAS).await;

    // A write block: not ready (naming it) after the default window of 60 s.
    put_settings(&m.es, &index, json!({"index.blocks.write": true})).await;
    m.db.batch_execute("UPDATE items SET n = 1 WHERE id = 1; DELETE FROM items WHERE id = 2")
        .await
        .unwrap();
    m.daemon
        .wait_log("cluster_block_exception", MIRRORED)
        .await
        .unwrap();
    let within = Duration::from_secs(120);
    m.probe
        .until_within(
            "not ready while blocked",
            within,
            &mut m.daemon,
            |_, ready| ready == 503,
        )
        .await;
    let (_, why) = m.probe.ready().await;
    assert!(
        why.contains("es sink: no batch written and not caught up in 60s")
            && why.contains("cluster_block_exception"),
        "{why}"
    );
    put_settings(&m.es, &index, json!({"index.blocks.write": false})).await;
    m.wait_whole().await;
    m.probe
        .until("ready once written", &mut m.daemon, |_, ready| ready == 200)
        .await;
    let (es, daemon) = (&m.es, &m.daemon);

    // A closed index.
    post(es, &index, "_close").await;
    m.db.batch_execute("UPDATE items SET n = 3 WHERE id = 3; DELETE FROM items WHERE id = 4")
        .await
        .unwrap();
    daemon
        .wait_log("index_closed_exception", MIRRORED)
        .await
        .unwrap();
    post(es, &index, "_open").await;
    m.wait_whole().await;
    let dead = m.sample("pgcdc_dead_letters_total", &[]).await;
    assert_eq!(dead, Some(0.0), "nothing dead-lettered");
}
