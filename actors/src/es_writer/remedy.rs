//! The sink's answer to its group's state: probe it, publish the lag and
//! readiness, report a stall, and apply the remedy `stall` chooses
//! (rejoin, or read every partition directly for a spell, then try the
//! group again).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::EsConfig;
use super::consume::{Clients, Sink};
use super::continuity::Continuity;
use super::error::EsError;
use super::group::{self, Prober, SinkConsumer};
use super::stall::{PartitionLag, Remedy, StallWatch, Verdict};
use crate::kafka_producer::KafkaConfig;

/// How often the sink probes its group's progress (lag metrics, the stall
/// check): between batches, and whenever no record came for this long.
pub(super) const PROBE_EVERY: Duration = Duration::from_secs(5);

/// How the sink reads its topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Membership {
    /// As a member of its consumer group.
    Group,
    /// Every partition directly, outside the group, until then.
    Direct(Instant),
}

/// How far the remedies for a stall went, kept across restarts of the
/// sink's task: a sink that crashed while reading directly goes on reading
/// directly, instead of joining a group that does not work and waiting
/// for the stall to be found again.
#[derive(Debug, Default)]
pub(super) struct Escalation {
    /// Rejoins and spells of direct reading since the group last worked.
    counts: (u32, u32),
    /// The end of the spell of direct reading under way.
    direct_until: Option<Instant>,
}

/// The [`Escalation`] a sink's task restarts from.
pub(super) type KeptEscalation = Arc<std::sync::Mutex<Escalation>>;

/// What the sink keeps to watch its group.
pub(super) struct GroupWatch {
    /// Looks up the group's progress.
    prober: Prober,
    /// The stall rule's memory.
    stall: StallWatch,
    /// Whether the sink reads as a group member or directly.
    membership: Membership,
    /// When the group was last probed.
    probed_at: Instant,
    /// Probes failed in a row.
    probe_failures: u32,
    /// The offset after the last record written, per partition: where the
    /// sink stands even when its commit has not landed (or is refused).
    positions: HashMap<(String, i32), i64>,
    /// Whether a change record (not only canaries) came since the last probe.
    pub(super) changes_since_probe: bool,
    /// Per partition, where the last probe found the group (its committed
    /// offset, or the log start if that is beyond it).
    probed: HashMap<(String, i32), i64>,
    /// Where the remedies stand, for the next run after a restart.
    kept: KeptEscalation,
}

impl GroupWatch {
    /// A watch for a sink that joins its group now.
    pub(super) fn new(
        es: &EsConfig,
        kafka: &KafkaConfig,
        kept: &KeptEscalation,
    ) -> Result<Self, EsError> {
        let bound = Duration::from_secs(es.stall_timeout_secs);
        let mut stall = StallWatch::new(bound, Instant::now());
        stall.resume(lock(kept).counts);
        Ok(Self {
            prober: group::prober(es, kafka)?,
            stall,
            membership: Membership::Group,
            probed_at: Instant::now(),
            probe_failures: 0,
            positions: HashMap::new(),
            probed: HashMap::new(),
            changes_since_probe: false,
            kept: kept.clone(),
        })
    }

    /// Keep where the remedies stand for a restarted task.
    fn keep(&self) {
        *lock(&self.kept) = Escalation {
            counts: self.stall.escalation(),
            direct_until: match self.membership {
                Membership::Direct(until) => Some(until),
                Membership::Group => None,
            },
        };
    }

    /// Whether the group has committed offsets past the log start of a
    /// partition (it read records before); `false` if the broker does not say.
    pub(super) async fn read_before(
        &self,
        consumer: &SinkConsumer,
        kafka: &Arc<KafkaConfig>,
    ) -> bool {
        group::probe(&self.prober, consumer, kafka)
            .await
            .is_ok_and(|lags| lags.iter().any(|l| l.committed.is_some_and(|o| o > l.low)))
    }

