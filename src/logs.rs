//! `pgcdc logs`: print the audit log (`<state_dir>/audit.db`), oldest first,
//! one record per line. It opens the database read-only, so it works while
//! the daemon writes to it.

use std::borrow::Cow;
use std::io::Write;
use std::path::Path;

use pgcdc_actors::audit::now_ms;
use pgcdc_actors::audit::store::{self, DeadLetterRow, LogQuery, LogRow};
use tracing::Level;

use crate::cli::LogsArgs;
use crate::error::AppError;
use crate::settings::Settings;

/// Print the records `args` select.
pub fn run(settings: &Settings, args: &LogsArgs) -> Result<(), AppError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| AppError::LocalIo(e.to_string()))?;
    let lines = rt.block_on(read_lines(&settings.audit_db(), args, now_ms()))?;
    let mut out = std::io::stdout().lock();
    for line in lines {
        // A closed pipe (`pgcdc logs | head`) ends the listing, not in an error.
        if writeln!(out, "{line}").is_err() {
            break;
        }
    }
    Ok(())
}

/// The lines `pgcdc logs` prints for `args`, reading `path`; `--since` counts back from `now_ms`.
pub async fn read_lines(
    path: &Path,
    args: &LogsArgs,
    now_ms: i64,
) -> Result<Vec<String>, AppError> {
    if !path.is_file() {
        return Err(AppError::LocalIo(format!(
            "no audit log at {} (pgcdc run and pgcdc es-sink write it when audit.enabled = true)",
            path.display()
        )));
    }
    let failed = |e: sqlx::Error| AppError::LocalIo(format!("audit log {}: {e}", path.display()));
    let mut conn = store::open_reader(path).await.map_err(failed)?;
    let since_ms = args.since.map(|d| {
        let back = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        now_ms.saturating_sub(back)
    });
    if args.dead_letters {
        let rows = store::read_dead_letters(&mut conn, since_ms, args.limit)
            .await
            .map_err(failed)?;
        return Ok(rows.iter().map(format_dead_letter).collect());
    }
    let query = LogQuery {
        min_level: args.level.unwrap_or(Level::TRACE),
        since_ms,
        limit: args.limit,
    };
    let rows = store::read_logs(&mut conn, &query).await.map_err(failed)?;
    Ok(rows.iter().map(format_log).collect())
}

/// `time level target message fields`; the fields only when there are any.
pub fn format_log(r: &LogRow) -> String {
    let mut line = format!(
        "{} {:<5} {} {}",
        r.time,
        r.level,
        r.target,
        one_line(&r.message)
    );
    if r.fields != "{}" {
        line.push(' ');
        line.push_str(&one_line(&r.fields));
    }
    line
}

/// `time table key=… lsn=… reason=… payload=…`, `-` for what is missing.
pub fn format_dead_letter(d: &DeadLetterRow) -> String {
    format!(
        "{} {} key={} lsn={} reason={} payload={}",
        d.time,
        if d.table.is_empty() { "-" } else { &d.table },
        or_dash(&d.key),
        or_dash(&d.lsn),
        one_line(&d.reason),
        or_dash(&d.payload)
    )
}

/// A missing value as `-`.
fn or_dash(v: &Option<String>) -> Cow<'_, str> {
    v.as_deref().map_or(Cow::Borrowed("-"), one_line)
}

