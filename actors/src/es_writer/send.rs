//! Sending one lane's bulk actions until each is written, superseded or
//! dead-lettered, whatever the server answers.
//!
//! | answer | what the sink does |
//! |---|---|
//! | transport error, 429, 5xx (whole request or item), an item refused by a write block or a closed index | retry with backoff, without limit |
//! | 413 (request too large) | split the actions in halves and send each; a single action is dead-lettered |
//! | 400 or another 4xx (whole request) | split likewise to find the record the server refuses; it is dead-lettered |
//! | 200 with a body that is not a bulk response | retry [`UNREADABLE_RETRIES`] times, then split likewise |
//! | an item without a status | retry it [`UNREADABLE_RETRIES`] times, then dead-letter it |
//! | 404 `index_not_found_exception` for a write through a mirror's alias | [`EsError::MirrorGone`]: the mirror's index was deleted |
//!
//! Writes are versioned by commit LSN, so sending an action again is harmless.
//! Each refusal is logged and counted in `pgcdc_es_bulk_refusals_total{reason}`.

use std::collections::HashMap;

use rdkafka::message::OwnedMessage;

use super::bulk::{outcomes, render, Action, Outcome};
use super::client::EsClient;
use super::config::EsConfig;
use super::dead_letter::DeadLetters;
use super::error::EsError;
use super::retry::backoff;
use crate::metrics::metrics;

/// Attempts at an unreadable answer (or a status-less item) before the
/// sink stops trusting it: enough for a transient proxy hiccup.
pub const UNREADABLE_RETRIES: u32 = 5;
/// HTTP status of a request the server finds too large.
const TOO_LARGE: u16 = 413;

/// What to do with a whole-request answer.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Try the same actions again after a backoff.
    Retry,
    /// Split the actions (or dead-letter a single one), for this reason.
    Split(&'static str),
}

/// How a failed bulk request of actions is handled, given the attempts so far.
fn on_failure(e: &EsError, attempt: u32) -> Result<Next, ()> {
    match e {
        EsError::Unreadable { .. } if attempt < UNREADABLE_RETRIES => Ok(Next::Retry),
        EsError::Unreadable { .. } => Ok(Next::Split("unreadable")),
        EsError::Status {
            status: TOO_LARGE, ..
        } => Ok(Next::Split("too_large")),
        e if e.retryable() => Ok(Next::Retry),
        EsError::Status { status, .. } if (400..500).contains(status) && !e.is_auth() => {
            Ok(Next::Split("bad_request"))
        }
        _ => Err(()),
    }
}

/// Who sends: the settings, the cluster, where refused records go.
pub(super) struct Sender<'a> {
    /// `[elasticsearch]`.
    pub es: &'a EsConfig,
    /// The cluster.
    pub client: &'a EsClient,
    /// The dead-letter topic.
    pub dlq: &'a DeadLetters,
    /// The batch the actions' `origin`s index.
    pub batch: &'a [OwnedMessage],
}

