//! Kafka over TLS (tansu behind a TLS terminator that advertises the TLS
//! address, verified against a CA made by the test), and the warning about
//! a topic with fewer than 3 copies (the mock cluster has no CreateTopics;
//! the min(3, brokers) rule is unit-tested).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use pgcdc_testkit::certs::TestCa;
use pgcdc_testkit::proxy::tls::TlsTerminator;

use crate::support::{config, free_port, pgcdc, Broker, PgCluster, Tansu, TopicReader};

/// `[kafka.properties]` for TLS trusting `ca`.
fn tls_properties(ca: &Path) -> String {
    format!(
        "[kafka.properties]\n\"security.protocol\" = \"ssl\"\n\"ssl.ca.location\" = {:?}\n",
        ca.display().to_string()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_kafka_over_tls_verified_against_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("kafka test ca").unwrap();
    let ca_file = ca.write(&dir.path().join("ca.crt")).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tls_port = listener.local_addr().unwrap().port();
    let tansu = Tansu::start_with(free_port(), tls_port).unwrap();
    let cert = ca.issue(&["127.0.0.1"], "kafka").unwrap();
    let _terminator = TlsTerminator::start(listener, &cert, tansu.port).unwrap();
    let pg = PgCluster::start().unwrap();
    let db = pg.client().await.unwrap();
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let state = dir.path().join("state");
    let cfg = config(&pg, &tansu, &state, &["t"], &tls_properties(&ca_file));
    let path = crate::support::check_reaches_kafka(dir.path(), &cfg);

    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute("INSERT INTO t VALUES (1, 'through tls')")
        .await
        .unwrap();
    let ca_path = ca_file.display().to_string();
    let props = [
        ("security.protocol", "ssl"),
        ("ssl.ca.location", ca_path.as_str()),
    ];
    let reader = TopicReader::with_properties(&tansu.brokers(), &props).unwrap();
    let records = reader
        .read_until("cdc-events", Duration::from_secs(60), |r| {
            r.iter().any(|r| r.after()["v"] == "through tls")
        })
        .unwrap();
    assert!(!records.is_empty());
    let log = daemon.log_text();
    assert!(log.contains("topic keeps fewer than 3 copies"), "{log}");
    daemon.terminate(Duration::from_secs(30)).unwrap();

    // A broker certificate from another CA is refused.
    let other = TestCa::new("someone else").unwrap();
    let other_file = other.write(&dir.path().join("other.crt")).unwrap();
    let cfg = config(&pg, &tansu, &state, &["t"], &tls_properties(&other_file));
    std::fs::write(&path, &cfg).unwrap();
    let out = pgcdc(&path, &["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("FAIL  kafka"), "{text}");
    assert!(text.contains("the broker refused the connection"), "{text}");
    assert!(text.contains("certificate verify failed"), "{text}");
}
