//! The pgcdc test kit: everything the integration tests, the benches and
//! the chaos harness share, once each.
//!
//! - services private to a test: [`pg::PgCluster`] (plain or TLS-only, with
//!   certificates from [`certs::TestCa`]), the brokers behind
//!   [`kafka::Broker`] ([`kafka::Tansu`], [`kafka::MockBroker`]),
//!   [`search::SearchServer`], the pgcdc process ([`daemon::Daemon`]) and a
//!   small filesystem ([`tmpfs::TmpfsMount`]);
//! - fault proxies: [`proxy::tcp::TcpProxy`] (cut, delay) and
//!   [`proxy::bulk::BulkFaultProxy`] (`_bulk` errors); fronts for brokers
//!   without TLS or SASL ([`proxy::tls::TlsTerminator`],
//!   [`proxy::sasl::SaslFront`]);
//! - the one bounded poll ([`wait`]), the mirror oracle ([`oracle`]), the
//!   slot watcher ([`slot`]) and the topic reader ([`kafka::TopicReader`]);
//! - the chaos harness ([`chaos`], binary `pgcdc-chaos`) and the
//!   `kafka-mock` binary.

pub mod bench;
pub mod certs;
pub mod chaos;
pub mod config;
pub mod daemon;
pub mod kafka;
pub mod oracle;
pub mod pg;
pub mod proxy;
pub mod search;
pub mod slot;
pub mod tmpfs;
pub mod wait;

use std::net::TcpListener;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

pub use daemon::Daemon;
pub use kafka::{Broker, MockBroker, Record, Tansu, TopicReader};
pub use pg::PgCluster;
pub use search::SearchServer;

/// A port nobody listens on right now.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Whether this process runs as root (PostgreSQL's tools then run as `postgres`).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// Send `signal` (`STOP`, `CONT`, …) to process `pid`.
pub fn signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let ok = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()?;
    if !ok.success() {
        anyhow::bail!("kill -{signal} {pid} failed");
    }
    Ok(())
}

/// Lock, ignoring poisoning (a panicked holder left consistent data behind).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
