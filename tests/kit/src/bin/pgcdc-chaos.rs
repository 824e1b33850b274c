//! `pgcdc-chaos`: the fault-injection harness, run against the shipped
//! `pgcdc` binary (see `pgcdc_testkit::chaos`). Users run it through
//! `scripts/chaos.sh`, which builds both binaries first.

use clap::Parser;
use pgcdc_testkit::chaos::{self, ChaosOptions};

/// Fault-injection harness for pgcdc: private PostgreSQL, a Kafka broker
/// (tansu or librdkafka's mock cluster) and osmem-server, the pgcdc daemon,
/// a workload, seeded faults and the oracle. Needs no config file.
#[derive(Debug, Parser)]
#[command(name = "pgcdc-chaos", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    opts: ChaosOptions,
}

fn main() {
    let cli = Cli::parse();
    let code = chaos::run(cli.opts, &mut std::io::stdout().lock());
    std::process::exit(code);
}
