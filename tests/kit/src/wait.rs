//! The one bounded poll: ask a condition again and again until it is ready,
//! fails for good, or the deadline passes. [`poll`] is the async flavour
//! (the condition may await), [`poll_blocking`] the blocking one; both take
//! their decisions from [`Deadline::step`].

use std::future::Future;
use std::time::{Duration, Instant};

/// The pause between two polls unless a caller asks for another.
pub const EVERY: Duration = Duration::from_millis(100);

/// One answer of a polled condition.
#[derive(Debug)]
pub enum Poll<T> {
    /// Done, with the value the caller waited for.
    Ready(T),
    /// Not yet; what it looks like now (reported if the deadline passes).
    Pending(String),
    /// It will never be ready (e.g. the daemon exited): stop waiting.
    Abort(String),
}

impl<T> Poll<T> {
    /// `Ready(value)` when `done`, else `Pending(why())`.
    pub fn when(done: bool, value: T, why: impl FnOnce() -> String) -> Poll<T> {
        if done {
            Poll::Ready(value)
        } else {
            Poll::Pending(why())
        }
    }
}

/// Why a wait ended without its value.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    /// The deadline passed.
    #[error("timed out after {after:?} waiting for {what}: {last}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// The timeout.
        after: Duration,
        /// The last `Pending` reason.
        last: String,
    },
    /// The condition gave up.
    #[error("gave up waiting for {what}: {why}")]
    Aborted {
        /// What was waited for.
        what: String,
        /// Why.
        why: String,
    },
}

/// A deadline and what to do with each answer.
#[derive(Debug)]
pub struct Deadline {
    what: String,
    timeout: Duration,
    at: Instant,
}

impl Deadline {
    /// A deadline `timeout` from now for a wait described by `what`.
    pub fn new(what: &str, timeout: Duration) -> Deadline {
        Deadline {
            what: what.to_owned(),
            timeout,
            at: Instant::now() + timeout,
        }
    }

    /// `Some(result)` when the wait is over, `None` to poll again.
    pub fn step<T>(&self, answer: Poll<T>) -> Option<Result<T, WaitError>> {
        match answer {
            Poll::Ready(v) => Some(Ok(v)),
            Poll::Abort(why) => Some(Err(WaitError::Aborted {
                what: self.what.clone(),
                why,
            })),
            Poll::Pending(last) if Instant::now() >= self.at => Some(Err(WaitError::Timeout {
                what: self.what.clone(),
                after: self.timeout,
                last,
            })),
            Poll::Pending(_) => None,
        }
    }
}

/// Poll `check` every `every` until it is ready or aborts, for at most `timeout`.
pub async fn poll<T, F, Fut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: F,
) -> Result<T, WaitError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Poll<T>>,
{
    let deadline = Deadline::new(what, timeout);
    loop {
        if let Some(done) = deadline.step(check().await) {
            return done;
        }
        tokio::time::sleep(every).await;
    }
}

/// [`poll`] for a condition that blocks instead of awaiting.
pub fn poll_blocking<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: impl FnMut() -> Poll<T>,
) -> Result<T, WaitError> {
    let deadline = Deadline::new(what, timeout);
    loop {
        if let Some(done) = deadline.step(check()) {
            return done;
        }
        std::thread::sleep(every);
    }
}

/// Wait until `cond` holds (polled every [`EVERY`]) for at most `timeout`.
pub async fn until<F, Fut>(what: &str, timeout: Duration, mut cond: F) -> Result<(), WaitError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    poll(what, timeout, EVERY, || {
        let fut = cond();
        async move { Poll::when(fut.await, (), || "not yet".into()) }
    })
    .await
}

/// Check that `invariant` holds every `every` for all of `period` (a
/// negative wait: nothing may happen); the first violation ends it.
pub async fn during<F, Fut>(
    what: &str,
    period: Duration,
    every: Duration,
    mut invariant: F,
) -> Result<(), WaitError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let held = poll(what, period, every, || {
        let fut = invariant();
        async move {
            match fut.await {
                Ok(()) => Poll::<()>::Pending("holds".into()),
                Err(why) => Poll::Abort(why),
            }
        }
    })
    .await;
    match held {
        Err(WaitError::Timeout { .. }) => Ok(()),
        other => other,
    }
}

/// Retry `attempt` until it succeeds or `timeout` passes; the last error on timeout.
pub async fn retry<T, E, F, Fut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut attempt: F,
) -> Result<T, WaitError>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    poll(what, timeout, every, || {
        let fut = attempt();
        async move {
            match fut.await {
                Ok(v) => Poll::Ready(v),
                Err(e) => Poll::Pending(e.to_string()),
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_reports_the_last_pending_reason() {
        let mut n = 0;
        let r: Result<(), _> =
            poll_blocking("n to grow", Duration::from_millis(30), EVERY / 10, || {
                n += 1;
                Poll::Pending(format!("n = {n}"))
            });
        let e = r
            .map(|_| ())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("n to grow") && e.contains(&format!("n = {n}")),
            "{e}"
        );
    }

    #[tokio::test]
    async fn ready_and_abort_end_the_wait_at_once() {
        let mut calls = 0;
        let v = poll(
            "three calls",
            Duration::from_secs(5),
            Duration::ZERO,
            || {
                calls += 1;
                let c = calls;
                async move { Poll::when(c == 3, c, || "later".into()) }
            },
        )
        .await;
        assert_eq!(v.ok(), Some(3));
        let a: Result<(), _> = poll("never", Duration::from_secs(5), Duration::ZERO, || async {
            Poll::Abort("gone".into())
        })
        .await;
        assert!(matches!(a, Err(WaitError::Aborted { .. })));
    }
}
