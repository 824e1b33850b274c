//! The audit database: schema, batched inserts, retention, and the reads
//! behind `pgcdc logs`.
//!
//! Times are RFC 3339 text in UTC with milliseconds (`2024-11-24T22:40:00.123Z`,
//! see [`rfc3339_ms`]): readable in the `sqlite3` shell, and ordered as text.

use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection, Row};
use tracing::Level;

use super::record::{rfc3339_ms, Entry};

/// How long a write waits for another connection's lock before the batch is dropped.
const BUSY_TIMEOUT: Duration = Duration::from_secs(2);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS logs (
    id      INTEGER PRIMARY KEY,
    time    TEXT NOT NULL,
    level   TEXT NOT NULL,
    target  TEXT NOT NULL,
    message TEXT NOT NULL,
    fields  TEXT NOT NULL,
    actor   TEXT,
    lsn     TEXT
);
CREATE INDEX IF NOT EXISTS logs_time ON logs (time);
CREATE INDEX IF NOT EXISTS logs_level ON logs (level);
CREATE TABLE IF NOT EXISTS dead_letters (
    id         INTEGER PRIMARY KEY,
    time       TEXT NOT NULL,
    table_name TEXT NOT NULL,
    key        TEXT,
    lsn        TEXT,
    reason     TEXT NOT NULL,
    payload    TEXT
);
CREATE INDEX IF NOT EXISTS dead_letters_time ON dead_letters (time);
";

/// Open (creating if missing) the database for writing: WAL journal,
/// synchronous=FULL. The file is readable by its owner only (it holds
/// messages about the data, and dead letters); SQLite gives its `-wal` and
/// `-shm` files the same mode.
pub async fn open_writer(path: &Path) -> Result<SqliteConnection, sqlx::Error> {
    private_file(path)?;
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(BUSY_TIMEOUT)
        .disable_statement_logging()
        .connect()
        .await?;
    sqlx::raw_sql(SCHEMA).execute(&mut conn).await?;
    Ok(conn)
}

/// Create `path` empty with mode 0600 if missing; make it 0600 if not.
fn private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

/// Open the database read-only; works while a daemon writes to it (WAL).
pub async fn open_reader(path: &Path) -> Result<SqliteConnection, sqlx::Error> {
    SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .busy_timeout(BUSY_TIMEOUT)
        .disable_statement_logging()
        .connect()
        .await
}

/// Write `entries` in one transaction: all or none.
pub async fn insert_batch(
    conn: &mut SqliteConnection,
    entries: &[Entry],
) -> Result<(), sqlx::Error> {
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    for entry in entries {
        match entry {
            Entry::Log(r) => {
                sqlx::query(
                    "INSERT INTO logs (time, level, target, message, fields, actor, lsn) \
                     VALUES (?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(rfc3339_ms(r.time_ms))
                .bind(r.level.as_str())
                .bind(&r.target)
                .bind(&r.message)
                .bind(serde_json::Value::Object(r.fields.clone()).to_string())
                .bind(&r.actor)
                .bind(&r.lsn)
                .execute(&mut *tx)
                .await?;
            }
            Entry::DeadLetter(d) => {
                sqlx::query(
                    "INSERT INTO dead_letters (time, table_name, key, lsn, reason, payload) \
                     VALUES (?, ?, ?, ?, ?, ?)",
                )
                .bind(rfc3339_ms(d.time_ms))
                .bind(&d.table)
                .bind(&d.key)
                .bind(&d.lsn)
                .bind(&d.reason)
                .bind(&d.payload)
                .execute(&mut *tx)
                .await?;
            }
        }
    }
    tx.commit().await
}

/// Delete rows of both tables older than `before_ms`, then the oldest `logs`
/// rows beyond `max_rows`. Returns how many rows went.
pub async fn apply_retention(
    conn: &mut SqliteConnection,
    before_ms: i64,
    max_rows: u64,
) -> Result<u64, sqlx::Error> {
    let cutoff = rfc3339_ms(before_ms);
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let mut deleted = 0;
    for sql in [
        "DELETE FROM logs WHERE time < ?",
        "DELETE FROM dead_letters WHERE time < ?",
    ] {
        deleted += sqlx::query(sql)
            .bind(&cutoff)
            .execute(&mut *tx)
            .await?
            .rows_affected();
    }
    let keep = i64::try_from(max_rows).unwrap_or(i64::MAX);
    deleted += sqlx::query(
        "DELETE FROM logs WHERE id <= (SELECT id FROM logs ORDER BY id DESC LIMIT 1 OFFSET ?)",
    )
    .bind(keep)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(deleted)
}

/// Which `logs` rows to read.
#[derive(Debug, Clone)]
pub struct LogQuery {
    /// Least severe level shown.
    pub min_level: Level,
    /// Only rows at or after this time (ms since the Unix epoch).
    pub since_ms: Option<i64>,
    /// The newest `limit` rows are returned.
    pub limit: u32,
}

/// A row of `logs`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRow {
    /// RFC 3339 UTC.
    pub time: String,
    /// `ERROR`, `WARN`, `INFO`, `DEBUG` or `TRACE`.
    pub level: String,
    /// The event's target.
    pub target: String,
    /// The message.
    pub message: String,
    /// The other fields as a JSON object.
    pub fields: String,
    /// The `actor` field.
    pub actor: Option<String>,
    /// The `lsn` field.
    pub lsn: Option<String>,
}

/// A row of `dead_letters`.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterRow {
    /// RFC 3339 UTC.
    pub time: String,
    /// `schema.table`.
    pub table: String,
    /// The Kafka key.
    pub key: Option<String>,
    /// The commit LSN.
    pub lsn: Option<String>,
    /// Why it was parked.
    pub reason: String,
    /// The record's value.
    pub payload: Option<String>,
}

