//! The sink's mirrors as aliases over generations
//! ([`generation`](super::generation)): finding a mirror's current
//! generation, following compatible schema changes, building, filling and
//! swapping in a new generation on an incompatible one, and dropping the
//! old one after `elasticsearch.reindex_grace_secs`. With several sink
//! processes in a group, one fill serves them all ([`shared`]).
//!
//! A mirror index from before generations (a concrete index under the
//! mirror's name) is migrated the same way on its first record: a first
//! generation is filled beside it, then one atomic alias update removes the
//! old index and points the mirror's name at the generation.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use tokio::task::JoinHandle;

use super::bulk::{floors_index_body, index_body, mapping_settings};
use super::client::{Beat, EsClient};
use super::config::EsConfig;
use super::error::EsError;
use super::fill::Fill;
use super::generation::{
    compare, filling_alias, generation_index, generation_of, Change, GenerationMeta, TableShape,
};
use super::mapping;
use super::retry::with_retry;
use super::shared::{self, FILL_DEAD, VIEW_FRESH};
use super::truncate::{floors_index, Position};
use crate::kafka_producer::KafkaConfig;
use crate::metrics::metrics;
use crate::pg::PostgresConfig;
/// Times a swap looks again after the alias moved under it.
const MAX_MOVES: u32 = 3;
/// Wait before a failed fill, or a mirror Elasticsearch refused, is tried again.
const FILL_RETRY: Duration = Duration::from_secs(30);
/// Why a mirror Elasticsearch accepts again is filled from PostgreSQL.
const SKIPPED: &str = "its changes were skipped while Elasticsearch refused its index";

/// A generation being filled, by this sink process or another one of its
/// group ([`shared`]).
struct Next {
    index: String,
    meta: GenerationMeta,
    /// Why it is filled: kept for a fill tried again after it failed or was dropped.
    why: String,
    /// Whether it holds changes the serving generation is known to lack:
    /// once swapped in, the mirror no longer lacks them.
    heals: bool,
    /// This process's fill: the rows copied and its last heartbeat. `None`:
    /// another process fills it, this one writes its changes to it too.
    fill: Option<JoinHandle<Result<(u64, Beat), EsError>>>,
}

/// One mirror: its alias, the generation serving it, the one being filled.
pub(super) struct Mirror {
    alias: String,
    /// The concrete index the alias points at; the alias's own name for a
    /// mirror index from before generations.
    current: String,
    /// `None`: a mirror from before generations (shape unknown).
    meta: Option<GenerationMeta>,
    next: Option<Next>,
    /// Highest generation number seen.
    last: u64,
    /// No new fill before this instant (after a failed one).
    retry_after: Option<Instant>,
    /// The last shape followed (`pgcdc.types` text and key columns): a
    /// record of the same shape needs no comparison.
    followed: Option<(String, Vec<String>)>,
    /// Why the mirror must be filled from PostgreSQL before it is whole
    /// (its index was deleted, Kafka never delivered some records), until a
    /// fill starts.
    refill: Option<String>,
    /// Known to lack changes (its index was deleted, Kafka never delivered
    /// some records) until a fill started since is swapped in.
    lacking: bool,
    /// Noted in the registry as lacking changes
    /// ([`EsClient::note_lacking`]): the note goes once it is filled.
    noted: bool,
}

impl Mirror {
    /// Whether the generation serving, or the one being filled, holds every
    /// change committed at or before `lsn`.
    fn holds_up_to(&self, lsn: u64) -> bool {
        let next = self.next.as_ref().map(|n| &n.meta);
        self.meta.iter().chain(next).any(|m| m.holds_up_to(lsn))
    }
}

/// The record's table (schema, name), read only when a fill needs it.
pub(super) type TableOf<'a> = &'a dyn Fn() -> Option<(String, String)>;

/// What routing needs of a record.
pub(super) struct Incoming<'a> {
    /// The topic it was read from.
    pub topic: &'a str,
    /// Its `pgcdc.types` header.
    pub types: Option<&'a str>,
    /// Its key (column name → value).
    pub key: Option<&'a Map<String, Value>>,
    /// Its position (commit LSN, seq).
    pub at: (u64, u32),
    /// Its table.
    pub table: TableOf<'a>,
}

/// A table's shape known without a record of it (a generation's `_meta`,
/// the catalog), for [`Mirrors::touch`].
struct Known<'a> {
    topic: &'a str,
    /// As the `pgcdc.types` header.
    types: &'a str,
    key: &'a [String],
    /// The commit LSN the shape holds from.
    at: u64,
    table: (String, String),
}

/// Where one record's write goes.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Route {
    /// Also write to this generation being filled.
    pub also: Option<String>,
    /// Elasticsearch refuses the mirror's index: the write is skipped,
    /// and the mirror filled from PostgreSQL once it accepts it.
    pub skip: bool,
    /// The current generation is about to be replaced: a refusal is not a dead letter.
    pub best_effort: bool,
    /// The mirror is a concrete index under its own name (from before
    /// generations), not an alias.
    pub concrete: bool,
    /// Write to this generation being filled instead of the current one.
    pub instead: Option<String>,
}

/// Every mirror this run touched.
pub(super) struct Mirrors {
    es: Arc<EsConfig>,
    pg: Option<Arc<PostgresConfig>>,
    /// Which topic a table's changes go to.
    kafka: Arc<KafkaConfig>,
    mirrors: HashMap<String, Mirror>,
    /// Retired generations and when they may be deleted.
    retired: Vec<(String, Instant)>,
    /// Whether the sink's group had read records before (committed
    /// offsets at start, or a batch written since): with its notes of the
    /// mirrors it created gone as well, a mirror that does not exist may
    /// have been deleted.
    resumed: bool,
    /// By topic: the highest commit LSN of a batch in which Kafka was found
    /// not to have delivered some records (0: none), as noted in the
    /// registry. A mirror a record of the topic goes to is filled again
    /// from PostgreSQL unless a generation holds every change up to it.
    gaps: HashMap<String, u64>,
    /// The highest commit LSN the sink has read: a fill started now holds
    /// every change up to it.
    read: u64,
    /// Configured tables without a mirror whose fill could not start (their
    /// shape unreadable), and when to try again.
    unfilled: Vec<(String, String)>,
    unfilled_retry: Option<Instant>,
    /// When the generations and fill heartbeats were last looked at.
    viewed: Option<Instant>,
    /// Fill heartbeats seen: generation index → beat count, and when it
    /// last changed.
    beats: HashMap<String, (u64, Instant)>,
    /// Generations whose fill another process gave up on: filled here
    /// again at the next [`Mirrors::settle`].
    orphans: Vec<GenerationMeta>,
    /// Mirrors whose index or mapping Elasticsearch refuses: when to try
    /// again, and their table (tried then without waiting for a change);
    /// their records are skipped meanwhile.
    refused: HashMap<String, (Instant, Option<(String, String)>)>,
    /// Mirrors not open here noted in the registry as lacking changes:
    /// filled from PostgreSQL when they open (why).
    noted: HashMap<String, String>,
}

