//! From `tracing` events to audit records, and the layer that queues them
//! for the writer without ever waiting.

use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::{DynFilterFn, FilterExt, Filtered, LevelFilter, Targets};
use tracing_subscriber::layer::{Context, Filter, Layer};
use tracing_subscriber::registry::LookupSpan;

use super::{Drops, DEAD_LETTER_TARGET, SELF_TARGET};
use crate::lsn::Lsn;

/// One row for the audit database.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    /// A row of `logs`.
    Log(LogRecord),
    /// A row of `dead_letters`.
    DeadLetter(DeadLetter),
}

/// A log event.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRecord {
    /// When the event happened, in milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// Its level.
    pub level: Level,
    /// Its target (the module path unless the event named one).
    pub target: String,
    /// The event's message.
    pub message: String,
    /// Every other field, by name.
    pub fields: Map<String, Value>,
    /// The `actor` field, if any.
    pub actor: Option<String>,
    /// The `lsn` field, if any, in PostgreSQL's notation (`16/B374D848`).
    pub lsn: Option<String>,
}

/// A record the sink parked on the dead-letter topic.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// When it was parked, in milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// `schema.table`, empty when the record did not say.
    pub table: String,
    /// The Kafka key (the primary key as JSON).
    pub key: Option<String>,
    /// The commit LSN of the change.
    pub lsn: Option<String>,
    /// Why it could not be indexed.
    pub reason: String,
    /// The record's value.
    pub payload: Option<String>,
}

impl Entry {
    /// The record for `event`, timestamped `time_ms`.
    pub fn from_event(event: &Event<'_>, time_ms: i64) -> Entry {
        let meta = event.metadata();
        let mut visitor = FieldVisitor::default();
        event.record(&mut visitor);
        let mut fields = visitor.fields;
        if meta.target() == DEAD_LETTER_TARGET {
            return Entry::DeadLetter(DeadLetter {
                time_ms,
                table: fields.remove("table").map(text).unwrap_or_default(),
                key: fields.remove("key").map(text),
                lsn: fields.remove("lsn").map(lsn_text),
                reason: fields.remove("reason").map(text).unwrap_or_default(),
                payload: fields.remove("payload").map(text),
            });
        }
        let mut target = meta.target().to_owned();
        // Records bridged from the `log` crate (librdkafka's) carry their real target as a field.
        if let Some(Value::String(real)) = fields.remove("log.target") {
            target = real;
            for bridged in ["log.module_path", "log.file", "log.line"] {
                fields.remove(bridged);
            }
        }
        Entry::Log(LogRecord {
            time_ms,
            level: *meta.level(),
            target,
            message: visitor.message.unwrap_or_default(),
            actor: fields.get("actor").cloned().map(text),
            lsn: fields.get("lsn").cloned().map(lsn_text),
            fields,
        })
    }
}

/// A field as text: strings without quotes, anything else as JSON.
fn text(value: Value) -> String {
    match value {
        Value::String(s) => s,
        other => other.to_string(),
    }
}

/// An `lsn` field in PostgreSQL's notation whether it was logged as a number or as text.
fn lsn_text(value: Value) -> String {
    match value.as_u64() {
        Some(n) => Lsn(n).to_string(),
        None => text(value),
    }
}

/// Collects an event's message and fields as JSON values.
#[derive(Default)]
struct FieldVisitor {
    message: Option<String>,
    fields: Map<String, Value>,
}

impl FieldVisitor {
    fn put(&mut self, field: &Field, value: Value) {
        if field.name() == "message" {
            self.message = Some(text(value));
        } else {
            self.fields.insert(field.name().to_owned(), value);
        }
    }
}

