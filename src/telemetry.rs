//! Logging with `tracing`: the console (human or JSON lines on stderr) and,
//! for the daemon commands, the SQLite audit log (`<state_dir>/audit.db`).

use std::io::IsTerminal;
use std::time::Duration;

use pgcdc_actors::audit::{asked_per_event, AuditHandle, AuditLayer, LogActor, DEAD_LETTER_TARGET};
use pgcdc_actors::error::ErrorClass;
use tracing::Subscriber;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

use crate::error::{AppError, ExitCode};
use crate::settings::{LogConfig, LogFormat, Settings};

/// Longest wait at exit for the audit log to write what is queued.
const AUDIT_FINISH: Duration = Duration::from_secs(5);

/// What `init` started; [`Telemetry::finish`] it before the process exits.
#[derive(Debug)]
pub struct Telemetry {
    audit: Option<AuditHandle>,
}

impl Telemetry {
    /// Write what the audit log has queued and close it, waiting a bounded time.
    pub fn finish(self) {
        if let Some(audit) = self.audit {
            if !audit.shutdown(AUDIT_FINISH) {
                eprintln!(
                    "pgcdc: the audit log did not finish writing within {}s",
                    AUDIT_FINISH.as_secs()
                );
            }
        }
    }
}

/// Install the global subscriber: the console always, the audit log when
/// `audit` (the daemon commands) and `audit.enabled`.
pub fn init(settings: &Settings, audit: bool) -> Result<Telemetry, AppError> {
    let (layer, handle) = if audit && settings.audit.enabled {
        let (layer, handle) = start_audit(settings)?;
        (Some(layer.filtered()), Some(handle))
    } else {
        (None, None)
    };
    let installed = tracing_subscriber::registry()
        .with(console(&settings.log))
        .with(layer)
        .try_init();
    if let Some(handle) = &handle {
        if installed.is_err() {
            // Another subscriber was there first (tests): nothing would feed the writer.
            handle.shutdown(AUDIT_FINISH);
            return Ok(Telemetry { audit: None });
        }
        handle.flush_on_exit();
    }
    Ok(Telemetry { audit: handle })
}

/// Human or JSON lines on stderr, filtered by `log.level`. Dead letters carry
/// row values, so they go to the audit log only.
fn console<S>(config: &LogConfig) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a> + 'static,
{
    let mut filter = EnvFilter::try_new(&config.level).unwrap_or_else(|_| EnvFilter::new("info"));
    if let Ok(off) = format!("{DEAD_LETTER_TARGET}=off").parse() {
        filter = filter.add_directive(off);
    }
    let layer = fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let layer = match config.format {
        LogFormat::Human => layer.boxed(),
        LogFormat::Json => layer.json().boxed(),
    };
    layer.with_filter(asked_per_event(filter))
}

fn start_audit(settings: &Settings) -> Result<(AuditLayer, AuditHandle), AppError> {
    settings.create_state_dir()?;
    LogActor::start(&settings.audit_db(), &settings.audit).map_err(|e| {
        let code = match e.class() {
            ErrorClass::Fatal(code) => code,
            ErrorClass::Transient => ExitCode::LocalIo,
        };
        AppError::Classified {
            code,
            message: e.to_string(),
        }
    })
}
