//! Reading a mirror index: documents by id (`_mget`, real-time) and every
//! document (a scroll in `_doc` order). The index is read by its name,
//! which may be an alias.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use super::compare::CDC_FIELD;
use crate::es_writer::naming::path_segment;
use crate::es_writer::{EsClient, EsError};

/// How long a scroll stays open between two pages.
const SCROLL_KEEP: &str = "5m";

/// A document: its `_id` and `_source`.
pub(crate) type Doc = (String, Map<String, Value>);

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
        let docs = answer
            .as_ref()
            .and_then(|a| a["docs"].as_array())
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        Ok(docs
            .iter()
            .filter(|d| d["found"].as_bool() == Some(true))
            .filter_map(|d| {
                let source = d["_source"].as_object()?.clone();
                Some((d["_id"].as_str()?.to_owned(), source))
            })
            .collect())
    }

    /// A page of `size` documents with only the `fields` and `_cdc` of their
    /// sources, and the scroll to read the next one from: the first page
    /// with `scroll = None`. Empty at the end (or if the index does not
    /// exist). Scrolling in `_doc` order needs no sort on `_id`, which
    /// Elasticsearch 8 refuses by default.
    pub async fn page(
        &self,
        scroll: Option<&str>,
        size: usize,
        fields: &[&str],
    ) -> Result<(Vec<Doc>, Option<String>), EsError> {
        let answer = match scroll {
            Some(id) => {
                let body = json!({ "scroll": SCROLL_KEEP, "scroll_id": id });
                self.es.post_json("_search/scroll", &body).await?
            }
            None => {
                let mut includes: Vec<&str> = fields.to_vec();
                includes.push(CDC_FIELD);
                let body = json!({
                    "size": size,
                    "sort": ["_doc"],
                    "_source": includes,
                    "query": {"match_all": {}},
                });
                let path = format!("{}/_search?scroll={SCROLL_KEEP}", self.path);
                self.es.post_json(&path, &body).await?
            }
        };
        let next = answer
            .as_ref()
            .and_then(|a| a["_scroll_id"].as_str())
            .map(str::to_owned);
        let hits = answer
            .as_ref()
            .and_then(|a| a["hits"]["hits"].as_array())
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let docs = hits
            .iter()
            .filter_map(|h| {
                let source = h["_source"].as_object().cloned().unwrap_or_default();
                Some((h["_id"].as_str()?.to_owned(), source))
            })
            .collect();
        Ok((docs, next))
    }
}