impl Mirrors {
    /// No mirror known yet; `pg` is where fills copy from.
    pub(super) fn new(
        es: Arc<EsConfig>,
        pg: Option<Arc<PostgresConfig>>,
        kafka: Arc<KafkaConfig>,
    ) -> Self {
        Self {
            es,
            pg,
            kafka,
            mirrors: HashMap::new(),
            retired: Vec::new(),
            resumed: false,
            gaps: HashMap::new(),
            read: 0,
            unfilled: Vec::new(),
            unfilled_retry: None,
            viewed: None,
            beats: HashMap::new(),
            orphans: Vec::new(),
            refused: HashMap::new(),
            noted: HashMap::new(),
        }
    }

    /// Kafka never delivered some records of `topics` (retention deleted
    /// them before the sink read them, compaction, a broker's skip), all
    /// committed at or before `lsn` (the batch's highest commit LSN): any
    /// mirror may lack changes, so each one a record of these topics goes
    /// to is filled again from PostgreSQL. The gap is noted in the registry
    /// before the batch's offsets are committed, so a sink that restarts
    /// before the fills complete finds it again.
    pub(super) async fn missed(
        &mut self,
        client: &EsClient,
        topics: Vec<String>,
        lsn: u64,
    ) -> Result<(), EsError> {
        if topics.is_empty() {
            return Ok(());
        }
        let lsn = lsn.max(1);
        self.read = self.read.max(lsn);
        let (registry, body) = (
            floors_index(&self.es.index_prefix),
            floors_index_body(&self.es),
        );
        with_retry(&self.es, || client.ensure_index(&registry, &body)).await?;
        for topic in &topics {
            with_retry(&self.es, || client.note_gap(&registry, topic, lsn)).await?;
            let known = self.gaps.entry(topic.clone()).or_default();
            *known = (*known).max(lsn);
        }
        self.fill_gapped(client, &topics).await
    }

    /// Start filling, from PostgreSQL, every mirror whose serving generation
    /// was created from records of `topics` and lacks a gap noted there,
    /// without waiting for its table's next change (a table that changes no
    /// more would keep the missing changes), and every configured table of
    /// those topics that has no mirror. Mirrors from an older pgcdc, whose
    /// generation does not name its topic and table, wait for a change.
    async fn fill_gapped(&mut self, client: &EsClient, topics: &[String]) -> Result<(), EsError> {
        let pattern = format!("{}*", super::naming::path_segment(&self.es.index_prefix));
        let indices = with_retry(&self.es, || client.aliases(&pattern)).await?;
        let mappings = with_retry(&self.es, || client.index_info(&pattern, "_mapping")).await?;
        let mut mirrored: HashSet<&str> = HashSet::new();
        for (index, info) in &indices {
            mirrored.insert(index);
            let aliases = info["aliases"].as_object();
            mirrored.extend(
                aliases
                    .into_iter()
                    .flat_map(|a| a.keys().map(String::as_str)),
            );
        }
        let unmirrored = self.configured(topics, &mirrored);
        for (index, info) in &indices {
            let Some(meta) = GenerationMeta::read(&mappings[index]["mappings"]) else {
                continue;
            };
            let serving = info["aliases"].get(&meta.alias).is_some();
            if serving && topics.contains(&meta.topic) {
                self.touch_meta(client, &meta).await?;
            }
        }
        for (schema, table) in unmirrored {
            self.fill_new(client, &schema, &table).await?;
        }
        Ok(())
    }

    /// The configured tables (`postgres.tables`) whose changes go to one of
    /// `topics` and that have no mirror among `mirrored`.
    fn configured(&self, topics: &[String], mirrored: &HashSet<&str>) -> Vec<(String, String)> {
        let names = self
            .pg
            .as_ref()
            .map(|pg| pg.tables.as_slice())
            .unwrap_or_default();
        names
            .iter()
            .filter_map(|name| crate::pg::parse_table_name(name).ok())
            .filter(|(schema, table)| {
                let alias = super::bulk::mirror_index(&self.es, schema, table);
                let topic = self.kafka.topic_for(schema, table);
                !mirrored.contains(alias.as_str()) && topics.contains(&topic)
            })
            .collect()
    }

    /// Create the mirror of a table that has none and fill it from
    /// PostgreSQL (its shape read from the catalog): its records may all be
    /// among those Kafka never delivered. For a mirror Elasticsearch
    /// refused, the same tries it again without waiting for a change.
    async fn fill_new(
        &mut self,
        client: &EsClient,
        schema: &str,
        table: &str,
    ) -> Result<(), EsError> {
        let Some(pg) = self.pg.clone() else {
            return Ok(());
        };
        let name = format!("{schema}.{table}");
        let alias = super::bulk::mirror_index(&self.es, schema, table);
        let shape = match super::fill::table_shape(&pg, schema, table).await {
            Ok(shape) => shape,
            Err(e) => {
                tracing::error!(table = %name, error = %e, "cannot read the table's shape to fill its mirror from PostgreSQL; trying again in 30 s");
                metrics().sink_lacking(&alias, Some("its table's shape cannot be read to fill it"));
                self.unfilled.push((schema.to_owned(), table.to_owned()));
                self.unfilled_retry = Some(Instant::now() + FILL_RETRY);
                return Ok(());
            }
        };
        let key: Vec<String> = shape.key_names().into_iter().map(str::to_owned).collect();
        let topic = self.kafka.topic_for(schema, table);
        let known = Known {
            topic: &topic,
            types: &shape.table.column_types,
            key: &key,
            at: self.read,
            table: (schema.to_owned(), table.to_owned()),
        };
        self.touch(client, &alias, known).await
    }

    /// [`Self::touch`] with the shape, topic and table a generation's
    /// `_meta` records (nothing for a generation of an older pgcdc, which
    /// names no table).
    async fn touch_meta(
        &mut self,
        client: &EsClient,
        meta: &GenerationMeta,
    ) -> Result<(), EsError> {
        let Some(table) = meta.table.clone() else {
            return Ok(());
        };
        let types = serde_json::to_string(&meta.shape.columns).unwrap_or_default();
        let known = Known {
            topic: &meta.topic,
            types: &types,
            key: &meta.shape.key,
            at: meta.since,
            table,
        };
        self.touch(client, &meta.alias, known).await
    }

    /// Route a record made up from a table's known shape, though no change
    /// came: the mirror is opened, and the fill it is marked for started.
    async fn touch(&mut self, client: &EsClient, alias: &str, k: Known<'_>) -> Result<(), EsError> {
        let key: Map<String, Value> = k.key.iter().map(|c| (c.clone(), Value::Null)).collect();
        let table = move || Some(k.table.clone());
        let rec = Incoming {
            topic: k.topic,
            types: Some(k.types),
            key: Some(&key),
            at: (k.at, 0),
            table: &table,
        };
        self.route(client, alias, &rec).await.map(drop)
    }