impl Visit for FieldVisitor {
    fn record_f64(&mut self, field: &Field, value: f64) {
        let v = serde_json::Number::from_f64(value)
            .map_or_else(|| Value::String(value.to_string()), Value::Number);
        self.put(field, v);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::Bool(value));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_owned()));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(value.to_string()));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        // `%x` fields arrive here too, formatted with their `Display`.
        self.put(field, Value::String(format!("{value:?}")));
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `unix_ms` as RFC 3339 in UTC with milliseconds, `2024-11-24T22:40:00.123Z`:
/// fixed width, so text order is time order.
pub fn rfc3339_ms(unix_ms: i64) -> String {
    let (days, ms) = (
        unix_ms.div_euclid(86_400_000),
        unix_ms.rem_euclid(86_400_000),
    );
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

/// Proleptic Gregorian date of a day number (days since 1970-01-01), after
/// Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The `tracing` layer that feeds the LogActor. It never waits: when the
/// queue is full (the writer is behind or the database is locked) the event
/// is counted as dropped and left out of the audit log; the console still
/// shows it.
pub struct AuditLayer {
    tx: mpsc::Sender<Entry>,
    drops: Drops,
    min_level: Level,
    /// Keep dead letters' payloads (row data) in the database.
    payloads: bool,
}

impl AuditLayer {
    pub(super) fn new(tx: mpsc::Sender<Entry>, drops: Drops, min_level: Level) -> Self {
        Self {
            tx,
            drops,
            min_level,
            payloads: true,
        }
    }

    /// Leave dead letters' payloads out (`audit.dead_letter_payloads = false`).
    pub(super) fn without_payloads(mut self) -> Self {
        self.payloads = false;
        self
    }

    /// Which events this layer takes: `min_level` and above, dead letters
    /// always, never the audit log's own warnings nor sqlx's (they would feed
    /// back into the queue they are about).
    pub fn filter(&self) -> Targets {
        Targets::new()
            .with_default(self.min_level)
            // Dead letters are warnings; a TRACE here would let every
            // `log::trace!` of the libraries reach the subscriber.
            .with_target(DEAD_LETTER_TARGET, Level::WARN)
            .with_target(SELF_TARGET, LevelFilter::OFF)
            .with_target("sqlx", LevelFilter::OFF)
    }

    /// The layer behind its own filter, ready for a `Registry`.
    pub fn filtered<S>(self) -> Filtered<Self, impl Filter<S>, S>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let filter = asked_per_event(self.filter());
        self.with_filter(filter)
    }
}

/// `filter`, asked about every event rather than answering "always" once
/// per callsite. rdkafka asks the `log` facade whether librdkafka's debug
/// lines are wanted whenever it makes a client configuration; the question
/// reaches the per-layer filters and, answered "no" with no event after it,
/// leaves a mark on the thread that makes the layer skip the next event of
/// a callsite it always takes (the sink's first `es sink assigned` line was
/// lost so). A filter asked about every event overwrites the mark first.
///
/// The result keeps `filter`'s most verbose level: without it the
/// subscriber has none, the `log` facade passes every record on (rdkafka
/// logs at trace level for every delivery report), and each costs a walk
/// through the filters.
pub fn asked_per_event<S: Subscriber, F: Filter<S>>(filter: F) -> impl Filter<S> {
    let every_event = DynFilterFn::new(|_, _| true)
        .with_callsite_filter(|_| Interest::sometimes())
        .with_max_level_hint(LevelFilter::TRACE);
    filter.and(every_event)
}

