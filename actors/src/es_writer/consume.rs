//! The sink's consuming loop: collect a batch from Kafka, check offset
//! continuity, plan and write it to Elasticsearch (truncates as barriers,
//! concurrent lanes by document, poison to the dead-letter topic), then commit
//! the offsets. Between batches, and whenever no record came for a while, it
//! probes its group's progress and remedies a stall (`remedy`).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};

use super::alias::{Incoming, Mirrors, Route};
use super::bulk::{floors_index_body, index_body, mapping_settings, plan, Action, Planned};
use super::canary::{Canaries, CanaryWatch};
use super::client::EsClient;
use super::config::EsConfig;
use super::continuity::Continuity;
use super::dead_letter::{header, DeadLetters};
use super::error::EsError;
use super::group::SinkConsumer;
use super::merge;
use super::remedy::GroupWatch;
use super::retry::{backoff, with_retry};
use super::send::Sender;
use super::toast::{Read, ReadError};
use super::truncate::{self, floors_index, Floors, Position, Written};
use crate::kafka_producer::{KafkaConfig, Reply};
use crate::lsn::Lsn;
use crate::pg::PostgresConfig;

/// The dead-letter producer's `client.id`, and its name in refusals.
const DEAD_LETTERS_CLIENT: &str = "pgcdc-es-dead-letters";

/// How often one batch may find a mirror deleted and open it again before
/// the sink restarts.
const MIRROR_REOPENS: u32 = 3;
/// A record the consumer hands over sooner than this after being asked was
/// already waiting for the sink.
const WAITING: Duration = Duration::from_millis(1);
/// Wait before a history index Elasticsearch refused is tried again.
const HISTORY_RETRY: Duration = Duration::from_secs(30);

/// A history index Elasticsearch refuses to create or map.
struct RefusedHistory {
    /// When to try again.
    retry_at: Instant,
    /// The column types of the last record for it.
    types: Option<String>,
    /// Its table: a retry maps the table's current columns, read from
    /// PostgreSQL, so a table fixed without a change after it is seen too.
    table: Option<(String, String)>,
}

/// The consuming loop, detached from the actor so panics surface as `JoinError`s.
pub(super) struct Sink {
    /// Where to write.
    pub(super) es: Arc<EsConfig>,
    /// What to read.
    pub(super) kafka: Arc<KafkaConfig>,
    /// Where new mirror generations are copied from.
    pub(super) pg: Option<Arc<PostgresConfig>>,
    /// Canary records to read, if any.
    pub(super) canary: Option<Arc<CanaryWatch>>,
    /// Where the remedies for a stall stood when the last run ended.
    pub(super) escalation: super::remedy::KeptEscalation,
}

/// Clients and caches of one run.
pub(super) struct Clients {
    /// The group member (or the direct reader); replaced by remedies.
    pub(super) consumer: SinkConsumer,
    /// The offset-continuity check.
    pub(super) continuity: Continuity,
    /// The watch on the group's progress.
    pub(super) group: GroupWatch,
    dlq: DeadLetters,
    es: EsClient,
    /// Indices known to exist (history indices, the floors index).
    indices: HashSet<String>,
    /// The column types each history index was last mapped for.
    history_types: HashMap<String, Option<String>>,
    /// History indices Elasticsearch refuses to create or map; their
    /// documents are dead-lettered meanwhile.
    history_refused: HashMap<String, RefusedHistory>,
    /// Truncate floors known, by mirror index.
    floors: Floors,
    /// The mirrors and their generations.
    mirrors: Mirrors,
    /// Canaries read and not yet searchable.
    canaries: Option<Canaries>,
    /// Tables whose mirror documents this batch wrote without unchanged
    /// TOAST columns PostgreSQL did not give: their mirrors are filled again.
    incomplete: std::sync::Mutex<HashSet<(String, String)>>,
}

