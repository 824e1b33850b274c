//! An HTTP proxy in front of the search server that answers `_bulk`
//! requests badly on command: each queued [`Fault`] spoils the next bulk
//! request (a 429 or 500 for the whole request, a dropped connection, or a
//! partial failure: some items are not forwarded and answered with an error
//! status). Everything else is forwarded unchanged. One request per
//! connection (`connection: close`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::lock;

/// Bytes read from a connection at a time.
const CHUNK: usize = 64 * 1024;

/// What one spoiled `_bulk` request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// This status (429, 500, …) for the whole request.
    Reject(u16),
    /// Close the connection without an answer.
    Drop,
    /// Every `every`-th item (from the first) fails with `status`, not applied.
    Partial {
        /// Which items fail.
        every: usize,
        /// Their status (429, 503, …); 0 leaves the status out.
        status: u16,
    },
    /// 200 with a body that is not JSON, nothing applied.
    NotJson,
}

/// A standing rule: every bulk request it matches is refused, not applied.
#[derive(Debug, Clone)]
pub enum Refuse {
    /// 400 for a request whose body contains this text.
    Containing(String),
    /// 413 for a request whose body is longer than this many bytes.
    LongerThan(usize),
}

/// Queued and fired faults, and bulk requests seen.
#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Fault>,
    rules: Vec<Refuse>,
    refused: usize,
    fired: usize,
    seen: usize,
}

/// The running proxy; its accept loop ends when it is dropped.
pub struct BulkFaultProxy {
    /// Base URL the daemon uses.
    pub url: String,
    state: Arc<Mutex<State>>,
    accept: tokio::task::JoinHandle<()>,
}

impl BulkFaultProxy {
    /// Proxy to `upstream` (a base URL) on a free port.
    pub async fn start(upstream: &str) -> Result<BulkFaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let state = Arc::new(Mutex::new(State::default()));
        let (st, upstream) = (state.clone(), upstream.to_owned());
        let http = reqwest::Client::new();
        let accept = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve(conn, upstream.clone(), http.clone(), st.clone()));
            }
        });
        Ok(BulkFaultProxy { url, state, accept })
    }

    /// Refuse every bulk request `rule` matches, from now on.
    pub fn refuse(&self, rule: Refuse) {
        lock(&self.state).rules.push(rule);
    }

    /// Requests refused by a standing rule so far.
    pub fn refused(&self) -> usize {
        lock(&self.state).refused
    }

    /// Spoil the next bulk requests with `faults`, in order, one each.
    pub fn push(&self, faults: impl IntoIterator<Item = Fault>) {
        lock(&self.state).queue.extend(faults);
    }

    /// Faults fired so far.
    pub fn fired(&self) -> usize {
        lock(&self.state).fired
    }

    /// Faults queued that have not fired yet.
    pub fn pending(&self) -> usize {
        lock(&self.state).queue.len()
    }

    /// Bulk requests seen so far.
    pub fn seen(&self) -> usize {
        lock(&self.state).seen
    }
}

impl Drop for BulkFaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Read one HTTP/1.1 request (head + content-length body): method, path, body.
async fn read_request(conn: &mut TcpStream) -> Option<(String, String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; CHUNK];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = conn.read(&mut chunk).await.ok().filter(|n| *n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut first = head.lines().next()?.split_whitespace();
    let (method, path) = (first.next()?.to_owned(), first.next()?.to_owned());
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = conn.read(&mut chunk).await.ok().filter(|n| *n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
    }
    Some((method, path, buf[head_end..head_end + len].to_vec()))
}

/// Answer with `status` and a JSON `body`, then close the connection.
async fn respond(conn: &mut TcpStream, status: u16, body: &[u8]) {
    let head = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(head.as_bytes()).await;
    let _ = conn.write_all(body).await;
    let _ = conn.shutdown().await;
}

/// Pass a request on to `upstream`; a failed request answers 502.
async fn forward(
    http: &reqwest::Client,
    upstream: &str,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> (u16, Vec<u8>) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::GET);
    let ct = if path.contains("_bulk") {
        "application/x-ndjson"
    } else {
        "application/json"
    };
    let resp = http
        .request(method, format!("{upstream}{path}"))
        .header("content-type", ct)
        .body(body)
        .send()
        .await;
    match resp {
        Ok(r) => (
            r.status().as_u16(),
            r.bytes().await.map(|b| b.to_vec()).unwrap_or_default(),
        ),
        Err(_) => (502, b"{}".to_vec()),
    }
}

/// Split an NDJSON bulk body into items (action line + source line unless a delete).
pub fn bulk_items(body: &[u8]) -> Vec<Vec<String>> {
    let text = String::from_utf8_lossy(body);
    let mut lines = text.lines().filter(|l| !l.is_empty());
    let mut items = Vec::new();
    while let Some(meta) = lines.next() {
        let mut item = vec![meta.to_owned()];
        if !meta.trim_start().starts_with("{\"delete\"") {
            item.extend(lines.next().map(str::to_owned));
        }
        items.push(item);
    }
    items
}

