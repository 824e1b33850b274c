//! Two independent Kafka implementations behind one [`Broker`] trait —
//! tansu (memory storage) and librdkafka's mock cluster (the `kafka-mock`
//! binary) — and the topic reader.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Lines, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;

use crate::wait::{self, Poll};
use crate::{free_port, lock};

/// How long a broker gets to answer its first metadata request.
const STARTUP: Duration = Duration::from_secs(30);
/// Timeout of one metadata, watermark or offset request.
const REQUEST: Duration = Duration::from_secs(5);

/// A Kafka-compatible broker private to a test; stopped on drop.
pub trait Broker: Send + Sync {
    /// Bootstrap servers (the advertised address).
    fn brokers(&self) -> String;
    /// Create `topic` with `partitions` partitions.
    fn create_topic(&self, topic: &str, partitions: i32) -> Result<()>;
    /// Lines for pgcdc's `[kafka]` section this broker needs.
    fn kafka_settings(&self) -> &'static str;
    /// Freeze (`STOP`) or thaw (`CONT`) the broker process.
    fn signal(&self, signal: &str) -> Result<()>;
    /// A short name for messages (`tansu`, `mock`).
    fn name(&self) -> &'static str;
}

/// A broker's process: signalled on request, thawed and killed on drop.
struct Process(Child);

impl Process {
    /// Send `signal` (`STOP`, `CONT`, …) to the process.
    fn signal(&self, signal: &str) -> Result<()> {
        crate::signal(self.0.id(), signal)
    }

    /// Thaw it (it may be frozen) and kill it.
    fn stop(&mut self) {
        let _ = self.signal("CONT");
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A consumer of `brokers` in `group` that never commits.
pub fn consumer(brokers: &str, group: &str) -> Result<BaseConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?)
}

/// Wait until the broker answers a metadata request.
pub fn wait_broker(brokers: &str, timeout: Duration) -> Result<()> {
    let c = consumer(brokers, "pgcdc-tests")?;
    let what = format!("kafka at {brokers} to answer");
    wait::poll_blocking(&what, timeout, wait::EVERY, || {
        match c.fetch_metadata(None, Duration::from_secs(1)) {
            Ok(_) => Poll::Ready(()),
            Err(e) => Poll::Pending(e.to_string()),
        }
    })?;
    Ok(())
}

/// A tansu broker with memory storage, killed on drop.
pub struct Tansu {
    process: Process,
    /// TCP port on 127.0.0.1 it listens on.
    pub port: u16,
    /// The port it advertises in metadata (a proxy's, or `port`).
    pub advertised: u16,
}

impl Tansu {
    /// Start tansu on a free port and wait until it answers.
    pub fn start() -> Result<Tansu> {
        let port = free_port()?;
        Tansu::start_with(port, port)
    }

    /// Start tansu on `port`, advertising `advertised`; waits until it
    /// answers when it advertises itself (a proxy may not run yet).
    pub fn start_with(port: u16, advertised: u16) -> Result<Tansu> {
        let url = format!("tcp://127.0.0.1:{port}");
        let front = format!("tcp://127.0.0.1:{advertised}");
        let bin = std::env::var("TANSU").unwrap_or_else(|_| "tansu".into());
        let child = Command::new(bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &front,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(
                "cannot start tansu: cargo install tansu --locked --features dynostore,libsql",
            )?;
        let tansu = Tansu {
            process: Process(child),
            port,
            advertised,
        };
        if port == advertised {
            wait_broker(&tansu.brokers(), STARTUP)?;
        }
        Ok(tansu)
    }

    /// Kill the broker (an outage; its in-memory data is gone).
    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// The broker's process id.
    pub fn pid(&self) -> u32 {
        self.process.0.id()
    }
}

impl Broker for Tansu {
    fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.advertised)
    }

    fn create_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        use rdkafka::client::DefaultClientContext;
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .create()?;
        let t = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        // The admin client's own thread answers: no runtime is needed to wait for it.
        for r in futures::executor::block_on(admin.create_topics([&t], &AdminOptions::new()))? {
            r.map_err(|(t, e)| anyhow::anyhow!("create topic {t}: {e}"))?;
        }
        Ok(())
    }

    fn kafka_settings(&self) -> &'static str {
        ""
    }

    fn signal(&self, signal: &str) -> Result<()> {
        self.process.signal(signal)
    }

    fn name(&self) -> &'static str {
        "tansu"
    }
}

