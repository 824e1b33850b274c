//! Layered configuration: the TOML file, then `PGCDC_*` environment
//! variables (`PGCDC_POSTGRES__HOST` sets `postgres.host`), then flags.

use pgcdc_actors::error::ConfigError;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Toml};
use figment::value::Value;
use figment::Figment;
use pgcdc_actors::audit::AuditConfig;
use pgcdc_actors::canary::CanaryConfig;
use pgcdc_actors::es_writer::EsConfig;
use pgcdc_actors::kafka_producer::Format as RecordFormat;
use pgcdc_actors::kafka_producer::KafkaConfig;
use pgcdc_actors::kafka_producer::TimeMode;
use pgcdc_actors::pg::PostgresConfig;
use pgcdc_actors::snapshot::SnapshotConfig;
use pgcdc_actors::supervision::SupervisionConfig;
use pgcdc_actors::verify::VerifyConfig;
use pgcdc_actors::wal_monitor::WalConfig;
use serde::Deserialize;

use crate::error::AppError;

/// Console log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One readable line per event.
    Human,
    /// One JSON object per event.
    Json,
}

/// `[log]` configuration section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Level filter, e.g. `info` or `info,pgcdc_actors=debug`.
    pub level: String,
    /// `human` or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Human,
        }
    }
}

/// `[metrics]` configuration section: the HTTP endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of `/metrics`, `/health` and `/ready`; empty disables the endpoint.
    pub listen: String,
    /// `/ready` answers 200 while confirmed progress (or, caught up, a
    /// keepalive) is at most this many seconds old.
    pub ready_window_secs: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9187".into(),
            ready_window_secs: 60,
        }
    }
}

impl MetricsConfig {
    /// The address to bind, if enabled.
    pub fn addr(&self) -> Option<std::net::SocketAddr> {
        self.listen.parse().ok()
    }

    fn validate(&self, errors: &mut Vec<ConfigError>) {
        if !self.listen.is_empty() && self.addr().is_none() {
            errors.push(ConfigError::new(
                "metrics.listen",
                format!(
                    "{:?} is not an address like 127.0.0.1:9187 (empty disables)",
                    self.listen
                ),
            ));
        }
        if self.ready_window_secs == 0 {
            errors.push(ConfigError::new(
                "metrics.ready_window_secs",
                "must be at least 1",
            ));
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Directory of local state (`checkpoint/` RocksDB, `audit.db`).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Seconds a graceful shutdown waits for Kafka to acknowledge what is in flight.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout_secs: u64,
    /// The source database.
    #[serde(default)]
    pub postgres: PostgresConfig,
    /// The Kafka destination.
    #[serde(default)]
    pub kafka: KafkaConfig,
    /// The initial snapshot.
    #[serde(default)]
    pub snapshot: SnapshotConfig,
    /// The Elasticsearch/OpenSearch sink (`pgcdc es-sink`).
    #[serde(default)]
    pub elasticsearch: EsConfig,
    /// Restart budget and backoff.
    #[serde(default)]
    pub supervision: SupervisionConfig,
    /// Console logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The metrics and health endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Retained-WAL budget and heartbeats.
    #[serde(default)]
    pub wal: WalConfig,
    /// The SQLite audit log (`<state_dir>/audit.db`).
    #[serde(default)]
    pub audit: AuditConfig,
    /// `pgcdc verify`: chunk size and waits.
    #[serde(default)]
    pub verify: VerifyConfig,
    /// The freshness canary.
    #[serde(default)]
    pub canary: CanaryConfig,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("state")
}

fn default_shutdown_timeout() -> u64 {
    30
}

/// Values given as command-line flags (highest precedence).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--log-level`.
    pub log_level: Option<String>,
}

impl Settings {
    /// Load from `path` (must exist if given), the environment and `overrides`; validate.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Self, AppError> {
        Self::load_with_env(path, overrides, std::env::vars())
    }

    /// [`Settings::load`] with `vars` as the environment.
    fn load_with_env(
        path: Option<&Path>,
        overrides: &Overrides,
        vars: impl Iterator<Item = (String, String)>,
    ) -> Result<Self, AppError> {
        let mut figment = Figment::new();
        if let Some(path) = path {
            if !path.is_file() {
                return Err(AppError::Config(vec![ConfigError::new(
                    "--config",
                    format!("config file {} does not exist", path.display()),
                )]));
            }
            figment = figment.merge(Toml::file(path));
        }
        let figment = figment.merge(environment(vars));
        let mut settings: Settings = figment
            .extract()
            .map_err(|e| AppError::Config(e.into_iter().map(figment_error).collect()))?;
        if let Some(dir) = &overrides.state_dir {
            settings.state_dir = dir.clone();
        }
        if let Some(level) = &overrides.log_level {
            settings.log.level = level.clone();
        }
        settings.validate()?;
        Ok(settings)
    }

