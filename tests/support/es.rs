//! osmem-server (an in-memory OpenSearch-compatible server) on a free port,
//! and an HTTP fault proxy to put in front of it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use pgcdc::chaos::es_proxy::{bulk_items, forward, read_request, respond};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};

/// A running osmem-server, killed on drop.
pub struct SearchServer {
    child: Child,
    pub url: String,
}

fn osmem_binary() -> String {
    if let Ok(bin) = std::env::var("OSMEM_SERVER_BIN") {
        return bin;
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import osmem_server; print(osmem_server.resolve_binary())",
        ])
        .output()
        .expect("python3");
    let bin = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        !bin.is_empty(),
        "osmem-server not installed: pip install osmem-server"
    );
    bin
}

impl SearchServer {
    /// Start the server; it prints its URL as JSON on its first line.
    pub fn start() -> SearchServer {
        let mut child = Command::new(osmem_binary())
            .args(["-addr", "127.0.0.1:0", "-no-stdin-watch", "-no-ja"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start osmem-server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("osmem banner");
        let banner: Value = serde_json::from_str(&line).expect("osmem banner is json");
        let url = banner["url"].as_str().expect("url").to_owned();
        SearchServer { child, url }
    }

    /// Every document of `index`: id → (version, source without `_cdc`).
    pub async fn documents(&self, index: &str) -> BTreeMap<String, (u64, Value)> {
        let hits = pgcdc::chaos::oracle::all_hits(&self.url, index)
            .await
            .expect("search");
        let mut docs = BTreeMap::new();
        for h in hits {
            let mut src = h["_source"].clone();
            if let Some(o) = src.as_object_mut() {
                o.remove("_cdc");
            }
            docs.insert(
                h["_id"].as_str().unwrap_or("").to_owned(),
                (h["_version"].as_u64().unwrap_or(0), src),
            );
        }
        docs
    }
}

impl Drop for SearchServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Faults the proxy injects into `_bulk` requests, consumed as they fire.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// Answer this many bulk requests with 429 as a whole.
    pub reject_429: usize,
    /// Answer this many bulk requests with 500 as a whole.
    pub reject_500: usize,
    /// Close the connection without an answer this many times.
    pub drop: usize,
    /// For this many bulk requests, fail every `partial_every`-th item with 429 (not applied).
    pub partial: usize,
    /// See `partial`.
    pub partial_every: usize,
    /// Bulk requests seen.
    pub seen: usize,
}

/// An HTTP proxy in front of the search server that injects [`Faults`].
pub struct FaultProxy {
    pub url: String,
    pub faults: Arc<Mutex<Faults>>,
}

impl FaultProxy {
    /// Proxy to `upstream` on a free port.
    pub async fn start(upstream: &str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let faults = Arc::new(Mutex::new(Faults::default()));
        let (f, upstream) = (faults.clone(), upstream.to_owned());
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve(conn, upstream.clone(), f.clone()));
            }
        });
        FaultProxy { url, faults }
    }
}

async fn serve(mut conn: TcpStream, upstream: String, faults: Arc<Mutex<Faults>>) {
    let Some((method, path, body)) = read_request(&mut conn).await else {
        return;
    };
    let http = reqwest::Client::new();
    if !path.contains("_bulk") {
        let (status, resp) = forward(&http, &upstream, &method, &path, body).await;
        return respond(&mut conn, status, &resp).await;
    }
    let fault = {
        let mut f = faults.lock().unwrap_or_else(|e| e.into_inner());
        f.seen += 1;
        if f.drop > 0 {
            f.drop -= 1;
            "drop"
        } else if f.reject_429 > 0 {
            f.reject_429 -= 1;
            "429"
        } else if f.reject_500 > 0 {
            f.reject_500 -= 1;
            "500"
        } else if f.partial > 0 {
            f.partial -= 1;
            "partial"
        } else {
            ""
        }
    };
    match fault {
        "drop" => drop(conn),
        "429" => {
            respond(
                &mut conn,
                429,
                br#"{"error":"too many requests","status":429}"#,
            )
            .await
        }
        "500" => respond(&mut conn, 500, br#"{"error":"boom","status":500}"#).await,
        "partial" => {
            let every = faults
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .partial_every
                .max(1);
            let items = bulk_items(&body);
            let kept: Vec<String> = items
                .iter()
                .enumerate()
                .filter(|(i, _)| i % every != 0)
                .flat_map(|(_, it)| it.clone())
                .collect();
            let mut forwarded = kept.join("\n");
            forwarded.push('\n');
            let (status, resp) =
                forward(&http, &upstream, &method, &path, forwarded.into_bytes()).await;
            let resp: Value = serde_json::from_slice(&resp).unwrap_or(Value::Null);
            let mut answers = resp["items"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter();
            let spliced: Vec<Value> = (0..items.len())
                .map(|i| {
                    if i % every == 0 {
                        json!({"index": {"status": 429, "error": {"type": "es_rejected_execution_exception"}}})
                    } else {
                        answers.next().unwrap_or(Value::Null)
                    }
                })
                .collect();
            let body = json!({"took": 1, "errors": true, "items": spliced}).to_string();
            respond(&mut conn, status, body.as_bytes()).await;
        }
        _ => {
            let (status, resp) = forward(&http, &upstream, &method, &path, body).await;
            respond(&mut conn, status, &resp).await;
        }
    }
}
