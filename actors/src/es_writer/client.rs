//! The Elasticsearch/OpenSearch REST client: auth, TLS, bulk, index creation.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde_json::{json, Value};

use super::config::EsConfig;
use super::EsError;

/// Characters of an error response body kept in the error: enough for
/// Elasticsearch's reason, short enough for one log line.
const ERROR_BODY_CHARS: usize = 500;
/// Status of a delete-by-query on an index that does not exist yet: nothing to delete.
const NOT_FOUND: u16 = 404;

/// A configured HTTP client for one cluster.
#[derive(Clone)]
pub struct EsClient {
    http: reqwest::Client,
    base: String,
    username: Option<String>,
    password: String,
}

/// `url` without credentials (validation refuses them; this keeps a log
/// line safe regardless).
fn base_url(url: &str) -> &str {
    url.rsplit('@').next().unwrap_or_default()
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
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}/{}", self.base, path));
        match &self.username {
            Some(u) => r.basic_auth(u, Some(&self.password)),
            None => r,
        }
    }

    /// POST `_bulk`; returns the parsed body, or the HTTP status for a whole-request failure.
    pub async fn bulk(&self, body: String) -> Result<Value, EsError> {
        let resp = self
            .request(reqwest::Method::POST, "_bulk")
            .header(CONTENT_TYPE, "application/x-ndjson")
            .body(body)
            .send()
            .await?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(EsError::Status {
                status: status.as_u16(),
                body: text.chars().take(ERROR_BODY_CHARS).collect(),
            });
        }
        Ok(resp.json().await?)
    }

    /// Create `index` with `body` unless it exists.
    pub async fn ensure_index(&self, index: &str, body: &Value) -> Result<(), EsError> {
        let resp = self
            .request(reqwest::Method::PUT, index)
            .json(body)
            .send()
            .await?;
        let status = resp.status();
        if status.is_success() {
            tracing::info!(index, "created index");
            return Ok(());
        }
        let text = resp.text().await.unwrap_or_default();
        if text.contains("resource_already_exists_exception") {
            return Ok(());
        }
        Err(EsError::Status {
            status: status.as_u16(),
            body: text.chars().take(ERROR_BODY_CHARS).collect(),
        })
    }

    /// Delete every document of `index` whose `_cdc.lsn` is below `lsn` (TRUNCATE).
    pub async fn delete_older_than(&self, index: &str, lsn: u64) -> Result<(), EsError> {
        let query = json!({"query": {"range": {"_cdc.lsn": {"lt": lsn}}}});
        let path = format!("{index}/_delete_by_query?refresh=true&conflicts=proceed");
        let resp = self
            .request(reqwest::Method::POST, &path)
            .json(&query)
            .send()
            .await?;
        let status = resp.status();
        if status.is_success() || status.as_u16() == NOT_FOUND {
            return Ok(());
        }
        let text = resp.text().await.unwrap_or_default();
        Err(EsError::Status {
            status: status.as_u16(),
            body: text.chars().take(ERROR_BODY_CHARS).collect(),
        })
    }
}