/// Keep one record on one line, and the terminal out of a payload's
/// hands: every control character (escape sequences, backspace, bell, C1
/// controls) is shown escaped: `\n`, `\r`, `\t`, else `\u{1b}`.
fn one_line(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&c.escape_unicode().to_string()),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use pgcdc_actors::audit::{DeadLetter, Entry, LogRecord};
    use serde_json::{json, Value};

    use super::*;
    use std::time::Duration;

    use crate::cli::{parse_since, Cli, Command};

    #[test]
    fn since_takes_seconds_minutes_hours_days() {
        assert_eq!(parse_since("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_since("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_since("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_since("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_since("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn since_rejects_anything_else() {
        for bad in [
            "",
            "h",
            "1",
            "1w",
            "-1h",
            "+1h",
            "1.5h",
            " 1h",
            "1h ",
            "1 h",
            "héh",
            "99999999999999999999d",
        ] {
            let e = parse_since(bad).unwrap_err();
            assert!(e.contains("is not a duration"), "{bad:?}: {e}");
        }
        assert!(parse_since("999999999999999999d").is_err(), "overflow");
    }

    #[test]
    fn bad_flags_are_usage_errors_with_exit_code_2() {
        for args in [
            ["pgcdc", "logs", "--since", "soon"],
            ["pgcdc", "logs", "--level", "loud"],
            ["pgcdc", "logs", "--limit", "0"],
        ] {
            let e = Cli::try_parse_from(args).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{args:?}");
            assert!(e.to_string().contains(args[2]), "{e}");
        }
        let cli =
            Cli::try_parse_from(["pgcdc", "logs", "--level", "WARN", "--since", "1h"]).unwrap();
        let Command::Logs(args) = cli.command else {
            panic!("not the logs command")
        };
        assert_eq!(args.level, Some(Level::WARN));
        assert_eq!(args.since, Some(Duration::from_secs(3600)));
        assert_eq!((args.limit, args.dead_letters), (100, false));
    }

    const NOW: i64 = 1_732_488_000_000; // 2024-11-24T22:40:00Z

    fn log(ago_s: i64, level: Level, message: &str, fields: Value) -> Entry {
        let Value::Object(fields) = fields else {
            panic!("fields must be an object")
        };
        Entry::Log(LogRecord {
            time_ms: NOW - ago_s * 1000,
            level,
            target: "pgcdc_actors::test".into(),
            message: message.into(),
            fields,
            actor: None,
            lsn: None,
        })
    }

    fn args(level: Option<Level>, since: Option<&str>, limit: u32, dead_letters: bool) -> LogsArgs {
        LogsArgs {
            level,
            since: since.map(|s| parse_since(s).unwrap()),
            limit,
            dead_letters,
        }
    }

    #[tokio::test]
    async fn logs_prints_what_the_flags_select_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let mut conn = store::open_writer(&path).await.unwrap();
        let batch = [
            log(7200, Level::ERROR, "two hours ago", json!({})),
            log(600, Level::INFO, "started", json!({})),
            log(300, Level::WARN, "delivery failed", json!({"attempt": 2})),
            log(60, Level::ERROR, "bad\nthing", json!({"lsn": "0/10"})),
            Entry::DeadLetter(DeadLetter {
                time_ms: NOW - 30_000,
                table: "public.users".into(),
                key: Some(r#"{"id":1}"#.into()),
                lsn: Some("0/10".into()),
                reason: "mapper_parsing_exception".into(),
                payload: None,
            }),
        ];
        store::insert_batch(&mut conn, &batch).await.unwrap();

        let lines = read_lines(&path, &args(Some(Level::WARN), Some("1h"), 100, false), NOW)
            .await
            .unwrap();
        assert_eq!(
            lines,
            [
                "2024-11-24T22:35:00.000Z WARN  pgcdc_actors::test delivery failed {\"attempt\":2}",
                "2024-11-24T22:39:00.000Z ERROR pgcdc_actors::test bad\\nthing {\"lsn\":\"0/10\"}",
            ]
        );
        let lines = read_lines(&path, &args(None, None, 2, false), NOW)
            .await
            .unwrap();
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].ends_with("delivery failed {\"attempt\":2}"),
            "{lines:?}"
        );
        let lines = read_lines(&path, &args(None, None, 100, false), NOW)
            .await
            .unwrap();
        assert!(
            lines[1].ends_with("INFO  pgcdc_actors::test started"),
            "{lines:?}"
        );
        let lines = read_lines(&path, &args(None, Some("1m"), 100, true), NOW)
            .await
            .unwrap();
        assert_eq!(
            lines,
            ["2024-11-24T22:39:30.000Z public.users key={\"id\":1} lsn=0/10 reason=mapper_parsing_exception payload=-"]
        );
    }

    #[tokio::test]
    async fn a_missing_audit_log_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let e = read_lines(&path, &args(None, None, 1, false), NOW)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no audit log at"), "{e}");
        assert_eq!(e.exit_code().code(), 6);
    }

    #[test]
    fn control_characters_are_escaped() {
        let hostile = "a\x1b]0;owned\x07\x1b[2Jb\tc\u{9b}d\x7f\n";
        let shown = one_line(hostile);
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert_eq!(
            shown,
            "a\\u{1b}]0;owned\\u{7}\\u{1b}[2Jb\\tc\\u{9b}d\\u{7f}\\n"
        );
        assert!(matches!(one_line("plain"), Cow::Borrowed(_)));
    }
}