    /// Whether the last probe is [`PROBE_EVERY`] old.
    pub(super) fn probe_due(&self) -> bool {
        self.probed_at.elapsed() >= PROBE_EVERY
    }

    /// The sink wrote a partition's records up to `offset` (the next to read) and committed.
    pub(super) fn written(&mut self, topic: &str, partition: i32, offset: i64) {
        self.stall
            .committed(topic, partition, offset, Instant::now());
        self.positions.insert((topic.to_owned(), partition), offset);
    }

    /// The next offset of a partition to apply, as far as known: every
    /// record below it is written (by this sink, or by the group before it
    /// committed), or gone from the log.
    pub(super) fn applied(&self, topic: &str, partition: i32) -> Option<i64> {
        let key = (topic.to_owned(), partition);
        let own = self.positions.get(&key).copied();
        let group = self.probed.get(&key).copied();
        own.max(group)
    }
}

impl Sink {
    /// Probe the group's progress (`idle`: no record came since the last
    /// probe): update the lag metrics and readiness, report a stall and
    /// remedy it.
    pub(super) async fn check_group(&self, c: &mut Clients, idle: bool) -> Result<(), EsError> {
        let checked = self.check(c, idle).await;
        c.group.keep();
        checked
    }

    /// A run that starts during a spell of direct reading (its task
    /// restarted): read directly for the rest of the spell.
    pub(super) async fn resume_direct(&self, c: &mut Clients) -> Result<(), EsError> {
        crate::metrics::metrics().es_sink_direct.set(0);
        let until = lock(&c.group.kept).direct_until;
        let Some(until) = until.filter(|u| *u > Instant::now()) else {
            return Ok(());
        };
        let Some(partitions) = self.probe(c).await else {
            return Ok(()); // in the group: a stall is found again
        };
        let left_secs = until.saturating_duration_since(Instant::now()).as_secs();
        tracing::warn!(group = %self.es.consumer_group, left_secs, "es sink restarted while reading directly, outside its group: reading directly for the rest of the spell");
        self.replace_consumer(c).await?;
        group::read_directly(&c.consumer, &partitions)?;
        c.group.membership = Membership::Direct(until);
        crate::metrics::metrics().es_sink_direct.set(1);
        Ok(())
    }

    /// [`Self::check_group`], before keeping where the remedies stand.
    async fn check(&self, c: &mut Clients, idle: bool) -> Result<(), EsError> {
        let now = Instant::now();
        c.group.probed_at = now;
        if let Membership::Direct(until) = c.group.membership {
            if now >= until {
                return self.back_to_group(c).await;
            }
        }
        let Some(partitions) = self.probe(c).await else {
            return Ok(());
        };
        super::consume::observe_canaries(c, None);
        let in_group = c.group.membership == Membership::Group;
        match c.group.stall.observe(&partitions, idle, in_group, now) {
            Verdict::Stalled {
                lag,
                stuck,
                stalled_for,
                remedy,
            } => {
                self.report_stall(&partitions, lag, stuck, stalled_for);
                self.apply(c, remedy, &partitions).await
            }
            verdict => {
                let m = crate::metrics::metrics();
                if m.sink_stalled(None) {
                    tracing::info!(group = %self.es.consumer_group, "es sink no longer stalled");
                }
                if verdict == Verdict::CaughtUp {
                    m.sink_caught_up();
                }
                Ok(())
            }
        }
    }

    /// Say that `lag` records wait on `stuck` partitions: the readiness
    /// reason and the metric always, an ERROR when the stall begins.
    fn report_stall(
        &self,
        partitions: &[PartitionLag],
        lag: i64,
        stuck: usize,
        stalled_for: Duration,
    ) {
        let owned = partitions.iter().filter(|l| l.owned).count();
        let group = &self.es.consumer_group;
        let stalled_secs = stalled_for.as_secs() + self.es.stall_timeout_secs;
        if stalled_for.is_zero() {
            tracing::error!(%group, lag, stuck, owned, stalled_secs, "es sink stalled: changes wait that no group member consumes");
        }
        crate::metrics::metrics().sink_stalled(Some(format!(
            "es sink stalled: {lag} records wait in consumer group {group:?} on {stuck} partitions whose committed offsets have not moved for {stalled_secs}s or more; this sink reads {owned} partitions"
        )));
    }

