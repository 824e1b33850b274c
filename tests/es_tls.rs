//! The search server over HTTPS (osmem-server behind a TLS terminator) with
//! `ca_file` and basic-auth credentials; credentials over plain HTTP refused.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use pgcdc_testkit::certs::TestCa;
use pgcdc_testkit::proxy::tls::TlsTerminator;

use crate::support::{config, pg_and_tansu, pgcdc, wait, SearchServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_indexes_over_https_verified_against_ca_file() {
    let (pg, tansu, dir, db) = pg_and_tansu().await;
    let es = SearchServer::start().unwrap();
    let es_port: u16 = es.url.rsplit(':').next().unwrap().parse().unwrap();
    let ca = TestCa::new("search test ca").unwrap();
    let ca_file = ca.write(&dir.path().join("ca.crt")).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let cert = ca.issue(&["localhost"], "search").unwrap();
    let _terminator = TlsTerminator::start(listener, &cert, es_port).unwrap();
    db.batch_execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
        .await
        .unwrap();
    let es_section = |url: &str, extra: &str| {
        format!(
            "\n[elasticsearch]\nrun_in_daemon = true\nurl = {url:?}\nnumber_of_replicas = 0\n\
             flush_interval_ms = 50\nusername = \"pgcdc\"\npassword = \"pw\"\n{extra}"
        )
    };
    let base = config(&pg, &tansu, &dir.path().join("state"), &["items"], "");

    // Credentials over plain http are refused before anything connects.
    let path = dir.path().join("http.toml");
    std::fs::write(&path, base.clone() + &es_section(&es.url, "")).unwrap();
    let out = pgcdc(&path, &["check"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("elasticsearch.url") && err.contains("unencrypted over http://"),
        "{err}"
    );

    let url = format!("https://localhost:{port}");
    let ca_line = format!("ca_file = {:?}\n", ca_file.display().to_string());
    let cfg = base + &es_section(&url, &ca_line);
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute("INSERT INTO items VALUES (1, 'secure'), (2, 'search')")
        .await
        .unwrap();
    let what = "both rows indexed over https";
    wait::poll(what, Duration::from_secs(60), wait::EVERY, || async {
        let docs = es.documents("cdc_public_items").await.unwrap_or_default();
        wait::Poll::when(docs.len() == 2, (), || format!("{} documents", docs.len()))
    })
    .await
    .unwrap();
    daemon.terminate(Duration::from_secs(30)).unwrap();
}
