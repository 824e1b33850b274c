//! `kafka-mock`: librdkafka's mock cluster behind its real TCP listeners, a
//! second Kafka implementation besides tansu. Prints the bootstrap address
//! on its first stdout line, then reads commands from stdin, one a line,
//! answering each with one line (`ok` or an error):
//!
//! - `topic <name> <partitions>`: create a topic (the mock has no CreateTopics).
//! - `produce_errors <code> <count>`: answer the next `count` Produce
//!   requests with Kafka error `code` (e.g. 10, message too large).
//!
//! It stays up until stdin closes or it is killed.

use std::io::{BufRead, Write};

use anyhow::{Context, Result};
use clap::Parser;
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

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
        ["produce_errors", code, count] => {
            let code = code.parse::<i32>().ok();
            let error = code.and_then(|c| RDKafkaRespErr::try_from(c).ok());
            match (error, count.parse::<usize>()) {
                (Some(e), Ok(n)) => {
                    cluster.request_errors(RDKafkaApiKey::Produce, &vec![e; n]);
                    "ok".into()
                }
                _ => format!("error: bad error code or count in {line:?}"),
            }
        }
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
