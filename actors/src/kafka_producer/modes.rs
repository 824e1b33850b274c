//! Debezium's value modes: `kafka.decimal_handling_mode = "double"` (numeric
//! and money as JSON numbers) and `kafka.time_precision_mode` (date, time and
//! timestamp as epoch numbers), applied to a change's rows before encoding.
//! Values that have no number (NaN, `infinity`) stay strings.

use serde_json::{Map, Value};

use super::{DecimalMode, KafkaConfig, TimeMode};
use crate::event::{ChangeEvent, Row};

/// Microseconds per millisecond.
const US_PER_MS: i64 = 1000;
/// Microseconds per second.
const US_PER_S: i64 = 1_000_000;
/// Seconds per day.
const S_PER_DAY: i64 = 86_400;

/// A date or time type whose values `time_precision_mode` changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Temporal {
    /// `date`.
    Date,
    /// `time` (without zone).
    Time,
    /// `timestamp` (without zone).
    Timestamp,
}

impl Temporal {
    /// The temporal type of PostgreSQL type `pg`, if any (not of arrays).
    pub(super) fn of(pg: &str) -> Option<Self> {
        match pg {
            "date" => Some(Self::Date),
            "time" => Some(Self::Time),
            "timestamp" => Some(Self::Timestamp),
            _ => None,
        }
    }

    /// Connect type and semantic name of this type's values in `mode`;
    /// `None` in `iso` mode (ISO strings).
    pub(super) fn connect_type(self, mode: TimeMode) -> Option<(&'static str, &'static str)> {
        match (mode, self) {
            (TimeMode::Iso, _) => None,
            (TimeMode::Adaptive, Self::Date) => Some(("int32", "io.debezium.time.Date")),
            (TimeMode::Adaptive, Self::Time) => Some(("int64", "io.debezium.time.MicroTime")),
            (TimeMode::Adaptive, Self::Timestamp) => {
                Some(("int64", "io.debezium.time.MicroTimestamp"))
            }
            (TimeMode::Connect, Self::Date) => {
                Some(("int32", "org.apache.kafka.connect.data.Date"))
            }
            (TimeMode::Connect, Self::Time) => {
                Some(("int32", "org.apache.kafka.connect.data.Time"))
            }
            (TimeMode::Connect, Self::Timestamp) => {
                Some(("int64", "org.apache.kafka.connect.data.Timestamp"))
            }
        }
    }

    /// The number of ISO text `s` in `mode` (`None` for `iso`, `infinity`
    /// and text that does not parse): days since 1970-01-01 for a date;
    /// microseconds (`adaptive`) or milliseconds (`connect`) past midnight
    /// for a time and since 1970-01-01T00:00 for a timestamp.
    pub(super) fn number(self, mode: TimeMode, s: &str) -> Option<i64> {
        let us = match self {
            Self::Date => return (mode != TimeMode::Iso).then(|| date_days(s)).flatten(),
            Self::Time => time_us(s)?,
            Self::Timestamp => {
                let (date, clock) = s.split_once(['T', ' '])?;
                let (clock, bc) = match clock.strip_suffix(" BC") {
                    Some(c) => (c, " BC"),
                    None => (clock, ""),
                };
                let days = date_days(&format!("{date}{bc}"))?;
                days.checked_mul(S_PER_DAY * US_PER_S)?
                    .checked_add(time_us(clock)?)?
            }
        };
        match mode {
            TimeMode::Iso => None,
            TimeMode::Adaptive => Some(us),
            TimeMode::Connect => Some(us.div_euclid(US_PER_MS)),
        }
    }
}

/// How one column's values are rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Convert {
    /// An exact decimal string to a double.
    Double,
    /// ISO date or time text to a number.
    Time(Temporal, TimeMode),
}

/// The columns of a `{"column": "type"}` object text whose values the
/// configured modes rewrite, and how; empty under the defaults.
pub(super) fn conversions(kafka: &KafkaConfig, column_types: &str) -> Vec<(String, Convert)> {
    if kafka.decimal_handling_mode == DecimalMode::String
        && kafka.time_precision_mode == TimeMode::Iso
    {
        return Vec::new();
    }
    let types: Map<String, Value> = serde_json::from_str(column_types).unwrap_or_default();
    types
        .into_iter()
        .filter_map(|(c, t)| {
            let t = t.as_str()?;
            let convert = match t.strip_prefix('_').unwrap_or(t) {
                "numeric" | "money" if kafka.decimal_handling_mode == DecimalMode::Double => {
                    Convert::Double
                }
                other => Convert::Time(Temporal::of(other)?, kafka.time_precision_mode),
            };
            (kafka.time_precision_mode != TimeMode::Iso || convert == Convert::Double)
                .then_some((c, convert))
        })
        .collect()
}

/// `event` with the values of `columns` rewritten (array elements too).
pub(super) fn apply(event: &mut ChangeEvent, columns: &[(String, Convert)]) {
    let rows = [&mut event.key, &mut event.before, &mut event.after];
    for row in rows.into_iter().flatten().map(Row::map_mut) {
        for (c, convert) in columns {
            if let Some(v) = row.get_mut(c) {
                rewrite(*convert, v);
            }
        }
    }
}

