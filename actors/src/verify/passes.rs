//! The passes of a verification, spread over connections in one snapshot.
//!
//! A full run reads the mirror once ([`Verifier::docs_first`]): one scroll
//! of whole documents, each page's rows looked up by key on the next free
//! connection while the scroll reads on. Documents without a row are
//! extra, different ones stale. The documents that found their row are
//! counted: if they are as many as the table's rows, no row is missing;
//! else the rows pass looks for the missing ones only.
//!
//! A sample (and that search for missing rows) compares rows first
//! ([`Verifier::rows_pass`], `verify.parallelism` key ranges at once, each
//! chunk's documents read by `_mget`) beside a pass over the sampled
//! mirror slices' ids ([`Verifier::docs_pass`]). A worker holds one chunk
//! (or page) at a time: at most `parallelism × chunk_rows` rows and
//! documents. Results are merged in range (slice) order, so the report
//! does not depend on which worker finished first.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Mutex;

use serde_json::{Map, Value};

use super::keys::key_of_doc;
use super::mirror::{Mirror, Slice};
use super::source::Snapshot;
use super::{by_id, compare, note, Apparent, Kind, TableReport, Verifier, VerifyError};
use crate::checkpoint::{KeyRange, KeyText};
use crate::snapshot::shape::Shape;

/// What one range or slice found: its counts and tallies, and the
/// differences to check again.
#[derive(Default)]
pub(super) struct Part {
    /// Counts, newer documents and (unchecked) nothing else.
    pub report: TableReport,
    /// Apparent differences.
    pub apparent: Vec<Apparent>,
}

impl Part {
    /// Add this part to `report` and `apparent`.
    pub fn merge_into(self, report: &mut TableReport, apparent: &mut Vec<Apparent>) {
        report.absorb(self.report);
        apparent.extend(self.apparent);
    }
}

