//! The sink's answer to its group's state: probe it, publish the lag and
//! readiness, report a stall, and apply the remedy `stall` chooses
//! (rejoin, or read every partition directly for a spell, then try the
//! group again).

use std::time::{Duration, Instant};

use super::consume::{Clients, Sink};
use super::continuity::Continuity;
use super::error::EsError;
use super::group::{self, SinkConsumer};
use super::stall::{PartitionLag, Remedy, Verdict};

/// How the sink reads its topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Membership {
    /// As a member of its consumer group.
    Group,
    /// Every partition directly, outside the group, until then.
    Direct(Instant),
}

impl Sink {
    /// Probe the group's progress (`idle`: no record came since the last
    /// probe): update the lag metrics and readiness, report a stall and
    /// remedy it.
    pub(super) async fn check_group(&self, c: &mut Clients, idle: bool) -> Result<(), EsError> {
        let now = Instant::now();
        c.probed_at = now;
        if let Membership::Direct(until) = c.membership {
            if now >= until {
                return self.back_to_group(c).await;
            }
        }
        let Some(partitions) = self.probe(c).await else {
            return Ok(());
        };
        let in_group = c.membership == Membership::Group;
        let verdict = c.watch.observe(&partitions, idle, in_group, now);
        let m = crate::metrics::metrics();
        let Verdict::Stalled {
            lag,
            stuck,
            stalled_for,
            remedy,
        } = verdict
        else {
            if m.sink_stalled(None) {
                tracing::info!(group = %self.es.consumer_group, "es sink no longer stalled");
            }
            if verdict == Verdict::CaughtUp {
                m.sink_caught_up();
            }
            return Ok(());
        };
        let owned = partitions.iter().filter(|l| l.owned).count();
        let (group, stalled_secs) = (
            &self.es.consumer_group,
            stalled_for.as_secs() + self.es.stall_timeout_secs,
        );
        let why = format!(
            "es sink stalled: {lag} records wait in consumer group {group:?} on {stuck} partitions whose committed offsets have not moved for {stalled_secs}s or more; this sink reads {owned} partitions"
        );
        if stalled_for.is_zero() {
            tracing::error!(%group, lag, stuck, owned, stalled_secs, "es sink stalled: changes wait that no group member consumes");
        }
        m.sink_stalled(Some(why));
        match remedy {
            Remedy::Wait => Ok(()),
            Remedy::Rejoin => {
                tracing::warn!(%group, "es sink: leaving its group and joining again to end the stall");
                self.rejoin(c).await
            }
            Remedy::ReadDirectly(spell) => {
                tracing::error!(%group, lag, stalled_secs, spell_secs = spell.as_secs(), "es sink: rejoining did not end the stall, the group does not form; reading every partition directly, outside the group, then trying the group again");
                self.read_directly(c, &partitions, spell).await
            }
        }
    }

    /// Look up every partition's lag (published as metrics); `None` if the
    /// broker did not answer (warned once per streak).
    async fn probe(&self, c: &mut Clients) -> Option<Vec<PartitionLag>> {
        let partitions = match group::probe(&c.prober, &c.consumer, &self.kafka).await {
            Ok(p) => p,
            Err(e) => {
                c.probe_failures += 1;
                if c.probe_failures == 1 {
                    tracing::warn!(error = %e, "es sink: cannot look up its group's progress; lag and stall are unknown until it can");
                }
                return None;
            }
        };
        c.probe_failures = 0;
        let mut partitions = partitions;
        for l in partitions.iter_mut().filter(|l| l.owned) {
            // What this sink wrote counts even if its commit has not landed
            // (or is refused, as for a sink reading directly on Kafka).
            if let Some(&at) = c.positions.get(&(l.topic.clone(), l.partition)) {
                l.committed = Some(l.committed.map_or(at, |o| o.max(at)));
            }
        }
        let m = crate::metrics::metrics();
        for l in &partitions {
            m.es_sink_lag
                .with_label_values(&[&l.topic, &l.partition.to_string()])
                .set(l.lag());
        }
        m.es_sink_partitions
            .set(partitions.iter().filter(|l| l.owned).count() as i64);
        Some(partitions)
    }

    /// Leave the group, then join it again as a new member.
    async fn rejoin(&self, c: &mut Clients) -> Result<(), EsError> {
        c.watch.acted(Remedy::Rejoin, Instant::now());
        self.replace_consumer(c).await?;
        group::subscribe(&c.consumer, &self.kafka)?;
        crate::metrics::metrics().es_sink_rejoins.inc();
        Ok(())
    }

    /// Leave the group and read `partitions` directly for `spell`.
    async fn read_directly(
        &self,
        c: &mut Clients,
        partitions: &[PartitionLag],
        spell: Duration,
    ) -> Result<(), EsError> {
        let now = Instant::now();
        c.watch.acted(Remedy::ReadDirectly(spell), now);
        self.replace_consumer(c).await?;
        group::read_directly(&c.consumer, partitions)?;
        c.membership = Membership::Direct(now + spell);
        crate::metrics::metrics().es_sink_direct.set(1);
        Ok(())
    }

    /// After a spell of direct reading: join the group again.
    async fn back_to_group(&self, c: &mut Clients) -> Result<(), EsError> {
        tracing::info!(group = %self.es.consumer_group, "es sink joining its group again after reading directly");
        c.watch.acted(Remedy::Wait, Instant::now());
        self.replace_consumer(c).await?;
        group::subscribe(&c.consumer, &self.kafka)?;
        c.membership = Membership::Group;
        crate::metrics::metrics().es_sink_direct.set(0);
        Ok(())
    }

    /// Close the consumer (leaving the group) and put a new, idle one in its place.
    async fn replace_consumer(&self, c: &mut Clients) -> Result<(), EsError> {
        let new: SinkConsumer = group::consumer(&self.es, &self.kafka)?;
        group::leave(std::mem::replace(&mut c.consumer, new)).await;
        c.continuity = Continuity::default();
        Ok(())
    }
}
