//! osmem-server, an in-memory OpenSearch-compatible server, on a free port,
//! and reading a whole index back.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// Hits per search request when an index is read whole.
const PAGE: usize = 5000;
/// The field the sink adds to every document (not part of the row).
const CDC_FIELD: &str = "_cdc";

/// A mirror index as read back: `_id` → (`_version`, `_source` without `_cdc`).
pub type Documents = BTreeMap<String, (u64, Value)>;

/// A running osmem-server, killed on drop.
pub struct SearchServer {
    child: Child,
    /// Base URL.
    pub url: String,
}

/// `$OSMEM_SERVER_BIN`, else where the python package says its binary is.
fn osmem_binary() -> Result<String> {
    if let Ok(bin) = std::env::var("OSMEM_SERVER_BIN") {
        return Ok(bin);
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import osmem_server; print(osmem_server.resolve_binary())",
        ])
        .output()
        .context("python3")?;
    let bin = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if bin.is_empty() {
        bail!("osmem-server not installed: pip install osmem-server");
    }
    Ok(bin)
}

impl SearchServer {
    /// Start the server; it prints its URL as JSON on its first line.
    pub fn start() -> Result<SearchServer> {
        let mut child = Command::new(osmem_binary()?)
            .args(["-addr", "127.0.0.1:0", "-no-stdin-watch", "-no-ja"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("start osmem-server")?;
        let mut line = String::new();
        let stdout = child.stdout.take().context("osmem-server has no stdout")?;
        BufReader::new(stdout).read_line(&mut line)?;
        let banner: Value = serde_json::from_str(&line).context("osmem banner")?;
        let url = banner["url"]
            .as_str()
            .context("no url in the osmem banner")?
            .to_owned();
        Ok(SearchServer { child, url })
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Freeze (`STOP`) or thaw (`CONT`) the server process.
    pub fn signal(&self, signal: &str) -> Result<()> {
        crate::signal(self.pid(), signal)
    }

    /// Every document of `index` (none if it does not exist).
    pub async fn documents(&self, index: &str) -> Result<Documents> {
        documents(&self.url, index).await
    }
}

impl Drop for SearchServer {
    fn drop(&mut self) {
        let _ = self.signal("CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every hit of `index` (with `_version`), paged with `search_after`; none
/// if the index does not exist.
pub async fn all_hits(url: &str, index: &str) -> Result<Vec<Value>> {
    let http = reqwest::Client::new();
    let _ = http.post(format!("{url}/{index}/_refresh")).send().await;
    let mut all = Vec::new();
    let mut after: Option<Value> = None;
    loop {
        let mut body = json!({"size": PAGE, "version": true, "sort": [{"_id": "asc"}], "query": {"match_all": {}}});
        if let Some(a) = &after {
            body["search_after"] = a.clone();
        }
        let resp = http
            .post(format!("{url}/{index}/_search"))
            .json(&body)
            .send()
            .await?;
        if resp.status().as_u16() == 404 {
            return Ok(all);
        }
        let v: Value = resp.json().await?;
        let hits = v["hits"]["hits"].as_array().cloned().unwrap_or_default();
        let Some(last) = hits.last() else {
            return Ok(all);
        };
        after = Some(last["sort"].clone());
        all.extend(hits);
    }
}

/// Every document of `index` at `url`. A mirror document whose `_version`
/// is not the commit LSN it holds (`_cdc.lsn`) is an error: versions are
/// what make replays harmless.
pub async fn documents(url: &str, index: &str) -> Result<Documents> {
    let mut docs = Documents::new();
    for h in all_hits(url, index).await? {
        let mut src = h["_source"].clone();
        let id = h["_id"].as_str().unwrap_or("").to_owned();
        let version = h["_version"].as_u64().unwrap_or(0);
        if let Some(cdc) = src.as_object_mut().and_then(|o| o.remove(CDC_FIELD)) {
            if cdc["lsn"].as_u64() != Some(version) {
                bail!("document {id} of {index} has _version {version} but holds the change at commit LSN {}", cdc["lsn"]);
            }
        }
        docs.insert(id, (version, src));
    }
    Ok(docs)
}