/// librdkafka's mock cluster in a `kafka-mock` process (see its source):
/// topics are created through its stdin (the mock has no CreateTopics).
pub struct MockBroker {
    process: Process,
    stdin: Mutex<ChildStdin>,
    replies: Mutex<Lines<BufReader<ChildStdout>>>,
    bootstrap: String,
}

impl MockBroker {
    /// Start `<exe>` (the `kafka-mock` binary) with `brokers` brokers.
    pub fn start(exe: &Path, brokers: u32) -> Result<MockBroker> {
        let mut child = Command::new(exe)
            .args(["--brokers", &brokers.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("start {}", exe.display()))?;
        let stdin = child.stdin.take().context("kafka-mock has no stdin")?;
        let stdout = child.stdout.take().context("kafka-mock has no stdout")?;
        let mut replies = BufReader::new(stdout).lines();
        let bootstrap = replies.next().context("kafka-mock printed nothing")??;
        let mock = MockBroker {
            process: Process(child),
            stdin: Mutex::new(stdin),
            replies: Mutex::new(replies),
            bootstrap,
        };
        wait_broker(&mock.bootstrap, STARTUP)?;
        Ok(mock)
    }

    /// Answer the next `count` Produce requests with Kafka error `code`.
    pub fn produce_errors(&self, code: i32, count: usize) -> Result<()> {
        self.command(&format!("produce_errors {code} {count}"))
    }

    /// Send one command line; fails unless it answers `ok`.
    fn command(&self, line: &str) -> Result<()> {
        writeln!(lock(&self.stdin), "{line}")?;
        let reply = lock(&self.replies).next().context("kafka-mock exited")??;
        if reply != "ok" {
            bail!("kafka-mock: {line}: {reply}");
        }
        Ok(())
    }
}

impl Broker for MockBroker {
    fn brokers(&self) -> String {
        self.bootstrap.clone()
    }

    fn create_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        self.command(&format!("topic {topic} {partitions}"))
    }

    fn kafka_settings(&self) -> &'static str {
        // The mock cluster has no CreateTopics: tests create topics through `create_topic`.
        "create_topics = false\n"
    }

    fn signal(&self, signal: &str) -> Result<()> {
        self.process.signal(signal)
    }

    fn name(&self) -> &'static str {
        "mock"
    }
}

/// A consumed record, decoded.
#[derive(Debug, Clone)]
pub struct Record {
    /// The key as JSON.
    pub key: Option<Value>,
    /// The key as sent (partitioning and compaction go by these bytes).
    pub key_bytes: Option<Vec<u8>>,
    /// The value as JSON (a JSON string holding the text if it is not JSON); `None`: tombstone.
    pub value: Option<Value>,
    /// Headers, by name.
    pub headers: HashMap<String, String>,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

impl Record {
    /// `value.op`.
    pub fn op(&self) -> &str {
        self.value
            .as_ref()
            .and_then(|v| v["op"].as_str())
            .unwrap_or("")
    }

    /// `value.after`.
    pub fn after(&self) -> &Value {
        self.value.as_ref().map_or(&Value::Null, |v| &v["after"])
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }
}

impl<M: Message> From<&M> for Record {
    fn from(m: &M) -> Self {
        let json = |b: Option<&[u8]>| {
            b.map(|b| {
                serde_json::from_slice(b)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(b).into_owned()))
            })
        };
        let mut headers = HashMap::new();
        if let Some(h) = m.headers() {
            for h in h.iter() {
                let v = String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned();
                headers.insert(h.key.to_string(), v);
            }
        }
        Record {
            key: json(m.key()),
            key_bytes: m.key().map(<[u8]>::to_vec),
            value: json(m.payload()),
            headers,
            partition: m.partition(),
            offset: m.offset(),
        }
    }
}

/// A reader of whole topics on one broker.
pub struct TopicReader {
    consumer: BaseConsumer,
}

