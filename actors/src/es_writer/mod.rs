//! EsWriterActor: consumes the change topics in a consumer group and keeps
//! one mirror index per table (plus an optional history index) in step, over
//! the `_bulk` REST API.
//!
//! Versions are commit LSNs with `version_type=external_gte`, so replaying any
//! part of Kafka leaves the mirror as one in-order pass would: a 409 means a
//! newer (or the same) version is already there and counts as success. Kafka
//! offsets are committed only after every record of the batch is written,
//! dead-lettered, or known to be superseded.
//!
//! This file holds the actor only; the loop is in `consume`, retries in
//! `retry`, dead letters in `dead_letter`, the offset-continuity check in
//! `continuity` (healing a broker's skipped records with `heal`), the
//! consumer and its group in `group`, the stall rule in `stall` and its
//! remedies in `remedy`, the pure planning of writes in `bulk`, and the
//! search stage of the freshness canary in `canary`.

mod alias;
mod bulk;
mod canary;
mod client;
mod config;
mod consume;
mod context;
mod continuity;
mod dead_letter;
mod error;
mod fill;
mod generation;
mod group;
mod heal;
mod mapping;
mod merge;
pub mod naming;
mod remedy;
mod retry;
mod send;
mod shared;
mod stall;
mod toast;
mod truncate;

use std::sync::Arc;

use actix::prelude::*;

pub use bulk::{
    field_mapping, index_body, mirror_index, outcomes, plan, render, Action, Outcome, Planned,
};
pub use canary::CanaryWatch;
pub use client::EsClient;
pub use config::EsConfig;
pub use error::EsError;
pub(crate) use group::{change_topic_ends, group_offsets};
pub use mapping::duration_secs;
pub use naming::doc_id;

use crate::error::ErrorClass;
use crate::kafka_producer::KafkaConfig;
use crate::pg::PostgresConfig;
use crate::supervision::{spawn_after_backoff, task_outcome, RestartBudget};
use consume::Sink;

/// The ES sink actor (supervised).
pub struct EsWriterActor {
    es: Arc<EsConfig>,
    kafka: Arc<KafkaConfig>,
    pg: Option<Arc<PostgresConfig>>,
    budget: RestartBudget,
    task: Option<tokio::task::AbortHandle>,
    /// Canary records to read (the search stage of freshness), if any.
    canary: Option<Arc<CanaryWatch>>,
    /// Where the remedies for a stall stand, across restarts of the task.
    escalation: remedy::KeptEscalation,
}

impl EsWriterActor {
    /// A sink reading the topics of `kafka` into `es`; new mirror
    /// generations are copied from `pg` (without it, an incompatible schema
    /// change cannot be met with a new index).
    pub fn new(
        es: Arc<EsConfig>,
        kafka: Arc<KafkaConfig>,
        pg: Option<Arc<PostgresConfig>>,
        budget: RestartBudget,
    ) -> Self {
        Self {
            es,
            kafka,
            pg,
            budget,
            task: None,
            canary: None,
            escalation: Default::default(),
        }
    }

    /// Also read `watch`'s canary records and measure the search stage.
    pub fn with_canaries(mut self, watch: Arc<CanaryWatch>) -> Self {
        self.canary = Some(watch);
        self
    }
}

impl Actor for EsWriterActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let sink = Sink {
            es: self.es.clone(),
            kafka: self.kafka.clone(),
            pg: self.pg.clone(),
            canary: self.canary.clone(),
            escalation: self.escalation.clone(),
        };
        let handle = spawn_after_backoff(&self.budget, sink.run());
        self.task = Some(handle.abort_handle());
        ctx.spawn(handle.into_actor(self).map(|res, act, ctx| {
            if let Ok(Err(e)) = &res {
                if let ErrorClass::Fatal(code) = e.class() {
                    act.budget.fatal(code, "es sink cannot continue", e);
                    return;
                }
            }
            if task_outcome("es_writer", res).is_err() {
                ctx.stop();
            }
        }));
    }
}

impl Supervised for EsWriterActor {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.budget.record();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