    /// At the sink's start: whether its group has `read_before` (else
    /// the notes of the mirrors it creates are started, so that only their
    /// loss later looks like [`Mirrors::resumed`]). Gaps noted before (by a
    /// sink that stopped before its fills completed, or another process of
    /// the group) are read, and the mirrors that lack them filled.
    pub(super) async fn start(
        &mut self,
        client: &EsClient,
        read_before: bool,
    ) -> Result<(), EsError> {
        self.resumed = read_before;
        if !read_before {
            let (registry, body) = (
                floors_index(&self.es.index_prefix),
                floors_index_body(&self.es),
            );
            with_retry(&self.es, || client.ensure_index(&registry, &body)).await?;
        }
        let registry = floors_index(&self.es.index_prefix);
        // Noted before a restart: filled now, without waiting for a change.
        for s in with_retry(&self.es, || client.lacking(&registry)).await? {
            metrics().sink_lacking(&s.alias, Some(&s.why));
            self.noted.insert(s.alias, s.why);
            if let Some((schema, table)) = s.table {
                self.fill_new(client, &schema, &table).await?;
            }
        }
        let noted = with_retry(&self.es, || client.gaps(&registry)).await?;
        let topics: Vec<String> = noted.iter().map(|(topic, _)| topic.clone()).collect();
        for (topic, lsn) in noted {
            // Noted after the sink read them: committed before a fill starts now.
            self.read = self.read.max(lsn);
            self.gaps.insert(topic, lsn);
        }
        if topics.is_empty() {
            return Ok(());
        }
        self.fill_gapped(client, &topics).await
    }

    /// The sink wrote change records.
    pub(super) fn wrote(&mut self) {
        self.resumed = true;
    }

    /// Route a record's write to mirror `alias`: find or create the mirror,
    /// follow the record's shape (`shape`, from commit LSN `lsn`), and say
    /// where the write goes. A mirror whose index or mapping Elasticsearch
    /// refuses ([`EsError::refused`]) does not hold up the others: its
    /// writes are skipped, it is tried again every 30 s, and once
    /// Elasticsearch accepts it, it is filled from PostgreSQL.
    pub(super) async fn route(
        &mut self,
        client: &EsClient,
        alias: &str,
        rec: &Incoming<'_>,
    ) -> Result<Route, EsError> {
        let skip = Route {
            skip: true,
            ..Route::default()
        };
        if self
            .refused
            .get(alias)
            .is_some_and(|(t, _)| Instant::now() < *t)
        {
            return Ok(skip);
        }
        match self.route_open(client, alias, rec).await {
            Err(e) => match e.refused() {
                Some(why) => {
                    self.refuse(client, alias, why, (rec.table)()).await?;
                    Ok(skip)
                }
                None => Err(e),
            },
            Ok(route) => {
                if self.refused.remove(alias).is_some() {
                    tracing::info!(alias, "Elasticsearch accepts the mirror's index again");
                    metrics().sink_lacking(alias, Some(SKIPPED));
                }
                Ok(route)
            }
        }
    }

    /// Elasticsearch refuses mirror `alias`'s index or mapping (`why`):
    /// its writes are skipped until it is tried again, and it
    /// [`lacks`](Self::lacks) them.
    async fn refuse(
        &mut self,
        client: &EsClient,
        alias: &str,
        why: String,
        table: Option<(String, String)>,
    ) -> Result<(), EsError> {
        let retry = (Instant::now() + FILL_RETRY, table);
        let again = self.refused.insert(alias.to_owned(), retry).is_some();
        let why = format!("Elasticsearch refuses its index ({why}); its changes are skipped and it is filled from PostgreSQL once Elasticsearch accepts it, tried every 30 s");
        if again {
            tracing::warn!(alias, why, "Elasticsearch still refuses the mirror's index");
        } else {
            tracing::error!(
                alias,
                why,
                "Elasticsearch refuses the mirror's index: the other mirrors go on"
            );
        }
        metrics()
            .es_mirrors_refused
            .with_label_values(&[alias])
            .inc();
        let table = self.refused[alias].1.clone();
        self.lacks(client, alias, &why, SKIPPED, table).await
    }

    /// Mirror `alias` of `table` lacks changes only a fill from PostgreSQL
    /// brings (`refill`; `why`: what `/ready` says now): reported until a
    /// fill is swapped in, and noted in the registry before the batch's
    /// offsets are committed, so a restart still fills it.
    async fn lacks(
        &mut self,
        client: &EsClient,
        alias: &str,
        why: &str,
        refill: &str,
        table: Option<(String, String)>,
    ) -> Result<(), EsError> {
        metrics().sink_lacking(alias, Some(why));
        let registry = floors_index(&self.es.index_prefix);
        let body = floors_index_body(&self.es);
        with_retry(&self.es, || client.ensure_index(&registry, &body)).await?;
        let table = table.as_ref();
        with_retry(&self.es, || {
            client.note_lacking(&registry, alias, refill, table)
        })
        .await?;
        match self.mirrors.get_mut(alias) {
            Some(m) => {
                m.refill.get_or_insert_with(|| refill.to_owned());
                m.lacking = true;
                m.noted = true;
            }
            None => {
                self.noted.insert(alias.to_owned(), refill.to_owned());
            }
        }
        Ok(())
    }

    /// Documents of `table`'s mirror were written without unchanged TOAST
    /// columns PostgreSQL did not give: the mirror is filled again from
    /// PostgreSQL, at once.
    pub(super) async fn incomplete(
        &mut self,
        client: &EsClient,
        table: (String, String),
    ) -> Result<(), EsError> {
        let alias = super::bulk::mirror_index(&self.es, &table.0, &table.1);
        let why = "documents were written without unchanged TOAST columns PostgreSQL did not give";
        self.lacks(client, &alias, why, why, Some(table.clone()))
            .await?;
        self.fill_new(client, &table.0, &table.1).await
    }

    /// The mirror `alias`, filled since it lacked changes, no longer does.
    async fn healed(&mut self, client: &EsClient, alias: &str) -> Result<(), EsError> {
        let m = self.mirrors.get_mut(alias).expect("mirror opened");
        m.lacking = false;
        metrics().sink_lacking(alias, None);
        if std::mem::take(&mut m.noted) {
            let registry = floors_index(&self.es.index_prefix);
            with_retry(&self.es, || client.forget_lacking(&registry, alias)).await?;
        }
        Ok(())
    }

