//! What a verification found for one table, counted and with examples.

use std::fmt::Write as _;

use serde::Serialize;

use super::compare::Kind;
use super::fence::Fence;
use super::kafka::KafkaLeg;
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
    /// Count `finding`, kept if among the first [`SHOWN`].
    pub(crate) fn add(&mut self, finding: &Finding) {
        self.count += 1;
        if self.first.len() < SHOWN {
            self.first.push(finding.clone());
        }
    }

    /// Count `later`'s findings after this one's.
    fn absorb(&mut self, later: Tally) {
        self.count += later.count;
        let room = SHOWN.saturating_sub(self.first.len());
        self.first.extend(later.first.into_iter().take(room));
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
    /// Differences that could not be confirmed: the pipeline was behind
    /// by more than the fence timeout (see `fence`).
    pub unconfirmed: Tally,
    /// The fraction of key ranges (and mirror slices) compared, if sampled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample: Option<f64>,
    /// The key ranges a sampled run compared: (after, up to) each, `None`
    /// for the table's start or end.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sampled_ranges: Vec<(Option<KeyText>, Option<KeyText>)>,
    /// How the last wait for the pipeline ended (`None`: nothing to re-check).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fence: Option<Fence>,
    /// Seconds the verification took.
    pub elapsed_secs: f64,
    /// Rows compared per second.
    pub rows_per_sec: f64,
    /// The Kafka leg (`--kafka`): the change topic against the table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaLeg>,
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
            Kind::Unconfirmed => return self.unconfirmed.add(&finding),
        }
        self.drift.push((kind, finding));
    }

    /// Add the counts and findings of `part` (of the same table, found after
    /// this report's).
    pub(crate) fn absorb(&mut self, part: TableReport) {
        self.compared += part.compared;
        self.documents += part.documents;
        self.missing.absorb(part.missing);
        self.extra.absorb(part.extra);
        self.stale.absorb(part.stale);
        self.newer.absorb(part.newer);
        self.unconfirmed.absorb(part.unconfirmed);
        self.drift.extend(part.drift);
    }

    /// Whether the mirror drifted from the table.
    pub fn drifted(&self) -> bool {
        self.missing.count + self.extra.count + self.stale.count > 0
            || self.kafka.as_ref().is_some_and(KafkaLeg::drifted)
    }

    /// Whether some differences could not be confirmed (the pipeline was
    /// too far behind): the table is not known to be equal.
    pub fn unconfirmed(&self) -> bool {
        self.unconfirmed.count > 0 || self.kafka.as_ref().is_some_and(|k| k.unconfirmed.count > 0)
    }

    /// `DRIFT`, `UNCONFIRMED` or `equal`.
    fn verdict(&self) -> &'static str {
        match (self.drifted(), self.unconfirmed()) {
            (true, _) => "DRIFT",
            (false, true) => "UNCONFIRMED",
            (false, false) => "equal",
        }
    }

    /// The report as text, a few lines.
    pub fn text(&self) -> String {
        let mut out = format!(
            "{} {} (index {}, snapshot {}): {} rows compared, {} documents checked; missing {}, extra {}, stale {}, newer {}, unconfirmed {}; {:.1}s, {:.0} rows/s",
            self.verdict(),
            self.table,
            self.index,
            self.snapshot_lsn,
            self.compared,
            self.documents,
            self.missing.count,
            self.extra.count,
            self.stale.count,
            self.newer.count,
            self.unconfirmed.count,
            self.elapsed_secs,
            self.rows_per_sec,
        );
        if let Some(s) = self.sample {
            let _ = write!(
                out,
                "\n  sampled: {} key ranges and {:.0}% of the mirror (slices picked at random)",
                self.sampled_ranges.len(),
                s * 100.0
            );
        }
        if let Some(Fence::TimedOut(behind)) = &self.fence {
            let _ = write!(
                out,
                "\n  {}: {} differences could not be confirmed",
                behind.text(),
                self.unconfirmed.count
            );
        }
        for (name, tally) in [
            ("missing", &self.missing),
            ("extra", &self.extra),
            ("stale", &self.stale),
            ("unconfirmed", &self.unconfirmed),
        ] {
            for f in &tally.first {
                let _ = write!(out, "\n  {name} {}", f.id);
                if !f.columns.is_empty() {
                    let _ = write!(out, " (columns {})", f.columns.join(", "));
                }
            }
        }
        if let Some(k) = &self.kafka {
            let _ = write!(out, "\n  {}", k.text());
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

    #[test]
    fn unconfirmed_differences_are_neither_drift_nor_equal() {
        let mut r = TableReport::default();
        r.add(Kind::Unconfirmed, finding("7"));
        r.fence = Some(Fence::TimedOut(crate::verify::Behind {
            stage: "sink",
            timeout_secs: 60,
            behind: 12,
            unit: "records",
        }));
        assert!(!r.drifted() && r.unconfirmed());
        assert!(r.drift.is_empty(), "not repaired as drift");
        let text = r.text();
        assert!(text.starts_with("UNCONFIRMED"), "{text}");
        assert!(
            text.contains("verify.fence_timeout_secs = 60: the sink was 12 records behind"),
            "{text}"
        );
        let json = serde_json::to_value(&r).unwrap_or_default();
        assert_eq!(json["fence"]["timed_out"]["behind"], 12);
        assert_eq!(json["unconfirmed"]["first"][0]["id"], "7");
    }
}
