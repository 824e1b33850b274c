//! Brokers that refuse pgcdc: a failed SASL authentication or TLS
//! handshake. librdkafka retries such a broker for ever and says why only
//! in a log line, so a wrong password looked like an unreachable broker
//! after a 30 s wait. pgcdc's start-up and `check` read the cluster's
//! metadata through a [`Prober`], a client whose context is a
//! [`RefusalWatch`], and stop at the first refusal with librdkafka's
//! reason. A producer, because polling it serves librdkafka's log lines
//! (an admin client's are never served, nor a consumer's outside a group).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::DeliveryResult;
use rdkafka::metadata::Metadata;
use rdkafka::producer::{BaseProducer, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;

use super::KafkaConfig;

/// How long one metadata request may take before the watch is read again.
const STEP: Duration = Duration::from_millis(500);

/// A client context that logs librdkafka's lines and errors and keeps the
/// first refusal among them.
#[derive(Debug, Default)]
pub struct RefusalWatch {
    refused: Mutex<Option<String>>,
}

impl RefusalWatch {
    /// Why a broker refused the client, if one did.
    pub fn refused(&self) -> Option<String> {
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn keep(&self, why: &str) {
        let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        refused.get_or_insert_with(|| why.to_owned());
    }
}

/// Whether a librdkafka log line says a broker refused the client.
fn is_refusal(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("authentication") || m.contains("ssl handshake failed")
}

/// Log one librdkafka line in pgcdc's log; whether it says a broker
/// refused the client.
fn log_line(level: RDKafkaLogLevel, facility: &str, message: &str) -> bool {
    use RDKafkaLogLevel::{Alert, Critical, Debug, Emerg, Error, Info, Notice, Warning};
    match level {
        Emerg | Alert | Critical | Error => {
            tracing::error!(target: "librdkafka", facility, "{message}");
            return is_refusal(message);
        }
        Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
        Notice | Info => tracing::info!(target: "librdkafka", facility, "{message}"),
        Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
    }
    false
}

/// Whether a librdkafka error event is a refusal.
fn is_refused(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SSL)
    )
}

impl ClientContext for RefusalWatch {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        if log_line(level, facility, message) {
            self.keep(message);
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if is_refused(&error) {
            self.keep(reason);
        }
        tracing::warn!(target: "librdkafka", %error, "{reason}");
    }
}

/// [`ClientContext::log`] of a client that runs with the pipeline (the
/// producer, the canary's, the sink's consumer), named `client`:
/// librdkafka's lines go to pgcdc's log, and a refusal also to the
/// metrics, which makes `/ready` 503 until a new client of the same
/// configuration gets through ([`crate::metrics::Metrics::kafka_accepted`]).
/// librdkafka keeps reconnecting meanwhile.
pub(crate) fn running_log(
    client: &'static str,
    level: RDKafkaLogLevel,
    facility: &str,
    message: &str,
) {
    if log_line(level, facility, message) {
        crate::metrics::metrics().kafka_refused(client, message);
    }
}

/// [`ClientContext::error`] of a client that runs with the pipeline (see
/// [`running_log`]).
pub(crate) fn running_error(client: &'static str, error: &KafkaError, reason: &str) {
    if is_refused(error) {
        crate::metrics::metrics().kafka_refused(client, reason);
    }
    tracing::error!(target: "librdkafka", %error, "{reason}");
}

/// A [`Prober`] sends nothing.
impl ProducerContext for RefusalWatch {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

/// A client that reads the cluster's metadata (see the module's text).
pub type Prober = BaseProducer<RefusalWatch>;

/// A [`Prober`] of the configured cluster, named `client_id`.
pub fn prober(kafka: &KafkaConfig, client_id: &str) -> KafkaResult<Prober> {
    kafka
        .client_base(client_id)
        .create_with_context(RefusalWatch::default())
}

/// The metadata of every topic of the cluster `prober` talks to, waiting up
/// to `timeout`; an error at once when a broker refuses it.
pub fn metadata_or_refusal(prober: &Prober, timeout: Duration) -> Result<Metadata, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let step = STEP.min(deadline.saturating_duration_since(Instant::now()));
        let error = match prober.client().fetch_metadata(None, step) {
            Ok(metadata) => return Ok(metadata),
            Err(e) => e,
        };
        prober.poll(Duration::ZERO);
        if let Some(why) = prober.context().refused() {
            return Err(format!("the broker refused the connection: {why}"));
        }
        if Instant::now() >= deadline {
            return Err(error.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_told_from_other_failures() {
        let sasl = "sasl_plaintext://127.0.0.1:9092/bootstrap: SASL authentication error: \
                    Authentication failed: Invalid username or password (after 1ms in state AUTH_REQ)";
        let tls = "ssl://127.0.0.1:9093/bootstrap: SSL handshake failed: error:0A000086:SSL \
                   routines::certificate verify failed";
        let down = "127.0.0.1:9092/bootstrap: Connect to ipv4#127.0.0.1:9092 failed: \
                    Connection refused (after 0ms in state CONNECT)";
        assert!(is_refusal(sasl) && is_refusal(tls));
        assert!(!is_refusal(down));
        let watch = RefusalWatch::default();
        watch.log(RDKafkaLogLevel::Error, "FAIL", down);
        assert_eq!(watch.refused(), None);
        watch.log(RDKafkaLogLevel::Error, "FAIL", sasl);
        watch.log(RDKafkaLogLevel::Error, "FAIL", tls);
        assert_eq!(watch.refused().as_deref(), Some(sasl), "the first is kept");
    }
}