    /// [`Self::route`] of a mirror Elasticsearch does not refuse (as far as
    /// is known).
    async fn route_open(
        &mut self,
        client: &EsClient,
        alias: &str,
        rec: &Incoming<'_>,
    ) -> Result<Route, EsError> {
        if !self.mirrors.contains_key(alias) {
            let mut mirror = self.open(client, alias, rec).await?;
            if let Some(why) = self.noted.remove(alias) {
                metrics().sink_lacking(alias, Some(&why));
                mirror.refill.get_or_insert(why);
                mirror.lacking = true;
                mirror.noted = true;
            }
            self.mirrors.insert(alias.to_owned(), mirror);
            self.observe_one(client, alias).await?;
        }
        self.read = self.read.max(rec.at.0);
        let gap = self.gaps.get(rec.topic).copied().unwrap_or(0);
        let m = self.mirrors.get_mut(alias).expect("mirror opened");
        let why = || format!("kafka never delivered some records of topic {}", rec.topic);
        if gap > 0 && !m.lacking && !m.meta.as_ref().is_some_and(|g| g.holds_up_to(gap)) {
            metrics().sink_lacking(alias, Some(&why()));
            m.lacking = true;
            if let Some(next) = m.next.as_mut().filter(|n| n.meta.holds_up_to(gap)) {
                next.heals = true;
            }
        }
        if gap > 0 && m.refill.is_none() && !m.holds_up_to(gap) {
            m.refill = Some(why());
        }
        self.refill(client, alias, rec).await?;
        let m = &self.mirrors[alias];
        let seen = m.followed.as_ref().is_some_and(|(types, key)| {
            Some(types.as_str()) == rec.types && rec.key.is_some_and(|k| k.keys().eq(key))
        });
        if !seen {
            let shape = rec
                .types
                .zip(rec.key)
                .and_then(|(t, k)| TableShape::of_record(t, k));
            if let Some(shape) = shape {
                if self.follow(client, alias, rec, &shape).await? {
                    let m = self.mirrors.get_mut(alias).expect("mirror opened");
                    m.followed = Some((rec.types.unwrap_or_default().to_owned(), shape.key));
                }
            }
        }
        let m = &self.mirrors[alias];
        let keyed_as = |shape: &TableShape| rec.key.is_none_or(|k| k.keys().eq(&shape.key));
        let also = m
            .next
            .as_ref()
            .and_then(|n| keyed_as(&n.meta.shape).then(|| n.index.clone()));
        // A record keyed differently than the current generation would add
        // a second document for its row there: it goes to the new one only.
        let key_fits = m.meta.as_ref().is_none_or(|meta| keyed_as(&meta.shape));
        Ok(match also {
            Some(next) if !key_fits => Route {
                instead: Some(next),
                ..Route::default()
            },
            also => Route {
                best_effort: m.next.is_some(),
                also,
                instead: None,
                concrete: m.current == alias,
                skip: false,
            },
        })
    }

    /// Start filling a mirror marked for it (from the record's shape) into
    /// a new generation; tried again at later records until it starts. A
    /// fill this process runs is swapped in first (restarted at each
    /// record, it might never end): the mirror stays marked, and lacking.
    async fn refill(
        &mut self,
        client: &EsClient,
        alias: &str,
        rec: &Incoming<'_>,
    ) -> Result<(), EsError> {
        let m = &self.mirrors[alias];
        let Some(why) = m.refill.clone() else {
            return Ok(());
        };
        if m.next.as_ref().is_some_and(|n| n.fill.is_some()) {
            return Ok(());
        }
        let shape = rec
            .types
            .zip(rec.key)
            .and_then(|(t, k)| TableShape::of_record(t, k));
        let Some(shape) = shape else {
            return Ok(());
        };
        if self.rebuild(client, alias, rec, &shape, &why).await? {
            let m = self.mirrors.get_mut(alias).expect("mirror opened");
            m.followed = Some((rec.types.unwrap_or_default().to_owned(), shape.key));
        }
        Ok(())
    }

    /// Forget the mirror `alias` (its index was deleted), stopping and
    /// dropping a fill this process runs; the next record opens it again.
    pub(super) async fn forget(&mut self, client: &EsClient, alias: &str) -> Result<(), EsError> {
        let Some(m) = self.mirrors.remove(alias) else {
            return Ok(());
        };
        metrics().sink_lacking(alias, None); // the next record finds out again
        let Some((index, fill)) = m.next.and_then(|n| Some((n.index, n.fill?))) else {
            return Ok(());
        };
        fill.abort();
        self.drop_generation(client, &index).await
    }

    /// Find the mirror's current generation, or create the first one.
    async fn open(
        &self,
        client: &EsClient,
        alias: &str,
        rec: &Incoming<'_>,
    ) -> Result<Mirror, EsError> {
        let pattern = format!(
            "{}{}*",
            super::naming::path_segment(alias),
            super::generation::GENERATION_SEPARATOR
        );
        let generations = with_retry(&self.es, || client.aliases(&pattern)).await?;
        let mut last = 0;
        let mut current = None;
        let mut others = Vec::new();
        for (index, info) in &generations {
            let Some(n) = generation_of(alias, index) else {
                continue;
            };
            last = last.max(n);
            match info["aliases"].get(alias) {
                Some(_) => current = Some((n, index.clone())),
                None => others.push((n, index.clone())),
            }
        }
        let serving = current.as_ref().map_or(0, |(n, _)| *n);
        for (n, index) in others {
            if n < serving {
                tracing::info!(index, "deleting a retired mirror generation");
                with_retry(&self.es, || client.delete_index(&index)).await?;
            } else {
                // Another sink process may be filling it; a crashed run's
                // leftover is replaced by the next new generation.
                tracing::warn!(index, "a mirror generation newer than the one serving exists (being filled elsewhere, or left by a crash); left alone");
            }
        }
        let registry = floors_index(&self.es.index_prefix);
        let noted = with_retry(&self.es, || client.mirror_noted(&registry, alias)).await?;
        // No notes at all while the group resumes: deleted with the mirrors.
        let lost = match noted {
            Some(noted) => noted,
            None => self.resumed,
        };
        let noted = noted == Some(true);
        let mut refill = None;
        let current = current.map(|(_, index)| index);
        let current = match current {
            Some(c) => c,
            None => {
                let own_path = super::naming::path_segment(alias);
                let own = with_retry(&self.es, || client.aliases(&own_path)).await?;
                if own.contains_key(alias) {
                    alias.to_owned() // a mirror index from before generations
                } else {
                    if lost {
                        tracing::error!(alias, "the mirror's index was deleted: its documents are gone, and the changes still to come would bring back only the rows they change; copying the table from PostgreSQL into a new index");
                        metrics()
                            .es_mirrors_deleted
                            .with_label_values(&[alias])
                            .inc();
                        let why = "the mirror's index was deleted";
                        metrics().sink_lacking(alias, Some(why));
                        refill = Some(why.to_owned());
                    }
                    let index = generation_index(alias, last + 1);
                    let shape = rec
                        .types
                        .zip(rec.key)
                        .and_then(|(t, k)| TableShape::of_record(t, k))
                        .unwrap_or_default();
                    let meta = generation_meta(alias, shape, rec);
                    let mut body = generation_body(&self.es, rec.types, &meta);
                    body["aliases"] = json!({ alias: {} });
                    with_retry(&self.es, || client.ensure_index(&index, &body)).await?;
                    last += 1;
                    index
                }
            }
        };
        let meta = self.check(client, &current).await?;
        if !noted {
            let body = floors_index_body(&self.es);
            with_retry(&self.es, || client.ensure_index(&registry, &body)).await?;
            with_retry(&self.es, || client.note_mirror(&registry, alias)).await?;
        }
        Ok(Mirror {
            alias: alias.to_owned(),
            current,
            meta,
            next: None,
            last,
            retry_after: None,
            followed: None,
            lacking: refill.is_some(),
            refill,
            noted: false,
        })
    }