impl<S: Subscriber> Layer<S> for AuditLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        // A full queue: count the event and spend nothing more on it.
        if self.tx.capacity() == 0 {
            self.drops.add(1);
            return;
        }
        let mut entry = Entry::from_event(event, now_ms());
        if let (Entry::DeadLetter(d), false) = (&mut entry, self.payloads) {
            d.payload = None;
        }
        if self.tx.try_send(entry).is_err() {
            self.drops.add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::registry::Registry;

    use super::*;

    #[test]
    fn a_filter_asked_per_event_keeps_its_most_verbose_level() {
        for level in [Level::WARN, Level::INFO, Level::DEBUG] {
            let filter = Targets::new().with_default(level);
            let asked = asked_per_event::<Registry, _>(filter);
            assert_eq!(
                Filter::<Registry>::max_level_hint(&asked),
                Some(LevelFilter::from_level(level))
            );
        }
    }

    /// Emit events through a layer with a queue of `capacity`; return what was queued.
    fn capture(capacity: usize, min_level: Level, emit: impl FnOnce()) -> (Vec<Entry>, u64) {
        let (tx, mut rx) = mpsc::channel(capacity);
        let drops = Drops::default();
        let layer = AuditLayer::new(tx, drops.clone(), min_level);
        let subscriber = tracing_subscriber::registry().with(layer.filtered());
        tracing::subscriber::with_default(subscriber, emit);
        let mut entries = Vec::new();
        while let Ok(e) = rx.try_recv() {
            entries.push(e);
        }
        (entries, drops.get())
    }

    fn log(entry: &Entry) -> &LogRecord {
        match entry {
            Entry::Log(r) => r,
            other => panic!("expected a log record, got {other:?}"),
        }
    }

    #[test]
    fn fields_become_json_and_actor_and_lsn_columns() {
        let (entries, dropped) = capture(16, Level::INFO, || {
            tracing::warn!(
                actor = "replication",
                lsn = %Lsn(0x16_B374_D848),
                attempt = 3u32,
                delta = -2i64,
                ratio = 0.5,
                paused = true,
                error = %"connection reset",
                "stream broke"
            );
            tracing::error!(target: "pgcdc::test", lsn = 4096u64, "numeric lsn");
        });
        assert_eq!(dropped, 0);
        assert_eq!(entries.len(), 2, "{entries:?}");
        let r = log(&entries[0]);
        assert_eq!(r.level, Level::WARN);
        assert_eq!(r.target, module_path!());
        assert_eq!(r.message, "stream broke");
        assert_eq!(r.actor.as_deref(), Some("replication"));
        assert_eq!(r.lsn.as_deref(), Some("16/B374D848"));
        let fields = Value::Object(r.fields.clone());
        assert_eq!(
            fields,
            serde_json::json!({"actor": "replication", "lsn": "16/B374D848", "attempt": 3,
                "delta": -2, "ratio": 0.5, "paused": true, "error": "connection reset"})
        );
        let r = log(&entries[1]);
        assert_eq!((r.level, r.target.as_str()), (Level::ERROR, "pgcdc::test"));
        assert_eq!(r.lsn.as_deref(), Some("0/1000"));
        assert_eq!(r.actor, None);
        assert!(r.time_ms > 1_600_000_000_000, "{}", r.time_ms);
    }

    #[test]
    fn records_bridged_from_log_keep_their_real_target() {
        let (entries, _) = capture(16, Level::INFO, || {
            tracing::error!(
                log.target = "librdkafka",
                log.module_path = "rdkafka::client",
                log.file = "client.rs",
                log.line = 74u32,
                "FAIL: connection refused"
            );
        });
        let r = log(&entries[0]);
        assert_eq!(r.target, "librdkafka");
        assert_eq!(r.message, "FAIL: connection refused");
        assert!(r.fields.is_empty(), "{:?}", r.fields);
    }

    #[test]
    fn events_below_the_level_and_own_warnings_are_not_recorded() {
        let (entries, _) = capture(16, Level::WARN, || {
            tracing::info!("too quiet");
            tracing::debug!("quieter");
            tracing::warn!(target: "pgcdc::audit", dropped = 5u64, "records dropped");
            tracing::warn!(target: "sqlx::query", "slow statement");
            tracing::warn!("kept");
        });
        assert_eq!(entries.len(), 1, "{entries:?}");
        assert_eq!(log(&entries[0]).message, "kept");
    }

    #[test]
    fn dead_letter_events_become_dead_letters_at_any_level() {
        let (entries, _) = capture(16, Level::ERROR, || {
            tracing::warn!(
                target: "pgcdc::dead_letter",
                table = "public.users",
                key = "{\"id\":7}",
                lsn = "0/1770A78",
                reason = "mapper_parsing_exception",
                payload = "{\"after\":{}}",
                "record dead-lettered"
            );
            tracing::warn!(target: "pgcdc::dead_letter", reason = "not json", "record dead-lettered");
        });
        assert_eq!(
            entries,
            [
                Entry::DeadLetter(DeadLetter {
                    time_ms: time_of(&entries[0]),
                    table: "public.users".into(),
                    key: Some("{\"id\":7}".into()),
                    lsn: Some("0/1770A78".into()),
                    reason: "mapper_parsing_exception".into(),
                    payload: Some("{\"after\":{}}".into()),
                }),
                Entry::DeadLetter(DeadLetter {
                    time_ms: time_of(&entries[1]),
                    table: String::new(),
                    key: None,
                    lsn: None,
                    reason: "not json".into(),
                    payload: None,
                }),
            ]
        );
    }

    fn time_of(entry: &Entry) -> i64 {
        match entry {
            Entry::Log(r) => r.time_ms,
            Entry::DeadLetter(d) => d.time_ms,
        }
    }

    #[test]
    fn a_full_queue_counts_drops_instead_of_waiting() {
        let (entries, dropped) = capture(4, Level::INFO, || {
            for i in 0..10 {
                tracing::info!(i, "event");
            }
        });
        assert_eq!(entries.len(), 4);
        assert_eq!(dropped, 6);
        assert!(super::super::dropped_total() >= 6);
    }

    #[test]
    fn times_are_fixed_width_rfc3339_utc() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_732_488_000_123), "2024-11-24T22:40:00.123Z");
        assert_eq!(rfc3339_ms(253_402_300_799_999), "9999-12-31T23:59:59.999Z");
    }
}
