//! Pure planning of Elasticsearch writes from change records, and
//! classification of `_bulk` responses. No I/O here.

use serde::Deserialize;
use serde_json::error::Category;
use serde_json::{json, Map, Value};

use super::config::EsConfig;
use super::naming::{doc_id, field, fields};
use super::truncate::Position;
use crate::wire::Envelope;

/// One `_bulk` action (its metadata line and optional source line).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Action {
    /// Target index.
    pub index: String,
    /// The action line.
    pub meta: String,
    /// The source line (absent for deletes).
    pub doc: Option<String>,
    /// Which record of the batch it came from.
    pub origin: usize,
    /// The document id.
    pub id: String,
    /// The change's position (commit LSN, seq): truncate floors compare it.
    pub at: Position,
    /// The history index (one document per change), not a mirror.
    pub history: bool,
    /// Unchanged TOAST columns to take from the stored document before sending.
    pub merge: Option<Box<Merge>>,
    /// Unchanged TOAST columns no document held: `columns` are the ones
    /// still missing from `doc`, to be read from PostgreSQL
    /// ([`toast`](super::toast)).
    pub lacking: Option<Box<Merge>>,
    /// Hash of index and document id: actions on one document share a lane,
    /// so they are sent in order even with several requests in flight.
    pub lane: u64,
    /// A mirror generation being filled that gets the same write
    /// ([`generation`](super::generation)).
    pub also: Option<String>,
    /// A refusal is counted, not dead-lettered: the write goes to a
    /// generation about to be replaced whose mapping may not fit it.
    pub best_effort: bool,
    /// Written through the mirror's alias with `require_alias`: if the
    /// alias is gone (its index deleted), the write is refused instead of
    /// creating an index under the mirror's name.
    pub via_alias: bool,
    /// Written to a generation being filled, through its writer alias
    /// ([`filling_alias`](super::generation::filling_alias)): if the
    /// generation was dropped meanwhile, there is nothing left to write.
    pub filling: bool,
}

impl Action {
    /// Bytes this action adds to a bulk body.
    pub fn len(&self) -> usize {
        self.meta.len() + 1 + self.doc.as_ref().map_or(0, |d| d.len() + 1)
    }

    /// Whether the action is empty (never: there is always a metadata line).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether it deletes its document.
    pub fn is_delete(&self) -> bool {
        self.doc.is_none()
    }

    /// The document it writes, if any, as JSON.
    pub fn source(&self) -> Option<Map<String, Value>> {
        match &self.merge {
            Some(m) => Some(m.doc.clone()),
            None => self
                .doc
                .as_deref()
                .and_then(|d| serde_json::from_str(d).ok()),
        }
    }

    /// A delete of document `id` in `index`, applied only while the
    /// document is at version `at.0` or older.
    pub fn versioned_delete(index: &str, id: &str, at: Position, origin: usize) -> Action {
        let meta = versioned_meta("delete", index, id, at.0, false);
        action(index, id, at, origin, meta, None)
    }

    /// For a document write Elasticsearch refused for good: a delete of the
    /// document at the write's version, so the mirror does not keep the
    /// row's older version as if it were current. `None` for deletes,
    /// history entries and writes to a retiring generation.
    pub fn withdrawal(&self) -> Option<Action> {
        if self.is_delete() || self.history || self.best_effort {
            return None;
        }
        let mut delete = Action::versioned_delete(&self.index, &self.id, self.at, self.origin);
        delete.filling = self.filling;
        Some(delete)
    }

    /// The same write to another index (a generation being filled, or a
    /// mirror index from before generations), not through an alias.
    pub fn to_index(&self, index: &str) -> Action {
        let mut meta: Value = serde_json::from_str(&self.meta).unwrap_or(Value::Null);
        if let Some(line) = meta.as_object_mut().and_then(|m| m.values_mut().next()) {
            line["_index"] = json!(index);
            if let Some(line) = line.as_object_mut() {
                line.remove(REQUIRE_ALIAS);
            }
        }
        Action {
            index: index.to_owned(),
            meta: meta.to_string(),
            lane: lane_of(index, &self.id),
            also: None,
            best_effort: false,
            via_alias: false,
            ..self.clone()
        }
    }
}

