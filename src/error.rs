//! Errors at the binary's edge and the exit codes they map to.

pub use pgcdc_actors::error::{ConfigError, ErrorClass, ExitCode, Fatal};

/// Why the daemon (or a subcommand) stopped.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The configuration is invalid; one line per problem.
    #[error("invalid configuration:{}", .0.iter().map(|e| format!("\n  {e}")).collect::<String>())]
    Config(Vec<ConfigError>),
    /// Kafka or PostgreSQL could not be reached.
    #[error("{0}")]
    Upstream(String),
    /// The state directory could not be used.
    #[error("state directory: {0}")]
    LocalIo(String),
    /// An actor reported a condition the process cannot continue from
    /// (already logged as `fatal: …` when it was reported).
    #[error("{0}")]
    Fatal(Fatal),
    /// Anything classified by an engine error.
    #[error("{message}")]
    Classified {
        /// Exit code from the engine's classification.
        code: ExitCode,
        /// What happened.
        message: String,
    },
}

impl AppError {
    /// The documented exit code.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            AppError::Config(_) => ExitCode::Config,
            AppError::Upstream(_) => ExitCode::Upstream,
            AppError::LocalIo(_) => ExitCode::LocalIo,
            AppError::Fatal(f) => f.code,
            AppError::Classified { code, .. } => *code,
        }
    }

    /// An engine error by its class, keeping its exit code (a transient one
    /// becomes "upstream unreachable").
    pub fn classified(class: ErrorClass, message: String) -> AppError {
        let code = match class {
            ErrorClass::Fatal(code) => code,
            ErrorClass::Transient => ExitCode::Upstream,
        };
        AppError::Classified { code, message }
    }
}
