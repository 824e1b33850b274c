//! The slot watcher: polls a replication slot's `confirmed_flush_lsn` in
//! the background and reports whether it ever moved backwards.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;

use crate::pg::connect;

/// How long the watcher tries to reconnect on each poll while PostgreSQL is down.
const RECONNECT: Duration = Duration::from_millis(500);

/// What the watcher saw.
#[derive(Debug, Default, Clone, Copy)]
pub struct SlotWatch {
    /// Highest `confirmed_flush_lsn` seen.
    pub max_confirmed: u64,
    /// The last value seen.
    pub last: u64,
    /// The first backwards move (from, to), if any.
    pub backwards: Option<(u64, u64)>,
}

/// A running watcher; [`SlotWatcher::stop`] ends it and returns what it saw.
pub struct SlotWatcher {
    stop: Arc<AtomicBool>,
    /// Set it before restarting PostgreSQL on purpose (see [`SlotWatcher::start`]).
    pub restarted: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<SlotWatch>,
}

impl SlotWatcher {
    /// Poll `slot` at `url` every `every`; reconnects when PostgreSQL
    /// restarts. PostgreSQL itself may report an older position after a
    /// restart: the slot is written to disk only when it is dirty, and before
    /// PostgreSQL 17 an advance of `confirmed_flush` alone does not make it
    /// dirty (not even for the shutdown checkpoint of `-m fast`). So after a
    /// restart announced through `restarted`, the first value becomes the new
    /// baseline; a move back at any other time counts.
    pub fn start(url: String, slot: &str, every: Duration) -> SlotWatcher {
        let stop = Arc::new(AtomicBool::new(false));
        let restarted = Arc::new(AtomicBool::new(false));
        let (s, r, slot) = (stop.clone(), restarted.clone(), slot.to_owned());
        let task = tokio::spawn(async move {
            let mut w = SlotWatch::default();
            let mut started = 0f64;
            let mut client: Option<Client> = None;
            let q = "SELECT (confirmed_flush_lsn - '0/0')::bigint, \
                     extract(epoch FROM pg_postmaster_start_time())::float8 \
                     FROM pg_replication_slots WHERE slot_name = $1";
            while !s.load(Ordering::SeqCst) {
                if client.as_ref().is_none_or(Client::is_closed) {
                    client = connect(&url, RECONNECT).await.ok();
                }
                let row = match &client {
                    Some(db) => db.query_opt(q, &[&slot]).await.ok().flatten(),
                    None => None,
                };
                if let Some(row) = row {
                    let start: f64 = row.get(1);
                    if let Some(v) = row.get::<_, Option<i64>>(0).map(|v| v as u64) {
                        if start != started && started != 0.0 && r.swap(false, Ordering::SeqCst) {
                            w.last = v;
                        }
                        started = start;
                        if v < w.last && w.backwards.is_none() {
                            w.backwards = Some((w.last, v));
                        }
                        w.last = v.max(w.last);
                        w.max_confirmed = w.max_confirmed.max(v);
                    }
                }
                tokio::time::sleep(every).await;
            }
            w
        });
        SlotWatcher {
            stop,
            restarted,
            task,
        }
    }

    /// Stop polling; what was seen.
    pub async fn stop(self) -> SlotWatch {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap_or_default()
    }
}