    /// Check an existing generation ([`mapping::check_existing`]); its shape.
    async fn check(
        &self,
        client: &EsClient,
        index: &str,
    ) -> Result<Option<GenerationMeta>, EsError> {
        let settings = with_retry(&self.es, || client.index_info(index, "_settings")).await?;
        let mappings = with_retry(&self.es, || client.index_info(index, "_mapping")).await?;
        let concrete = settings
            .as_object()
            .and_then(|o| o.keys().next().cloned())
            .unwrap_or_else(|| index.to_owned());
        mapping::check_existing(&concrete, &settings, &mappings, &self.es.gc_deletes)
            .map_err(EsError::Config)?;
        Ok(GenerationMeta::read(&mappings[&concrete]["mappings"]))
    }

    /// Follow a record's shape: map added columns, or start a new
    /// generation. Whether the mirror now follows this shape (`false`: an
    /// older record, or a new generation that could not start yet).
    async fn follow(
        &mut self,
        client: &EsClient,
        alias: &str,
        rec: &Incoming<'_>,
        shape: &TableShape,
    ) -> Result<bool, EsError> {
        let m = &self.mirrors[alias];
        let target = m.next.as_ref().map(|n| &n.meta).or(m.meta.as_ref());
        if target.is_some_and(|meta| rec.at.0 < meta.since) {
            return Ok(false); // an older record: its shape is history
        }
        let change = match target {
            Some(meta) => compare(&meta.shape, shape),
            None => Change::Incompatible("a mirror index from before generations".into()),
        };
        let change = match change {
            Change::Compatible(added) if !added.is_empty() => self
                .defaults(&added, rec.table)
                .await
                .unwrap_or(Change::Compatible(added)),
            other => other,
        };
        match change {
            Change::Same => Ok(true),
            Change::Compatible(added) => {
                self.add_columns(client, alias, shape, &added).await?;
                Ok(true)
            }
            Change::Incompatible(why) => self.rebuild(client, alias, rec, shape, &why).await,
        }
    }

    /// Added columns that older rows hold a value in (a default) need a
    /// new generation: the documents written before lack it. So does an
    /// added column when PostgreSQL cannot say (a needless fill rather than
    /// documents missing a value). `None` when every added column is NULL
    /// in older rows.
    async fn defaults(&self, added: &Map<String, Value>, table: TableOf<'_>) -> Option<Change> {
        let pg = self.pg.as_ref()?;
        let (schema, name) = table()?;
        let columns: Vec<String> = added.keys().cloned().collect();
        let found = async {
            fail::fail_point!(crate::wire::failpoint::ES_COLUMN_DEFAULTS, |_| Err(
                crate::pg::PgError::NotReady("failpoint es-column-defaults".into())
            ));
            let sql = crate::pg::connect(pg).await?;
            crate::pg::catalog::columns_with_defaults(&sql, &schema, &name, &columns).await
        };
        match found.await {
            Ok(with) if with.is_empty() => None,
            Ok(with) => Some(Change::Incompatible(format!(
                "columns {with:?} added with a default that older rows hold"
            ))),
            Err(e) => {
                tracing::warn!(table = %format!("{schema}.{name}"), columns = ?columns, error = %e, "cannot tell whether added columns have defaults that older rows hold: filling a new index from PostgreSQL");
                Some(Change::Incompatible(format!(
                    "columns {columns:?} added, and whether older rows hold a default is unknown"
                )))
            }
        }
    }

    /// Map added columns in the current generation and the next one.
    async fn add_columns(
        &mut self,
        client: &EsClient,
        alias: &str,
        shape: &TableShape,
        added: &Map<String, Value>,
    ) -> Result<(), EsError> {
        let types = serde_json::to_string(&shape.columns).unwrap_or_default();
        let settings = mapping_settings(&index_body(&self.es, Some(&types), false));
        let m = self.mirrors.get_mut(alias).expect("mirror opened");
        let mut targets: Vec<(&str, &mut GenerationMeta)> = Vec::new();
        if let Some(meta) = m.meta.as_mut() {
            targets.push((&m.current, meta));
        }
        if let Some(next) = m.next.as_mut() {
            targets.push((&next.index, &mut next.meta));
        }
        for (index, meta) in targets {
            if let Change::Incompatible(_) = compare(&meta.shape, shape) {
                continue; // the retiring generation cannot take it
            }
            meta.shape = shape.clone();
            let value = meta.to_value();
            if let Some(settings) = &settings {
                with_retry(&self.es, || client.put_settings(index, settings)).await?;
            }
            let properties = super::naming::fields(added.clone());
            with_retry(&self.es, || client.put_mapping(index, &properties, &value)).await?;
            if !added.is_empty() {
                tracing::info!(index, columns = ?added.keys().collect::<Vec<_>>(), "mapped new columns");
            }
        }
        Ok(())
    }

    /// Start filling a new generation for `shape` (dropping one being
    /// filled for an older shape), or follow a fill another sink process
    /// has under way that fits; a fill the mirror was marked for is then
    /// under way.
    async fn rebuild(
        &mut self,
        client: &EsClient,
        alias: &str,
        rec: &Incoming<'_>,
        shape: &TableShape,
        why: &str,
    ) -> Result<bool, EsError> {
        self.observe_one(client, alias).await?;
        let gap = self.gaps.get(rec.topic).copied().unwrap_or(0);
        let m = self.mirrors.get_mut(alias).expect("mirror opened");
        let lacking = m.lacking;
        if let Some(next) = m.next.as_mut().filter(|n| n.fill.is_none()) {
            let fits = !matches!(compare(&next.meta.shape, shape), Change::Incompatible(_));
            if fits && (gap == 0 || next.meta.holds_up_to(gap)) {
                next.heals |= lacking;
                m.refill = None;
                return Ok(true);
            }
            m.next = None; // replaced by the newer generation started here
        }
        self.abandon(client, alias, "the table changed again")
            .await?;
        let es = self.es.clone();
        let m = self.mirrors.get_mut(alias).expect("mirror opened");
        if m.retry_after.is_some_and(|t| Instant::now() < t) {
            return Ok(false);
        }
        let Some(pg) = self.pg.clone() else {
            tracing::error!(alias, why, "no PostgreSQL connection to copy the table into a new index: the mirror stays as it is (after an incompatible schema change, changes that do not fit the mapping are dead-lettered)");
            m.retry_after = Some(Instant::now() + FILL_RETRY);
            return Ok(false);
        };
        let Some((schema, table)) = (rec.table)() else {
            return Ok(false);
        };
        let registry = floors_index(&es.index_prefix);
        let registry_body = floors_index_body(&es);
        with_retry(&es, || client.ensure_index(&registry, &registry_body)).await?;
        m.last += 1;
        let index = generation_index(alias, m.last);
        let Some(beat) = with_retry(&es, || client.first_beat(&registry, &index)).await? else {
            return Ok(false); // another process takes this number: followed at the next look
        };
        let mut meta = generation_meta(alias, shape.clone(), rec);
        meta.filled = Some(self.read.max(rec.at.0));
        let mut body = generation_body(&es, rec.types, &meta);
        body["aliases"] = json!({ filling_alias(&index): {} });
        // A leftover under the number this process now holds is no one's.
        with_retry(&es, || client.delete_index(&index)).await?;
        with_retry(&es, || client.ensure_index(&index, &body)).await?;
        tracing::warn!(alias, index, why, "filling a new index from PostgreSQL; the alias keeps serving the old one until it is complete");
        metrics().es_reindexes.with_label_values(&["started"]).inc();
        let fill = Fill {
            pg,
            es: es.clone(),
            client: client.clone(),
            schema,
            table,
            index: index.clone(),
            key: shape.key.clone(),
        };
        m.next = Some(Next {
            index,
            meta,
            why: why.to_owned(),
            heals: m.lacking,
            fill: Some(tokio::spawn(shared::run(
                fill,
                client.clone(),
                registry,
                beat,
            ))),
        });
        m.refill = None;
        Ok(true)
    }

