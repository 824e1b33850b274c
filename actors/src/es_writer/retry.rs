//! Retrying Elasticsearch requests: capped exponential backoff with jitter.

use std::time::Duration;

use super::config::EsConfig;
use super::error::EsError;

/// Largest doubling exponent: 2^16 steps is far past any sane `retry_max_ms`.
const MAX_DOUBLINGS: u32 = 16;
/// Jitter resolution: the random part is `step / 2 * n / JITTER_STEPS`.
const JITTER_STEPS: u64 = 1000;

/// Run `op` until it succeeds or fails with a non-retryable error, backing off in between.
pub(super) async fn with_retry<T, F, Fut>(cfg: &EsConfig, mut op: F) -> Result<T, EsError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, EsError>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Err(e) if e.retryable() => {
                attempt += 1;
                tracing::warn!(error = %e, attempt, "elasticsearch request failed; retrying");
                tokio::time::sleep(backoff(cfg, attempt)).await;
            }
            other => return other,
        }
    }
}

/// Capped exponential backoff with jitter (50–100% of the step).
pub(super) fn backoff(cfg: &EsConfig, attempt: u32) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    backoff_with(cfg, attempt, u64::from(nanos) % JITTER_STEPS)
}

/// [`backoff`] with the jitter drawn (`0..JITTER_STEPS`).
fn backoff_with(cfg: &EsConfig, attempt: u32, jitter: u64) -> Duration {
    let step = cfg
        .retry_initial_ms
        .saturating_mul(1 << attempt.min(MAX_DOUBLINGS))
        .min(cfg.retry_max_ms);
    let jitter = jitter * step / (2 * JITTER_STEPS);
    Duration::from_millis(step / 2 + jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_half_to_all_of_the_capped_step() {
        let cfg = EsConfig {
            retry_initial_ms: 100,
            retry_max_ms: 1000,
            ..Default::default()
        };
        let ms = |attempt, jitter| backoff_with(&cfg, attempt, jitter).as_millis();
        assert_eq!((ms(1, 0), ms(1, JITTER_STEPS - 1)), (100, 199));
        assert_eq!(ms(2, 0), 200);
        assert_eq!(ms(10, 0), 500, "capped at retry_max_ms");
        assert!(backoff(&cfg, 1) >= Duration::from_millis(100));
    }
}