    /// Every invalid field, reported together.
    fn validate(&self) -> Result<(), AppError> {
        let mut errors = Vec::new();
        self.postgres.validate(&mut errors);
        self.kafka.validate(&mut errors);
        self.elasticsearch.validate(&mut errors);
        self.snapshot.validate(&mut errors);
        self.supervision.validate(&mut errors);
        self.metrics.validate(&mut errors);
        self.wal.validate(&mut errors);
        self.audit.validate(&mut errors);
        self.validate_debezium(&mut errors);
        self.verify.validate(&mut errors);
        self.canary.validate(&mut errors);
        if self.shutdown_timeout_secs == 0 {
            errors.push(ConfigError::new(
                "shutdown_timeout_secs",
                "must be at least 1",
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            errors.push(ConfigError::new(
                "log.level",
                format!("{:?} is not a valid filter", self.log.level),
            ));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(AppError::Config(errors))
        }
    }

    /// The secret that signs pgcdc's WAL messages (created by the daemon).
    pub fn message_key_path(&self) -> PathBuf {
        self.state_dir.join("message.key")
    }

    /// Create `state_dir` readable by its owner only (0700): it holds the
    /// checkpoint and the audit log. An existing one is narrowed to 0700.
    pub fn create_state_dir(&self) -> Result<(), AppError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let dir = &self.state_dir;
        let private = std::fs::Permissions::from_mode(0o700);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .and_then(|()| std::fs::set_permissions(dir, private))
            .map_err(|e| AppError::LocalIo(format!("{}: {e}", dir.display())))
    }

    /// Where the RocksDB checkpoint lives.
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.state_dir.join("checkpoint")
    }

    /// Where the SQLite audit log lives.
    pub fn audit_db(&self) -> PathBuf {
        self.state_dir.join(pgcdc_actors::audit::FILE_NAME)
    }
}

/// Environment prefix: `PGCDC_POSTGRES__HOST` sets `postgres.host`.
const ENV_PREFIX: &str = "PGCDC_";
/// Keys whose environment values are taken as the exact string: secrets
/// and names, where `0123` must not become the number 123.
const VERBATIM: &[&str] = &[
    "postgres.password",
    "postgres.user",
    "elasticsearch.username",
    "elasticsearch.password",
    "elasticsearch.api_key",
];

/// The variables of librdkafka properties, after [`ENV_PREFIX`] and lower-cased: what
/// follows is the property's name with `.` written `_` and `_` written `__`
/// (`PGCDC_KAFKA__PROPERTIES__SASL_PASSWORD` sets `sasl.password`,
/// `…__LOG__LEVEL` sets `log_level`), as Confluent's images spell them.
const PROPERTIES_PREFIX: &str = "kafka__properties__";

/// The `PGCDC_*` variables among `vars` as one layer: `__` nests, names are
/// lower-cased, values are read as TOML-like scalars and arrays (as figment's
/// `Env` does) except the [`VERBATIM`] keys and librdkafka properties
/// ([`PROPERTIES_PREFIX`]), which keep their exact text. `PGCDC_CONFIG` is
/// the flag's.
fn environment(vars: impl Iterator<Item = (String, String)>) -> Figment {
    let mut layer = Figment::new();
    for (name, raw) in vars {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let lower = rest.to_ascii_lowercase();
        if let Some(property) = lower.strip_prefix(PROPERTIES_PREFIX) {
            let mut one = figment::value::Dict::new();
            one.insert(property_name(property), Value::from(raw));
            layer = layer.merge(Serialized::default("kafka.properties", one));
            continue;
        }
        let key = lower.replace("__", ".");
        if key == "config" || key.is_empty() {
            continue;
        }
        let value = match VERBATIM.contains(&key.as_str()) {
            true => Value::from(raw),
            false => raw
                .parse()
                .unwrap_or_else(|e: std::convert::Infallible| match e {}),
        };
        layer = layer.merge(Serialized::default(&key, value));
    }
    layer
}

/// The librdkafka property a lower-cased environment variable names
/// ([`PROPERTIES_PREFIX`]).
fn property_name(spelled: &str) -> String {
    spelled
        .split("__")
        .map(|part| part.replace('_', "."))
        .collect::<Vec<_>>()
        .join("_")
}