    /// Drop the generation this process fills for `alias`, if any. A
    /// generation another process fills stays followed: a truncate reaches
    /// it through the stored floor when it is swapped in.
    pub(super) async fn abandon(
        &mut self,
        client: &EsClient,
        alias: &str,
        why: &str,
    ) -> Result<(), EsError> {
        let Some(m) = self.mirrors.get_mut(alias) else {
            return Ok(());
        };
        let Some(fill) = m.next.as_mut().and_then(|n| n.fill.take()) else {
            return Ok(());
        };
        let next = m.next.take().expect("filled here");
        m.followed = None; // the next record starts a generation again
        m.refill = Some(next.why);
        fill.abort();
        tracing::warn!(alias, index = %next.index, why, "dropping the new index being filled; it is built again from the next change");
        metrics()
            .es_reindexes
            .with_label_values(&["abandoned"])
            .inc();
        self.drop_generation(client, &next.index).await
    }

    /// Delete a generation this process filled, then its fill's heartbeat.
    async fn drop_generation(&self, client: &EsClient, index: &str) -> Result<(), EsError> {
        let registry = floors_index(&self.es.index_prefix);
        with_retry(&self.es, || client.delete_index(index)).await?;
        with_retry(&self.es, || client.end_beat(&registry, index, None)).await?;
        Ok(())
    }

    /// Look at the generations and fill heartbeats when the last look is
    /// [`VIEW_FRESH`] old: follow the fills other sink processes run, take
    /// in the generations they swap in, and end the fills whose process
    /// stopped. While `idle` (no batch to write), only to follow a fill.
    pub(super) async fn observe(&mut self, client: &EsClient, idle: bool) -> Result<(), EsError> {
        let following = || {
            self.mirrors
                .values()
                .any(|m| m.next.as_ref().is_some_and(|n| n.fill.is_none()))
        };
        if self.viewed.is_some_and(|t| t.elapsed() < VIEW_FRESH) || (idle && !following()) {
            return Ok(());
        }
        let started = Instant::now();
        if !self.mirrors.is_empty() {
            let pattern = format!("{}*", super::naming::path_segment(&self.es.index_prefix));
            let aliases: Vec<String> = self.mirrors.keys().cloned().collect();
            let indices = self.view(client, &pattern, &aliases).await?;
            self.end_orphaned_beats(client, &indices).await?;
        }
        self.viewed = Some(started);
        Ok(())
    }

    /// End the stopped heartbeats of fills whose generation does not exist
    /// (a process died between writing the first beat and creating the
    /// index, or between deleting it and ending the beat).
    async fn end_orphaned_beats(
        &self,
        client: &EsClient,
        indices: &Map<String, Value>,
    ) -> Result<(), EsError> {
        let registry = floors_index(&self.es.index_prefix);
        let gone: Vec<&String> = self
            .beats
            .keys()
            .filter(|i| !indices.contains_key(*i) && self.stopped(i))
            .collect();
        for index in gone {
            with_retry(&self.es, || client.end_beat(&registry, index, None)).await?;
        }
        Ok(())
    }

    /// [`Self::observe`] of one mirror, at once.
    async fn observe_one(&mut self, client: &EsClient, alias: &str) -> Result<(), EsError> {
        let pattern = format!(
            "{}{}*",
            super::naming::path_segment(alias),
            super::generation::GENERATION_SEPARATOR
        );
        self.view(client, &pattern, &[alias.to_owned()])
            .await
            .map(drop)
    }

    /// Look at the indices matching `pattern` and at the fill heartbeats,
    /// for the mirrors `aliases`; the indices.
    async fn view(
        &mut self,
        client: &EsClient,
        pattern: &str,
        aliases: &[String],
    ) -> Result<Map<String, Value>, EsError> {
        let registry = floors_index(&self.es.index_prefix);
        // Heartbeats first: a fill's process moves the alias before it ends
        // the heartbeat, so a fill seen without one is seen swapped in.
        let beats = with_retry(&self.es, || client.beats(&registry)).await?;
        let indices = with_retry(&self.es, || client.aliases(pattern)).await?;
        let now = Instant::now();
        for (index, beat) in &beats {
            let seen = self.beats.entry(index.clone()).or_insert((beat.n, now));
            if seen.0 != beat.n {
                *seen = (beat.n, now);
            }
        }
        self.beats.retain(|index, _| beats.contains_key(index));
        for alias in aliases {
            self.observe_mirror(client, alias, &indices, &beats).await?;
        }
        Ok(indices)
    }

    /// Whether the fill of `index` looks stopped: no heartbeat of it has
    /// changed for [`FILL_DEAD`] since this process first saw one.
    fn stopped(&self, index: &str) -> bool {
        self.beats
            .get(index)
            .is_none_or(|(_, at)| at.elapsed() >= FILL_DEAD)
    }