impl Sink {
    /// Consume, write and commit until an error ends the run.
    pub(super) async fn run(self) -> Result<(), EsError> {
        crate::metrics::metrics().sink_started();
        let mut c = self.connect()?;
        let read_before = c.group.read_before(&c.consumer, &self.kafka).await;
        c.mirrors.start(&c.es, read_before).await?;
        self.resume_direct(&mut c).await?;
        let mut stopped_reading = Instant::now();
        loop {
            let collected = self.collect(&c.consumer, stopped_reading).await?;
            stopped_reading = Instant::now();
            let Some(mut batch) = collected else {
                c.group.changes_since_probe = false;
                self.check_group(&mut c, true).await?;
                c.mirrors.observe(&c.es, true).await?;
                c.mirrors.settle(&c.es).await?;
                self.retry_history(&mut c).await?;
                continue;
            };
            // Fills other processes of the group started are written to
            // as well ([`shared`](super::shared)).
            c.mirrors.observe(&c.es, false).await?;
            lose_records(&mut batch);
            let gapped = c.continuity.check(&c.consumer, &mut batch).await;
            if !gapped.is_empty() {
                let lsn = batch.iter().filter_map(commit_lsn).max().unwrap_or(0);
                c.mirrors.missed(&c.es, gapped, lsn).await?;
            }
            if batch.is_empty() {
                continue; // every record is to be read again (a seek back)
            }
            self.write(&mut c, &batch).await?;
            fail::fail_point!(crate::wire::failpoint::ES_AFTER_BULK);
            commit(&c.consumer, &batch)?;
            self.written(&mut c, &batch);
            observe_canaries(&mut c, Some(&batch));
            c.mirrors.settle(&c.es).await?;
            self.retry_history(&mut c).await?;
            if has_changes(&c, &batch) {
                c.group.changes_since_probe = true;
                c.mirrors.wrote();
            }
            if c.group.probe_due() {
                // Idle: only canary records came (they do not show the change partitions move).
                let idle = !std::mem::take(&mut c.group.changes_since_probe);
                self.check_group(&mut c, idle).await?;
            }
        }
    }

    /// The canary topic, if the sink reads it.
    pub(super) fn canary_topic(&self) -> Option<&str> {
        self.canary.as_deref().map(|w| w.topic.as_str())
    }

    /// Join the group, and build the dead-letter producer and the ES client.
    fn connect(&self) -> Result<Clients, EsError> {
        crate::metrics::metrics().sink_history_forgotten();
        let dlq = DeadLetters {
            producer: self
                .kafka
                .client_config()
                .set("client.id", DEAD_LETTERS_CLIENT)
                .create_with_context(Reply(DEAD_LETTERS_CLIENT))?,
            topic: self.es.dead_letter_topic.clone(),
        };
        Ok(Clients {
            consumer: super::group::join(&self.es, &self.kafka, self.canary_topic())?,
            continuity: Continuity::new(self.canary_topic()),
            group: GroupWatch::new(&self.es, &self.kafka, &self.escalation)?,
            dlq,
            es: EsClient::new(&self.es)?,
            indices: HashSet::new(),
            history_types: HashMap::new(),
            history_refused: HashMap::new(),
            floors: Floors::default(),
            mirrors: Mirrors::new(self.es.clone(), self.pg.clone(), self.kafka.clone()),
            canaries: self.canary.clone().map(Canaries::new),
            incomplete: Default::default(),
        })
    }

