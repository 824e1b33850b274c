//! Reading a mirror index: documents by id (`_mget`, real-time) and every
//! document (a scroll in `_doc` order). The index is read by its name,
//! which may be an alias.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use crate::es_writer::naming::path_segment;
use crate::es_writer::{EsClient, EsError};

/// How long a scroll stays open between two pages (pgcdc cannot clear one:
/// it ends on its own this long after its last page).
const SCROLL_KEEP: &str = "2m";

/// One of `max` slices of a scroll (`id < max`, `max ≥ 2`): the documents
/// whose `_id` hashes to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slice {
    /// Which slice.
    pub id: usize,
    /// Of how many.
    pub max: usize,
}

/// One mirror index of one cluster.
pub(crate) struct Mirror<'a> {
    /// The cluster.
    pub es: &'a EsClient,
    /// The index (or alias) name, percent-encoded for URL paths.
    pub path: String,
}

impl<'a> Mirror<'a> {
    /// The mirror `index` of `es`.
    pub fn new(es: &'a EsClient, index: &str) -> Self {
        Self {
            es,
            path: path_segment(index),
        }
    }

    /// Make every write so far visible to searches.
    pub async fn refresh(&self) -> Result<(), EsError> {
        let path = format!("{}/_refresh", self.path);
        self.es.post_json(&path, &json!({})).await.map(drop)
    }

    /// The documents of `ids` that exist, by id (`_mget` reads the latest
    /// version, refreshed or not).
    pub async fn get(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, Map<String, Value>>, EsError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let path = format!("{}/_mget", self.path);
        let answer = self.es.post_json(&path, &json!({ "ids": ids })).await?;
        let docs = match answer.map(|mut a| a["docs"].take()) {
            Some(Value::Array(docs)) => docs,
            _ => Vec::new(),
        };
        Ok(docs
            .into_iter()
            .filter(|d| d["found"].as_bool() == Some(true))
            .filter_map(|mut d| match d["_source"].take() {
                Value::Object(source) => Some((d["_id"].as_str()?.to_owned(), source)),
                _ => None,
            })
            .collect())
    }

    /// A page of the ids of `size` documents (of `slice`, if given; no
    /// sources) and the scroll to read the next one from: the first page
    /// with `scroll = None`. Empty at the end (or if the index does not
    /// exist).
    pub async fn page(
        &self,
        scroll: Option<&str>,
        size: usize,
        slice: Option<Slice>,
    ) -> Result<(Vec<String>, Option<String>), EsError> {
        let (hits, next) = self.hits(scroll, size, slice, false).await?;
        Ok((hits.into_iter().map(|(id, _)| id).collect(), next))
    }

    /// A page of `size` documents (ids and, if `sources`, their sources;
    /// else empty objects) and the scroll to read the next one from, as
    /// [`Self::page`]. Scrolling in `_doc` order needs no sort on `_id`,
    /// which Elasticsearch 8 refuses by default.
    pub async fn hits(
        &self,
        scroll: Option<&str>,
        size: usize,
        slice: Option<Slice>,
        sources: bool,
    ) -> Result<(Vec<(String, Map<String, Value>)>, Option<String>), EsError> {
        let answer = match scroll {
            Some(id) => {
                let body = json!({ "scroll": SCROLL_KEEP, "scroll_id": id });
                self.es.post_json("_search/scroll", &body).await?
            }
            None => {
                let mut body = json!({
                    "size": size,
                    "sort": ["_doc"],
                    "_source": sources,
                    "query": {"match_all": {}},
                });
                if let Some(s) = slice {
                    body["slice"] = json!({"id": s.id, "max": s.max});
                }
                let path = format!("{}/_search?scroll={SCROLL_KEEP}", self.path);
                self.es.post_json(&path, &body).await?
            }
        };
        let Some(mut answer) = answer else {
            return Ok((Vec::new(), None));
        };
        let next = answer["_scroll_id"].as_str().map(str::to_owned);
        let hits = match answer["hits"]["hits"].take() {
            Value::Array(hits) => hits,
            _ => Vec::new(),
        };
        let hits = hits
            .into_iter()
            .filter_map(|mut h| {
                let source = match h["_source"].take() {
                    Value::Object(source) => source,
                    _ => Map::new(),
                };
                Some((h["_id"].as_str()?.to_owned(), source))
            })
            .collect();
        Ok((hits, next))
    }
}
