//! What a verification found for one table, counted and with examples.

use std::fmt::Write as _;

use serde::Serialize;

use super::compare::Kind;
use super::fence::Fence;
use crate::checkpoint::KeyText;

/// Keys of each kind shown in a report.
pub const SHOWN: usize = 10;

/// One key and what was found for it.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// The mirror document id.
    pub id: String,
    /// The columns that differ (stale only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<String>,
    /// The key as text, to copy it again; `None` when it cannot be read
    /// back from an extra document.
    #[serde(skip)]
    pub key: Option<KeyText>,
}

/// The count of one kind and its first [`SHOWN`] keys.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Tally {
    /// How many.
    pub count: u64,
    /// The first ones.
    pub first: Vec<Finding>,
}

impl Tally {
    fn add(&mut self, finding: &Finding) {
        self.count += 1;
        if self.first.len() < SHOWN {
            self.first.push(finding.clone());
        }
    }
}

/// One table's verification.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TableReport {
    /// `schema.table`.
    pub table: String,
    /// The mirror index (or alias).
    pub index: String,
    /// The WAL position of the snapshot the table was read in.
    pub snapshot_lsn: String,
    /// Rows of the table compared with their documents.
    pub compared: u64,
    /// Documents of the mirror checked against the table (none when sampling).
    pub documents: u64,
    /// Rows without a document.
    pub missing: Tally,
    /// Documents without a row.
    pub extra: Tally,
    /// Rows whose document differs.
    pub stale: Tally,
    /// Documents holding changes newer than the snapshot (not drift).
    pub newer: Tally,
    /// The fraction of key ranges compared, if sampled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample: Option<f64>,
    /// How the last wait for the pipeline ended (`None`: nothing to re-check).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fence: Option<Fence>,
    /// Seconds the verification took.
    pub elapsed_secs: f64,
    /// Rows compared per second.
    pub rows_per_sec: f64,
    /// Every drifted key (for a repair).
    #[serde(skip)]
    pub drift: Vec<(Kind, Finding)>,
}

impl TableReport {
    /// Count a finding of `kind`.
    pub(crate) fn add(&mut self, kind: Kind, finding: Finding) {
        match kind {
            Kind::Missing => self.missing.add(&finding),
            Kind::Extra => self.extra.add(&finding),
            Kind::Stale => self.stale.add(&finding),
            Kind::Newer => return self.newer.add(&finding),
        }
        self.drift.push((kind, finding));
    }

    /// Whether the mirror drifted from the table.
    pub fn drifted(&self) -> bool {
        self.missing.count + self.extra.count + self.stale.count > 0
    }

    /// The report as text, a few lines.
    pub fn text(&self) -> String {
        let verdict = if self.drifted() { "DRIFT" } else { "equal" };
        let mut out = format!(
            "{verdict} {} (index {}, snapshot {}): {} rows compared, {} documents checked; missing {}, extra {}, stale {}, newer {}; {:.1}s, {:.0} rows/s",
            self.table,
            self.index,
            self.snapshot_lsn,
            self.compared,
            self.documents,
            self.missing.count,
            self.extra.count,
            self.stale.count,
            self.newer.count,
            self.elapsed_secs,
            self.rows_per_sec,
        );
        if let Some(s) = self.sample {
            let _ = write!(
                out,
                "\n  sampled {:.0}% of the key ranges; extra documents are not looked for",
                s * 100.0
            );
        }
        if let Some(Fence::TimedOut(stage)) = &self.fence {
            let _ = write!(out, "\n  the pipeline did not catch up in time (waiting for the {stage}): differences may still be in flight");
        }
        for (name, tally) in [
            ("missing", &self.missing),
            ("extra", &self.extra),
            ("stale", &self.stale),
        ] {
            for f in &tally.first {
                let _ = write!(out, "\n  {name} {}", f.id);
                if !f.columns.is_empty() {
                    let _ = write!(out, " (columns {})", f.columns.join(", "));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(id: &str) -> Finding {
        Finding {
            id: id.into(),
            columns: vec!["n".into()],
            key: None,
        }
    }

    #[test]
    fn reports_count_every_finding_and_show_the_first() {
        let mut r = TableReport::default();
        for i in 0..(SHOWN + 3) {
            r.add(Kind::Stale, finding(&i.to_string()));
        }
        r.add(Kind::Newer, finding("x"));
        assert_eq!(
            (r.stale.count, r.stale.first.len()),
            (SHOWN as u64 + 3, SHOWN)
        );
        assert_eq!(r.drift.len(), SHOWN + 3, "newer is not drift");
        assert!(r.drifted());
        let text = r.text();
        assert!(
            text.starts_with("DRIFT") && text.contains("stale 0 (columns n)"),
            "{text}"
        );
        let json = serde_json::to_value(&r).unwrap_or_default();
        assert_eq!(json["stale"]["count"], SHOWN as u64 + 3);
        assert_eq!(json["newer"]["first"][0]["id"], "x");
    }
}