    /// Wait for one record, then gather more until the batch is full or the
    /// flush interval passed since the first arrived; `None` when no record
    /// came for [`super::remedy::PROBE_EVERY`]. `stopped_reading` is when
    /// the sink last stopped reading to write: a first record that waited
    /// through that write does not wait a whole interval more
    /// ([`first_arrival`]).
    async fn collect(
        &self,
        consumer: &SinkConsumer,
        stopped_reading: Instant,
    ) -> Result<Option<Vec<OwnedMessage>>, EsError> {
        let asked = Instant::now();
        let Ok(first) = tokio::time::timeout(super::remedy::PROBE_EVERY, consumer.recv()).await
        else {
            return Ok(None);
        };
        let first = first?.detach();
        let arrived = first_arrival(asked, Instant::now(), stopped_reading);
        let deadline = arrived + Duration::from_millis(self.es.flush_interval_ms);
        let mut bytes = first.payload().map_or(0, <[u8]>::len);
        let mut batch = vec![first];
        while batch.len() < self.es.bulk_max_actions && bytes < self.es.bulk_max_bytes {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, consumer.recv()).await {
                Ok(msg) => {
                    let msg = msg?.detach();
                    bytes += msg.payload().map_or(0, <[u8]>::len);
                    batch.push(msg);
                }
                Err(_) => break,
            }
        }
        Ok(Some(batch))
    }

    /// After a committed batch: progress for the stall check and readiness,
    /// and the highest commit LSN applied per table.
    fn written(&self, c: &mut Clients, batch: &[OwnedMessage]) {
        for ((topic, partition), offset) in next_offsets(batch) {
            c.group.written(topic, partition, offset);
        }
        let mut applied: HashMap<Cow<'_, str>, Lsn> = HashMap::new();
        for msg in batch {
            let lsn = header(msg, crate::wire::header::COMMIT_LSN).and_then(|l| l.parse().ok());
            if let (Some(table), Some(lsn)) = (header(msg, crate::wire::header::TABLE), lsn) {
                let at = applied.entry(table).or_insert(lsn);
                *at = (*at).max(lsn);
            }
        }
        let m = crate::metrics::metrics();
        for (table, lsn) in applied {
            m.sink_applied(&table, lsn);
        }
        m.sink_wrote();
    }

    /// [`Self::write_batch`], again after opening a mirror found deleted
    /// (the batch is not committed, and writes are versioned).
    async fn write(&self, c: &mut Clients, batch: &[OwnedMessage]) -> Result<(), EsError> {
        let mut reopened = 0;
        loop {
            match self.write_batch(c, batch).await {
                Err(EsError::MirrorGone(alias)) if reopened < MIRROR_REOPENS => {
                    reopened += 1;
                    tracing::error!(alias = %alias, "the mirror's index was deleted while the sink wrote to it: opening the mirror again");
                    c.mirrors.forget(&c.es, &alias).await?;
                }
                done => return done,
            }
        }
    }

    /// Write a batch: records in order, truncates as barriers (see
    /// [`truncate`](super::truncate)), poison to the dead-letter topic.
    async fn write_batch(&self, c: &mut Clients, batch: &[OwnedMessage]) -> Result<(), EsError> {
        let mut pending = Vec::new();
        let mut written = Vec::new();
        for (i, msg) in batch.iter().enumerate() {
            if c.canaries
                .as_ref()
                .is_some_and(|k| k.is_canary(msg.topic()))
            {
                continue; // read once the batch is written ([`observe_canaries`])
            }
            match plan(&self.es, msg.key(), msg.payload(), i) {
                Planned::Skip => {}
                Planned::Actions(actions) => {
                    for mut a in actions {
                        let route = self.ensure_index(c, &a, msg).await?;
                        if route.skip {
                            // A history document is dead-lettered instead.
                            if !a.history {
                                crate::metrics::metrics()
                                    .es_items
                                    .with_label_values(&["skipped_refused_mirror"])
                                    .inc();
                            }
                            continue;
                        }
                        if let Some(next) = &route.instead {
                            a = a.to_filling(next);
                        } else if route.concrete {
                            a = a.to_index(&a.index.clone());
                        }
                        a.also = route.also;
                        a.best_effort = route.best_effort;
                        if !a.history && c.floors.below(&a.index, a.at) {
                            crate::metrics::metrics()
                                .es_items
                                .with_label_values(&["superseded"])
                                .inc();
                            continue;
                        }
                        written.extend(Written::of(&a));
                        pending.push(a);
                    }
                }
                Planned::Truncate { index, at } => {
                    self.flush(c, std::mem::take(&mut pending), batch).await?;
                    self.truncate(c, &index, at).await?;
                }
                Planned::Poison(reason) => {
                    crate::metrics::metrics().dead_letters.inc();
                    c.dlq.send(msg, &reason).await?
                }
            }
        }
        self.flush(c, pending, batch).await?;
        self.sweep(c, &written, batch).await?;
        let incomplete = std::mem::take(&mut *c.incomplete.lock().expect("not poisoned"));
        for table in incomplete {
            c.mirrors.incomplete(&c.es, table).await?;
        }
        Ok(())
    }

    /// Store the truncate's floor, then delete what is below it.
    async fn truncate(&self, c: &mut Clients, index: &str, at: Position) -> Result<(), EsError> {
        let floors = floors_index(&self.es.index_prefix);
        if !c.indices.contains(&floors) {
            let body = floors_index_body(&self.es);
            with_retry(&self.es, || c.es.ensure_index(&floors, &body)).await?;
            c.indices.insert(floors.clone());
        }
        c.mirrors
            .abandon(&c.es, index, "the table was truncated")
            .await?;
        with_retry(&self.es, || c.es.put_floor(&floors, index, at)).await?;
        c.floors.learn(index, at);
        with_retry(&self.es, || c.es.delete_below(index, at)).await?;
        tracing::info!(index, lsn = at.0, seq = at.1, "truncate applied");
        Ok(())
    }

    /// Read the floors of the indices this batch wrote; where one rose
    /// meanwhile, delete what the batch left below it.
    async fn sweep(
        &self,
        c: &mut Clients,
        written: &[Written],
        batch: &[OwnedMessage],
    ) -> Result<(), EsError> {
        let mut touched: Vec<&str> = written.iter().map(Written::index).collect();
        touched.sort_unstable();
        touched.dedup();
        if touched.is_empty() {
            return Ok(());
        }
        let floors = floors_index(&self.es.index_prefix);
        let stored = with_retry(&self.es, || c.es.floors(&floors, &touched)).await?;
        let rose: Vec<String> = stored
            .into_iter()
            .filter_map(|(index, at)| c.floors.learn(&index, at).then_some(index))
            .collect();
        let deletes = truncate::sweep(written, &c.floors, &rose);
        if !deletes.is_empty() {
            tracing::info!(indices = ?rose, documents = deletes.len(), "a truncate from another sink or partition: deleting what this batch wrote below it");
            self.flush(c, deletes, batch).await?;
        }
        Ok(())
    }

    /// Create history index `index` for columns `types`, or map the columns
    /// it lacks (each time the columns change, and once per process).
    async fn map_history(
        &self,
        c: &Clients,
        index: &str,
        types: Option<&str>,
    ) -> Result<(), EsError> {
        let body = index_body(&self.es, types, true);
        with_retry(&self.es, || c.es.ensure_index(index, &body)).await?;
        if let Some(settings) = mapping_settings(&body) {
            with_retry(&self.es, || c.es.put_settings(index, &settings)).await?;
        }
        let properties = body["mappings"]["properties"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let mapped = with_retry(&self.es, || async {
            match c
                .es
                .put_mapping(index, &properties, &serde_json::Value::Null)
                .await
            {
                Err(e) if !e.retryable() => Ok(Err(e)),
                other => other.map(Ok),
            }
        });
        if let Err(e) = mapped.await? {
            // A column whose type changed keeps its first mapping: values
            // that do not fit it are kept in `_source`, not indexed.
            tracing::warn!(index, error = %e, "history index keeps its earlier column mappings");
        }
        Ok(())
    }

    /// Try the history indices Elasticsearch refused again once their wait
    /// is over, mapped for their table's current columns where PostgreSQL
    /// tells them (else for their last record's).
    async fn retry_history(&self, c: &mut Clients) -> Result<(), EsError> {
        let now = Instant::now();
        let due: Vec<String> = c
            .history_refused
            .iter()
            .filter(|(_, r)| r.retry_at <= now)
            .map(|(i, _)| i.clone())
            .collect();
        for index in due {
            let Some(refused) = c.history_refused.get(&index) else {
                continue;
            };
            let types = match (&self.pg, &refused.table) {
                (Some(pg), Some((schema, table))) => {
                    let shape = super::fill::table_shape(pg, schema, table).await;
                    shape.ok().map(|s| s.table.column_types.clone())
                }
                _ => None,
            }
            .or_else(|| refused.types.clone());
            match self.map_history(c, &index, types.as_deref()).await {
                Ok(()) => {
                    tracing::info!(
                        index,
                        "Elasticsearch accepts the history index: its documents are written again"
                    );
                    c.history_refused.remove(&index);
                    c.history_types.insert(index.clone(), types);
                    crate::metrics::metrics().sink_history_refused(&index, None);
                }
                Err(e) => {
                    let why = e.refused().ok_or(e)?;
                    tracing::warn!(
                        index,
                        why,
                        "Elasticsearch still refuses the history index (tried again in 30 s)"
                    );
                    let why = history_refused(&why);
                    crate::metrics::metrics().sink_history_refused(&index, Some(&why));
                    if let Some(r) = c.history_refused.get_mut(&index) {
                        r.retry_at = Instant::now() + HISTORY_RETRY;
                    }
                }
            }
        }
        Ok(())
    }

    /// Make sure the action's index exists: a history index is created
    /// once and maps columns added later; a mirror follows the record's
    /// shape ([`Mirrors`]). Where the write goes.
    async fn ensure_index(
        &self,
        c: &mut Clients,
        action: &Action,
        msg: &OwnedMessage,
    ) -> Result<Route, EsError> {
        let index = action.index.as_str();
        let types = header(msg, crate::wire::header::TYPES);
        if action.history {
            if let Some(refused) = c.history_refused.get_mut(index) {
                // Tried again by `retry_history`, with the latest columns.
                refused.types = types.map(Cow::into_owned);
            } else if c.history_types.get(index).map(Option::as_deref) != Some(types.as_deref()) {
                match self.map_history(c, index, types.as_deref()).await {
                    Ok(()) => {
                        let types = types.map(Cow::into_owned);
                        c.history_types.insert(index.to_owned(), types);
                    }
                    Err(e) => {
                        let why = e.refused().ok_or(e)?;
                        tracing::error!(index, why, "Elasticsearch refuses the history index: its documents are dead-lettered until it accepts it (tried again every 30 s)");
                        let m = crate::metrics::metrics();
                        m.es_mirrors_refused.with_label_values(&[index]).inc();
                        m.sink_history_refused(index, Some(&history_refused(&why)));
                        let refused = RefusedHistory {
                            retry_at: Instant::now() + HISTORY_RETRY,
                            types: types.map(Cow::into_owned),
                            table: record_table(msg),
                        };
                        c.history_refused.insert(index.to_owned(), refused);
                    }
                }
            }
            if !c.history_refused.contains_key(index) {
                return Ok(Route::default());
            }
            // A change's history document cannot be made again later: kept in the dead-letter topic.
            crate::metrics::metrics().dead_letters.inc();
            c.dlq
                .send(msg, "history index refused by Elasticsearch")
                .await?;
            return Ok(Route {
                skip: true,
                ..Route::default()
            });
        }
        if !c.indices.contains(index) {
            let (floors, one) = (floors_index(&self.es.index_prefix), [index]);
            for (i, at) in with_retry(&self.es, || c.es.floors(&floors, &one)).await? {
                c.floors.learn(&i, at);
            }
            c.indices.insert(index.to_owned());
        }
        let key: Option<serde_json::Map<String, serde_json::Value>> =
            msg.key().and_then(|k| serde_json::from_slice(k).ok());
        let table = || record_table(msg);
        let rec = Incoming {
            topic: msg.topic(),
            types: types.as_deref(),
            key: key.as_ref(),
            at: action.at,
            table: &table,
        };
        c.mirrors.route(&c.es, index, &rec).await
    }

    /// Send actions in `max_in_flight` concurrent lanes (by document), each until
    /// every action is done, superseded, or dead-lettered; unchanged TOAST
    /// columns are merged in first.
    async fn flush(
        &self,
        c: &Clients,
        mut pending: Vec<Action>,
        batch: &[OwnedMessage],
    ) -> Result<(), EsError> {
        self.merge(c, &mut pending).await?;
        let copies: Vec<Action> = pending
            .iter()
            .filter_map(|a| a.also.as_deref().map(|next| a.to_filling(next)))
            .collect();
        pending.extend(copies);
        let lanes = self.es.max_in_flight.max(1);
        if lanes == 1 || pending.len() < 2 * lanes {
            return self.flush_lane(c, pending, batch).await;
        }
        let mut split: Vec<Vec<Action>> = (0..lanes).map(|_| Vec::new()).collect();
        for a in pending {
            split[(a.lane % lanes as u64) as usize].push(a);
        }
        let results =
            futures::future::join_all(split.into_iter().map(|p| self.flush_lane(c, p, batch)))
                .await;
        results.into_iter().collect()
    }

    /// Fill the unchanged TOAST columns of `pending`'s merges ([`merge`](super::merge)).
    async fn merge(&self, c: &Clients, pending: &mut Vec<Action>) -> Result<(), EsError> {
        if pending.iter().all(|a| a.merge.is_none()) {
            return Ok(());
        }
        let fetch = merge::to_fetch(pending);
        let stored = match fetch.is_empty() {
            true => Default::default(),
            false => with_retry(&self.es, || c.es.documents(&fetch)).await?,
        };
        let r = merge::resolve(pending, &stored);
        let m = crate::metrics::metrics();
        m.es_items
            .with_label_values(&["superseded"])
            .inc_by(r.superseded as u64);
        if r.lacking == 0 {
            return Ok(());
        }
        let (mut read, mut attempt) = (Read::default(), 0);
        let error = loop {
            let Some(pg) = &self.pg else {
                break Some("no postgres settings".to_owned());
            };
            match super::toast::fill(pg, pending, &mut read).await {
                Ok(()) => break None,
                Err(ReadError::Refused(e)) => break Some(e),
                // Written without them, the documents would stay wrong:
                // wait for PostgreSQL as for Elasticsearch.
                Err(ReadError::Unreachable(e)) => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "cannot read unchanged TOAST columns from PostgreSQL; retrying");
                    tokio::time::sleep(backoff(&self.es, attempt)).await;
                }
            }
        };
        m.es_items
            .with_label_values(&["toast_from_postgres"])
            .inc_by(read.filled as u64);
        m.es_items
            .with_label_values(&["toast_row_gone"])
            .inc_by(read.gone as u64);
        let left = r.lacking - read.filled - read.gone;
        if left > 0 {
            m.es_items
                .with_label_values(&["toast_missing"])
                .inc_by(left as u64);
            tracing::warn!(documents = left, error, "changes with unchanged TOAST columns that no document holds could not be read from PostgreSQL: written without those columns, and the mirror is filled again from PostgreSQL (REPLICA IDENTITY FULL sends them)");
            let tables = pending
                .iter()
                .filter_map(|a| Some(a.lacking.as_ref()?.table.clone()));
            c.incomplete.lock().expect("not poisoned").extend(tables);
        }
        Ok(())
    }

    /// Send one lane's actions, in order, until each is handled.
    async fn flush_lane(
        &self,
        c: &Clients,
        pending: Vec<Action>,
        batch: &[OwnedMessage],
    ) -> Result<(), EsError> {
        let sender = Sender {
            es: &self.es,
            client: &c.es,
            dlq: &c.dlq,
            batch,
        };
        sender.send(pending).await
    }
}

