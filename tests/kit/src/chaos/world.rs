//! A scenario's running world: its services, proxies and the daemon.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::task::block_in_place;
use tokio_postgres::Client;

use super::{workload, BrokerKind, ChaosOptions, Rng, Scenario, PARTITIONS, TOPIC};
use crate::daemon::Daemon;
use crate::free_port;
use crate::kafka::{Broker, MockBroker, Tansu};
use crate::pg::{wait_slot_active, PgCluster};
use crate::proxy::bulk::BulkFaultProxy;
use crate::proxy::tcp::TcpProxy;
use crate::search::SearchServer;
use crate::slot::SlotWatcher;
use crate::tmpfs::TmpfsMount;

/// The replication slot the daemon uses.
pub(crate) const SLOT: &str = "pgcdc";
/// The dead-letter topic (created up front on the mock broker).
const DEAD_LETTERS: &str = "pgcdc-dead-letters";
/// Size of the `disk-full` scenario's filesystem.
const TMPFS_MB: u64 = 64;

/// Why a scenario cannot run here (reported `SKIPPED`, never `PASS`).
#[derive(Debug)]
pub(crate) struct Skip(pub(crate) String);

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Skip {}

/// A scenario's running world.
pub(crate) struct World {
    pub(crate) pg: PgCluster,
    pub(crate) db: Client,
    pub(crate) daemon: Daemon,
    /// Watches the slot; told about PostgreSQL restarts done on purpose.
    pub(crate) slot: Option<SlotWatcher>,
    /// The daemon's `state_dir`.
    pub(crate) state_dir: PathBuf,
    /// `proxy`: the TCP proxies in front of PostgreSQL, Kafka and ES, by service.
    pub(crate) proxies: Vec<(&'static str, TcpProxy)>,
    /// `es-errors`: the HTTP fault proxy in front of ES, and the PRNG its faults are drawn from.
    pub(crate) es_proxy: Option<(BulkFaultProxy, Rng)>,
    pub(crate) broker: Box<dyn Broker>,
    pub(crate) es: SearchServer,
    /// `disk-full`: the small filesystem `state_dir` lives on.
    _disk: Option<TmpfsMount>,
    _dir: tempfile::TempDir,
}

/// The daemon's configuration: the product's defaults (dynamic group
/// membership for the sink) except for the test's fast flushes. The producer keeps its default (multi-record) batches on every broker:
/// the sink heals tansu 0.6's mid-batch fetch skip by seeking back.
fn daemon_config(
    dir: &Path,
    pg_port: u16,
    password: &str,
    broker: &dyn Broker,
    es_url: &str,
) -> String {
    format!(
        "state_dir = {state:?}\nshutdown_timeout_secs = 20\n\
         [postgres]\nhost = \"127.0.0.1\"\nport = {pg_port}\nuser = \"postgres\"\npassword = {password:?}\n\
         database = \"postgres\"\ntables = [\"public.chaos_items\"]\nstatus_interval_secs = 1\n\
         [kafka]\nbrokers = {brokers:?}\ntopic_partitions = {PARTITIONS}\ndelivery_timeout_ms = 30000\n{settings}\
         [elasticsearch]\nrun_in_daemon = true\nurl = {es_url:?}\nnumber_of_replicas = 0\nflush_interval_ms = 50\n\
         [supervision]\nmax_restarts = 50\nbackoff_initial_ms = 50\nbackoff_max_ms = 1000\n\
         [log]\nlevel = \"info\"\n[metrics]\nlisten = \"\"\n",
        state = dir.join("state").display().to_string(),
        brokers = broker.brokers(),
        settings = broker.kafka_settings(),
    )
}

/// The port of a base URL such as `http://127.0.0.1:9200`.
fn url_port(url: &str) -> Result<u16> {
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .with_context(|| format!("no port in {url}"))
}

/// The broker, with the `proxy` scenario's TCP proxy in front of tansu (its
/// clients reconnect to the advertised address: tansu must advertise the proxy).
fn start_broker(
    scenario: Scenario,
    opts: &ChaosOptions,
    proxies: &mut Vec<(&'static str, TcpProxy)>,
) -> Result<Box<dyn Broker>> {
    match (opts.broker, scenario) {
        (BrokerKind::Mock, Scenario::Proxy) => {
            Err(Skip("the mock cluster advertises its own address, not a proxy's".into()).into())
        }
        (BrokerKind::Mock, _) => {
            let exe = opts
                .kafka_mock
                .clone()
                .unwrap_or_else(|| "kafka-mock".into());
            let mock = MockBroker::start(&exe, 1)?;
            mock.create_topic(TOPIC, PARTITIONS)?;
            mock.create_topic(DEAD_LETTERS, 1)?;
            Ok(Box::new(mock))
        }
        (BrokerKind::Tansu, Scenario::Proxy) => {
            let front = std::net::TcpListener::bind("127.0.0.1:0")?;
            let tansu = Tansu::start_with(free_port()?, front.local_addr()?.port())?;
            proxies.push(("kafka", TcpProxy::start(front, tansu.port)?));
            crate::kafka::wait_broker(&tansu.brokers(), Duration::from_secs(30))?;
            Ok(Box::new(tansu))
        }
        (BrokerKind::Tansu, _) => Ok(Box::new(Tansu::start()?)),
    }
}

/// Start the services (with the scenario's proxies or small filesystem) and
/// the daemon, and wait until it streams.
pub(crate) async fn start(
    scenario: Scenario,
    seed: u64,
    run_seed: u64,
    opts: &ChaosOptions,
) -> Result<World> {
    let dir = tempfile::Builder::new().prefix("pgcdc-chaos-").tempdir()?;
    let state_dir = dir.path().join("state");
    let disk = match scenario {
        Scenario::DiskFull => {
            Some(TmpfsMount::mount(&state_dir, TMPFS_MB).map_err(|e| Skip(format!("{e:#}")))?)
        }
        _ => None,
    };
    let pg =
        block_in_place(|| PgCluster::start_with_password(&format!("chaos-secret-{run_seed}")))?;
    let es = SearchServer::start()?;
    let mut proxies = Vec::new();
    let broker = block_in_place(|| start_broker(scenario, opts, &mut proxies))?;
    if scenario == Scenario::Proxy {
        proxies.insert(0, ("postgres", TcpProxy::to(pg.port)?));
        proxies.push(("elasticsearch", TcpProxy::to(url_port(&es.url)?)?));
    }
    let es_proxy = match scenario {
        Scenario::EsErrors => Some((BulkFaultProxy::start(&es.url).await?, Rng::new(seed))),
        _ => None,
    };
    let db = pg.client().await?;
    db.batch_execute(workload::DDL).await?;
    let proxied = |service: &str| {
        proxies
            .iter()
            .find(|(s, _)| *s == service)
            .map(|(_, p)| p.port)
    };
    let pg_port = proxied("postgres").unwrap_or(pg.port);
    let es_url = match (&es_proxy, proxied("elasticsearch")) {
        (Some((p, _)), _) => p.url.clone(),
        (None, Some(port)) => format!("http://127.0.0.1:{port}"),
        (None, None) => es.url.clone(),
    };
    let config = daemon_config(dir.path(), pg_port, &pg.password, &*broker, &es_url);
    let exe = opts.pgcdc.clone().unwrap_or_else(|| "pgcdc".into());
    let daemon = Daemon::start(&exe, dir.path(), &config, "run", &[])?;
    let mut w = World {
        pg,
        db,
        daemon,
        slot: None,
        state_dir,
        proxies,
        es_proxy,
        broker,
        es,
        _disk: disk,
        _dir: dir,
    };
    wait_streaming(&mut w).await?;
    Ok(w)
}

/// Wait until the daemon holds the slot with an active walsender.
pub(crate) async fn wait_streaming(w: &mut World) -> Result<()> {
    wait_slot_active(&w.db, &mut w.daemon, SLOT).await
}