/// The newest rows of `logs` matching `q`, oldest first.
pub async fn read_logs(
    conn: &mut SqliteConnection,
    q: &LogQuery,
) -> Result<Vec<LogRow>, sqlx::Error> {
    // Level names are our constants, not input: safe to inline.
    let levels: Vec<String> = [
        Level::ERROR,
        Level::WARN,
        Level::INFO,
        Level::DEBUG,
        Level::TRACE,
    ]
    .into_iter()
    .filter(|l| *l <= q.min_level)
    .map(|l| format!("'{}'", l.as_str()))
    .collect();
    let sql = format!(
        "SELECT time, level, target, message, fields, actor, lsn FROM logs \
         WHERE level IN ({}) AND time >= ? ORDER BY time DESC, id DESC LIMIT ?",
        levels.join(", ")
    );
    let rows = sqlx::query(&sql)
        .bind(since_text(q.since_ms))
        .bind(q.limit)
        .fetch_all(conn)
        .await?;
    let mut out = rows
        .iter()
        .map(|r| {
            Ok(LogRow {
                time: r.try_get(0)?,
                level: r.try_get(1)?,
                target: r.try_get(2)?,
                message: r.try_get(3)?,
                fields: r.try_get(4)?,
                actor: r.try_get(5)?,
                lsn: r.try_get(6)?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    out.reverse();
    Ok(out)
}

/// The newest `limit` dead letters since `since_ms`, oldest first.
pub async fn read_dead_letters(
    conn: &mut SqliteConnection,
    since_ms: Option<i64>,
    limit: u32,
) -> Result<Vec<DeadLetterRow>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT time, table_name, key, lsn, reason, payload FROM dead_letters \
         WHERE time >= ? ORDER BY time DESC, id DESC LIMIT ?",
    )
    .bind(since_text(since_ms))
    .bind(limit)
    .fetch_all(conn)
    .await?;
    let mut out = rows
        .iter()
        .map(|r| {
            Ok(DeadLetterRow {
                time: r.try_get(0)?,
                table: r.try_get(1)?,
                key: r.try_get(2)?,
                lsn: r.try_get(3)?,
                reason: r.try_get(4)?,
                payload: r.try_get(5)?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    out.reverse();
    Ok(out)
}

/// The lower time bound as text; the empty string sorts before every time.
fn since_text(since_ms: Option<i64>) -> String {
    since_ms.map(rfc3339_ms).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use serde_json::Map;

    use super::super::record::{DeadLetter, LogRecord};
    use super::*;

    fn record(time_ms: i64, level: Level, message: &str) -> Entry {
        Entry::Log(LogRecord {
            time_ms,
            level,
            target: "pgcdc::test".into(),
            message: message.into(),
            fields: Map::new(),
            actor: None,
            lsn: None,
        })
    }

    const DAY: i64 = 86_400_000;

    async fn messages(path: &Path, q: LogQuery) -> Vec<String> {
        let mut conn = open_reader(path).await.unwrap();
        let rows = read_logs(&mut conn, &q).await.unwrap();
        rows.into_iter().map(|r| r.message).collect()
    }

    #[tokio::test]
    async fn retention_drops_old_rows_and_caps_logs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let mut conn = open_writer(&path).await.unwrap();
        let now = 100 * DAY;
        let mut batch: Vec<Entry> = (0..5)
            .map(|i| record(now - 20 * DAY + i, Level::INFO, "old"))
            .collect();
        batch.extend((0..5).map(|i| record(now - DAY + i, Level::WARN, &format!("new {i}"))));
        batch.push(Entry::DeadLetter(DeadLetter {
            time_ms: now - 20 * DAY,
            table: "public.t".into(),
            key: None,
            lsn: None,
            reason: "old".into(),
            payload: None,
        }));
        insert_batch(&mut conn, &batch).await.unwrap();
        let deleted = apply_retention(&mut conn, now - 14 * DAY, 3).await.unwrap();
        assert_eq!(deleted, 5 + 1 + 2);
        let q = LogQuery {
            min_level: Level::TRACE,
            since_ms: None,
            limit: 100,
        };
        let rows = read_logs(&mut conn, &q).await.unwrap();
        let messages: Vec<_> = rows.iter().map(|r| r.message.as_str()).collect();
        assert_eq!(messages, ["new 2", "new 3", "new 4"]);
        assert!(read_dead_letters(&mut conn, None, 10)
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn reads_filter_by_level_and_time_and_keep_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let mut conn = open_writer(&path).await.unwrap();
        let batch = [
            record(DAY, Level::ERROR, "e1"),
            record(DAY + 1, Level::INFO, "i1"),
            record(DAY + 2, Level::WARN, "w1"),
            record(DAY + 3, Level::ERROR, "e2"),
            record(DAY + 4, Level::WARN, "w2"),
        ];
        insert_batch(&mut conn, &batch).await.unwrap();
        let read = |min_level, since_ms, limit| {
            messages(
                &path,
                LogQuery {
                    min_level,
                    since_ms,
                    limit,
                },
            )
        };
        assert_eq!(read(Level::WARN, None, 10).await, ["e1", "w1", "e2", "w2"]);
        assert_eq!(read(Level::ERROR, None, 10).await, ["e1", "e2"]);
        assert_eq!(
            read(Level::TRACE, Some(DAY + 2), 10).await,
            ["w1", "e2", "w2"]
        );
        assert_eq!(read(Level::TRACE, None, 2).await, ["e2", "w2"]);
        // A read-only connection cannot write.
        let mut reader = open_reader(&path).await.unwrap();
        assert!(insert_batch(&mut reader, &batch).await.is_err());
    }
}
