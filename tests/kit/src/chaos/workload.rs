//! The workload: numbered transactions on `chaos_items` mixing inserts,
//! updates, deletes, primary-key changes, multi-row and one large
//! transaction, and where asked a `TRUNCATE` every [`TRUNCATE_EVERY`].
//! Every transaction writes its own number into `n`, so each change it
//! makes is recognisable on Kafka; ids are never reused, so a delete of an
//! id happens at most once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_postgres::Client;

use super::Rng;
use crate::lock;
use crate::pg::connect;

/// The table the workload writes.
pub const DDL: &str = "CREATE TABLE chaos_items (id bigint PRIMARY KEY, n bigint NOT NULL, v text)";

/// Rows of the one large transaction.
pub const LARGE_TX_ROWS: i64 = 5_000;
/// The transaction number of the large transaction.
const LARGE_TX_AT: i64 = 25;
/// Transactions from one `TRUNCATE` to the next, when the workload truncates.
const TRUNCATE_EVERY: i64 = 600;
/// How long the writer keeps trying to reconnect after an error.
const RECONNECT: Duration = Duration::from_secs(60);

/// A change a committed transaction must have produced on Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Expect {
    /// An event whose `after` has this id and `n` (insert, update, new key of a key change).
    After {
        /// Primary key.
        id: i64,
        /// Transaction number.
        n: i64,
    },
    /// An `op=d` event for this key (delete, old key of a key change).
    Delete {
        /// Primary key.
        id: i64,
    },
}

/// A transaction whose COMMIT returned success.
#[derive(Debug, Clone)]
pub struct Committed {
    /// Transaction number.
    pub n: i64,
    /// `pg_current_wal_lsn()` read right after the commit (`u64::MAX` if that read failed).
    pub lsn_after: u64,
    /// The events it must have produced.
    pub expect: Vec<Expect>,
}

/// What the workload did: committed transactions, in commit order.
#[derive(Debug, Default)]
pub struct Journal {
    /// Committed transactions.
    pub committed: Vec<Committed>,
    /// Transactions whose outcome is unknown (the connection broke during them).
    pub unknown: usize,
}

/// One planned transaction.
struct Plan {
    sql: String,
    expect: Vec<Expect>,
    added: Vec<i64>,
    removed: Vec<i64>,
}

/// The writer's model of the table: live ids and the next unused id.
struct Model {
    live: Vec<i64>,
    next_id: i64,
}

impl Model {
    fn fresh_id(&mut self) -> i64 {
        self.next_id += 1;
        self.next_id
    }

    /// Up to `k` distinct live ids, chosen at random.
    fn pick(&self, rng: &mut Rng, k: usize) -> Vec<i64> {
        let mut pool = self.live.clone();
        let mut out = Vec::new();
        while out.len() < k && !pool.is_empty() {
            let i = rng.below(pool.len() as u64) as usize;
            out.push(pool.swap_remove(i));
        }
        out
    }
}

fn value(n: i64, id: i64) -> String {
    format!("tx {n} row {id} \u{e9}\"q\"")
}

fn insert(plan: &mut Plan, n: i64, id: i64) {
    let v = value(n, id);
    plan.sql.push_str(&format!(
        "INSERT INTO chaos_items VALUES ({id}, {n}, '{v}');"
    ));
    plan.expect.push(Expect::After { id, n });
    plan.added.push(id);
}

fn update(plan: &mut Plan, n: i64, id: i64) {
    let v = value(n, id);
    plan.sql.push_str(&format!(
        "UPDATE chaos_items SET n = {n}, v = '{v}' WHERE id = {id};"
    ));
    plan.expect.push(Expect::After { id, n });
}

fn delete(plan: &mut Plan, id: i64) {
    plan.sql
        .push_str(&format!("DELETE FROM chaos_items WHERE id = {id};"));
    plan.expect.push(Expect::Delete { id });
    plan.removed.push(id);
}

fn change_key(plan: &mut Plan, n: i64, old: i64, new: i64) {
    plan.sql.push_str(&format!(
        "UPDATE chaos_items SET id = {new}, n = {n} WHERE id = {old};"
    ));
    plan.expect.push(Expect::Delete { id: old });
    plan.expect.push(Expect::After { id: new, n });
    plan.removed.push(old);
    plan.added.push(new);
}

