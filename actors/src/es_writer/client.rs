//! The Elasticsearch/OpenSearch REST client: auth, TLS, bulk, index creation.

use std::collections::HashMap;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde_json::{json, Map, Value};

use super::bulk::BulkResponse;
use super::config::EsConfig;
use super::merge::{DocRef, Stored};
use super::naming::path_segment;
use super::truncate::{below_query, floor_doc, floors_of, Position};
use super::EsError;

/// Characters of an error response body kept in the error: enough for
/// Elasticsearch's reason, short enough for one log line.
const ERROR_BODY_CHARS: usize = 500;
/// Status of a request on an index that does not exist yet: nothing there.
const NOT_FOUND: u16 = 404;
/// Status of a versioned write at or below the stored version.
const CONFLICT: u16 = 409;

/// A configured HTTP client for one cluster.
#[derive(Clone)]
pub struct EsClient {
    http: reqwest::Client,
    base: String,
    username: Option<String>,
    password: String,
    /// Names this client in the fill heartbeats it writes, so a write
    /// retried after its answer was lost is known as its own.
    owner: String,
}

/// `url` without credentials (validation refuses them; this keeps a log
/// line safe regardless).
fn base_url(url: &str) -> &str {
    url.rsplit('@').next().unwrap_or_default()
}

/// The id of the document that notes a mirror's creation: `~` is never
/// part of a mirror's name, so it is no mirror's floor.
fn noted_id(alias: &str) -> String {
    path_segment(&format!("created~{alias}"))
}

/// The id of the document that notes a gap in `topic` (records Kafka never
/// delivered); `~` keeps it apart from floors and creation notes.
fn gap_id(topic: &str) -> String {
    path_segment(&format!("gap~{topic}"))
}

/// A mirror that lacks changes only a fill from PostgreSQL brings
/// ([`EsClient::note_lacking`]).
#[derive(Debug, serde::Deserialize)]
pub struct Lacking {
    /// The mirror's alias.
    #[serde(rename = "lacking")]
    pub alias: String,
    /// Why it lacks them.
    #[serde(default)]
    pub why: String,
    /// Its table (schema, name), if known.
    #[serde(default)]
    pub table: Option<(String, String)>,
}

/// The id of the document that notes that mirror `alias` lacks changes
/// only a fill from PostgreSQL brings.
fn lacking_id(alias: &str) -> String {
    path_segment(&format!("lacking~{alias}"))
}

/// The id of the document whose changes show that a sink process is
/// still filling the generation `index` ([`shared`](super::shared)).
fn filling_id(index: &str) -> String {
    path_segment(&format!("filling~{index}"))
}

/// A random token naming one client in the heartbeats it writes.
fn owner_token() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::getrandom(&mut b);
    format!("{:016x}", u64::from_le_bytes(b))
}

/// A fill's heartbeat document as last written: what a conditional write
/// of the next beat must find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beat {
    /// How many beats were written.
    pub n: u64,
    seq_no: u64,
    primary_term: u64,
}

impl Beat {
    fn of(doc: &Value, n: u64) -> Option<Beat> {
        Some(Beat {
            n,
            seq_no: doc["_seq_no"].as_u64()?,
            primary_term: doc["_primary_term"].as_u64()?,
        })
    }

    fn condition(&self) -> String {
        format!(
            "if_seq_no={}&if_primary_term={}",
            self.seq_no, self.primary_term
        )
    }
}

