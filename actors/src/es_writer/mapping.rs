//! Mirror indices that already exist (new columns' mappings are in
//! [`generation`](super::generation) and [`alias`](super::alias)).
//!
//! - A mirror index that already exists is checked once per run: one whose
//!   `index.gc_deletes` is shorter than `elasticsearch.gc_deletes` (60 s when
//!   unset) would let a replay bring deleted rows back, so the sink refuses
//!   it, naming the setting to change; one pgcdc did not create (no
//!   `_meta.created_by = "pgcdc"`) is accepted with a warning.

use serde_json::{json, Value};

/// The `_meta` marker of the indices pgcdc creates.
pub const CREATED_BY: &str = "pgcdc";
/// Elasticsearch's `index.gc_deletes` when an index does not set it.
const GC_DELETES_DEFAULT_SECS: u64 = 60;

/// Seconds in an Elasticsearch time value (`30d`, `12h`, `60s`, `500ms`).
pub fn duration_secs(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = text.split_at(split);
    let n: u64 = n.parse().ok()?;
    let secs = match unit {
        "d" => n.checked_mul(86_400)?,
        "h" => n.checked_mul(3_600)?,
        "m" => n.checked_mul(60)?,
        "s" => n,
        "ms" => n / 1_000,
        "micros" => n / 1_000_000,
        "nanos" => n / 1_000_000_000,
        _ => return None,
    };
    Some(secs)
}

/// Check an existing mirror index's `_settings` and `_mapping` answers
/// against `gc_deletes` (the configured value): its mapped columns, or why
/// it cannot be used.
pub fn check_existing(
    index: &str,
    settings: &Value,
    mapping: &Value,
    gc_deletes: &str,
) -> Result<(), String> {
    let want = duration_secs(gc_deletes).unwrap_or(0);
    let have = settings[index]["settings"]["index"]["gc_deletes"]
        .as_str()
        .map_or(Some(GC_DELETES_DEFAULT_SECS), duration_secs)
        .unwrap_or(0);
    if have < want {
        return Err(format!(
            "mirror index {index} keeps deleted documents' versions for {have} s (index.gc_deletes), less than elasticsearch.gc_deletes = {gc_deletes}: a replay could bring deleted rows back. Run PUT {index}/_settings {{\"index.gc_deletes\": \"{gc_deletes}\"}} (or delete the index to let pgcdc create it)"
        ));
    }
    let mappings = &mapping[index]["mappings"];
    if mappings["_meta"]["created_by"] != json!(CREATED_BY) {
        tracing::warn!(
            index,
            "mirror index was not created by pgcdc: its mappings are used as they are"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_values_parse() {
        assert_eq!(duration_secs("30d"), Some(2_592_000));
        assert_eq!(duration_secs("60s"), Some(60));
        assert_eq!(duration_secs("1500ms"), Some(1));
        assert_eq!(duration_secs("2h"), Some(7_200));
        assert_eq!(duration_secs("soon"), None);
        assert_eq!(duration_secs("5y"), None);
    }

    #[test]
    fn an_index_that_forgets_deletes_sooner_is_refused() {
        let settings = |gc: Option<&str>| {
            let mut index = json!({});
            if let Some(gc) = gc {
                index["gc_deletes"] = json!(gc);
            }
            json!({"i": {"settings": {"index": index}}})
        };
        let mapping = json!({"i": {"mappings": {"_meta": {"created_by": "pgcdc"}, "properties": {"id": {"type": "long"}}}}});
        assert!(check_existing("i", &settings(Some("30d")), &mapping, "30d").is_ok());
        let refused = check_existing("i", &settings(None), &mapping, "30d").unwrap_err();
        assert!(refused.contains("PUT i/_settings"), "{refused}");
        assert!(check_existing("i", &settings(Some("1d")), &mapping, "30d").is_err());
        assert!(check_existing("i", &settings(None), &mapping, "60s").is_ok());
    }
}