/// The action name of an item's first line (`index`, `delete`, ...).
fn action(item: &[String]) -> String {
    item.first()
        .and_then(|l| serde_json::from_str::<Value>(l).ok())
        .and_then(|v| v.as_object().and_then(|o| o.keys().next().cloned()))
        .unwrap_or_else(|| "index".into())
}

/// Forward only the items not chosen to fail; splice failures into the answer.
async fn partial(
    http: &reqwest::Client,
    upstream: &str,
    path: &str,
    body: &[u8],
    every: usize,
    status: u16,
) -> (u16, Vec<u8>) {
    let items = bulk_items(body);
    let fails = |i: usize| i % every.max(1) == 0;
    let mut kept: String = items
        .iter()
        .enumerate()
        .filter(|(i, _)| !fails(*i))
        .flat_map(|(_, it)| it.clone())
        .collect::<Vec<_>>()
        .join("\n");
    let mut answers = Vec::new().into_iter();
    if !kept.is_empty() {
        kept.push('\n');
        let (s, resp) = forward(http, upstream, "POST", path, kept.into_bytes()).await;
        if s != 200 {
            return (s, resp);
        }
        let resp: Value = serde_json::from_slice(&resp).unwrap_or(Value::Null);
        answers = resp["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter();
    }
    let reason = if status == 429 {
        "es_rejected_execution_exception"
    } else {
        "unavailable_shards_exception"
    };
    let spliced: Vec<Value> = items
        .iter()
        .enumerate()
        .map(|(i, it)| {
            if fails(i) && status == 0 {
                json!({ action(it): {"error": {"type": reason, "reason": "injected, no status"}}})
            } else if fails(i) {
                json!({ action(it): {"status": status, "error": {"type": reason, "reason": "injected"}}})
            } else {
                answers.next().unwrap_or(Value::Null)
            }
        })
        .collect();
    (
        200,
        json!({"took": 1, "errors": true, "items": spliced})
            .to_string()
            .into_bytes(),
    )
}

/// The fault for the next request to `path` (only `_bulk` requests are
/// spoiled): a standing rule's refusal, else the next queued fault.
fn next_fault(state: &Mutex<State>, path: &str, body: &[u8]) -> Option<Fault> {
    if !path.contains("_bulk") {
        return None;
    }
    let mut s = lock(state);
    s.seen += 1;
    let refusal = s.rules.iter().find_map(|r| match r {
        Refuse::Containing(text) if String::from_utf8_lossy(body).contains(text.as_str()) => {
            Some(400)
        }
        Refuse::LongerThan(n) if body.len() > *n => Some(413),
        _ => None,
    });
    if let Some(status) = refusal {
        s.refused += 1;
        return Some(Fault::Reject(status));
    }
    let fault = s.queue.pop_front();
    s.fired += usize::from(fault.is_some());
    fault
}

async fn serve(
    mut conn: TcpStream,
    upstream: String,
    http: reqwest::Client,
    state: Arc<Mutex<State>>,
) {
    let Some((method, path, body)) = read_request(&mut conn).await else {
        return;
    };
    let (status, resp) = match next_fault(&state, &path, &body) {
        None => forward(&http, &upstream, &method, &path, body).await,
        Some(Fault::Drop) => return drop(conn),
        Some(Fault::Reject(status)) => (
            status,
            json!({"error": "injected", "status": status})
                .to_string()
                .into_bytes(),
        ),
        Some(Fault::Partial { every, status }) => {
            partial(&http, &upstream, &path, &body, every, status).await
        }
        Some(Fault::NotJson) => (200, b"<html>gateway says hello</html>".to_vec()),
    };
    respond(&mut conn, status, &resp).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_bodies_split_into_items_and_deletes_have_no_source() {
        let body = b"{\"index\":{\"_id\":\"1\"}}\n{\"id\":1}\n{\"delete\":{\"_id\":\"2\"}}\n{\"index\":{\"_id\":\"3\"}}\n{\"id\":3}\n";
        let items = bulk_items(body);
        assert_eq!(items.len(), 3);
        assert_eq!(items[1].len(), 1);
        assert_eq!(action(&items[1]), "delete");
        assert_eq!(action(&items[2]), "index");
    }

    #[test]
    fn an_armed_burst_fires_exactly_its_faults() {
        let state = Mutex::new(State::default());
        lock(&state)
            .queue
            .extend([Fault::Drop, Fault::Reject(429), Fault::Reject(500)]);
        assert_eq!(next_fault(&state, "/idx/_search", b""), None);
        let fired: Vec<_> = (0..5).map(|_| next_fault(&state, "/_bulk", b"")).collect();
        assert_eq!(
            &fired[..3],
            [
                Some(Fault::Drop),
                Some(Fault::Reject(429)),
                Some(Fault::Reject(500))
            ]
        );
        assert!(fired[3].is_none() && fired[4].is_none());
        let s = lock(&state);
        assert_eq!((s.fired, s.seen, s.queue.len()), (3, 5, 0));
    }
}
