//! Console logging with `tracing`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::settings::{LogConfig, LogFormat};

/// Install the global subscriber (human or JSON lines on stderr).
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_new(&config.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match config.format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