/// What `/ready` says of a history index Elasticsearch refuses.
fn history_refused(why: &str) -> String {
    format!("Elasticsearch refuses the history index, its documents are dead-lettered: {why}")
}

/// The table a change record names.
fn record_table(msg: &OwnedMessage) -> Option<(String, String)> {
    let env: crate::wire::Envelope<'_, serde_json::Value> =
        serde_json::from_slice(msg.payload()?).ok()?;
    Some((
        env.source.schema.into_owned(),
        env.source.table.into_owned(),
    ))
}

/// The commit LSN of a change record (`None` for anything else).
fn commit_lsn(msg: &OwnedMessage) -> Option<u64> {
    let env: crate::wire::Envelope<'_, serde_json::Value> =
        serde_json::from_slice(msg.payload()?).ok()?;
    Some(env.source.commit_lsn)
}

/// When a batch's first record arrived, as far as the sink can tell: handed
/// over at once (`answered` within [`WAITING`] of `asked`), it was waiting,
/// and it came after the sink stopped reading (`stopped_reading`); else
/// when it was handed over.
fn first_arrival(asked: Instant, answered: Instant, stopped_reading: Instant) -> Instant {
    match answered.saturating_duration_since(asked) < WAITING {
        true => stopped_reading,
        false => answered,
    }
}