impl Action {
    /// The same write to the generation `index` being filled, through its
    /// writer alias, so a write after the generation was dropped is refused
    /// instead of creating an index with guessed mappings under its name.
    pub fn to_filling(&self, index: &str) -> Action {
        let mut a = self.to_index(index);
        let mut meta: Value = serde_json::from_str(&a.meta).unwrap_or(Value::Null);
        let line = meta
            .as_object_mut()
            .and_then(|m| m.values_mut().next())
            .and_then(Value::as_object_mut);
        if let Some(line) = line {
            let writer = super::generation::filling_alias(index);
            line.insert("_index".into(), json!(writer));
            line.insert(REQUIRE_ALIAS.into(), json!(true));
        }
        a.meta = meta.to_string();
        a.filling = true;
        a
    }
}

/// A row without its unchanged TOAST columns ([`merge`](super::merge)).
#[derive(Debug, Clone, PartialEq)]
pub struct Merge {
    /// The columns to take from the stored document.
    pub columns: Vec<String>,
    /// The document as the change has it (with `_cdc`).
    pub doc: Map<String, Value>,
    /// The row's table: schema and name.
    pub table: (String, String),
    /// The row's key, as the record key has it.
    pub key: Map<String, Value>,
}

/// What one Kafka record asks of Elasticsearch.
#[derive(Debug, Clone, PartialEq)]
pub enum Planned {
    /// Nothing (a tombstone).
    Skip,
    /// Index, update or delete documents.
    Actions(Vec<Action>),
    /// Empty a table's mirror index of everything older than the truncate.
    Truncate {
        /// The mirror index.
        index: String,
        /// The truncate's position (commit LSN, seq).
        at: Position,
    },
    /// The record cannot be indexed; why.
    Poison(String),
}

/// The mirror index of `schema.table` ([`naming`](super::naming)).
pub fn mirror_index(cfg: &EsConfig, schema: &str, table: &str) -> String {
    super::naming::mirror_index(&cfg.index_prefix, schema, table)
}

/// Status of a delete of a document that is not there: the goal is reached.
const NOT_FOUND: u64 = 404;
/// The error type of an item whose index (or alias) does not exist.
const INDEX_NOT_FOUND: &str = "index_not_found_exception";
/// Error types of items refused until an operator acts (a write block,
/// also the flood-stage disk block of older versions; a closed index):
/// retried, never dead-lettered.
const BLOCKED: [&str; 2] = ["cluster_block_exception", "index_closed_exception"];
/// The action-line flag that refuses a write unless its `_index` is an alias.
const REQUIRE_ALIAS: &str = "require_alias";
/// Status of a versioned write older than the document: a newer change is already there.
const CONFLICT: u64 = 409;
/// Status of an item the cluster is too busy for: retry.
const TOO_MANY_REQUESTS: u64 = 429;
/// An item without a status: retried a few times, then dead-lettered.
const NO_STATUS: u64 = 0;
/// Text fields also get a `keyword` sub-field for exact matches up to this length
/// (Elasticsearch's own dynamic-mapping default).
const TEXT_KEYWORD_MAX: u32 = 256;
/// Values of types pgcdc does not map are indexed as keywords up to this length;
/// longer ones are kept in `_source` but not indexed.
const KEYWORD_MAX: u32 = 1024;

/// A change envelope as the sink reads it.
type ReadEnvelope = Envelope<'static, Map<String, Value>>;

/// Read a record value as a change envelope; why not, as a dead-letter reason.
fn read_envelope(value: &[u8]) -> Result<ReadEnvelope, String> {
    serde_json::from_slice(value).map_err(|e| match e.classify() {
        Category::Data => {
            format!("not a pgcdc change envelope (op, source.schema/table/commit_lsn): {e}")
        }
        Category::Io | Category::Syntax | Category::Eof => format!("value is not json: {e}"),
    })
}

