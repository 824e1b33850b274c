//! The sink's errors and their one classification point.

use crate::error::{ErrorClass, ExitCode};

/// HTTP status of a request refused for bad credentials or missing rights.
const UNAUTHORIZED: u16 = 401;
/// HTTP status of a request refused for missing rights.
const FORBIDDEN: u16 = 403;
/// HTTP status of a missing index or document.
const NOT_FOUND: u16 = 404;
/// HTTP status of a request that timed out waiting.
const REQUEST_TIMEOUT: u16 = 408;
/// HTTP status of a version conflict.
const CONFLICT: u16 = 409;
/// HTTP status of "too many requests": the cluster asks us to slow down.
const TOO_MANY_REQUESTS: u16 = 429;
/// First HTTP status of a server-side failure (5xx), worth retrying.
const SERVER_ERROR: u16 = 500;

/// ES sink failures.
#[derive(Debug, thiserror::Error)]
pub enum EsError {
    /// Invalid settings found while building clients.
    #[error("{0}")]
    Config(String),
    /// Kafka consumer or dead-letter producer failure.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// HTTP transport failure (connection refused, reset, timeout).
    #[error("elasticsearch request: {0}")]
    Http(#[from] reqwest::Error),
    /// The server answered with a body that is not what the request returns.
    #[error("elasticsearch answered {status} with an unreadable body: {body}")]
    Unreadable {
        /// HTTP status.
        status: u16,
        /// Why it is unreadable, and the start of the body.
        body: String,
    },
    /// Copying a table into a new mirror generation failed (the
    /// generation is dropped and built again later).
    #[error("filling a new mirror generation: {0}")]
    Fill(String),
    /// A write through a mirror's alias found no such alias: the mirror's
    /// index was deleted. The batch is written again once the mirror is
    /// opened again (and refilled from PostgreSQL).
    #[error("the mirror {0} no longer exists (its index was deleted)")]
    MirrorGone(String),
    /// A whole request was refused.
    #[error("elasticsearch answered {status}: {body}")]
    Status {
        /// HTTP status.
        status: u16,
        /// Start of the body.
        body: String,
    },
}

impl EsError {
    /// The one classification point for sink errors.
    pub fn class(&self) -> ErrorClass {
        match self {
            EsError::Config(_) => ErrorClass::Fatal(ExitCode::Config),
            e if e.is_auth() => ErrorClass::Fatal(ExitCode::Upstream),
            _ => ErrorClass::Transient,
        }
    }

    /// Credentials refused or rights missing.
    pub(super) fn is_auth(&self) -> bool {
        matches!(
            self,
            EsError::Status {
                status: UNAUTHORIZED | FORBIDDEN,
                ..
            }
        )
    }

    /// Elasticsearch refuses the request itself (a 4xx other than
    /// credentials, a missing index, a timeout, a conflict or overload: a
    /// mapping it cannot parse, a shard limit reached, a template's bad
    /// setting): sending it again changes nothing until someone changes
    /// the cluster or the table.
    pub(super) fn refused(&self) -> Option<String> {
        let EsError::Status { status, body } = self else {
            return None;
        };
        let other = [
            UNAUTHORIZED,
            FORBIDDEN,
            NOT_FOUND,
            REQUEST_TIMEOUT,
            CONFLICT,
            TOO_MANY_REQUESTS,
        ];
        if !(400..SERVER_ERROR).contains(status) || other.contains(status) {
            return None;
        }
        let reason = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|b| {
                let cause = &b["error"]["root_cause"][0];
                let reason = cause["reason"].as_str().or(b["error"]["reason"].as_str())?;
                Some(match cause["type"].as_str() {
                    Some(kind) => format!("{kind}: {reason}"),
                    None => reason.to_owned(),
                })
            });
        Some(format!(
            "elasticsearch answered {status}: {}",
            reason.as_deref().unwrap_or(body)
        ))
    }

    /// Whether retrying the same request can help.
    pub(super) fn retryable(&self) -> bool {
        match self {
            EsError::Http(_) | EsError::Unreadable { .. } => true,
            EsError::Status { status, .. } => {
                *status == TOO_MANY_REQUESTS || *status >= SERVER_ERROR
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16) -> EsError {
        EsError::Status {
            status,
            body: String::new(),
        }
    }

    #[test]
    fn refused_credentials_are_fatal_and_overload_is_retried() {
        assert_eq!(status(403).class(), ErrorClass::Fatal(ExitCode::Upstream));
        assert_eq!(status(401).class(), ErrorClass::Fatal(ExitCode::Upstream));
        assert_eq!(status(503).class(), ErrorClass::Transient);
        assert!(status(429).retryable() && status(502).retryable());
        assert!(!status(400).retryable() && !status(403).retryable());
        assert!(status(400).refused().is_some() && status(413).refused().is_some());
        for s in [401, 403, 404, 408, 409, 429, 500, 503] {
            assert_eq!(status(s).refused(), None, "{s}");
        }
        let body = r#"{"error":{"root_cause":[{"type":"mapper_parsing_exception","reason":"bad [a]"}],"type":"x","reason":"y"},"status":400}"#;
        let refused = EsError::Status {
            status: 400,
            body: body.into(),
        };
        assert_eq!(
            refused.refused().as_deref(),
            Some("elasticsearch answered 400: mapper_parsing_exception: bad [a]")
        );
        assert_eq!(
            EsError::Config("x".into()).class(),
            ErrorClass::Fatal(ExitCode::Config)
        );
    }
}
