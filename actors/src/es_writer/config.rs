//! `[elasticsearch]`: where the ES sink writes and how.

use crate::error::ConfigError;
use std::path::PathBuf;

use serde::Deserialize;

use crate::secret::Secret;

/// Default `bulk_max_actions`: Elastic's sizing advice starts around a
/// thousand documents per request.
const DEFAULT_BULK_MAX_ACTIONS: usize = 1000;
/// Default `bulk_max_bytes` (5 MiB): inside Elastic's recommended 5–15 MB per request.
const DEFAULT_BULK_MAX_BYTES: usize = 5 << 20;
/// Default `flush_interval_ms`: a change reaches the mirror within a fifth of
/// a second even when traffic is too light to fill a request.
const DEFAULT_FLUSH_INTERVAL_MS: u64 = 200;
/// Default `retry_initial_ms`: a busy cluster gets a moment before the retry.
const DEFAULT_RETRY_INITIAL_MS: u64 = 100;
/// Default `retry_max_ms`: retries never wait more than ten seconds apart.
const DEFAULT_RETRY_MAX_MS: u64 = 10_000;
/// Default `stall_timeout_secs`: past a normal rebalance after a crash (the
/// 10 s session timeout plus a join), short enough that both remedies
/// (rejoin, then reading directly) fit in a minute.
const DEFAULT_STALL_TIMEOUT_SECS: u64 = 20;
/// Default `reindex_grace_secs`: longer than a search or a scroll page takes.
const DEFAULT_REINDEX_GRACE_SECS: u64 = 60;
/// Default `request_timeout_secs`: longer than a large bulk request takes on
/// a loaded cluster, short enough to notice a hung connection.
const DEFAULT_REQUEST_TIMEOUT_SECS: u64 = 30;

/// `[elasticsearch]` configuration section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EsConfig {
    /// Also run the ES sink inside `pgcdc run` (one process for the whole pipeline).
    pub run_in_daemon: bool,
    /// Base URL of Elasticsearch or OpenSearch.
    pub url: String,
    /// Basic-auth user (with `password`).
    pub username: Option<String>,
    /// Basic-auth password; never logged.
    pub password: Secret,
    /// API key (`Authorization: ApiKey …`), instead of basic auth; never logged.
    pub api_key: Secret,
    /// PEM file of the CA that signed the server's certificate.
    pub ca_file: Option<PathBuf>,
    /// Send `username`/`password` or `api_key` over plain `http://` (a
    /// trusted private network only); otherwise credentials need `https://`.
    pub allow_credentials_over_http: bool,
    /// Accept any server certificate (self-signed development setups only):
    /// anyone on the network path can then read and change what pgcdc sends.
    /// Logged at WARN whenever a client is built.
    pub danger_accept_invalid_certs: bool,
    /// Mirror index name prefix: `<index_prefix><schema>_<table>`.
    pub index_prefix: String,
    /// Also keep a history index (`<mirror>_history`, one document per change).
    pub history: bool,
    /// `index.gc_deletes` of indices pgcdc creates: how long a delete's version
    /// is remembered. Replays older than this could resurrect deleted rows, so
    /// keep it above the Kafka topic's retention.
    pub gc_deletes: String,
    /// Shards of indices pgcdc creates.
    pub number_of_shards: u32,
    /// Replicas of indices pgcdc creates.
    pub number_of_replicas: u32,
    /// Most actions in one `_bulk` request.
    pub bulk_max_actions: usize,
    /// Most bytes in one `_bulk` request.
    pub bulk_max_bytes: usize,
    /// Bulk requests in flight at once. Actions on one document always go
    /// through the same request lane, so per-document order is kept.
    pub max_in_flight: usize,
    /// Longest wait for a bulk request to fill, in ms.
    pub flush_interval_ms: u64,
    /// First retry delay for 429/5xx/connection errors, in ms (doubles, with jitter).
    pub retry_initial_ms: u64,
    /// Largest retry delay, in ms.
    pub retry_max_ms: u64,
    /// Timeout of one HTTP request, in seconds.
    pub request_timeout_secs: u64,
    /// Kafka consumer group of the sink.
    pub consumer_group: String,
    /// Seconds records may wait beyond the group's committed offset of a
    /// partition with that offset standing still before the sink is stalled:
    /// it logs an error, turns `/ready` 503, and leaves and joins its group
    /// again; if the stall lasts this long again, it reads every partition
    /// directly for a while.
    pub stall_timeout_secs: u64,
    /// Seconds a mirror's previous index is kept after its alias moved to a
    /// new one (searches running on it can finish).
    pub reindex_grace_secs: u64,
    /// Topic for records that cannot be indexed (with the reason).
    pub dead_letter_topic: String,
}