/// Plan the writes for one record (`origin` is its position in the batch).
pub fn plan(cfg: &EsConfig, key: Option<&[u8]>, value: Option<&[u8]>, origin: usize) -> Planned {
    let Some(value) = value else {
        return Planned::Skip;
    };
    let env = match read_envelope(value) {
        Ok(env) => env,
        Err(reason) => return Planned::Poison(reason),
    };
    let src = &env.source;
    let index = mirror_index(cfg, &src.schema, &src.table);
    let lsn = src.commit_lsn;
    if env.op == "t" {
        return Planned::Truncate {
            index,
            at: (lsn, src.seq),
        };
    }
    let key: Option<Map<String, Value>> = key.and_then(|k| serde_json::from_slice(k).ok());
    let Some(key) = key.filter(|k| !k.is_empty()) else {
        return Planned::Poison("record key is not a json object of the primary key".into());
    };
    let id = doc_id(&key);
    // The history entry first: the mirror's write takes the row out of `env`.
    let history = cfg
        .history
        .then(|| history_action(&env, &index, key.clone(), origin));
    match current_action(env, &index, (&id, &key), origin) {
        Ok(current) => Planned::Actions([current].into_iter().chain(history).collect()),
        Err(reason) => Planned::Poison(reason),
    }
}

/// The write that keeps the mirror index current: a versioned delete, a
/// versioned index, or (unchanged TOAST columns) a merge; why not (a dead
/// letter's reason) when the op needs an after image and has none, or is
/// unknown.
fn current_action(
    mut env: ReadEnvelope,
    index: &str,
    (id, key): (&str, &Map<String, Value>),
    origin: usize,
) -> Result<Action, String> {
    let (lsn, seq) = (env.source.commit_lsn, env.source.seq);
    let (meta, doc) = match (&*env.op, env.after.take()) {
        ("d", _) => (versioned_meta("delete", index, id, lsn, true), None),
        ("c" | "u" | "r", Some(after)) => {
            let mut doc = fields(after);
            let cdc = json!({"op": env.op, "lsn": lsn, "seq": seq, "ts_ms": env.source.ts_ms, "xid": env.source.tx_id});
            doc.insert("_cdc".into(), cdc);
            let meta = versioned_meta("index", index, id, lsn, true);
            let text = serde_json::to_string(&doc).expect("a JSON map serializes");
            // Unchanged TOAST columns were not sent: they are taken from the
            // stored document before the (still versioned) write.
            let merge = (!env.unchanged_toast.is_empty()).then(|| {
                let columns = env
                    .unchanged_toast
                    .iter()
                    .map(|c| field(c).into_owned())
                    .collect();
                let table = (env.source.schema.to_string(), env.source.table.to_string());
                let key = key.clone();
                Box::new(Merge {
                    columns,
                    doc,
                    table,
                    key,
                })
            });
            return Ok(Action {
                merge,
                via_alias: true,
                ..action(index, id, (lsn, seq), origin, meta, Some(text))
            });
        }
        _ => return Err(format!("op {:?} without an after image", env.op)),
    };
    Ok(Action {
        via_alias: true,
        ..action(index, id, (lsn, seq), origin, meta, doc)
    })
}

/// A mirror action.
fn action(
    index: &str,
    id: &str,
    at: Position,
    origin: usize,
    meta: String,
    doc: Option<String>,
) -> Action {
    Action {
        index: index.to_owned(),
        meta,
        doc,
        origin,
        id: id.to_owned(),
        at,
        lane: lane_of(index, id),
        ..Action::default()
    }
}

/// The metadata line of `action` on one document, versioned by commit LSN
/// (`external_gte`: the changes of one transaction share a version);
/// `via_alias`: refused unless `index` is an alias.
fn versioned_meta(action: &str, index: &str, id: &str, lsn: u64, via_alias: bool) -> String {
    let mut meta =
        json!({"_index": index, "_id": id, "version": lsn, "version_type": "external_gte"});
    if via_alias {
        meta[REQUIRE_ALIAS] = json!(true);
    }
    json!({ action: meta }).to_string()
}

