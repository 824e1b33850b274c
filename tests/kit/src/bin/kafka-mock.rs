//! `kafka-mock`: librdkafka's mock cluster behind its real TCP listeners, a
//! second Kafka implementation besides tansu. Prints the bootstrap address
//! on its first stdout line, then reads commands from stdin, one a line,
//! answering each with one line (`ok` or an error):
//!
//! - `topic <name> <partitions>`: create a topic (the mock has no CreateTopics).
//!
//! It stays up until stdin closes or it is killed.

use std::io::{BufRead, Write};

use anyhow::{Context, Result};
use clap::Parser;
use rdkafka::mocking::MockCluster;

/// librdkafka's mock Kafka cluster on 127.0.0.1.
#[derive(Debug, Parser)]
#[command(name = "kafka-mock", about)]
struct Args {
    /// Brokers in the cluster (the replication factor of its topics).
    #[arg(long, default_value_t = 1)]
    brokers: i32,
}

/// Run one command line; the answer line.
fn command<C: rdkafka::ClientContext>(
    cluster: &MockCluster<'_, C>,
    brokers: i32,
    line: &str,
) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["topic", name, partitions] => match partitions.parse::<i32>() {
            Ok(p) => match cluster.create_topic(name, p, brokers) {
                Ok(()) => "ok".into(),
                Err(e) => format!("error: {e}"),
            },
            Err(e) => format!("error: partitions: {e}"),
        },
        _ => format!("error: unknown command {line:?}"),
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let cluster = MockCluster::new(args.brokers).context("start the mock cluster")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", cluster.bootstrap_servers())?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        writeln!(out, "{}", command(&cluster, args.brokers, &line?))?;
        out.flush()?;
    }
    Ok(())
}