/// Run `work` on every item, each worker (one per connection of `snaps`)
/// taking the next item when done; the parts in item order.
async fn in_parallel<'a, T, F, Fut>(
    snaps: &'a [Snapshot],
    items: Vec<T>,
    work: F,
) -> Result<Vec<Part>, VerifyError>
where
    F: Fn(&'a Snapshot, T) -> Fut,
    Fut: Future<Output = Result<Part, VerifyError>>,
{
    let queue = Mutex::new(items.into_iter().enumerate().collect::<VecDeque<_>>());
    let (queue, work) = (&queue, &work);
    let workers = snaps.iter().map(|snap| async move {
        let mut done = Vec::new();
        // A poisoned queue (a panicked worker) ends this worker too.
        while let Some((i, item)) = queue.lock().ok().and_then(|mut q| q.pop_front()) {
            done.push((i, work(snap, item).await?));
        }
        Ok::<_, VerifyError>(done)
    });
    let mut parts: Vec<(usize, Part)> = futures::future::try_join_all(workers)
        .await?
        .into_iter()
        .flatten()
        .collect();
    parts.sort_by_key(|(i, _)| *i);
    Ok(parts.into_iter().map(|(_, p)| p).collect())
}

impl Verifier {
    /// Every document of the mirror against its row (one scroll with
    /// sources, pages checked on all of `snaps` at once): the differences,
    /// and how many documents found their row.
    pub(super) async fn docs_first(
        &self,
        snaps: &[Snapshot],
        shape: &Shape,
        mirror: &Mirror<'_>,
    ) -> Result<(Part, u64), VerifyError> {
        let size = self.opts.chunk_rows;
        let workers = snaps.len().max(1);
        // Pages read ahead of the lookups: at most one waiting per worker.
        let (tx, rx) = tokio::sync::mpsc::channel(workers);
        let rx = tokio::sync::Mutex::new(rx);
        let read = async move {
            let (mut page, mut scroll) = mirror.hits(None, size, None, true).await?;
            // A scroll ends with an empty page, not with a short one.
            let mut n = 0;
            while !page.is_empty() {
                if tx.send((n, page)).await.is_err() {
                    break;
                }
                n += 1;
                let Some(next) = scroll.take() else { break };
                (page, scroll) = mirror.hits(Some(&next), size, None, true).await?;
            }
            Ok::<_, VerifyError>(())
        };
        let rx = &rx;
        let check = snaps.iter().map(|snap| async move {
            let mut done = Vec::new();
            loop {
                let page = rx.lock().await.recv().await;
                let Some((n, page)) = page else { break };
                let (part, matched) = self.check_documents(snap, shape, page).await?;
                done.push((n, part, matched));
            }
            Ok::<_, VerifyError>(done)
        });
        let ((), parts) = tokio::try_join!(read, futures::future::try_join_all(check))?;
        let mut parts: Vec<_> = parts.into_iter().flatten().collect();
        // In page order, so the report does not depend on which worker was first.
        parts.sort_by_key(|(n, _, _)| *n);
        let mut all = Part::default();
        let mut matched = 0;
        for (_, part, m) in parts {
            part.merge_into(&mut all.report, &mut all.apparent);
            matched += m;
        }
        Ok((all, matched))
    }

    /// One page of whole documents against the rows of their keys: the
    /// differences, and how many documents found their row (by their own id:
    /// a stray id that reads back as an existing key is still extra).
    async fn check_documents(
        &self,
        snap: &Snapshot,
        shape: &Shape,
        page: Vec<(String, Map<String, Value>)>,
    ) -> Result<(Part, u64), VerifyError> {
        let names = shape.key_columns();
        let keys: Vec<Option<KeyText>> = page
            .iter()
            .map(|(id, source)| key_of_doc(id, source, &names))
            .collect();
        let wanted: Vec<KeyText> = keys.iter().flatten().cloned().collect();
        let rows = by_id(snap.lookup(shape, &wanted).await?);
        let mut part = Part::default();
        let mut matched = 0;
        for ((id, doc), key) in page.iter().zip(keys) {
            let row = rows.get(id);
            matched += u64::from(row.is_some());
            let verdict = compare(row, Some(doc), &snap.cut);
            note(&mut part.report, &mut part.apparent, verdict, id, key);
        }
        part.report.documents += page.len() as u64;
        Ok((part, matched))
    }

    /// Every row of `ranges` against its document (`missing_only`: only
    /// rows without a document are noted, the documents having been
    /// compared already).
    pub(super) async fn rows_pass(
        &self,
        snaps: &[Snapshot],
        shape: &Shape,
        mirror: &Mirror<'_>,
        ranges: Vec<KeyRange>,
        missing_only: bool,
    ) -> Result<Vec<Part>, VerifyError> {
        in_parallel(snaps, ranges, |snap, range| {
            self.compare_range(snap, shape, mirror, range, missing_only)
        })
        .await
    }

    /// The rows of one key range, chunk by chunk, against their documents.
    async fn compare_range(
        &self,
        snap: &Snapshot,
        shape: &Shape,
        mirror: &Mirror<'_>,
        mut range: KeyRange,
        missing_only: bool,
    ) -> Result<Part, VerifyError> {
        let limit = self.opts.chunk_rows;
        let mut part = Part::default();
        loop {
            let rows = snap.chunk(shape, &range, limit).await?;
            let Some(last) = rows.last() else { break };
            let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
            let docs = mirror.get(&ids).await?;
            for row in &rows {
                let verdict = compare(Some(&row.after), docs.get(&row.id), &snap.cut);
                if missing_only && !matches!(&verdict, super::Verdict::Differs(Kind::Missing, _)) {
                    continue;
                }
                let key = Some(row.key.clone());
                note(&mut part.report, &mut part.apparent, verdict, &row.id, key);
            }
            part.report.compared += rows.len() as u64;
            if rows.len() < limit {
                break;
            }
            range.after = Some(last.key.clone());
        }
        Ok(part)
    }

    /// Every document of `slices` against the table, for extra ones.
    pub(super) async fn docs_pass(
        &self,
        snaps: &[Snapshot],
        shape: &Shape,
        mirror: &Mirror<'_>,
        slices: Vec<Option<Slice>>,
    ) -> Result<Vec<Part>, VerifyError> {
        in_parallel(snaps, slices, |snap, slice| {
            self.check_slice(snap, shape, mirror, slice)
        })
        .await
    }

    /// The documents of one slice (`None`: the whole mirror), page by page,
    /// each page's keys looked up while the next page is read: a document
    /// without a row is extra (or newer).
    async fn check_slice(
        &self,
        snap: &Snapshot,
        shape: &Shape,
        mirror: &Mirror<'_>,
        slice: Option<Slice>,
    ) -> Result<Part, VerifyError> {
        let size = self.opts.chunk_rows;
        let mut part = Part::default();
        let (mut page, mut scroll) = mirror.page(None, size, slice).await?;
        // A scroll ends with an empty page, not with a short one.
        while !page.is_empty() {
            let next = scroll.take();
            let read_ahead = async {
                match &next {
                    Some(id) => mirror.page(Some(id), size, slice).await.map(Some),
                    None => Ok(None),
                }
            };
            let checked = self.check_page(snap, shape, mirror, &page, &mut part);
            let (checked, read) = tokio::join!(checked, read_ahead);
            checked?;
            (page, scroll) = read?.unwrap_or_default();
        }
        Ok(part)
    }

    /// Look the documents `ids` up in the table; fetch those without a row
    /// (and those whose key only their source holds).
    async fn check_page(
        &self,
        snap: &Snapshot,
        shape: &Shape,
        mirror: &Mirror<'_>,
        ids: &[String],
        part: &mut Part,
    ) -> Result<(), VerifyError> {
        let names = shape.key_columns();
        let none = Map::new();
        let mut keys: Vec<Option<KeyText>> =
            ids.iter().map(|id| key_of_doc(id, &none, &names)).collect();
        let hashed: Vec<String> = ids
            .iter()
            .zip(&keys)
            .filter(|(_, k)| k.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        if !hashed.is_empty() {
            let sources = mirror.get(&hashed).await?;
            for (id, key) in ids.iter().zip(keys.iter_mut()) {
                if let (None, Some(source)) = (&key, sources.get(id)) {
                    *key = key_of_doc(id, source, &names);
                }
            }
        }
        let wanted: Vec<KeyText> = keys.iter().flatten().cloned().collect();
        let found = snap.existing(shape, &wanted).await?;
        let (without, keys): (Vec<String>, Vec<Option<KeyText>>) = ids
            .iter()
            .zip(keys)
            .filter(|(id, _)| !found.contains(*id))
            .map(|(id, k)| (id.clone(), k))
            .unzip();
        // A document deleted since the page was read is not extra.
        let docs = mirror.get(&without).await?;
        for (id, key) in without.iter().zip(keys) {
            if let Some(doc) = docs.get(id) {
                let verdict = compare(None, Some(doc), &snap.cut);
                note(&mut part.report, &mut part.apparent, verdict, id, key);
            }
        }
        part.report.documents += ids.len() as u64;
        Ok(())
    }
}