/// The history index entry of a change: the whole envelope with `@timestamp`
/// (the commit time) and the row `key`, one document per change.
fn history_action(
    env: &ReadEnvelope,
    index: &str,
    key: Map<String, Value>,
    origin: usize,
) -> Action {
    let history = format!("{index}_history");
    let hid = format!("{}-{}", env.source.commit_lsn, env.source.seq);
    let mut doc = match serde_json::to_value(env) {
        Ok(Value::Object(doc)) => doc,
        _ => Map::new(),
    };
    doc.insert("@timestamp".into(), json!(env.source.ts_ms));
    doc.insert("key".into(), Value::Object(key));
    let meta = json!({"index": {"_index": history, "_id": hid}}).to_string();
    let lane = lane_of(&history, &hid);
    Action {
        index: history,
        meta,
        doc: Some(Value::Object(doc).to_string()),
        origin,
        id: hid,
        at: (env.source.commit_lsn, env.source.seq),
        history: true,
        lane,
        ..Action::default()
    }
}

/// A stable hash of a document's index and id.
fn lane_of(index: &str, id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (index, id).hash(&mut h);
    h.finish()
}

/// The NDJSON body of a bulk request.
pub fn render(actions: &[Action]) -> String {
    let mut body = String::with_capacity(actions.iter().map(Action::len).sum());
    for a in actions {
        body.push_str(&a.meta);
        body.push('\n');
        if let Some(d) = &a.doc {
            body.push_str(d);
            body.push('\n');
        }
    }
    body
}

/// What happened to one bulk item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Written (or a delete of an absent document).
    Done,
    /// 409: an equal or newer version is already there — also done.
    Conflict,
    /// 429 or 5xx: try again.
    Retry(String),
    /// No status: try again a few times, then dead-letter.
    Unanswered,
    /// Refused for good (mapping, parse errors): dead-letter it.
    Reject(String),
    /// 404: the index or alias does not exist (deleted). A write through
    /// a mirror's alias means the mirror is gone; a delete elsewhere
    /// reached its goal.
    NoIndex(String),
}

/// A `_bulk` response as the sink reads it: each item's status and error.
/// The rest of each item (index, id, version, shards) is skipped, not kept:
/// parsed whole into a [`Value`], a response of 1,000 items cost the sink
/// more CPU than rendering its request.
#[derive(Debug, Deserialize)]
pub struct BulkResponse {
    items: Vec<BulkItem>,
}

/// One item of a `_bulk` response: the result under its action's name.
#[derive(Debug, Deserialize)]
struct BulkItem {
    index: Option<ItemResult>,
    create: Option<ItemResult>,
    update: Option<ItemResult>,
    delete: Option<ItemResult>,
}

/// What Elasticsearch says of one item.
#[derive(Debug, Default, Deserialize)]
struct ItemResult {
    /// [`NO_STATUS`] when absent or not a number.
    #[serde(default, deserialize_with = "lenient_status")]
    status: u64,
    /// Why the item failed; `null` if it did not.
    #[serde(default)]
    error: Value,
}

/// An item's status, or [`NO_STATUS`] for anything but an integer.
fn lenient_status<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    Ok(Value::deserialize(d)?.as_u64().unwrap_or(NO_STATUS))
}

impl BulkItem {
    /// The item's action and result (none if it names no known action).
    fn result(&self) -> (&'static str, Option<&ItemResult>) {
        [
            ("index", &self.index),
            ("create", &self.create),
            ("update", &self.update),
            ("delete", &self.delete),
        ]
        .into_iter()
        .find_map(|(action, r)| r.as_ref().map(|r| (action, Some(r))))
        .unwrap_or(("", None))
    }
}

/// Classify every item of a `_bulk` response with `n` actions.
pub fn outcomes(resp: &BulkResponse, n: usize) -> Result<Vec<Outcome>, String> {
    let items = &resp.items;
    if items.len() != n {
        return Err(format!(
            "bulk response has {} items for {n} actions",
            items.len()
        ));
    }
    let unanswered = ItemResult::default();
    Ok(items
        .iter()
        .map(|item| {
            let (action, result) = item.result();
            let body = result.unwrap_or(&unanswered);
            let reason = || body.error.to_string();
            let kind = &body.error["type"];
            match body.status {
                200..=299 => Outcome::Done,
                _ if BLOCKED.iter().any(|b| kind == *b) => Outcome::Retry(reason()),
                NOT_FOUND if kind == INDEX_NOT_FOUND => Outcome::NoIndex(reason()),
                NOT_FOUND if action == "delete" => Outcome::Done,
                CONFLICT => Outcome::Conflict,
                NO_STATUS => Outcome::Unanswered,
                TOO_MANY_REQUESTS | 500..=599 => Outcome::Retry(reason()),
                _ => Outcome::Reject(reason()),
            }
        })
        .collect())
}