/// Plan transaction `n`; every row is touched at most once. With
/// `truncates`, every [`TRUNCATE_EVERY`]th (from the middle of the first
/// span) empties the table, then inserts a row.
fn plan(n: i64, model: &mut Model, rng: &mut Rng, truncates: bool) -> Plan {
    let mut p = Plan {
        sql: "BEGIN;".into(),
        expect: Vec::new(),
        added: Vec::new(),
        removed: Vec::new(),
    };
    if truncates && n % TRUNCATE_EVERY == TRUNCATE_EVERY / 2 {
        p.sql.push_str("TRUNCATE chaos_items;");
        p.removed = model.live.clone();
        insert(&mut p, n, model.fresh_id());
    } else if n == LARGE_TX_AT {
        let first = model.next_id + 1;
        model.next_id += LARGE_TX_ROWS;
        p.sql.push_str(&format!(
            "INSERT INTO chaos_items SELECT g, {n}, 'large ' || g FROM generate_series({first}, {}) g;",
            model.next_id
        ));
        for id in first..=model.next_id {
            p.expect.push(Expect::After { id, n });
            p.added.push(id);
        }
    } else {
        match rng.below(100) {
            0..=34 => (0..1 + rng.below(3)).for_each(|_| insert(&mut p, n, model.fresh_id())),
            35..=59 => {
                let k = 1 + rng.below(3) as usize;
                model
                    .pick(rng, k)
                    .into_iter()
                    .for_each(|id| update(&mut p, n, id));
            }
            60..=74 => model
                .pick(rng, 1)
                .into_iter()
                .for_each(|id| delete(&mut p, id)),
            75..=86 => {
                for old in model.pick(rng, 1) {
                    let new = model.fresh_id();
                    change_key(&mut p, n, old, new);
                }
            }
            _ => {
                let ids = model.pick(rng, 2);
                insert(&mut p, n, model.fresh_id());
                insert(&mut p, n, model.fresh_id());
                ids.first()
                    .into_iter()
                    .for_each(|&id| update(&mut p, n, id));
                ids.get(1).into_iter().for_each(|&id| delete(&mut p, id));
            }
        }
        if p.expect.is_empty() {
            insert(&mut p, n, model.fresh_id());
        }
    }
    p.sql.push_str("COMMIT;");
    p
}

/// Reconnect and reload the live ids after an error (the outcome of the
/// failed transaction is unknown, so the model is re-read from the table).
async fn recover(url: &str, model: &mut Model) -> Option<Client> {
    let client = connect(url, RECONNECT).await.ok()?;
    let rows = client.query("SELECT id FROM chaos_items", &[]).await.ok()?;
    model.live = rows.iter().map(|r| r.get::<_, i64>(0)).collect();
    Some(client)
}

/// Commit numbered transactions until `stop` is set, recording each commit
/// in `journal`; with `truncates`, a `TRUNCATE` now and then.
pub async fn run(
    url: String,
    seed: u64,
    truncates: bool,
    stop: Arc<AtomicBool>,
    journal: Arc<Mutex<Journal>>,
) {
    let mut rng = Rng::new(seed ^ 0x005e_ed0f_c4a0);
    let mut model = Model {
        live: Vec::new(),
        next_id: 0,
    };
    let Some(mut client) = recover(&url, &mut model).await else {
        return;
    };
    let mut n = 0i64;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let p = plan(n, &mut model, &mut rng, truncates);
        if client.batch_execute(&p.sql).await.is_err() {
            lock(&journal).unknown += 1;
            let _ = client.batch_execute("ROLLBACK").await;
            match recover(&url, &mut model).await {
                Some(c) => client = c,
                None => return,
            }
            continue;
        }
        model.live.retain(|id| !p.removed.contains(id));
        model.live.extend(&p.added);
        let q = "SELECT (pg_current_wal_lsn() - '0/0')::bigint";
        let lsn_after = match client.query_one(q, &[]).await {
            Ok(row) => row.get::<_, i64>(0) as u64,
            Err(_) => u64::MAX,
        };
        lock(&journal).committed.push(Committed {
            n,
            lsn_after,
            expect: p.expect,
        });
        tokio::time::sleep(Duration::from_millis(2 + rng.below(8))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_touch_each_row_at_most_once_and_truncates_empty_the_model() {
        let mut rng = Rng::new(1);
        let mut model = Model {
            live: Vec::new(),
            next_id: 0,
        };
        let mut truncated = Vec::new();
        for n in 1..2000 {
            let p = plan(n, &mut model, &mut rng, true);
            let mut ids: Vec<i64> = p
                .expect
                .iter()
                .map(|e| match e {
                    Expect::After { id, .. } | Expect::Delete { id } => *id,
                })
                .collect();
            let len = ids.len();
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(ids.len(), len, "tx {n} touches a row twice: {}", p.sql);
            model.live.retain(|id| !p.removed.contains(id));
            model.live.extend(&p.added);
            if p.sql.contains("TRUNCATE") {
                truncated.push(n);
                assert_eq!(model.live, p.added, "only the row inserted after it");
            }
        }
        assert_eq!(truncated, [300, 900, 1500]);
    }
}