impl Sender<'_> {
    /// Send `actions` (one lane, in order) until each is handled.
    pub async fn send(&self, actions: Vec<Action>) -> Result<(), EsError> {
        // Parts still to send, the next one last; splitting keeps the order.
        let mut parts = vec![actions];
        while let Some(part) = parts.pop() {
            if let Some((left, right)) = self.send_part(part).await? {
                parts.push(right);
                parts.push(left);
            }
        }
        Ok(())
    }

    /// Send one part until its items are handled, or return its halves.
    async fn send_part(
        &self,
        mut pending: Vec<Action>,
    ) -> Result<Option<(Vec<Action>, Vec<Action>)>, EsError> {
        let (mut attempt, mut unanswered) = (0u32, HashMap::new());
        while !pending.is_empty() {
            let answer = match self.client.bulk(render(&pending)).await {
                Ok(resp) => outcomes(&resp, pending.len()).map_err(|e| EsError::Unreadable {
                    status: 200,
                    body: e,
                }),
                Err(e) => Err(e),
            };
            let results = match answer {
                Ok(results) => results,
                Err(e) => match on_failure(&e, attempt) {
                    Ok(Next::Retry) => {
                        attempt += 1;
                        metrics().sink_retrying(&e.to_string());
                        tracing::warn!(error = %e, attempt, "elasticsearch bulk request failed; retrying");
                        tokio::time::sleep(backoff(self.es, attempt)).await;
                        continue;
                    }
                    Ok(Next::Split(reason)) => return self.split(pending, reason, &e).await,
                    Err(()) => return Err(e),
                },
            };
            let why;
            (pending, why) = self.settle(pending, results, &mut unanswered).await?;
            // Without a reason, only the deletes of refused writes are left: sent at once.
            if let Some(why) = why {
                attempt += 1;
                metrics().sink_retrying(&why);
                tracing::warn!(
                    items = pending.len(),
                    attempt,
                    error = why,
                    "bulk items not written (429, 5xx, a write block or a closed index, or no status); retrying"
                );
                tokio::time::sleep(backoff(self.es, attempt)).await;
            }
        }
        Ok(None)
    }

    /// Halve `actions`, or dead-letter the single one the server refuses.
    async fn split(
        &self,
        mut actions: Vec<Action>,
        reason: &'static str,
        e: &EsError,
    ) -> Result<Option<(Vec<Action>, Vec<Action>)>, EsError> {
        metrics().es_refusals.with_label_values(&[reason]).inc();
        if actions.len() > 1 {
            tracing::warn!(reason, error = %e, actions = actions.len(), "elasticsearch refused a bulk request; splitting it");
            let right = actions.split_off(actions.len() / 2);
            return Ok(Some((actions, right)));
        }
        if let Some(a) = actions.pop() {
            tracing::warn!(reason, error = %e, index = %a.index, "elasticsearch refused a single action; dead-lettering its record");
            self.dead_letter(&a, &format!("{reason}: {e}")).await?;
            if let Some(delete) = a.withdrawal() {
                return Ok(Some((vec![delete], Vec::new())));
            }
        }
        Ok(None)
    }

    /// Count the items' outcomes, dead-letter the refused ones; the actions
    /// to send next (those to try again, and the deletes withdrawing the
    /// documents of refused writes, in order), and the first reason to try
    /// again, if any.
    async fn settle(
        &self,
        pending: Vec<Action>,
        results: Vec<Outcome>,
        unanswered: &mut HashMap<(usize, bool), u32>,
    ) -> Result<(Vec<Action>, Option<String>), EsError> {
        let m = metrics();
        let (mut retry, mut why) = (Vec::new(), None);
        let mut counts: HashMap<&str, u64> = HashMap::new();
        for (action, outcome) in pending.into_iter().zip(results) {
            let outcome = match outcome {
                Outcome::NoIndex(_) if action.filling => {
                    // The generation being filled was dropped (a newer one,
                    // or its fill ended): whoever fills the mirror again
                    // copies the row from PostgreSQL.
                    *counts.entry("dropped_generation").or_default() += 1;
                    continue;
                }
                Outcome::NoIndex(_) if action.via_alias => {
                    return Err(EsError::MirrorGone(action.index));
                }
                Outcome::NoIndex(_) if action.is_delete() => Outcome::Done,
                other => other,
            };
            let label = match outcome {
                Outcome::Done => "done",
                Outcome::Conflict => "superseded",
                Outcome::Retry(reason) => {
                    why.get_or_insert(reason);
                    retry.push(action);
                    "retried"
                }
                Outcome::Unanswered => {
                    let tries = unanswered
                        .entry((action.origin, action.history))
                        .or_default();
                    *tries += 1;
                    if *tries < UNREADABLE_RETRIES {
                        why.get_or_insert_with(|| "no status".to_owned());
                        retry.push(action);
                        "retried"
                    } else {
                        m.es_refusals.with_label_values(&["no_status"]).inc();
                        self.dead_letter(&action, "bulk item without a status, repeatedly")
                            .await?;
                        retry.extend(action.withdrawal());
                        "dead_lettered"
                    }
                }
                Outcome::Reject(_) | Outcome::NoIndex(_) if action.best_effort => {
                    m.es_refusals.with_label_values(&["retiring_index"]).inc();
                    "refused_by_retiring_index"
                }
                Outcome::Reject(reason) | Outcome::NoIndex(reason) => {
                    self.dead_letter(&action, &reason).await?;
                    retry.extend(action.withdrawal());
                    "dead_lettered"
                }
            };
            *counts.entry(label).or_default() += 1;
        }
        for (label, n) in counts {
            m.es_items.with_label_values(&[label]).inc_by(n);
        }
        Ok((retry, why))
    }

    async fn dead_letter(&self, action: &Action, reason: &str) -> Result<(), EsError> {
        metrics().dead_letters.inc();
        self.dlq.send(&self.batch[action.origin], reason).await
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
    fn each_answer_is_retried_split_or_fatal() {
        let unreadable = EsError::Unreadable {
            status: 200,
            body: "<html>".into(),
        };
        assert_eq!(on_failure(&unreadable, 0), Ok(Next::Retry));
        assert_eq!(
            on_failure(&unreadable, UNREADABLE_RETRIES),
            Ok(Next::Split("unreadable"))
        );
        assert_eq!(on_failure(&status(413), 0), Ok(Next::Split("too_large")));
        assert_eq!(on_failure(&status(400), 0), Ok(Next::Split("bad_request")));
        assert_eq!(on_failure(&status(503), 9), Ok(Next::Retry));
        assert_eq!(on_failure(&status(429), 9), Ok(Next::Retry));
        assert_eq!(on_failure(&status(403), 0), Err(()));
        assert_eq!(on_failure(&status(401), 0), Err(()));
    }
}