impl Default for EsConfig {
    fn default() -> Self {
        Self {
            run_in_daemon: false,
            url: "http://localhost:9200".into(),
            username: None,
            password: Secret::default(),
            api_key: Secret::default(),
            ca_file: None,
            allow_credentials_over_http: false,
            danger_accept_invalid_certs: false,
            index_prefix: "cdc_".into(),
            history: false,
            gc_deletes: "30d".into(),
            number_of_shards: 1,
            number_of_replicas: 1,
            bulk_max_actions: DEFAULT_BULK_MAX_ACTIONS,
            bulk_max_bytes: DEFAULT_BULK_MAX_BYTES,
            max_in_flight: 1,
            flush_interval_ms: DEFAULT_FLUSH_INTERVAL_MS,
            retry_initial_ms: DEFAULT_RETRY_INITIAL_MS,
            retry_max_ms: DEFAULT_RETRY_MAX_MS,
            request_timeout_secs: DEFAULT_REQUEST_TIMEOUT_SECS,
            consumer_group: "pgcdc-es-sink".into(),
            stall_timeout_secs: DEFAULT_STALL_TIMEOUT_SECS,
            reindex_grace_secs: DEFAULT_REINDEX_GRACE_SECS,
            dead_letter_topic: "pgcdc-dead-letters".into(),
        }
    }
}

impl EsConfig {
    /// Every invalid field, by path.
    pub fn validate(&self, errors: &mut Vec<ConfigError>) {
        self.validate_transport(errors);
        if self.username.is_some() && !self.api_key.expose().is_empty() {
            errors.push(ConfigError::new(
                "elasticsearch.api_key",
                "set either username/password or api_key, not both",
            ));
        }
        if let Some(ca) = &self.ca_file {
            if !ca.is_file() {
                errors.push(ConfigError::new(
                    "elasticsearch.ca_file",
                    format!("{} does not exist", ca.display()),
                ));
            }
        }
        let lower = |s: &str| {
            s.chars()
                .all(|c| !c.is_ascii_uppercase() && !" \"*\\<|,>/?".contains(c))
        };
        if !lower(&self.index_prefix) {
            errors.push(ConfigError::new(
                "elasticsearch.index_prefix",
                "must be lowercase without spaces or \"*\\<|,>/?",
            ));
        }
        for (key, v) in [
            ("bulk_max_actions", self.bulk_max_actions),
            ("bulk_max_bytes", self.bulk_max_bytes),
            ("stall_timeout_secs", self.stall_timeout_secs as usize),
        ] {
            if v == 0 {
                errors.push(ConfigError::new(
                    format!("elasticsearch.{key}"),
                    "must be at least 1",
                ));
            }
        }
        if self.retry_initial_ms == 0 || self.retry_initial_ms > self.retry_max_ms {
            errors.push(ConfigError::new(
                "elasticsearch.retry_initial_ms",
                "must be between 1 and retry_max_ms",
            ));
        }
        if self.consumer_group.is_empty() {
            errors.push(ConfigError::new(
                "elasticsearch.consumer_group",
                "must not be empty",
            ));
        }
        if self.dead_letter_topic.is_empty() {
            errors.push(ConfigError::new(
                "elasticsearch.dead_letter_topic",
                "must not be empty",
            ));
        }
    }
}