/// A figment error as a configuration error naming the key it is about
/// (`config` when it concerns the file as a whole).
fn figment_error(e: figment::Error) -> ConfigError {
    let key = if e.path.is_empty() {
        "config".to_string()
    } else {
        e.path.join(".")
    };
    ConfigError::new(key, e.kind.to_string())
}

impl Settings {
    /// Debezium-compatibility settings that depend on other sections.
    fn validate_debezium(&self, errors: &mut Vec<ConfigError>) {
        if self.kafka.heartbeats && self.wal.heartbeat_secs == 0 {
            errors.push(ConfigError::new(
                "kafka.heartbeats",
                "needs wal.heartbeat_secs above 0 (the heartbeat interval)",
            ));
        }
        if self.elasticsearch.run_in_daemon {
            errors.extend(self.sink_errors());
        }
    }

    /// Why the Elasticsearch sink cannot run with these settings, checked
    /// where it runs (`elasticsearch.run_in_daemon`, `pgcdc es-sink`).
    pub fn sink_errors(&self) -> Vec<ConfigError> {
        let mut errors: Vec<ConfigError> = self.sink_format_error().into_iter().collect();
        self.validate_index_names(&mut errors);
        errors
    }

    /// Two configured tables whose changes would land in one Elasticsearch
    /// index: mirror names join schema and table with `_` (`a.b_c` and
    /// `a_b.c` are both `cdc_a_b_c`), and with `elasticsearch.history` a
    /// table's history index is named like the mirror of the table with
    /// `_history` appended to its name.
    fn validate_index_names(&self, errors: &mut Vec<ConfigError>) {
        let mut seen: std::collections::HashMap<String, String> = Default::default();
        let tables = self
            .postgres
            .tables
            .iter()
            .filter_map(|t| pgcdc_actors::pg::parse_table_name(t).ok());
        for (schema, table) in tables {
            let mirror = pgcdc_actors::es_writer::naming::mirror_index(
                &self.elasticsearch.index_prefix,
                &schema,
                &table,
            );
            let name = format!("{schema}.{table}");
            let mut indices = vec![(mirror.clone(), format!("the mirror of {name}"))];
            if self.elasticsearch.history {
                indices.push((
                    format!("{mirror}_history"),
                    format!("the history index of {name}"),
                ));
            }
            for (index, what) in indices {
                if let Some(other) = seen.insert(index.clone(), what.clone()) {
                    errors.push(ConfigError::new(
                        "postgres.tables",
                        format!("{other} and {what} would both be the Elasticsearch index {index:?}, mixing their documents: list only one of the two tables, or turn elasticsearch.history off where that is the clash"),
                    ));
                }
            }
        }
    }

