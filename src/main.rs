//! The `pgcdc` binary: parses flags, loads configuration, runs a subcommand
//! and turns its outcome into a documented exit code.

use clap::Parser;
use pgcdc::cli::{Cli, Command};
use pgcdc::settings::{Overrides, Settings};

// The change path allocates a few buffers per row on one thread and frees
// them on another (librdkafka's threads); mimalloc handles that pattern with
// far less CPU than glibc's malloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The environment variable for how long mimalloc keeps freed memory before
/// it gives it back to the kernel, and pgcdc's value for it, in ms.
/// mimalloc's own (1,000) keeps a freed 64 MiB value resident for a second,
/// so values read faster than that add up: in the pipeline benchmark ten
/// 64 MiB values peaked at 232-328 MiB with it and at 236-264 MiB in four
/// runs with 100, with no more CPU per row.
const PURGE_DELAY: (&str, &str) = ("MIMALLOC_PURGE_DELAY", "100");

/// Start pgcdc again in this process (same pid, arguments and environment)
/// with [`PURGE_DELAY`] set, unless the environment sets it already:
/// mimalloc reads its options only when the process is loaded. Returns only
/// if that fails, with why; pgcdc then runs with mimalloc's default.
///
/// It starts the binary by its own path, so the process keeps its name
/// (`ps`, `top`, `pkill pgcdc`), which the kernel takes from that path;
/// only when the file is gone (replaced by an upgrade) does it fall back to
/// `/proc/self/exe`, and the process is then named `exe`.
fn with_purge_delay() -> Option<std::io::Error> {
    use std::os::unix::process::CommandExt;
    if std::env::var_os(PURGE_DELAY.0).is_some() {
        return None;
    }
    let exe = std::env::current_exe()
        .ok()
        .filter(|path| path.is_file())
        .unwrap_or_else(|| "/proc/self/exe".into());
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_default();
    let error = std::process::Command::new(exe)
        .arg0(argv0)
        .args(args)
        .env(PURGE_DELAY.0, PURGE_DELAY.1)
        .exec();
    Some(error)
}

/// Turn transparent huge pages off for this process. mimalloc advises the
/// kernel to back its arenas with huge pages, and the kernel then makes each
/// touched 2 MiB range resident whole: in the pipeline benchmark that raised
/// the backlog's peak RSS from 75-89 to 110-130 MiB with no CPU saved. The
/// kernel's flag, set on the process's address space and so for every
/// thread, overrides that advice, for memory already reserved too. Where the
/// kernel refuses it, pgcdc runs on with THP, using more memory and nothing
/// else different, and says so once logging is up.
fn no_transparent_huge_pages() -> Result<(), String> {
    #[cfg(target_os = "linux")]
    rustix::thread::disable_transparent_huge_pages(true).map_err(|e| e.to_string())?;
    Ok(())
}

fn main() {
    let purge = with_purge_delay();
    let thp = no_transparent_huge_pages();
    // Failpoints (compiled in only with the `failpoints` feature) are set via FAILPOINTS=name=action.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let cli = Cli::parse();
    let overrides = Overrides {
        state_dir: cli.state_dir.clone(),
        log_level: cli.log_level.clone(),
    };
    let settings = match Settings::load(Some(&cli.config), &overrides) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("pgcdc: {e}");
            std::process::exit(e.exit_code().code());
        }
    };
    // The daemon commands also keep the audit log.
    let audit = matches!(cli.command, Command::Run | Command::EsSink);
    let telemetry = match pgcdc::telemetry::init(&settings, audit) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("pgcdc: {e}");
            std::process::exit(e.exit_code().code());
        }
    };
    if let Some(e) = purge {
        tracing::warn!(error = %e, "pgcdc could not start again with {}={}: it runs as usual, and freed memory stays resident up to a second", PURGE_DELAY.0, PURGE_DELAY.1);
    }
    if let Err(e) = thp {
        tracing::warn!(error = %e, "the kernel kept transparent huge pages on for pgcdc: it runs as usual, with more resident memory");
    }
    let result = match &cli.command {
        Command::Run => pgcdc::app::run(settings),
        Command::EsSink => pgcdc::app::run_es_sink(settings),
        Command::Check => pgcdc::check::run(settings),
        Command::Status => pgcdc::check::status(settings),
        Command::Snapshot { tables } => pgcdc::check::request_backfill(settings, tables),
        Command::Logs(args) => pgcdc::logs::run(&settings, args),
        Command::Verify(args) => match pgcdc::verify::run(settings, args) {
            Ok(code) if code != 0 => {
                telemetry.finish();
                std::process::exit(code);
            }
            other => other.map(drop),
        },
    };
    if let Err(e) = result {
        // A fatal report was logged (`fatal: …`) by the actor that made it.
        if !matches!(e, pgcdc::error::AppError::Fatal(_)) {
            tracing::error!(exit_code = e.exit_code().code(), "{e}");
            eprintln!("pgcdc: {e}");
        }
        telemetry.finish();
        std::process::exit(e.exit_code().code());
    }
    telemetry.finish();
}
