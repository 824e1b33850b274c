//! A tansu broker on a free port, and a reader of whole topics.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;

/// A tansu broker with in-memory storage, killed on drop.
pub struct Tansu {
    child: Child,
    pub port: u16,
}

impl Tansu {
    /// Start tansu and wait until it answers metadata requests.
    pub fn start() -> Tansu {
        let port = super::free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(std::env::var("TANSU").unwrap_or_else(|_| "tansu".into()))
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url, "--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start tansu: install it with `cargo install tansu --locked --features dynostore,libsql`");
        let tansu = Tansu { child, port };
        let consumer = tansu.consumer();
        let deadline = Instant::now() + Duration::from_secs(30);
        while consumer
            .fetch_metadata(None, Duration::from_secs(1))
            .is_err()
        {
            assert!(Instant::now() < deadline, "tansu did not come up");
        }
        tansu
    }

    /// Create `topic` with one partition (tests that produce before pgcdc runs).
    pub async fn create_topic(&self, topic: &str) {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .create()
            .expect("admin");
        let t = NewTopic::new(topic, 1, TopicReplication::Fixed(1));
        admin
            .create_topics([&t], &AdminOptions::new())
            .await
            .expect("create topic");
    }

    /// Kill the broker (an outage; its in-memory data is gone).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Freeze the broker (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success());
    }

    /// Thaw a paused broker (SIGCONT).
    pub fn resume(&self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-CONT", &pid])
            .status()
            .unwrap()
            .success());
    }

    /// Bootstrap servers.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn consumer(&self) -> BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .set("group.id", "pgcdc-tests")
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer")
    }

    /// Read `topic` from the beginning until `done(records)` holds; panics after `timeout`.
    pub fn read_until(
        &self,
        topic: &str,
        timeout: Duration,
        done: impl Fn(&[Record]) -> bool,
    ) -> Vec<Record> {
        let consumer = self.consumer();
        let deadline = Instant::now() + timeout;
        let partitions = loop {
            let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(5));
            let n = md
                .ok()
                .and_then(|m| m.topics().first().map(|t| t.partitions().len()))
                .unwrap_or(0);
            if n > 0 {
                break n;
            }
            assert!(Instant::now() < deadline, "topic {topic} never appeared");
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p as i32, Offset::Beginning)
                .expect("tpl");
        }
        consumer.assign(&tpl).expect("assign");
        let mut records = Vec::new();
        // `done` is checked when the topic is drained for now, or every 4096 records.
        let mut check = true;
        while !(check && done(&records)) {
            assert!(
                Instant::now() < deadline,
                "timed out reading {topic}: {} records so far",
                records.len()
            );
            match consumer.poll(Duration::from_millis(200)) {
                Some(msg) => {
                    records.push(Record::from(&msg.expect("kafka error while reading")));
                    check = records.len() % 4096 == 0;
                }
                None => check = true,
            }
        }
        records
    }

    /// Read everything in `topic`: at least the high watermarks' worth, then
    /// until nothing new arrives for a second. (tansu's reported high
    /// watermark can lag what a fetch returns, so it is only a lower bound.)
    pub fn read_all(&self, topic: &str) -> Vec<Record> {
        let consumer = self.consumer();
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .expect("metadata");
        let partitions = md
            .topics()
            .first()
            .map(|t| t.partitions().len())
            .unwrap_or(0);
        let mut total = 0i64;
        for p in 0..partitions {
            let (lo, hi) = consumer
                .fetch_watermarks(topic, p as i32, Duration::from_secs(5))
                .expect("watermarks");
            total += hi - lo;
        }
        let mut records =
            self.read_until(topic, Duration::from_secs(60), |r| r.len() as i64 >= total);
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p as i32, Offset::Beginning)
                .expect("tpl");
        }
        consumer.assign(&tpl).expect("assign");
        let (mut n, mut quiet_since) = (0usize, Instant::now());
        while quiet_since.elapsed() < Duration::from_secs(1) {
            if let Some(msg) = consumer.poll(Duration::from_millis(100)) {
                let msg = msg.expect("kafka error while reading");
                n += 1;
                if n > records.len() {
                    records.push(Record::from(&msg));
                }
                quiet_since = Instant::now();
            }
        }
        records
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A consumed record, decoded.
#[derive(Debug, Clone)]
pub struct Record {
    pub key: Option<Value>,
    /// The key as sent (partitioning and compaction go by these bytes).
    pub key_bytes: Option<Vec<u8>>,
    pub value: Option<Value>,
    pub headers: HashMap<String, String>,
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
}

impl<M: Message> From<&M> for Record {
    fn from(m: &M) -> Self {
        let json =
            |b: Option<&[u8]>| b.map(|b| serde_json::from_slice(b).expect("record is not json"));
        let mut headers = HashMap::new();
        if let Some(h) = m.headers() {
            for i in 0..h.count() {
                let h = h.get(i);
                headers.insert(
                    h.key.to_string(),
                    String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                );
            }
        }
        Record {
            key: json(m.key()),
            key_bytes: m.key().map(<[u8]>::to_vec),
            value: json(m.payload()),
            headers,
        }
    }
}