    /// Why the Elasticsearch sink cannot read what the producer writes, if
    /// it cannot: it reads the `json` envelope with ISO date and time
    /// strings only (its index mappings make them `date` fields).
    pub fn sink_format_error(&self) -> Option<ConfigError> {
        let format = self.kafka.format;
        let time = self.kafka.time_precision_mode;
        if format != RecordFormat::Json {
            return Some(ConfigError::new(
                "kafka.format",
                format!(
                    "the Elasticsearch sink reads only \"json\", not {:?}; keep kafka.format = \"json\" for the sink (elasticsearch.run_in_daemon, pgcdc es-sink)",
                    format.name()
                ),
            ));
        }
        (time != TimeMode::Iso).then(|| {
            ConfigError::new(
                "kafka.time_precision_mode",
                format!(
                    "the Elasticsearch sink reads dates and times as ISO strings, not {:?} numbers; keep kafka.time_precision_mode = \"iso\" for the sink (elasticsearch.run_in_daemon, pgcdc es-sink)",
                    time.name()
                ),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let path = dir.path().join("pgcdc.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn errors(res: Result<Settings, AppError>) -> Vec<String> {
        match res {
            Err(AppError::Config(e)) => e.iter().map(ToString::to_string).collect(),
            other => panic!("expected config errors, got {other:?}"),
        }
    }

    #[test]
    fn shipped_configs_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let s = Settings::load(Some(&dir.join("pgcdc.toml")), &Overrides::default()).unwrap();
        assert_eq!(s.postgres.tables, ["public.users"]);
        let d = Settings::load(Some(&dir.join("docker.toml")), &Overrides::default()).unwrap();
        assert_eq!(d.kafka.brokers, "kafka:9092");
    }

    #[test]
    fn tables_whose_indices_would_be_one_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let load = |text: &str| Settings::load(Some(&write(&dir, text)), &Overrides::default());
        let clash = "[postgres]\ntables = [\"a.b_c\", \"a_b.c\"]\n";
        let kafka_only = load(clash).expect("no sink: no clash");
        let e: Vec<String> = kafka_only
            .sink_errors()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(
            e[0].contains("a.b_c") && e[0].contains("a_b.c") && e[0].contains("cdc_a_b_c"),
            "{e:?}"
        );
        let pair = "[postgres]\ntables = [\"t\", \"t_history\"]\n";
        let sink = "[elasticsearch]\nrun_in_daemon = true\n";
        load(&format!("{pair}{sink}")).expect("no history index: no clash");
        let e = errors(load(&format!("{pair}{sink}history = true\n")));
        assert!(e[0].contains("the history index of public.t"), "{e:?}");
        assert!(e[0].contains("the mirror of public.t_history"), "{e:?}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "[postgres]\nhots = \"x\"\ntables = [\"t\"]\n");
        let e = errors(Settings::load(Some(&path), &Overrides::default()));
        assert!(e[0].contains("hots") && e[0].contains("postgres"), "{e:?}");
    }

    #[test]
    fn invalid_values_are_all_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "[postgres]\ntables = []\nslot = \"Bad Slot\"\n[kafka]\ntopic_partitions = 0\n",
        );
        let e = errors(Settings::load(Some(&path), &Overrides::default()));
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e.iter().any(|m| m.starts_with("kafka.topic_partitions")));
    }

    #[test]
    fn wrong_types_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "[postgres]\nport = \"high\"\ntables = [\"t\"]\n");
        let e = errors(Settings::load(Some(&path), &Overrides::default()));
        assert!(e[0].contains("postgres.port"), "{e:?}");
    }

    #[test]
    fn audit_section_is_validated_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "[postgres]\ntables = [\"t\"]\n[audit]\nlevel = \"loud\"\nmax_rows = 0\n",
        );
        let e = errors(Settings::load(Some(&path), &Overrides::default()));
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].starts_with("audit.level") && e[1].starts_with("audit.max_rows"));
        let path = write(
            &dir,
            "[postgres]\ntables = [\"t\"]\n[audit]\nretention = 3\n",
        );
        let e = errors(Settings::load(Some(&path), &Overrides::default()));
        assert!(
            e[0].contains("retention") && e[0].contains("audit"),
            "{e:?}"
        );
        let path = write(&dir, "[postgres]\ntables = [\"t\"]\n");
        let s = Settings::load(Some(&path), &Overrides::default()).unwrap();
        assert!(s.audit.enabled);
        assert_eq!((s.audit.retention_days, s.audit.max_rows), (14, 1_000_000));
    }

    #[test]
    fn missing_file_is_an_error() {
        let e = errors(Settings::load(
            Some(Path::new("/nonexistent/pgcdc.toml")),
            &Overrides::default(),
        ));
        assert!(e[0].contains("does not exist"));
    }

    #[test]
    fn password_is_redacted_in_debug() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "[postgres]\npassword = \"hunter2\"\ntables = [\"t\"]\n",
        );
        let s = Settings::load(Some(&path), &Overrides::default()).unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(s.postgres.password.expose(), "hunter2");
    }

    #[test]
    fn secrets_from_the_environment_stay_exact_strings() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "[postgres]\ntables = [\"t\"]\n");
        let env = [
            ("PGCDC_POSTGRES__PASSWORD", "0123"),
            ("PGCDC_ELASTICSEARCH__PASSWORD", "1e3"),
            ("PGCDC_ELASTICSEARCH__USERNAME", "007"),
            ("PGCDC_POSTGRES__PORT", "6543"),
            ("PGCDC_ELASTICSEARCH__URL", "https://es:9200"),
            ("OTHER", "x"),
        ];
        let vars = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let s = Settings::load_with_env(Some(&path), &Overrides::default(), vars).unwrap();
        assert_eq!(s.postgres.password.expose(), "0123");
        assert_eq!(s.elasticsearch.password.expose(), "1e3");
        assert_eq!(s.elasticsearch.username.as_deref(), Some("007"));
        assert_eq!(s.postgres.port, 6543);
    }

    #[test]
    fn librdkafka_properties_from_the_environment_keep_their_names_and_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "[postgres]\ntables = [\"t\"]\n\
             [kafka.properties]\n\"linger.ms\" = 5\n\"security.protocol\" = \"plaintext\"\n",
        );
        let env = [
            ("PGCDC_KAFKA__PROPERTIES__SASL_USERNAME", "pgcdc"),
            ("PGCDC_KAFKA__PROPERTIES__SASL_PASSWORD", "0123"),
            ("PGCDC_KAFKA__PROPERTIES__SECURITY_PROTOCOL", "sasl_ssl"),
            ("PGCDC_KAFKA__PROPERTIES__SASL_MECHANISM", "SCRAM-SHA-512"),
            ("PGCDC_KAFKA__PROPERTIES__LOG__LEVEL", "7"),
            ("PGCDC_kafka__properties__message.max.bytes", "2000000"),
        ];
        let vars = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let s = Settings::load_with_env(Some(&path), &Overrides::default(), vars).unwrap();
        let p = &s.kafka.properties;
        assert_eq!(p["sasl.password"], "0123");
        assert_eq!(p["security.protocol"], "sasl_ssl", "the environment wins");
        assert_eq!(p["sasl.mechanism"], "SCRAM-SHA-512");
        assert_eq!(p["log_level"], "7");
        assert_eq!(p["message.max.bytes"], "2000000");
        assert_eq!(p["linger.ms"], "5", "the file's other properties stay");
        assert!(!format!("{s:?}").contains("0123"));
        s.kafka
            .client_config()
            .create::<rdkafka::producer::BaseProducer>()
            .expect("librdkafka knows every name");
    }

    #[test]
    fn kafka_properties_are_redacted_and_errors_never_echo_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "[postgres]\ntables = [\"t\"]\npassword = [\"hunter2\"]\n\
             [kafka.properties]\n\"sasl.password\" = \"s3cr3t-sasl\"\n\"linger.ms\" = 5\n",
        );
        let e = errors(Settings::load(Some(&path), &Overrides::default()));
        assert!(e.iter().all(|m| !m.contains("hunter2")), "{e:?}");
        let path = write(
            &dir,
            "[postgres]\ntables = [\"t\"]\n[kafka.properties]\n\"sasl.password\" = \"s3cr3t-sasl\"\n\"linger.ms\" = 5\n",
        );
        let s = Settings::load(Some(&path), &Overrides::default()).unwrap();
        assert!(!format!("{s:?}").contains("s3cr3t-sasl"));
        assert_eq!(s.kafka.properties["linger.ms"], "5");
    }

    #[test]
    fn state_dir_is_created_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "[postgres]\ntables = [\"t\"]\n");
        let mut s = Settings::load(Some(&path), &Overrides::default()).unwrap();
        s.state_dir = dir.path().join("a/state");
        s.create_state_dir().unwrap();
        let mode = std::fs::metadata(&s.state_dir)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "{mode:o}");
    }

    #[test]
    fn debezium_settings_that_cannot_work_are_refused_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "[postgres]\ntables = [\"t\"]\n[kafka]\nformat = \"row\"\nheartbeats = true\n\
             heartbeat_topic = \"bad topic\"\n[elasticsearch]\nrun_in_daemon = true\n[wal]\nheartbeat_secs = 0\n",
        );
        let e = errors(Settings::load(Some(&path), &Overrides::default()));
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(
            e.iter()
                .any(|m| m.contains("kafka.format") && m.contains("Elasticsearch sink")),
            "{e:?}"
        );
        assert!(e.iter().any(|m| m.contains("kafka.heartbeats")), "{e:?}");
        assert!(
            e.iter().any(|m| m.contains("kafka.heartbeat_topic")),
            "{e:?}"
        );
        let path = write(
            &dir,
            "[postgres]\ntables = [\"t\"]\n[kafka]\nformat = \"connect-json\"\nsource_connector = \"postgresql\"\n\
             transaction_metadata = true\n[kafka.topic_config]\n\"cleanup.policy\" = \"compact\"\n",
        );
        let s = Settings::load(Some(&path), &Overrides::default()).unwrap();
        assert_eq!(s.kafka.format, RecordFormat::ConnectJson);
        assert!(s.sink_format_error().is_some());
        let path = write(
            &dir,
            "[postgres]\ntables = [\"t\"]\n[kafka]\ntime_precision_mode = \"adaptive\"\n\
             [elasticsearch]\nrun_in_daemon = true\n",
        );
        let e = errors(Settings::load(Some(&path), &Overrides::default()));
        assert!(
            e.len() == 1 && e[0].contains("kafka.time_precision_mode"),
            "{e:?}"
        );
        assert_eq!(
            s.kafka.transaction_topic().as_deref(),
            Some("pgcdc.transaction")
        );
        assert_eq!(s.kafka.topic_config["cleanup.policy"], "compact");
    }
}