/// Settings and mappings of the truncate floors index.
pub fn floors_index_body(cfg: &EsConfig) -> Value {
    json!({
        "settings": {"index": {"number_of_shards": 1, "number_of_replicas": cfg.number_of_replicas}},
        "mappings": {"properties": {
            "index": {"type": "keyword"}, "lsn": {"type": "long"}, "seq": {"type": "long"}}}
    })
}

/// Index settings and mappings from the table's column types (`pgcdc.types` header).
pub fn index_body(cfg: &EsConfig, types: Option<&str>, history: bool) -> Value {
    let settings = json!({"index": {
        "gc_deletes": cfg.gc_deletes,
        "number_of_shards": cfg.number_of_shards,
        "number_of_replicas": cfg.number_of_replicas,
    }});
    if history {
        let mut props = history_properties(types);
        props.insert("@timestamp".into(), json!({"type": "date"}));
        props.insert("op".into(), json!({"type": "keyword"}));
        let settings = with_fields_limit(settings, &props);
        let mappings = json!({"date_detection": false, "properties": props});
        return json!({"settings": settings, "mappings": mappings});
    }
    let mut props: Map<String, Value> = column_mappings(types)
        .into_iter()
        .map(|(c, mapping)| (field(&c).into_owned(), mapping))
        .collect();
    props.insert(
        "_cdc".into(),
        json!({"properties": {"op": {"type": "keyword"}, "lsn": {"type": "long"}, "seq": {"type": "long"}, "ts_ms": {"type": "date"}, "xid": {"type": "long"}}}),
    );
    let settings = with_fields_limit(settings, &props);
    let meta = json!({"created_by": super::mapping::CREATED_BY});
    json!({"settings": settings, "mappings": {"_meta": meta, "properties": props}})
}

/// Elasticsearch's default `index.mapping.total_fields.limit`.
const FIELDS_LIMIT_DEFAULT: usize = 1000;
/// Room left under the limit for columns added later (their mapping
/// raises it again when it would not fit).
const FIELDS_ROOM: usize = 200;

/// The fields a mapping's `properties` count towards the total fields
/// limit: each property, its multi-fields and an object's properties.
fn field_count(props: &Map<String, Value>) -> usize {
    props
        .values()
        .map(|p| {
            let nested = |k: &str| p[k].as_object().map_or(0, field_count);
            1 + nested("fields") + nested("properties")
        })
        .sum()
}

/// The total fields limit an index with `props` needs (a wide table: more
/// than Elasticsearch's default leaves room for), if above the default.
pub fn fields_limit(props: &Map<String, Value>) -> Option<usize> {
    let needed = field_count(props) + FIELDS_ROOM;
    (needed > FIELDS_LIMIT_DEFAULT).then_some(needed)
}

/// The `index.mapping` settings of an index creation `body` (a raised
/// total fields limit), to apply before mapping added columns; `None`
/// when the default fits.
pub fn mapping_settings(body: &Value) -> Option<Value> {
    let mapping = &body["settings"]["index"]["mapping"];
    (!mapping.is_null()).then(|| json!({"index": {"mapping": mapping}}))
}

/// `settings` with the total fields limit `props` need.
fn with_fields_limit(mut settings: Value, props: &Map<String, Value>) -> Value {
    if let Some(limit) = fields_limit(props) {
        settings["index"]["mapping"] = json!({"total_fields": {"limit": limit}});
    }
    settings
}

/// The mapping of each column of a `pgcdc.types` text.
fn column_mappings(types: Option<&str>) -> Map<String, Value> {
    let columns: Map<String, Value> = types
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or_default();
    columns
        .iter()
        .map(|(c, t)| (c.clone(), field_mapping(t.as_str().unwrap_or(""))))
        .collect()
}