    /// Apply `remedy` to a stall.
    async fn apply(
        &self,
        c: &mut Clients,
        remedy: Remedy,
        partitions: &[PartitionLag],
    ) -> Result<(), EsError> {
        let group = &self.es.consumer_group;
        match remedy {
            Remedy::Wait => Ok(()),
            Remedy::Rejoin => {
                tracing::warn!(%group, "es sink: leaving its group and joining again to end the stall");
                self.rejoin(c).await
            }
            Remedy::ReadDirectly(spell) => {
                tracing::error!(%group, spell_secs = spell.as_secs(), "es sink: rejoining did not end the stall, the group does not form; reading every partition directly, outside the group, then trying the group again");
                self.read_directly(c, partitions, spell).await
            }
        }
    }

    /// Look up every partition's lag (published as metrics); `None` if the
    /// broker did not answer (warned once per streak).
    async fn probe(&self, c: &mut Clients) -> Option<Vec<PartitionLag>> {
        let partitions = match group::probe(&c.group.prober, &c.consumer, &self.kafka).await {
            Ok(p) => p,
            Err(e) => {
                c.group.probe_failures += 1;
                if c.group.probe_failures == 1 {
                    tracing::warn!(error = %e, "es sink: cannot look up its group's progress; lag and stall are unknown until it can");
                }
                return None;
            }
        };
        c.group.probe_failures = 0;
        let mut partitions = partitions;
        for l in partitions.iter_mut().filter(|l| l.owned) {
            // What this sink wrote counts even if its commit has not landed
            // (or is refused, as for a sink reading directly on Kafka).
            if let Some(&at) = c.group.positions.get(&(l.topic.clone(), l.partition)) {
                l.committed = Some(l.committed.map_or(at, |o| o.max(at)));
            }
        }
        c.group.probed = partitions
            .iter()
            .filter_map(|l| {
                let at = l.committed.map_or(l.low, |o| o.max(l.low));
                Some(((l.topic.clone(), l.partition), at)).filter(|_| at > 0)
            })
            .collect();
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
        c.group.stall.acted(Remedy::Rejoin, Instant::now());
        self.replace_consumer(c).await?;
        group::subscribe(&c.consumer, &self.kafka, self.canary_topic())?;
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
        c.group.stall.acted(Remedy::ReadDirectly(spell), now);
        self.replace_consumer(c).await?;
        group::read_directly(&c.consumer, partitions)?;
        c.group.membership = Membership::Direct(now + spell);
        crate::metrics::metrics().es_sink_direct.set(1);
        Ok(())
    }

    /// After a spell of direct reading: join the group again.
    async fn back_to_group(&self, c: &mut Clients) -> Result<(), EsError> {
        tracing::info!(group = %self.es.consumer_group, "es sink joining its group again after reading directly");
        c.group.stall.acted(Remedy::Wait, Instant::now());
        self.replace_consumer(c).await?;
        group::subscribe(&c.consumer, &self.kafka, self.canary_topic())?;
        c.group.membership = Membership::Group;
        crate::metrics::metrics().es_sink_direct.set(0);
        Ok(())
    }

    /// Close the consumer (leaving the group) and put a new, idle one in its place.
    async fn replace_consumer(&self, c: &mut Clients) -> Result<(), EsError> {
        let new: SinkConsumer = group::consumer(&self.es, &self.kafka)?;
        group::leave(std::mem::replace(&mut c.consumer, new)).await;
        c.continuity = Continuity::new(self.canary_topic());
        Ok(())
    }
}

/// `kept`, also after a panic while it was held.
fn lock(kept: &KeptEscalation) -> std::sync::MutexGuard<'_, Escalation> {
    kept.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