    /// [`Self::observe`] for the mirror `alias`.
    async fn observe_mirror(
        &mut self,
        client: &EsClient,
        alias: &str,
        indices: &Map<String, Value>,
        beats: &HashMap<String, Beat>,
    ) -> Result<(), EsError> {
        let Some(m) = self.mirrors.get_mut(alias) else {
            return Ok(());
        };
        let mut generations = Vec::new();
        let mut serving = None;
        for (index, info) in indices {
            let Some(n) = generation_of(alias, index) else {
                continue;
            };
            if info["aliases"].get(alias).is_some() {
                serving = Some(index.clone());
            }
            m.last = m.last.max(n);
            generations.push((n, index.clone()));
        }
        if let Some(serving) = serving.filter(|s| *s != m.current) {
            self.switched(client, alias, &serving).await?;
        }
        let followed = self.mirrors[alias]
            .next
            .as_ref()
            .filter(|n| n.fill.is_none())
            .map(|n| n.index.clone());
        if let Some(index) = followed {
            let present = generations.iter().any(|(_, i)| *i == index);
            let ended = !present || !beats.contains_key(&index);
            if ended {
                tracing::info!(
                    alias,
                    index,
                    "the new index another sink process filled was dropped"
                );
            } else if self.stopped(&index) {
                let registry = floors_index(&self.es.index_prefix);
                let last = beats.get(&index).copied();
                if with_retry(&self.es, || client.end_beat(&registry, &index, last)).await? {
                    tracing::warn!(alias, index, "the sink process filling the mirror's new index stopped (its heartbeat did not change for {} s): dropping that index and filling the mirror again here", FILL_DEAD.as_secs());
                    with_retry(&self.es, || client.delete_index(&index)).await?;
                    metrics()
                        .es_reindexes
                        .with_label_values(&["abandoned"])
                        .inc();
                }
            }
            if ended || self.stopped(&index) {
                let m = self.mirrors.get_mut(alias).expect("observed");
                if let Some(next) = m.next.take() {
                    m.followed = None;
                    self.orphans.push(next.meta);
                }
            }
        }
        let m = &self.mirrors[alias];
        let serving = generation_of(alias, &m.current);
        let next_n = m.next.as_ref().and_then(|x| generation_of(alias, &x.index));
        let newest = generations
            .iter()
            .filter(|(n, i)| serving.is_none_or(|s| *n > s) && beats.contains_key(i))
            .filter(|(_, i)| !self.stopped(i))
            .max_by_key(|(n, _)| *n)
            .cloned();
        let Some((n, index)) = newest else {
            return Ok(());
        };
        if next_n.is_some_and(|x| x >= n) {
            return Ok(());
        }
        self.abandon(client, alias, "another sink process fills a newer index")
            .await?;
        self.follow_fill(client, alias, index).await
    }

    /// Write every change of `alias` to the generation `index` that another
    /// sink process fills, too.
    async fn follow_fill(
        &mut self,
        client: &EsClient,
        alias: &str,
        index: String,
    ) -> Result<(), EsError> {
        let mappings = with_retry(&self.es, || client.index_info(&index, "_mapping")).await?;
        let Some(meta) = GenerationMeta::read(&mappings[&index]["mappings"]) else {
            return Ok(());
        };
        let gap = self.gaps.get(&meta.topic).copied().unwrap_or(0);
        let m = self.mirrors.get_mut(alias).expect("observed");
        let fits = gap == 0 || meta.holds_up_to(gap);
        if fits {
            m.refill = None;
        }
        tracing::info!(
            alias,
            index,
            "another sink process fills a new index of the mirror: writing each change to it too"
        );
        m.next = Some(Next {
            index,
            meta,
            why: "filled by another sink process".into(),
            heals: m.lacking && fits,
            fill: None,
        });
        Ok(())
    }

    /// Another sink process pointed the alias at `serving`.
    async fn switched(
        &mut self,
        client: &EsClient,
        alias: &str,
        serving: &str,
    ) -> Result<(), EsError> {
        let m = self.mirrors.get_mut(alias).expect("observed");
        tracing::info!(alias, from = %m.current, to = %serving, "another sink process switched the mirror to a new index");
        m.followed = None;
        let followed = m.next.take_if(|n| n.index == serving);
        let (meta, heals) = match followed {
            Some(next) => (Some(next.meta), next.heals),
            None => (self.check(client, serving).await?, false),
        };
        let gap = meta
            .as_ref()
            .map_or(0, |g| self.gaps.get(&g.topic).copied().unwrap_or(0));
        let holds = gap > 0 && meta.as_ref().is_some_and(|g| g.holds_up_to(gap));
        let m = self.mirrors.get_mut(alias).expect("observed");
        m.current = serving.to_owned();
        m.meta = meta;
        if (heals || holds) && m.refill.is_none() && m.lacking {
            self.healed(client, alias).await?;
        }
        let m = self.mirrors.get_mut(alias).expect("observed");
        let older = m
            .next
            .as_ref()
            .is_some_and(|n| generation_of(alias, &n.index) <= generation_of(alias, serving));
        if older {
            self.abandon(client, alias, "a newer index serves the mirror")
                .await?;
            let m = self.mirrors.get_mut(alias).expect("observed");
            m.next = None; // a followed one
        }
        Ok(())
    }

    /// Between batches: start the fills of tables without a mirror that
    /// could not start before, and of generations whose fill another
    /// process gave up on; swap in every generation whose fill is complete,
    /// drop failed fills, and delete retired generations whose grace passed.
    pub(super) async fn settle(&mut self, client: &EsClient) -> Result<(), EsError> {
        if self.unfilled_retry.is_some_and(|t| t <= Instant::now()) {
            self.unfilled_retry = None;
            for (schema, table) in std::mem::take(&mut self.unfilled) {
                self.fill_new(client, &schema, &table).await?;
            }
        }
        for meta in std::mem::take(&mut self.orphans) {
            self.touch_meta(client, &meta).await?;
        }
        let now = Instant::now();
        let refused: Vec<(String, String)> = self
            .refused
            .values()
            .filter(|(t, _)| *t <= now)
            .filter_map(|(_, table)| table.clone())
            .collect();
        for (schema, table) in refused {
            self.fill_new(client, &schema, &table).await?;
            // Not tried (its shape unreadable): not again before the next wait.
            let alias = super::bulk::mirror_index(&self.es, &schema, &table);
            if let Some((t, _)) = self.refused.get_mut(&alias) {
                *t = (*t).max(now + FILL_RETRY);
            }
        }
        let done: Vec<String> = self
            .mirrors
            .values()
            .filter(|m| {
                let fill = m.next.as_ref().and_then(|n| n.fill.as_ref());
                fill.is_some_and(JoinHandle::is_finished)
            })
            .map(|m| m.alias.clone())
            .collect();
        let registry = floors_index(&self.es.index_prefix);
        for alias in done {
            let m = self.mirrors.get_mut(&alias).expect("listed");
            let mut next = m.next.take().expect("finished");
            let filled = match next.fill.take().expect("filled here").await {
                Ok(filled) => filled,
                Err(e) => return Err(EsError::Fill(e.to_string())),
            };
            let filled = match filled {
                // Still this process's fill (no other one found it stopped).
                Ok((rows, beat)) => {
                    match with_retry(&self.es, || client.beat(&registry, &next.index, beat)).await?
                    {
                        Some(_) => Ok(rows),
                        None => Err(shared::ended_elsewhere(&next.index)),
                    }
                }
                Err(e) => Err(e),
            };
            match filled {
                Ok(rows) => {
                    let heals = next.heals;
                    let swapped = self
                        .swap(client, &alias, next.index, next.meta, rows)
                        .await?;
                    let m = &self.mirrors[&alias];
                    let again = m.meta.as_ref().and_then(|g| g.table.clone());
                    if swapped && heals && m.refill.is_none() {
                        self.healed(client, &alias).await?;
                    } else if let Some((schema, table)) = again.filter(|_| m.refill.is_some()) {
                        // Marked while this fill ran: the next one starts now.
                        self.fill_new(client, &schema, &table).await?;
                    }
                }
                Err(e) => {
                    tracing::error!(alias, index = %next.index, error = %e, "filling the new index failed; trying again later");
                    metrics()
                        .es_reindexes
                        .with_label_values(&["abandoned"])
                        .inc();
                    let m = self.mirrors.get_mut(&alias).expect("listed");
                    m.retry_after = Some(Instant::now() + FILL_RETRY);
                    m.followed = None;
                    m.refill = Some(next.why);
                    self.drop_generation(client, &next.index).await?;
                }
            }
        }
        let now = Instant::now();
        let (due, kept): (Vec<_>, Vec<_>) = self.retired.drain(..).partition(|(_, t)| *t <= now);
        self.retired = kept;
        for (index, _) in due {
            tracing::info!(index, "deleting a retired mirror generation");
            with_retry(&self.es, || client.delete_index(&index)).await?;
        }
        Ok(())
    }