impl EsConfig {
    /// Whether basic-auth or API-key credentials are configured.
    fn has_credentials(&self) -> bool {
        self.username.is_some() || !self.api_key.expose().is_empty()
    }

    /// The URL's scheme, credentials in the URL, credentials over plain HTTP.
    /// The URL is shown only without what precedes an `@`.
    fn validate_transport(&self, errors: &mut Vec<ConfigError>) {
        let key = "elasticsearch.url";
        let shown = self.url.rsplit('@').next().unwrap_or_default();
        let Ok(url) = reqwest::Url::parse(&self.url) else {
            errors.push(ConfigError::new(key, format!("{shown:?} is not a URL")));
            return;
        };
        if !matches!(url.scheme(), "http" | "https") {
            errors.push(ConfigError::new(
                key,
                format!("{shown:?} must start with http:// or https://"),
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            errors.push(ConfigError::new(
                key,
                "holds credentials (user:password@): set elasticsearch.username and elasticsearch.password (or api_key) instead",
            ));
        }
        if url.scheme() == "http" && self.has_credentials() && !self.allow_credentials_over_http {
            errors.push(ConfigError::new(
                key,
                "credentials would be sent unencrypted over http://: use https://, or set elasticsearch.allow_credentials_over_http = true on a trusted network",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_named() {
        let mut errors = Vec::new();
        EsConfig::default().validate(&mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let bad = EsConfig {
            url: "localhost:9200".into(),
            index_prefix: "CDC_".into(),
            bulk_max_actions: 0,
            stall_timeout_secs: 0,
            username: Some("u".into()),
            api_key: Secret::new("k"),
            ..Default::default()
        };
        bad.validate(&mut errors);
        let keys = crate::error_keys(&errors);
        assert_eq!(
            keys,
            [
                "elasticsearch.url",
                "elasticsearch.api_key",
                "elasticsearch.index_prefix",
                "elasticsearch.bulk_max_actions",
                "elasticsearch.stall_timeout_secs"
            ]
        );
    }

    #[test]
    fn credentials_need_https_and_never_ride_in_the_url() {
        let with_user = EsConfig {
            username: Some("pgcdc".into()),
            password: Secret::new("hunter2"),
            ..Default::default()
        };
        let mut errors = Vec::new();
        with_user.validate(&mut errors);
        assert!(
            errors[0].to_string().contains("unencrypted over http://"),
            "{errors:?}"
        );
        let api_key = EsConfig {
            api_key: Secret::new("k"),
            ..Default::default()
        };
        let mut errors = Vec::new();
        api_key.validate(&mut errors);
        assert_eq!(crate::error_keys(&errors), ["elasticsearch.url"]);
        for ok in [
            EsConfig {
                allow_credentials_over_http: true,
                ..with_user.clone()
            },
            EsConfig {
                url: "https://es:9200".into(),
                ..with_user.clone()
            },
        ] {
            let mut errors = Vec::new();
            ok.validate(&mut errors);
            assert!(errors.is_empty(), "{errors:?}");
        }
        let in_url = EsConfig {
            url: "https://elastic:s3cr3t@es:9200".into(),
            ..Default::default()
        };
        let mut errors = Vec::new();
        in_url.validate(&mut errors);
        let text = format!("{errors:?} {}", errors[0]);
        assert!(text.contains("set elasticsearch.username"), "{text}");
        assert!(!text.contains("s3cr3t"), "{text}");
        let bad = EsConfig {
            url: "ftp://elastic:s3cr3t@es".into(),
            ..Default::default()
        };
        let mut errors = Vec::new();
        bad.validate(&mut errors);
        assert!(!format!("{errors:?}").contains("s3cr3t"), "{errors:?}");
    }
}