/// Drop what the `es-records-lost` failpoint says (tests: records a broker
/// never delivers): with `return`, the records between the batch's first
/// and last (retention, compaction while the sink was behind); with
/// `return(head)`, all but the last (the oldest, deleted before the group
/// read them).
fn lose_records(batch: &mut Vec<OwnedMessage>) {
    let lost = || -> Option<String> {
        fail::fail_point!(crate::wire::failpoint::ES_RECORDS_LOST, |arg| Some(
            arg.unwrap_or_default()
        ));
        None
    };
    match lost().as_deref() {
        Some("head") if batch.len() > 1 => drop(batch.drain(..batch.len() - 1)),
        Some(_) if batch.len() > 2 => drop(batch.drain(1..batch.len() - 1)),
        _ => {}
    }
}

/// Whether `batch` holds a record of a change topic (not only canaries).
fn has_changes(c: &Clients, batch: &[OwnedMessage]) -> bool {
    match &c.canaries {
        Some(k) => batch.iter().any(|m| !k.is_canary(m.topic())),
        None => !batch.is_empty(),
    }
}

/// Read the canary records of `batch` (without one: after a probe, see
/// whether the sink reads the canary partition), then count the canaries
/// whose partitions are applied now.
pub(super) fn observe_canaries(c: &mut Clients, batch: Option<&[OwnedMessage]>) {
    let Some(canaries) = &mut c.canaries else {
        return;
    };
    match batch {
        Some(batch) => canaries.read(batch),
        None => canaries.owned(canaries.assigned(&c.consumer)),
    }
    canaries.observe(|topic, partition| c.group.applied(topic, partition));
}