impl TopicReader {
    /// A reader of `brokers`' topics.
    pub fn new(brokers: &str) -> Result<TopicReader> {
        TopicReader::with_properties(brokers, &[])
    }

    /// A reader with extra librdkafka `properties` (TLS, SASL).
    pub fn with_properties(brokers: &str, properties: &[(&str, &str)]) -> Result<TopicReader> {
        let mut config = ClientConfig::new();
        for (k, v) in properties {
            config.set(*k, *v);
        }
        let consumer = config
            .set("bootstrap.servers", brokers)
            .set("group.id", "pgcdc-tests")
            .set("enable.auto.commit", "false")
            .create()?;
        Ok(TopicReader { consumer })
    }

    /// Assign every partition of `topic` from the beginning (waits for the topic);
    /// the sum of the partitions' high watermarks.
    fn rewind(&self, topic: &str, timeout: Duration) -> Result<i64> {
        let what = format!("topic {topic} to appear");
        let partitions = wait::poll_blocking(&what, timeout, wait::EVERY, || {
            let md = self.consumer.fetch_metadata(Some(topic), REQUEST);
            let n = md
                .ok()
                .and_then(|m| m.topics().first().map(|t| t.partitions().len()));
            Poll::when(n.unwrap_or(0) > 0, n.unwrap_or(0) as i32, || {
                "no partitions".into()
            })
        })?;
        let (mut tpl, mut total) = (TopicPartitionList::new(), 0);
        for p in 0..partitions {
            let (lo, hi) = self.consumer.fetch_watermarks(topic, p, REQUEST)?;
            total += hi - lo;
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        self.consumer.assign(&tpl)?;
        Ok(total)
    }

    /// Read `topic` from the beginning until `done(records)` holds (checked
    /// when the topic is drained for now, or every 4096 records); fails after `timeout`.
    pub fn read_until(
        &self,
        topic: &str,
        timeout: Duration,
        done: impl Fn(&[Record]) -> bool,
    ) -> Result<Vec<Record>> {
        let started = Instant::now();
        self.rewind(topic, timeout)?;
        let mut records = Vec::new();
        let mut check = true;
        let what = format!("records of {topic}");
        let rest = timeout.saturating_sub(started.elapsed());
        wait::poll_blocking(&what, rest, Duration::ZERO, || {
            if check && done(&records) {
                return Poll::Ready(());
            }
            match self.consumer.poll(Duration::from_millis(200)) {
                Some(Ok(msg)) => {
                    records.push(Record::from(&msg));
                    check = records.len() % 4096 == 0;
                }
                Some(Err(e)) => return Poll::Abort(format!("kafka error while reading: {e}")),
                None => check = true,
            }
            Poll::Pending(format!("{} records so far", records.len()))
        })?;
        Ok(records)
    }

    /// Read everything in `topic`: at least the high watermarks' worth (a
    /// lower bound: tansu's can lag what a fetch returns), then until
    /// nothing new arrives for `quiet`.
    pub fn read_all(&self, topic: &str, quiet: Duration, timeout: Duration) -> Result<Vec<Record>> {
        let want = self.rewind(topic, timeout)?;
        let mut records = Vec::new();
        let mut quiet_since = Instant::now();
        let what = format!("all of {topic}");
        wait::poll_blocking(&what, timeout, Duration::ZERO, || {
            if records.len() as i64 >= want && quiet_since.elapsed() >= quiet {
                return Poll::Ready(());
            }
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(msg)) => {
                    records.push(Record::from(&msg));
                    quiet_since = Instant::now();
                }
                Some(Err(e)) => return Poll::Abort(format!("kafka error while reading: {e}")),
                None => {}
            }
            Poll::Pending(format!("{} of at least {want} records", records.len()))
        })?;
        Ok(records)
    }
}

/// `group`'s committed offsets on partitions `0..partitions` of `topic`
/// (`-1` where it committed none); an OffsetFetch, the reader does not join.
pub fn committed_offsets(
    brokers: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> Result<Vec<i64>> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = c.committed_offsets(tpl, REQUEST)?;
    Ok(got
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => -1,
        })
        .collect())
}