    /// The mirror `alias`'s stored truncate floor.
    async fn floor(&self, client: &EsClient, alias: &str) -> Result<Option<Position>, EsError> {
        let registry = floors_index(&self.es.index_prefix);
        let names = [alias];
        let floors = with_retry(&self.es, || client.floors(&registry, &names)).await?;
        Ok(floors.into_iter().next().map(|(_, at)| at))
    }

    /// The indices the alias `alias` points at (or the concrete index under
    /// its name, from before generations), oldest generation first.
    async fn holders(&self, client: &EsClient, alias: &str) -> Result<Vec<String>, EsError> {
        let own_path = super::naming::path_segment(alias);
        let found = with_retry(&self.es, || client.aliases(&own_path)).await?;
        let mut holders: Vec<String> = found.keys().cloned().collect();
        holders.sort_by_key(|h| generation_of(alias, h));
        Ok(holders)
    }

    /// The filled generation `index` came too late: `newer` serves the
    /// mirror already. It is dropped, and `newer` taken in.
    async fn outrun(
        &mut self,
        client: &EsClient,
        alias: &str,
        index: &str,
        newer: &str,
    ) -> Result<(), EsError> {
        tracing::warn!(alias, index, serving = %newer, "a newer index serves the mirror already: dropping this one");
        metrics()
            .es_reindexes
            .with_label_values(&["abandoned"])
            .inc();
        self.drop_generation(client, index).await?;
        self.switched(client, alias, newer).await
    }

    /// Point the alias at the filled generation in one atomic update, unless
    /// a newer one serves already; whether it was swapped in.
    async fn swap(
        &mut self,
        client: &EsClient,
        alias: &str,
        index: String,
        meta: GenerationMeta,
        rows: u64,
    ) -> Result<bool, EsError> {
        // A truncate another process applied while the generation was
        // filled: what the copy holds from before it goes.
        // Either way the generation ends refreshed (the deletes refresh it):
        // searches through the alias must not see it behind the old index,
        // which its own refresh may have shown the latest writes.
        let floor = self.floor(client, alias).await?;
        match floor {
            Some(at) => with_retry(&self.es, || client.delete_below(&index, at)).await?,
            None => with_retry(&self.es, || client.refresh(&index)).await?,
        }
        let mine = generation_of(alias, &index);
        let mut moves = 0;
        let holder = loop {
            let holders = self.holders(client, alias).await?;
            let newest = holders.last().cloned();
            if let Some(newer) = newest.filter(|h| generation_of(alias, h) >= mine) {
                return self
                    .outrun(client, alias, &index, &newer)
                    .await
                    .map(|()| false);
            }
            let mut actions: Vec<Value> = holders
                .iter()
                .map(|h| match h == alias {
                    true => json!({"remove_index": {"index": alias}}),
                    false => json!({"remove": {"index": h, "alias": alias}}),
                })
                .collect();
            actions.push(json!({"add": {"index": index, "alias": alias}}));
            let actions = Value::Array(actions);
            match with_retry(&self.es, || client.update_aliases(actions.clone())).await {
                Ok(()) => break holders.last().cloned(),
                // The alias moved meanwhile (another process swapped): look again.
                Err(EsError::Status { status: 404, .. }) if moves < MAX_MOVES => moves += 1,
                Err(e) => return Err(e),
            }
        };
        // A server that takes the removal of an alias another swap moved
        // leaves it on both: the newest generation keeps it.
        let holders = self.holders(client, alias).await?;
        if holders.len() > 1 {
            let (newest, older) = holders.split_last().expect("two");
            let actions: Vec<Value> = older
                .iter()
                .map(|h| json!({"remove": {"index": h, "alias": alias}}))
                .collect();
            with_retry(&self.es, || {
                client.update_aliases(Value::Array(actions.clone()))
            })
            .await?;
            if *newest != index {
                return self
                    .outrun(client, alias, &index, newest)
                    .await
                    .map(|()| false);
            }
        }
        let legacy = holder.as_deref() == Some(alias);
        let registry = floors_index(&self.es.index_prefix);
        with_retry(&self.es, || client.end_beat(&registry, &index, None)).await?;
        let m = self.mirrors.get_mut(alias).expect("mirror opened");
        tracing::info!(alias, from = ?holder, to = %index, rows, "mirror switched to its new index");
        metrics().es_reindexes.with_label_values(&["swapped"]).inc();
        m.current = index.clone();
        m.meta = Some(meta);
        if let Some(old) = holder.filter(|_| !legacy) {
            let grace = Duration::from_secs(self.es.reindex_grace_secs);
            self.retired.push((old, Instant::now() + grace));
        }
        // A truncate stored while the alias moved reached the old index only.
        let now = self.floor(client, alias).await?;
        if let Some(at) = now.filter(|at| Some(*at) != floor) {
            with_retry(&self.es, || client.delete_below(&index, at)).await?;
        }
        Ok(true)
    }
}

impl Drop for Mirrors {
    /// A run that ends stops the fills it started: no one would swap them in.
    fn drop(&mut self) {
        let fills = self
            .mirrors
            .values()
            .filter_map(|m| m.next.as_ref()?.fill.as_ref());
        for fill in fills {
            fill.abort();
        }
    }
}

/// The `_meta` of a generation of `alias` for `shape`, created at `rec`.
fn generation_meta(alias: &str, shape: TableShape, rec: &Incoming<'_>) -> GenerationMeta {
    let mut meta = GenerationMeta::new(alias, shape, rec.at.0);
    meta.topic = rec.topic.to_owned();
    meta.table = (rec.table)();
    meta
}

/// A generation's creation body: settings, mappings, and its `_meta`.
fn generation_body(es: &EsConfig, types: Option<&str>, meta: &GenerationMeta) -> Value {
    let mut body = index_body(es, types, false);
    body["mappings"]["_meta"] = meta.to_value();
    body
}