/// The offset after the last record of each partition in the batch.
fn next_offsets(batch: &[OwnedMessage]) -> HashMap<(&str, i32), i64> {
    let mut next: HashMap<(&str, i32), i64> = HashMap::new();
    for m in batch {
        let e = next.entry((m.topic(), m.partition())).or_insert(0);
        *e = (*e).max(m.offset() + 1);
    }
    next
}

/// Commit the offset after the last record of each partition in the batch.
fn commit(consumer: &SinkConsumer, batch: &[OwnedMessage]) -> Result<(), EsError> {
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in next_offsets(batch) {
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    }
    // Asynchronous: a synchronous commit would block the actor thread (the
    // whole pipeline when the sink runs in the daemon) for a broker round
    // trip. A commit that fails only means these records are written again.
    consumer.commit(&tpl, CommitMode::Async)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_that_waited_through_a_write_counts_its_wait_from_when_reading_stopped() {
        let stopped_reading = Instant::now();
        let asked = stopped_reading + Duration::from_millis(300);
        // Already queued: handed over at once, its wait began before the write.
        let at_once = asked + Duration::from_micros(20);
        assert_eq!(
            first_arrival(asked, at_once, stopped_reading),
            stopped_reading
        );
        // Waited for: it arrived when it was handed over.
        let later = asked + Duration::from_millis(40);
        assert_eq!(first_arrival(asked, later, stopped_reading), later);
    }
}