/// `v` rewritten by `convert`; values without a number stay as they are.
fn rewrite(convert: Convert, v: &mut Value) {
    match v {
        Value::Array(items) => items.iter_mut().for_each(|i| rewrite(convert, i)),
        Value::String(s) => {
            let number = match convert {
                Convert::Double => s.parse::<f64>().ok().and_then(serde_json::Number::from_f64),
                Convert::Time(t, mode) => t.number(mode, s).map(serde_json::Number::from),
            };
            if let Some(n) = number {
                *v = Value::Number(n);
            }
        }
        _ => {}
    }
}

/// Days from 1970-01-01 to ISO date text `YYYY-MM-DD` (a ` BC` suffix
/// counts years before year 1: 1 BC is year 0).
fn date_days(s: &str) -> Option<i64> {
    let (s, bc) = match s.strip_suffix(" BC") {
        Some(d) => (d, true),
        None => (s, false),
    };
    let mut parts = s.splitn(3, '-');
    let year: i64 = digits(parts.next()?)?;
    let month: i64 = digits(parts.next()?)?;
    let day: i64 = digits(parts.next()?)?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let year = if bc { 1 - year } else { year };
    Some(days_from_civil(year, month, day))
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil` algorithm: years counted from March, in 400-year eras).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let shifted_month = (month + 9) % 12;
    let day_of_year = (153 * shifted_month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Microseconds past midnight of time text `HH:MM:SS[.ffffff]`.
fn time_us(s: &str) -> Option<i64> {
    let (clock, fraction) = s.split_once('.').unwrap_or((s, ""));
    let mut parts = clock.splitn(3, ':');
    let h: i64 = digits(parts.next()?)?;
    let m: i64 = digits(parts.next()?)?;
    let sec: i64 = digits(parts.next()?)?;
    if fraction.len() > 6 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let micros: i64 = format!("{fraction:0<6}").parse().ok()?;
    Some(((h * 60 + m) * 60 + sec) * US_PER_S + micros)
}

/// A non-empty run of ASCII digits as a number.
fn digits(s: &str) -> Option<i64> {
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn dates_are_days_since_the_epoch() {
        for (text, days) in [
            ("1970-01-01", 0),
            ("1969-12-31", -1),
            ("2000-03-01", 11_017),
            ("2024-02-29", 19_782),
            ("0001-01-01", -719_162),
            ("0001-12-31 BC", -719_163),
        ] {
            assert_eq!(date_days(text), Some(days), "{text}");
        }
        assert_eq!(date_days("infinity"), None);
        assert_eq!(date_days("2024-13-01"), None);
    }

    #[test]
    fn times_and_timestamps_are_micros_in_adaptive_and_millis_in_connect() {
        let (a, c) = (TimeMode::Adaptive, TimeMode::Connect);
        assert_eq!(Temporal::Time.number(a, "13:14:15.5"), Some(47_655_500_000));
        assert_eq!(
            Temporal::Time.number(c, "13:14:15.500999"),
            Some(47_655_500)
        );
        assert_eq!(Temporal::Time.number(a, "24:00:00"), Some(86_400_000_000));
        let ts = "2018-06-20T15:13:16.945104";
        assert_eq!(
            Temporal::Timestamp.number(a, ts),
            Some(1_529_507_596_945_104)
        );
        assert_eq!(Temporal::Timestamp.number(c, ts), Some(1_529_507_596_945));
        // Before the epoch, milliseconds round down as Java's floorDiv does.
        let before = "1969-12-31T23:59:59.9995";
        assert_eq!(Temporal::Timestamp.number(a, before), Some(-500));
        assert_eq!(Temporal::Timestamp.number(c, before), Some(-1));
        let bc = "0001-12-31 00:00:00 BC";
        assert_eq!(
            Temporal::Timestamp.number(a, bc),
            Some(-719_163 * 86_400 * 1_000_000)
        );
        assert_eq!(Temporal::Date.number(c, "1970-01-02"), Some(1));
        assert_eq!(Temporal::Timestamp.number(a, "infinity"), None);
        assert_eq!(Temporal::Time.number(TimeMode::Iso, "13:14:15"), None);
    }

    #[test]
    fn only_the_columns_a_mode_changes_are_converted() {
        let types = r#"{"id":"int4","d":"date","ds":"_date","t":"time","tz":"timetz","at":"timestamptz","n":"numeric"}"#;
        let kafka = KafkaConfig {
            time_precision_mode: TimeMode::Adaptive,
            ..KafkaConfig::default()
        };
        let columns = conversions(&kafka, types);
        let names: Vec<&str> = columns.iter().map(|(c, _)| c.as_str()).collect();
        assert_eq!(names, ["d", "ds", "t"]);
        assert!(conversions(&KafkaConfig::default(), types).is_empty());
        let mut event = super::super::envelope::tests::event(crate::event::Op::Create);
        event.after = json!({"id": 1, "d": "1970-01-02", "ds": ["1970-01-03", null, "infinity"],
                             "t": "00:00:01", "tz": "00:00:01+02"})
        .as_object()
        .cloned()
        .map(Row::from);
        apply(&mut event, &columns);
        assert_eq!(
            Value::Object(event.after.unwrap().to_map().into_owned()),
            json!({"id": 1, "d": 1, "ds": [2, null, "infinity"], "t": 1_000_000, "tz": "00:00:01+02"})
        );
    }
}