impl EsClient {
    /// Build the client (CA file, API key, timeouts) from `cfg`.
    pub fn new(cfg: &EsConfig) -> Result<Self, EsError> {
        let mut headers = HeaderMap::new();
        if !cfg.api_key.expose().is_empty() {
            let mut v = HeaderValue::from_str(&format!("ApiKey {}", cfg.api_key.expose()))
                .map_err(|_| {
                    EsError::Config("elasticsearch.api_key: not a valid header value".into())
                })?;
            v.set_sensitive(true);
            headers.insert(AUTHORIZATION, v);
        }
        let mut builder = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(Duration::from_secs(cfg.request_timeout_secs))
            .pool_max_idle_per_host(4);
        if let Some(ca) = &cfg.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| EsError::Config(format!("elasticsearch.ca_file: {e}")))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| EsError::Config(format!("elasticsearch.ca_file: {e}")))?;
            builder = builder.add_root_certificate(cert);
        }
        if cfg.danger_accept_invalid_certs {
            tracing::warn!(
                url = %base_url(&cfg.url),
                "elasticsearch.danger_accept_invalid_certs is on: the server certificate is NOT verified; anyone on the network path can read and change what pgcdc sends"
            );
            builder = builder.danger_accept_invalid_certs(true);
        }
        let http = builder
            .build()
            .map_err(|e| EsError::Config(format!("elasticsearch: {e}")))?;
        Ok(Self {
            http,
            base: cfg.url.trim_end_matches('/').to_owned(),
            username: cfg.username.clone(),
            password: cfg.password.expose().to_owned(),
            owner: owner_token(),
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}/{}", self.base, path));
        match &self.username {
            Some(u) => r.basic_auth(u, Some(&self.password)),
            None => r,
        }
    }

    /// POST `_bulk`; returns each item's status and error, or the HTTP status for a whole-request failure.
    pub async fn bulk(&self, body: String) -> Result<BulkResponse, EsError> {
        let resp = self
            .request(reqwest::Method::POST, "_bulk")
            .header(CONTENT_TYPE, "application/x-ndjson")
            .body(body)
            .send()
            .await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        let start = || {
            String::from_utf8_lossy(&bytes)
                .chars()
                .take(ERROR_BODY_CHARS)
                .collect::<String>()
        };
        if !status.is_success() {
            return Err(EsError::Status {
                status: status.as_u16(),
                body: start(),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| EsError::Unreadable {
            status: status.as_u16(),
            body: format!("{e}: {}", start()),
        })
    }

    /// Create `index` with `body` unless it exists.
    /// Whether it was created (`false`: it existed).
    pub async fn ensure_index(&self, index: &str, body: &Value) -> Result<bool, EsError> {
        let resp = self
            .request(reqwest::Method::PUT, &path_segment(index))
            .json(body)
            .send()
            .await?;
        let status = resp.status();
        if status.is_success() {
            tracing::info!(index, "created index");
            return Ok(true);
        }
        let text = resp.text().await.unwrap_or_default();
        if text.contains("resource_already_exists_exception") {
            return Ok(false);
        }
        Err(EsError::Status {
            status: status.as_u16(),
            body: text.chars().take(ERROR_BODY_CHARS).collect(),
        })
    }

    /// Delete every document of `index` below the truncate at `at`, after a
    /// refresh, so every write made so far is seen.
    pub async fn delete_below(&self, index: &str, at: Position) -> Result<(), EsError> {
        self.refresh(index).await?;
        let index = path_segment(index);
        let path = format!("{index}/_delete_by_query?refresh=true&conflicts=proceed");
        self.call(reqwest::Method::POST, &path, Some(&below_query(at)))
            .await?;
        Ok(())
    }

    /// Make every write to `index` so far visible to searches.
    pub async fn refresh(&self, index: &str) -> Result<(), EsError> {
        let path = format!("{}/_refresh", path_segment(index));
        self.call(reqwest::Method::POST, &path, None)
            .await
            .map(drop)
    }

    /// Store the truncate floor of `mirror` (a lower one than stored is ignored).
    pub async fn put_floor(&self, floors: &str, mirror: &str, at: Position) -> Result<(), EsError> {
        let path = format!(
            "{}/_doc/{}?version={}&version_type=external&refresh=true",
            path_segment(floors),
            path_segment(mirror),
            at.0
        );
        match self
            .call(reqwest::Method::PUT, &path, Some(&floor_doc(mirror, at)))
            .await
        {
            Err(EsError::Status {
                status: CONFLICT, ..
            }) => Ok(()),
            other => other.map(drop),
        }
    }

    /// Whether `registry` notes that the mirror `alias` was created;
    /// `None` if there is no such index.
    pub async fn mirror_noted(&self, registry: &str, alias: &str) -> Result<Option<bool>, EsError> {
        if !self
            .aliases(&path_segment(registry))
            .await?
            .contains_key(registry)
        {
            return Ok(None);
        }
        let path = format!("{}/_doc/{}", path_segment(registry), noted_id(alias));
        let doc = self.call(reqwest::Method::GET, &path, None).await?;
        Ok(Some(doc.is_some_and(|d| d["found"] == json!(true))))
    }

    /// Note in `registry` that the mirror `alias` was created.
    pub async fn note_mirror(&self, registry: &str, alias: &str) -> Result<(), EsError> {
        let path = format!(
            "{}/_doc/{}?refresh=true",
            path_segment(registry),
            noted_id(alias)
        );
        let doc = json!({ "index": alias });
        self.call(reqwest::Method::PUT, &path, Some(&doc))
            .await
            .map(drop)
    }

    /// Note in `registry` that Kafka never delivered some records of `topic`
    /// committed at or before `lsn` (a lower note than stored is ignored).
    pub async fn note_gap(&self, registry: &str, topic: &str, lsn: u64) -> Result<(), EsError> {
        let path = format!(
            "{}/_doc/{}?version={lsn}&version_type=external&refresh=true",
            path_segment(registry),
            gap_id(topic)
        );
        let doc = json!({ "gap": topic, "lsn": lsn });
        match self.call(reqwest::Method::PUT, &path, Some(&doc)).await {
            Err(EsError::Status {
                status: CONFLICT, ..
            }) => Ok(()),
            other => other.map(drop),
        }
    }

    /// Note in `registry` that mirror `alias` of `table` (schema, name)
    /// lacks changes only a fill from PostgreSQL brings (`why`): it is
    /// filled by whichever process opens it next.
    pub async fn note_lacking(
        &self,
        registry: &str,
        alias: &str,
        why: &str,
        table: Option<&(String, String)>,
    ) -> Result<(), EsError> {
        let path = format!(
            "{}/_doc/{}?refresh=true",
            path_segment(registry),
            lacking_id(alias)
        );
        let doc = json!({ "lacking": alias, "why": why, "table": table });
        self.call(reqwest::Method::PUT, &path, Some(&doc))
            .await
            .map(drop)
    }

    /// Remove the note of [`Self::note_lacking`]: the mirror was filled.
    pub async fn forget_lacking(&self, registry: &str, alias: &str) -> Result<(), EsError> {
        let path = format!(
            "{}/_doc/{}?refresh=true",
            path_segment(registry),
            lacking_id(alias)
        );
        self.call(reqwest::Method::DELETE, &path, None)
            .await
            .map(drop)
    }

    /// The mirrors noted by [`Self::note_lacking`].
    pub async fn lacking(&self, registry: &str) -> Result<Vec<Lacking>, EsError> {
        let notes = self.registry_notes(registry, "lacking").await?;
        Ok(notes
            .iter()
            .filter_map(|h| serde_json::from_value(h["_source"].clone()).ok())
            .collect())
    }

    /// The documents of `registry` that have a `field` (none if there is
    /// no registry), with their sequence numbers.
    async fn registry_notes(&self, registry: &str, field: &str) -> Result<Vec<Value>, EsError> {
        let body = json!({"size": 10_000, "seq_no_primary_term": true,
                          "query": {"exists": {"field": field}}});
        let path = format!("{}/_search", path_segment(registry));
        let found = self.call(reqwest::Method::POST, &path, Some(&body)).await?;
        let hits = found.as_ref().and_then(|f| f["hits"]["hits"].as_array());
        Ok(hits.cloned().unwrap_or_default())
    }

    /// Every gap noted in `registry`: topic, LSN.
    pub async fn gaps(&self, registry: &str) -> Result<Vec<(String, u64)>, EsError> {
        let notes = self.registry_notes(registry, "gap").await?;
        Ok(notes
            .iter()
            .filter_map(|h| {
                let s = &h["_source"];
                Some((s["gap"].as_str()?.to_owned(), s["lsn"].as_u64()?))
            })
            .collect())
    }

    /// Write the first heartbeat of a fill of `index` into `registry`;
    /// `None` if one is there already (another sink process fills it).
    pub async fn first_beat(&self, registry: &str, index: &str) -> Result<Option<Beat>, EsError> {
        let path = format!(
            "{}/_doc/{}?op_type=create&refresh=true",
            path_segment(registry),
            filling_id(index)
        );
        let doc = json!({ "filling": index, "beat": 0, "owner": self.owner });
        match self.call(reqwest::Method::PUT, &path, Some(&doc)).await {
            Err(EsError::Status {
                status: CONFLICT, ..
            }) => self.own_beat(registry, index, 0).await,
            Ok(Some(resp)) => Ok(Beat::of(&resp, 0)),
            other => other.map(|_| None),
        }
    }

    /// The heartbeat of the fill of `index` if it is this client's beat
    /// `n` (written by an attempt whose answer was lost).
    async fn own_beat(&self, registry: &str, index: &str, n: u64) -> Result<Option<Beat>, EsError> {
        let path = format!("{}/_doc/{}", path_segment(registry), filling_id(index));
        let doc = self.call(reqwest::Method::GET, &path, None).await?;
        Ok(doc.and_then(|d| {
            let s = &d["_source"];
            let own = s["owner"] == json!(self.owner) && s["beat"].as_u64() == Some(n);
            own.then(|| Beat::of(&d, n)).flatten()
        }))
    }

    /// Write the next heartbeat of the fill of `index`, on condition that
    /// `last` is still the stored one; `None` if it is not (another sink
    /// process found the fill stopped and ended it).
    pub async fn beat(
        &self,
        registry: &str,
        index: &str,
        last: Beat,
    ) -> Result<Option<Beat>, EsError> {
        let path = format!(
            "{}/_doc/{}?{}&refresh=true",
            path_segment(registry),
            filling_id(index),
            last.condition()
        );
        let doc = json!({ "filling": index, "beat": last.n + 1, "owner": self.owner });
        match self.call(reqwest::Method::PUT, &path, Some(&doc)).await {
            Err(EsError::Status {
                status: CONFLICT, ..
            }) => self.own_beat(registry, index, last.n + 1).await,
            Ok(Some(resp)) => Ok(Beat::of(&resp, last.n + 1)),
            other => other.map(|_| None),
        }
    }

    /// Delete the heartbeat of the fill of `index` (only if it is still
    /// `last`, when given); whether it was deleted.
    pub async fn end_beat(
        &self,
        registry: &str,
        index: &str,
        last: Option<Beat>,
    ) -> Result<bool, EsError> {
        let condition = last.map_or(String::new(), |b| format!("{}&", b.condition()));
        let path = format!(
            "{}/_doc/{}?{condition}refresh=true",
            path_segment(registry),
            filling_id(index),
        );
        match self.call(reqwest::Method::DELETE, &path, None).await {
            Err(EsError::Status {
                status: CONFLICT, ..
            }) => Ok(false),
            other => other.map(|d| d.is_some()),
        }
    }

    /// The fills with a heartbeat in `registry`: generation index → its
    /// heartbeat as stored now.
    pub async fn beats(&self, registry: &str) -> Result<HashMap<String, Beat>, EsError> {
        let notes = self.registry_notes(registry, "filling").await?;
        Ok(notes
            .iter()
            .filter_map(|h| {
                let s = &h["_source"];
                let beat = Beat::of(h, s["beat"].as_u64()?)?;
                Some((s["filling"].as_str()?.to_owned(), beat))
            })
            .collect())
    }

    /// The stored truncate floors of `mirrors`.
    pub async fn floors(
        &self,
        floors: &str,
        mirrors: &[&str],
    ) -> Result<Vec<(String, Position)>, EsError> {
        let body = json!({ "ids": mirrors });
        let path = format!("{}/_mget", path_segment(floors));
        let resp = self.call(reqwest::Method::POST, &path, Some(&body)).await?;
        Ok(resp.map(|r| floors_of(&r)).unwrap_or_default())
    }

    /// The concrete indices named by `pattern` (a name, an alias, or a
    /// wildcard, not percent-encoded) and their aliases; empty if none.
    pub async fn aliases(&self, pattern: &str) -> Result<Map<String, Value>, EsError> {
        let info = self
            .call(reqwest::Method::GET, &format!("{pattern}/_alias"), None)
            .await?;
        Ok(info
            .and_then(|v| v.as_object().cloned())
            .unwrap_or_default())
    }

    /// Apply alias `actions` atomically (`POST _aliases`).
    /// A 404 (an index or alias named in a removal is gone) is an error:
    /// nothing was applied.
    pub async fn update_aliases(&self, actions: Value) -> Result<(), EsError> {
        let body = json!({ "actions": actions });
        match self
            .call(reqwest::Method::POST, "_aliases", Some(&body))
            .await?
        {
            Some(_) => Ok(()),
            None => Err(EsError::Status {
                status: NOT_FOUND,
                body: "an index or alias the update removes is gone".into(),
            }),
        }
    }

    /// Delete `index` (gone already is fine).
    pub async fn delete_index(&self, index: &str) -> Result<(), EsError> {
        self.call(reqwest::Method::DELETE, &path_segment(index), None)
            .await?;
        Ok(())
    }

    /// `GET <index>/<what>` (`_settings`, `_mapping`); `null` if the index is gone.
    pub async fn index_info(&self, index: &str, what: &str) -> Result<Value, EsError> {
        let path = format!("{}/{what}", path_segment(index));
        let info = self.call(reqwest::Method::GET, &path, None).await?;
        Ok(info.unwrap_or(Value::Null))
    }

    /// Update `index`'s dynamic `settings`.
    pub async fn put_settings(&self, index: &str, settings: &Value) -> Result<(), EsError> {
        let path = format!("{}/_settings", path_segment(index));
        self.call(reqwest::Method::PUT, &path, Some(settings))
            .await?;
        Ok(())
    }

    /// Add `properties` to `index`'s mapping, and set its `_meta` (unless null).
    pub async fn put_mapping(
        &self,
        index: &str,
        properties: &Map<String, Value>,
        meta: &Value,
    ) -> Result<(), EsError> {
        let path = format!("{}/_mapping", path_segment(index));
        let mut body = json!({ "properties": properties });
        if !meta.is_null() {
            body["_meta"] = meta.clone();
        }
        self.call(reqwest::Method::PUT, &path, Some(&body)).await?;
        Ok(())
    }

    /// The stored version and source of each of `docs` that exists.
    pub async fn documents(&self, docs: &[DocRef]) -> Result<HashMap<DocRef, Stored>, EsError> {
        let wanted: Vec<Value> = docs
            .iter()
            .map(|(index, id)| json!({"_index": index, "_id": id}))
            .collect();
        let body = json!({ "docs": wanted });
        let resp = self
            .call(reqwest::Method::POST, "_mget", Some(&body))
            .await?;
        let found = resp
            .as_ref()
            .and_then(|r| r["docs"].as_array())
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        // Answers come in request order; keyed by the name asked for (an
        // alias answers with its concrete index's name).
        Ok(docs
            .iter()
            .zip(found)
            .filter(|(_, d)| d["found"].as_bool() == Some(true))
            .filter_map(|(key, d)| {
                let source = d["_source"].as_object()?.clone();
                Some((key.clone(), (d["_version"].as_u64()?, source)))
            })
            .collect())
    }

    /// POST `body` to `path` (a search, an `_mget`, a refresh); its JSON
    /// answer (`None` for 404), or the refusal.
    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Option<Value>, EsError> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    /// Send a request; its JSON answer (`None` for 404), or the refusal.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Option<Value>, EsError> {
        let mut req = self.request(method, path);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await?;
        let status = resp.status();
        if status.as_u16() == NOT_FOUND {
            return Ok(None);
        }
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(EsError::Status {
                status: status.as_u16(),
                body: text.chars().take(ERROR_BODY_CHARS).collect(),
            });
        }
        Ok(Some(serde_json::from_str(&text).unwrap_or(Value::Null)))
    }
}