/// A history index's `before`, `after` and `key`, mapped by the column
/// types like a mirror; a column not mapped yet is kept in `_source`
/// without being guessed at (no dynamic mapping that a later value of
/// another shape would be refused by).
fn history_properties(types: Option<&str>) -> Map<String, Value> {
    let row = json!({"type": "object", "dynamic": false, "properties": column_mappings(types)});
    ["before", "after", "key"]
        .into_iter()
        .map(|f| (f.to_owned(), row.clone()))
        .collect()
}

/// The mapping of one PostgreSQL type (array types map like their element).
pub fn field_mapping(pg_type: &str) -> Value {
    let t = pg_type.strip_prefix('_').unwrap_or(pg_type);
    let number = |ty: &str| json!({"type": ty, "ignore_malformed": true});
    match t {
        "int2" | "int4" => number("integer"),
        "int8" | "oid" | "xid" => number("long"),
        "float4" => number("float"),
        "float8" | "numeric" | "money" => number("double"),
        "bool" => json!({"type": "boolean"}),
        "timestamptz" | "timestamp" | "date" => json!({"type": "date", "ignore_malformed": true}),
        "text" | "varchar" | "bpchar" | "name" | "char" | "xml" => {
            json!({"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": TEXT_KEYWORD_MAX}}})
        }
        "bytea" => json!({"type": "binary"}),
        // Objects of any shape: kept in `_source`, not indexed.
        "json" | "jsonb" | "record" | "hstore" => json!({"type": "object", "enabled": false}),
        _ => json!({"type": "keyword", "ignore_above": KEYWORD_MAX}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(history: bool) -> EsConfig {
        EsConfig {
            history,
            ..Default::default()
        }
    }

    fn envelope(op: &str, after: Value) -> Vec<u8> {
        json!({"before": null, "after": after, "op": op, "ts_ms": 1,
               "source": {"schema": "public", "table": "users", "commit_lsn": 500, "seq": 2, "ts_ms": 9, "txId": 41}})
        .to_string()
        .into_bytes()
    }

    fn lines(p: Planned) -> Vec<(Value, Option<Value>)> {
        let Planned::Actions(a) = p else {
            panic!("{p:?}")
        };
        a.iter()
            .map(|a| {
                (
                    serde_json::from_str(&a.meta).unwrap(),
                    a.doc.as_ref().map(|d| serde_json::from_str(d).unwrap()),
                )
            })
            .collect()
    }

    #[test]
    fn upserts_are_versioned_by_commit_lsn() {
        let p = plan(
            &cfg(false),
            Some(br#"{"id":7}"#),
            Some(&envelope("u", json!({"id": 7, "n": "x"}))),
            0,
        );
        let l = lines(p);
        assert_eq!(
            l[0].0,
            json!({"index": {"_index": "cdc_public_users", "_id": "7", "version": 500, "version_type": "external_gte", "require_alias": true}})
        );
        assert_eq!(
            l[0].1,
            Some(
                json!({"id": 7, "n": "x", "_cdc": {"op": "u", "lsn": 500, "seq": 2, "ts_ms": 9, "xid": 41}})
            )
        );
    }

    #[test]
    fn columns_named_like_reserved_fields_are_written_under_shifted_fields() {
        let row = json!({"id": 7, "_id": "m7", "_cdc": "mine", "_source": "crm"});
        let l = lines(plan(
            &cfg(false),
            Some(br#"{"id":7}"#),
            Some(&envelope("u", row)),
            0,
        ));
        assert_eq!(
            l[0].1,
            Some(
                json!({"id": 7, "_id_": "m7", "_cdc_": "mine", "_source_": "crm", "_cdc": {"op": "u", "lsn": 500, "seq": 2, "ts_ms": 9, "xid": 41}})
            )
        );
        let body = index_body(&cfg(false), Some(r#"{"id":"int4","_id":"text"}"#), false);
        let p = &body["mappings"]["properties"];
        assert_eq!(p["_id_"]["fields"]["keyword"]["type"], json!("keyword"));
        assert!(p.get("_id").is_none(), "{p}");
    }

    #[test]
    fn a_write_to_a_generation_being_filled_goes_through_its_writer_alias() {
        let Planned::Actions(a) = plan(
            &cfg(false),
            Some(br#"{"id":7}"#),
            Some(&envelope("u", json!({"id": 7, "n": "x"}))),
            0,
        ) else {
            panic!("an update plans actions");
        };
        let copy = a[0].to_filling("cdc_public_users~2");
        assert!(copy.filling && !copy.via_alias && copy.also.is_none());
        let meta: Value = serde_json::from_str(&copy.meta).unwrap();
        assert_eq!(
            meta,
            json!({"index": {"_index": "cdc_public_users~2~w", "_id": "7", "version": 500, "version_type": "external_gte", "require_alias": true}})
        );
        assert_eq!(
            (copy.index.as_str(), &copy.doc),
            ("cdc_public_users~2", &a[0].doc)
        );
    }

    #[test]
    fn deletes_are_versioned_and_history_is_appended() {
        let l = lines(plan(
            &cfg(true),
            Some(br#"{"a":1,"b":"x"}"#),
            Some(&envelope("d", Value::Null)),
            3,
        ));
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].0["delete"]["_id"], json!("[1,\"x\"]"));
        assert_eq!(l[0].0["delete"]["version"], json!(500));
        assert_eq!(l[0].0["delete"]["require_alias"], json!(true));
        assert_eq!(
            l[1].0,
            json!({"index": {"_index": "cdc_public_users_history", "_id": "500-2"}})
        );
        assert_eq!(l[1].1.as_ref().unwrap()["@timestamp"], json!(9));
    }

    #[test]
    fn unchanged_toast_merges_instead_of_replacing() {
        let mut env: Value = serde_json::from_slice(&envelope("u", json!({"id": 1}))).unwrap();
        env["unchanged_toast"] = json!(["blob"]);
        let l = lines(plan(
            &cfg(false),
            Some(br#"{"id":1}"#),
            Some(env.to_string().as_bytes()),
            0,
        ));
        assert_eq!(l[0].0["index"]["version"], json!(500), "versioned");
        let Planned::Actions(a) = plan(
            &cfg(false),
            Some(br#"{"id":1}"#),
            Some(env.to_string().as_bytes()),
            0,
        ) else {
            panic!("no actions");
        };
        assert_eq!(a[0].merge.as_ref().unwrap().columns, ["blob"]);
    }

    #[test]
    fn tombstones_truncates_and_poison() {
        assert_eq!(plan(&cfg(false), Some(b"{}"), None, 0), Planned::Skip);
        let t = plan(&cfg(false), None, Some(&envelope("t", Value::Null)), 0);
        assert_eq!(
            t,
            Planned::Truncate {
                index: "cdc_public_users".into(),
                at: (500, 2)
            }
        );
        assert!(matches!(
            plan(&cfg(false), None, Some(b"nope"), 0),
            Planned::Poison(_)
        ));
        assert!(matches!(
            plan(&cfg(false), None, Some(b"{\"op\":\"c\"}"), 0),
            Planned::Poison(_)
        ));
        assert!(matches!(
            plan(&cfg(false), None, Some(&envelope("c", json!({"id": 1}))), 0),
            Planned::Poison(_)
        ));
        // An upsert without its row, or an unknown op, with or without history.
        for (op, history) in [("u", false), ("c", true), ("x", false), ("x", true)] {
            let p = plan(
                &cfg(history),
                Some(br#"{"id":7}"#),
                Some(&envelope(op, Value::Null)),
                0,
            );
            assert_eq!(
                p,
                Planned::Poison(format!("op {op:?} without an after image")),
                "{op} {history}"
            );
        }
    }

    #[test]
    fn bulk_items_are_classified() {
        let resp = json!({"items": [
            {"index": {"status": 201}}, {"index": {"status": 409}}, {"index": {"status": 429, "error": "busy"}},
            {"delete": {"status": 404}}, {"index": {"status": 400, "error": {"type": "mapper_parsing_exception"}}},
            {"index": {"status": 503}},
            {"index": {"status": 404, "error": {"type": "index_not_found_exception"}}},
            {"index": {"status": 403, "error": {"type": "cluster_block_exception"}}},
            {"index": {"status": 400, "error": {"type": "index_closed_exception"}}}]});
        let resp: BulkResponse = serde_json::from_value(resp).unwrap();
        let o = outcomes(&resp, 9).unwrap();
        assert_eq!(o[0], Outcome::Done);
        assert_eq!(o[1], Outcome::Conflict);
        assert!(matches!(o[2], Outcome::Retry(_)));
        assert_eq!(o[3], Outcome::Done);
        assert!(matches!(&o[4], Outcome::Reject(r) if r.contains("mapper_parsing")));
        assert!(matches!(o[5], Outcome::Retry(_)));
        assert!(matches!(&o[6], Outcome::NoIndex(r) if r.contains("index_not_found")));
        assert!(matches!(&o[7], Outcome::Retry(r) if r.contains("cluster_block")));
        assert!(matches!(&o[8], Outcome::Retry(r) if r.contains("index_closed")));
        assert!(outcomes(&resp, 5).is_err());
    }

    #[test]
    fn bulk_items_without_a_numeric_status_are_unanswered() {
        let resp = json!({"took": 3, "errors": false, "items": [
            {"index": {"_index": "cdc_public_users~1", "_id": "7", "_version": 500, "result": "created",
                       "_shards": {"total": 1, "successful": 1, "failed": 0}, "_seq_no": 0, "_primary_term": 1, "status": 201}},
            {"index": {"_id": "8"}}, {"index": {"status": "201"}}, {"frobnicate": {"status": 201}}, {}]});
        let resp: BulkResponse = serde_json::from_value(resp).unwrap();
        let o = outcomes(&resp, 5).unwrap();
        assert_eq!(o[0], Outcome::Done);
        assert!(o[1..].iter().all(|o| *o == Outcome::Unanswered), "{o:?}");
        let no_items = serde_json::from_value::<BulkResponse>(json!({"took": 3, "errors": false}));
        assert!(no_items.is_err());
    }

    #[test]
    fn mappings_follow_column_types() {
        let body = index_body(
            &cfg(false),
            Some(r#"{"id":"int4","name":"text","at":"timestamptz","tags":"_text"}"#),
            false,
        );
        let p = &body["mappings"]["properties"];
        assert_eq!(p["id"]["type"], json!("integer"));
        assert_eq!(p["name"]["fields"]["keyword"]["type"], json!("keyword"));
        assert_eq!(p["at"]["type"], json!("date"));
        assert_eq!(p["tags"]["type"], json!("text"));
        assert_eq!(body["settings"]["index"]["gc_deletes"], json!("30d"));
        assert!(
            body["settings"]["index"].get("mapping").is_none(),
            "the default fits"
        );
        let wide: Map<String, Value> = (0..500).map(|i| (format!("c{i}"), json!("text"))).collect();
        let wide = Value::Object(wide).to_string();
        let body = index_body(&cfg(false), Some(&wide), false);
        let limit = &body["settings"]["index"]["mapping"]["total_fields"]["limit"];
        assert_eq!(
            limit,
            &json!(1000 + 6 + FIELDS_ROOM),
            "500 texts and keywords, _cdc and its 5"
        );
        let history = index_body(&cfg(false), Some(r#"{"id":"int4","j":"jsonb"}"#), true);
        let m = &history["mappings"];
        assert_eq!(m["date_detection"], json!(false));
        for row in ["before", "after", "key"] {
            assert_eq!(m["properties"][row]["dynamic"], json!(false), "{row}");
            assert_eq!(
                m["properties"][row]["properties"]["id"]["type"],
                json!("integer")
            );
            assert_eq!(
                m["properties"][row]["properties"]["j"]["enabled"],
                json!(false)
            );
        }
    }

    #[test]
    fn render_is_ndjson() {
        let a = Action {
            index: "i".into(),
            meta: "{\"delete\":{}}".into(),
            doc: None,
            origin: 0,
            id: String::new(),
            at: (0, 0),
            ..Action::default()
        };
        let b = Action {
            index: "i".into(),
            meta: "{\"index\":{}}".into(),
            doc: Some("{}".into()),
            origin: 1,
            id: String::new(),
            at: (0, 0),
            ..Action::default()
        };
        assert_eq!(render(&[a, b]), "{\"delete\":{}}\n{\"index\":{}}\n{}\n");
    }
}
