//! Kafka consumers for subscriptions.
//!
//! The [`KafkaIngress`] controller follows the subscriptions in the metadata
//! group and runs one consumer for each on this node. Every assigned Kafka
//! partition gets its own task, which batches records into one Raft entry per
//! target partition. Per (Kafka partition, target partition) there is at most
//! one append in flight, retried until it commits: the appends that commit for
//! one target partition are always a prefix, in offset order, of what was sent
//! there, so the dedup rule "drop sequence numbers at or below the last one"
//! never drops a record that was not appended.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_log::{partition_group, PartitionId, METADATA_GROUP};
use ferry_partition::partitioner::kafka_producer_id;
use ferry_partition::state::MetadataState;
use ferry_partition::wire::v1::{
    Command, Invoke, KafkaCluster, MetadataCommand, Response, RetentionPolicy, Subscription,
};
use ferry_partition::{Log, LogReads};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use rdkafka::config::ClientConfig;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn, Span};

use crate::consumer::{self, Control, Event, LogLevel, Start};
use crate::record::{self, Origin, Record, Sink};
use crate::subscription::Settings;
use crate::Error;

/// A Kafka cluster from the configuration (`[[ingress.kafka-clusters]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ClusterOptions {
    pub name: String,
    /// `[PROTOCOL://]host:port`, e.g. `PLAINTEXT://127.0.0.1:9092`.
    pub brokers: Vec<String>,
    /// Any other librdkafka property, passed through to every consumer.
    #[serde(flatten)]
    pub properties: BTreeMap<String, PropertyValue>,
}

/// A librdkafka property value as written in TOML.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PropertyValue {
    String(String),
    Integer(i64),
    Bool(bool),
}

impl std::fmt::Display for PropertyValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PropertyValue::String(s) => f.write_str(s),
            PropertyValue::Integer(i) => write!(f, "{i}"),
            PropertyValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

const PROTOCOLS: [&str; 4] = ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"];

impl ClusterOptions {
    /// Checks the name and every broker address.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.contains('/') {
            return Err(format!("name {:?} must be non-empty and contain no '/'", self.name));
        }
        if self.brokers.is_empty() {
            return Err("brokers must list at least one broker".to_owned());
        }
        for broker in &self.brokers {
            let address = match broker.split_once("://") {
                Some((protocol, address)) => {
                    if !PROTOCOLS.iter().any(|p| p.eq_ignore_ascii_case(protocol)) {
                        return Err(format!(
                            "broker {broker:?}: unknown protocol {protocol:?} (expected one of {})",
                            PROTOCOLS.join(", ")
                        ));
                    }
                    address
                }
                None => broker.as_str(),
            };
            let valid = match address.rsplit_once(':') {
                Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
                None => false,
            };
            if !valid {
                return Err(format!("broker {broker:?} is not [PROTOCOL://]host:port"));
            }
        }
        Ok(())
    }

    /// A cluster registered through the admin API, as its consumers use it:
    /// its `bootstrap.servers` (or `metadata.broker.list`) are its brokers.
    pub fn from_registered(cluster: &KafkaCluster) -> Result<ClusterOptions, String> {
        let mut properties = cluster.properties.clone();
        let servers = properties
            .remove("bootstrap.servers")
            .or_else(|| properties.remove("metadata.broker.list"))
            .ok_or("properties must set bootstrap.servers (or metadata.broker.list)")?;
        let options = ClusterOptions {
            name: cluster.name.clone(),
            brokers: servers.split(',').map(str::trim).filter(|b| !b.is_empty()).map(str::to_owned).collect(),
            properties: properties.into_iter().map(|(k, v)| (k, PropertyValue::String(v))).collect(),
        };
        options.validate()?;
        Ok(options)
    }

    /// The cluster with secret property values hidden, for display.
    pub fn redacted(&self) -> ClusterOptions {
        let mut shown = self.clone();
        for (key, value) in shown.properties.iter_mut() {
            if is_secret(key) {
                *value = PropertyValue::String(REDACTED.to_owned());
            }
        }
        shown
    }

    /// Properties with secret values hidden, for display.
    pub fn redacted_properties(&self) -> BTreeMap<String, String> {
        self.properties
            .iter()
            .map(|(k, v)| (k.clone(), if is_secret(k) { REDACTED.to_owned() } else { v.to_string() }))
            .collect()
    }
}

/// What a secret property's value reads as.
pub const REDACTED: &str = "***";

/// Whether librdkafka property `name` holds a credential (a user name, a
/// password, a key).
pub fn is_secret(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["password", "secret", "token", "key", "username"].iter().any(|s| name.contains(s))
}

/// The Kafka cluster `name`: from the config file (`configured`), else one
/// registered through the admin API and kept in `metadata`.
pub fn find_cluster(configured: &[ClusterOptions], metadata: &MetadataState, name: &str) -> Option<ClusterOptions> {
    configured
        .iter()
        .find(|c| c.name == name)
        .cloned()
        .or_else(|| metadata.kafka_clusters.get(name).and_then(|c| ClusterOptions::from_registered(c).ok()))
}

/// Tuning of the Kafka ingress (`[ingress]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct Options {
    /// Most records taken from a Kafka partition at once.
    pub batch_records_max: usize,
    /// Most bytes of records in one append (one log entry); a larger record
    /// goes alone.
    pub batch_bytes_max: usize,
    /// Most records of one Kafka partition read but not yet committed in Raft.
    pub buffer_records_max: usize,
    pub retry_delay_ms_initial: u64,
    pub retry_delay_ms_max: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            batch_records_max: 1024,
            batch_bytes_max: 4 << 20,
            buffer_records_max: 8192,
            retry_delay_ms_initial: 50,
            retry_delay_ms_max: 5_000,
        }
    }
}

impl Options {
    pub fn validate(&self) -> Result<(), String> {
        if self.batch_records_max == 0 || self.buffer_records_max < self.batch_records_max {
            return Err("batch-records-max must be positive and at most buffer-records-max".to_owned());
        }
        if self.batch_bytes_max == 0 || self.batch_bytes_max > ferry_log::COMMAND_BYTES_MAX / 2 {
            return Err(format!("batch-bytes-max must be positive and at most {}", ferry_log::COMMAND_BYTES_MAX / 2));
        }
        if self.retry_delay_ms_initial == 0 || self.retry_delay_ms_max < self.retry_delay_ms_initial {
            return Err("retry-delay-ms-initial must be positive and at most retry-delay-ms-max".to_owned());
        }
        Ok(())
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(self.retry_delay_ms_initial, self.retry_delay_ms_max)
    }
}

struct Backoff {
    next_ms: u64,
    max_ms: u64,
}

impl Backoff {
    fn new(initial_ms: u64, max_ms: u64) -> Self {
        Backoff { next_ms: initial_ms, max_ms }
    }

    fn next(&mut self) -> Duration {
        let delay = self.next_ms;
        self.next_ms = (delay * 2).min(self.max_ms);
        Duration::from_millis(delay)
    }
}

/// A librdkafka client of `cluster`: its brokers and properties.
pub fn cluster_config(cluster: &ClusterOptions, client_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", cluster.brokers.join(","));
    config.set("client.id", client_id);
    for (k, v) in &cluster.properties {
        config.set(k, v.to_string());
    }
    config
}

/// Builds the librdkafka configuration of a subscription's consumer, whose
/// own options `settings` has read.
pub fn consumer_config(
    cluster: &ClusterOptions,
    subscription: &Subscription,
    settings: &Settings,
    client_id: &str,
) -> ClientConfig {
    let mut config = cluster_config(cluster, client_id);
    // Incremental rebalances move only the partitions that change owner, so a
    // node joining or leaving does not pause every other node's partitions.
    if config.get("partition.assignment.strategy").is_none() {
        config.set("partition.assignment.strategy", "cooperative-sticky");
    }
    for (k, v) in settings.consumer_options(&subscription.options) {
        config.set(k, v);
    }
    // Each partition has a queue of its own in the consumer process, and
    // librdkafka's prefetch limit applies to each: 64 MiB by default.
    if config.get("queued.max.messages.kbytes").is_none() {
        config.set("queued.max.messages.kbytes", QUEUED_KBYTES_DEFAULT);
    }
    // Statistics carry the partition offsets the consumer lag is computed from.
    if config.get("statistics.interval.ms").is_none() {
        config.set("statistics.interval.ms", STATISTICS_INTERVAL_MS_DEFAULT);
    }
    config.set("group.id", subscription.group_id());
    // Offsets are stored by Ferry once appended, then committed periodically.
    config.set("enable.auto.commit", "true");
    config.set("enable.auto.offset.store", "false");
    config
}

/// What librdkafka prefetches of one partition at most, in KiB, unless the
/// cluster or subscription says otherwise.
const QUEUED_KBYTES_DEFAULT: &str = "16384";

/// How often librdkafka reports the statistics that consumer lag comes
/// from, unless the cluster or the subscription sets `statistics.interval.ms`.
const STATISTICS_INTERVAL_MS_DEFAULT: &str = "5000";

/// One Kafka partition consumed by a subscription.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LagKey {
    pub subscription: String,
    pub topic: String,
    pub partition: i32,
}

/// How a subscription's consumer on this node is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumerState {
    /// Its consumer process is starting or waiting for partitions.
    Starting,
    /// Partitions are assigned to it, or records arrive.
    Consuming,
    /// The broker says the topic does not exist; consumption resumes on its
    /// own when the topic is created again.
    TopicMissing { message: String },
    /// Its consumer failed and is started again after a backoff.
    Restarting { reason: String },
}

impl ConsumerState {
    /// The state's name, as the admin API shows it.
    pub fn name(&self) -> &'static str {
        match self {
            ConsumerState::Starting => "starting",
            ConsumerState::Consuming => "consuming",
            ConsumerState::TopicMissing { .. } => "topic-missing",
            ConsumerState::Restarting { .. } => "restarting",
        }
    }

    /// What the state says beyond its name.
    pub fn detail(&self) -> &str {
        match self {
            ConsumerState::Starting | ConsumerState::Consuming => "",
            ConsumerState::TopicMissing { message } => message,
            ConsumerState::Restarting { reason } => reason,
        }
    }
}

#[derive(Debug, Default)]
struct Status {
    lag: BTreeMap<LagKey, i64>,
    consumers: BTreeMap<String, ConsumerState>,
}

/// How the subscriptions' consumers on this node are doing: each one's
/// [`ConsumerState`], and the consumer lag of every Kafka partition they
/// consume, that is the records in the partition after the offset Ferry
/// stored for commit (after everything already committed in the partition
/// log).
///
/// Lag entries come from librdkafka's statistics (every
/// `statistics.interval.ms`) and leave when the partition is revoked or the
/// subscription stops. Each is also the gauge `ferry_ingress_consumer_lag{subscription, topic,
/// partition}`, which drops to 0 when the entry leaves; a consumer whose
/// topic is missing sets `ferry_ingress_subscription_topic_missing{subscription}`
/// to 1. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct IngressStatus {
    status: Arc<Mutex<Status>>,
}

impl IngressStatus {
    /// Every lag entry, in (subscription, topic, partition) order.
    pub fn lag(&self) -> Vec<(LagKey, i64)> {
        self.lock().lag.iter().map(|(key, &lag)| (key.clone(), lag)).collect()
    }

    /// The state of every subscription's consumer on this node, by id.
    pub fn consumers(&self) -> Vec<(String, ConsumerState)> {
        self.lock().consumers.iter().map(|(id, state)| (id.clone(), state.clone())).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().expect("ingress status lock poisoned")
    }

    fn set_lag(&self, key: LagKey, lag: i64) {
        lag_gauge(&key).set(lag as f64);
        self.lock().lag.insert(key, lag);
    }

    fn remove_lag(&self, key: &LagKey) {
        if self.lock().lag.remove(key).is_some() {
            lag_gauge(key).set(0.0);
        }
    }

    fn set_state(&self, subscription: &str, state: ConsumerState) {
        let missing = matches!(state, ConsumerState::TopicMissing { .. });
        let earlier = self.lock().consumers.insert(subscription.to_owned(), state);
        let was_missing = matches!(earlier, Some(ConsumerState::TopicMissing { .. }));
        if missing != was_missing {
            metrics::gauge!("ferry_ingress_subscription_topic_missing", "subscription" => subscription.to_owned())
                .set(if missing { 1.0 } else { 0.0 });
        }
    }

    /// Forgets a subscription that stopped on this node.
    fn remove_subscription(&self, subscription: &str) {
        self.set_state(subscription, ConsumerState::Starting);
        let mut status = self.lock();
        status.consumers.remove(subscription);
        let removed: Vec<LagKey> = status.lag.keys().filter(|k| k.subscription == subscription).cloned().collect();
        for key in removed {
            status.lag.remove(&key);
            lag_gauge(&key).set(0.0);
        }
    }
}

fn lag_gauge(key: &LagKey) -> metrics::Gauge {
    metrics::gauge!(
        "ferry_ingress_consumer_lag",
        "subscription" => key.subscription.clone(),
        "topic" => key.topic.clone(),
        "partition" => key.partition.to_string(),
    )
}

/// The program that runs a subscription's consumer: `ferry-server
/// kafka-consumer` (see [`crate::consumer`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerProgram {
    pub path: std::path::PathBuf,
    pub args: Vec<String>,
}

/// Runs the consumers of every subscription on this node.
pub struct KafkaIngress {
    log: Log,
    clusters: Arc<Vec<ClusterOptions>>,
    options: Options,
    retention: RetentionPolicy,
    status: IngressStatus,
    program: Arc<ConsumerProgram>,
}

impl KafkaIngress {
    /// An ingress whose consumers run as `program` and report into
    /// `status`; the invocations it creates are kept as `retention` says.
    pub fn new(
        log: Log,
        clusters: Vec<ClusterOptions>,
        options: Options,
        retention: RetentionPolicy,
        status: IngressStatus,
        program: ConsumerProgram,
    ) -> Self {
        KafkaIngress { log, clusters: Arc::new(clusters), options, retention, status, program: Arc::new(program) }
    }

    /// Follows the subscriptions until `cancel` fires, then stops every
    /// consumer. A subscription whose cluster changes (registered, replaced
    /// or removed at runtime), or that is resumed, gets a new consumer once
    /// the old one stopped.
    pub async fn run(self, cancel: CancellationToken) {
        let tracker = TaskTracker::new();
        let mut changes = self.log.metadata_changes();
        let mut running: HashMap<String, Running> = HashMap::new();
        // Consumers told to stop, until they have left their group.
        let mut stopping: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
        let mut drain_check = tokio::time::interval(DRAIN_CHECK_INTERVAL);
        drain_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Since when each draining subscription has had nothing open.
        let mut drained: HashMap<String, tokio::time::Instant> = HashMap::new();
        loop {
            stopping.retain(|_, task| !task.is_finished());
            // Tests make the ingress itself fail here.
            fail::fail_point!("kafka-ingress");
            let desired: BTreeMap<String, (Subscription, Option<ClusterOptions>)> = self.log.read_metadata(|m| {
                let cluster = |s: &Subscription| find_cluster(&self.clusters, m, &s.cluster);
                m.subscriptions
                    .iter()
                    .filter(|(_, s)| !s.paused && !s.draining)
                    .map(|(id, s)| (id.clone(), (s.clone(), cluster(s))))
                    .collect()
            });
            let stale: Vec<String> = running
                .iter()
                .filter(|(id, r)| desired.get(*id).is_none_or(|(_, cluster)| *cluster != r.cluster))
                .map(|(id, _)| id.clone())
                .collect();
            for id in stale {
                let Some(stopped) = running.remove(&id) else { continue };
                if desired.contains_key(&id) {
                    info!(subscription = %id, "the subscription's Kafka cluster changed, restarting its consumer");
                } else if let Some(draining) = self.log.read_metadata(|m| m.subscriptions.get(&id).map(|s| s.draining))
                {
                    let why = if draining { "being deleted" } else { "paused" };
                    info!(subscription = %id, "subscription {why}, stopping its consumer");
                } else {
                    info!(subscription = %id, "subscription deleted, stopping its consumer");
                }
                stopped.token.cancel();
                stopping.insert(id, stopped.task);
            }
            for (id, (subscription, cluster)) in desired {
                if running.contains_key(&id) {
                    continue;
                }
                let token = cancel.child_token();
                let worker = SubscriptionWorker {
                    log: self.log.clone(),
                    cluster: cluster.clone(),
                    options: self.options.clone(),
                    retention: self.retention,
                    subscription,
                    status: self.status.clone(),
                    program: self.program.clone(),
                };
                // Its consumer group has one member of this node at a time.
                let previous = stopping.remove(&id);
                let supervised = token.clone();
                let task = tracker.spawn(async move {
                    if let Some(previous) = previous {
                        let _ = previous.await;
                    }
                    // Changed again meanwhile: a later consumer replaces this one.
                    if !supervised.is_cancelled() {
                        worker.supervise(supervised).await
                    }
                });
                running.insert(id, Running { token, cluster, task });
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                _ = drain_check.tick() => self.finish_drains(&mut drained).await,
                _ = cancel.cancelled() => break,
            }
        }
        for r in running.values() {
            r.token.cancel();
        }
        tracker.close();
        tracker.wait().await;
    }
}

/// How often the metadata leader looks whether subscriptions being deleted
/// have drained.
const DRAIN_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// How long a draining subscription must have had nothing open before it
/// goes: its consumers on every node have seen it draining and stopped
/// appending by then.
const DRAIN_QUIET: Duration = Duration::from_secs(2);

impl KafkaIngress {
    /// On the metadata leader: removes each subscription being deleted
    /// whose records' invocations have all completed in every partition, for
    /// [`DRAIN_QUIET`].
    async fn finish_drains(&self, drained: &mut HashMap<String, tokio::time::Instant>) {
        let draining: Vec<String> =
            self.log.read_metadata(|m| m.subscriptions.values().filter(|s| s.draining).map(|s| s.id.clone()).collect());
        drained.retain(|id, _| draining.contains(id));
        if draining.is_empty() || !self.log.is_leader(METADATA_GROUP) {
            return;
        }
        for id in draining {
            let mut open = Ok(0);
            for partition in 0..self.log.partitions() {
                match self.log.read_partition(partition, |view| view.open_invocations(&id)) {
                    Ok(count) => open = open.map(|sum| sum + count),
                    Err(e) => {
                        open = Err(e);
                        break;
                    }
                }
            }
            match open {
                Ok(0) => {}
                Ok(open) => {
                    debug!(subscription = %id, open, "draining");
                    drained.remove(&id);
                    continue;
                }
                Err(e) => {
                    debug!(subscription = %id, "cannot count what is open: {e}");
                    drained.remove(&id);
                    continue;
                }
            }
            let since = *drained.entry(id.clone()).or_insert_with(tokio::time::Instant::now);
            if since.elapsed() < DRAIN_QUIET {
                continue;
            }
            let remove = Command::Metadata(MetadataCommand::RemoveSubscription { id: id.clone() });
            match self.log.propose(METADATA_GROUP, remove).await {
                Ok(_) => info!(subscription = %id, "subscription drained and deleted"),
                Err(e) => warn!(subscription = %id, "deleting the drained subscription: {e}"),
            }
            drained.remove(&id);
        }
    }
}

/// The consumer of a subscription on this node.
struct Running {
    token: CancellationToken,
    /// The cluster it was started for.
    cluster: Option<ClusterOptions>,
    task: tokio::task::JoinHandle<()>,
}

/// How long a consumer process has to commit its stored offsets and leave
/// the group when its subscription stops, before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// A subscription's consumer process (see [`crate::consumer`]): controls go
/// to its stdin, events come from its stdout. Killed when dropped.
struct ConsumerProcess {
    child: tokio::process::Child,
    controls: Controls,
    events: mpsc::Receiver<Event>,
}

/// Sends controls to a consumer process. Cheap to clone; a control sent
/// after the process ended is dropped.
#[derive(Clone)]
struct Controls(mpsc::UnboundedSender<Control>);

impl Controls {
    fn send(&self, control: Control) {
        let _ = self.0.send(control);
    }
}

impl ConsumerProcess {
    async fn spawn(program: &ConsumerProgram, start: &Start) -> std::io::Result<ConsumerProcess> {
        let mut child = tokio::process::Command::new(&program.path)
            .args(&program.args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            // Its own process group: a Ctrl-C meant for the node reaches the
            // node alone, which then stops the consumer in order.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()?;
        let mut stdin = tokio::io::BufWriter::new(child.stdin.take().expect("piped stdin"));
        let mut stdout = tokio::io::BufReader::with_capacity(1 << 16, child.stdout.take().expect("piped stdout"));
        let mut first = Vec::new();
        consumer::write_frame(&mut first, start)?;
        stdin.write_all(&first).await?;
        stdin.flush().await?;

        let (controls, mut pending) = mpsc::unbounded_channel::<Control>();
        tokio::spawn(async move {
            let mut frame = Vec::new();
            let mut ping = tokio::time::interval(consumer::PING_INTERVAL);
            loop {
                let control = tokio::select! {
                    control = pending.recv() => match control {
                        Some(control) => control,
                        None => return,
                    },
                    _ = ping.tick() => Control::Ping,
                };
                let mut next = Some(control);
                while let Some(control) = next {
                    frame.clear();
                    consumer::write_frame(&mut frame, &control).expect("a control encodes");
                    if stdin.write_all(&frame).await.is_err() {
                        return;
                    }
                    next = pending.try_recv().ok();
                }
                if stdin.flush().await.is_err() {
                    return;
                }
            }
        });
        let (sender, events) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut body = Vec::new();
            loop {
                let len = match stdout.read_u32_le().await {
                    Ok(len) => len as usize,
                    Err(_) => return,
                };
                if len > consumer::FRAME_BYTES_MAX {
                    warn!("consumer process sent a frame of {len} bytes; dropping it");
                    return;
                }
                body.resize(len, 0);
                if stdout.read_exact(&mut body).await.is_err() {
                    return;
                }
                let event = match consumer::decode::<Event>(&body) {
                    Ok(event) => event,
                    Err(e) => {
                        warn!("consumer process sent an undecodable frame: {e}");
                        return;
                    }
                };
                if sender.send(event).await.is_err() {
                    return;
                }
            }
        });
        Ok(ConsumerProcess { child, controls: Controls(controls), events })
    }

    /// Asks the process to commit and leave, waiting for it (and draining
    /// what it still says) up to [`STOP_TIMEOUT`], then kills it.
    async fn stop(mut self) {
        self.controls.send(Control::Stop);
        let drained = async { while self.events.recv().await.is_some() {} };
        if tokio::time::timeout(STOP_TIMEOUT, drained).await.is_err() {
            warn!("consumer process did not stop within {STOP_TIMEOUT:?}; killing it");
            let _ = self.child.start_kill();
        }
        let _ = self.child.wait().await;
    }

    /// Why the process ended, once its output closed.
    async fn exit_reason(&mut self) -> String {
        match tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await {
            Ok(Ok(status)) => format!("the consumer process exited ({status})"),
            Ok(Err(e)) => format!("the consumer process ended: {e}"),
            Err(_) => {
                let _ = self.child.start_kill();
                "the consumer process closed its output".to_owned()
            }
        }
    }
}

struct SubscriptionWorker {
    log: Log,
    /// Its cluster, if there is one of that name.
    cluster: Option<ClusterOptions>,
    options: Options,
    retention: RetentionPolicy,
    subscription: Subscription,
    status: IngressStatus,
    program: Arc<ConsumerProgram>,
}

impl SubscriptionWorker {
    /// What the subscription's consumer process starts with.
    fn start(&self) -> Result<Start, Error> {
        let sub = &self.subscription;
        let cluster = self.cluster.as_ref().ok_or_else(|| Error::UnknownCluster { name: sub.cluster.clone() })?;
        let settings = Settings::parse(&sub.options)
            .map_err(|reason| Error::InvalidSubscription { id: sub.id.clone(), reason })?;
        let client_id = format!("ferry-{}-{}", self.log.node_id(), sub.id);
        let config = consumer_config(cluster, sub, &settings, &client_id);
        Ok(Start {
            subscription: sub.id.clone(),
            topic: sub.topic.clone(),
            start: settings.start,
            // `config_map` hides credentials: each value is read with `get`.
            config: config
                .config_map()
                .keys()
                .map(|k| (k.to_string(), config.get(k).unwrap_or_default().to_owned()))
                .collect(),
            batch_records_max: self.options.batch_records_max,
            batch_bytes_max: self.options.batch_bytes_max,
        })
    }

    /// Runs the subscription's consumer until `cancel` fires. If it fails (its
    /// process crashed, or a partition worker panicked), it is torn down and
    /// started again after a backoff: consumption resumes from the offsets
    /// committed to Kafka, and what is read twice is dropped as duplicates by
    /// the partition log.
    async fn supervise(self, cancel: CancellationToken) {
        let id = &self.subscription.id;
        self.status.set_state(id, ConsumerState::Starting);
        let mut backoff = self.options.backoff();
        loop {
            let run = std::panic::AssertUnwindSafe(self.run(cancel.clone()));
            let failure = match futures::FutureExt::catch_unwind(run).await {
                Ok(Ok(())) if cancel.is_cancelled() => break,
                Ok(Ok(())) => "the consumer stopped".to_owned(),
                Ok(Err(e)) => e,
                Err(panic) => ferry_telemetry::panic_message(panic.as_ref()).to_owned(),
            };
            let delay = backoff.next();
            error!(subscription = %id, "subscription failed: {failure}; restarting in {delay:?}");
            metrics::counter!("ferry_ingress_subscription_restarts_total", "subscription" => id.clone()).increment(1);
            let missing = matches!(self.status.lock().consumers.get(id), Some(ConsumerState::TopicMissing { .. }));
            if !missing {
                self.status.set_state(id, ConsumerState::Restarting { reason: failure });
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = cancel.cancelled() => break,
            }
        }
        self.status.remove_subscription(id);
    }

    /// Consumes until `cancel` fires; `Err` when the consumer process ended
    /// or a partition worker failed.
    async fn run(&self, cancel: CancellationToken) -> Result<(), String> {
        let sub = &self.subscription;
        let mut backoff = self.options.backoff();
        let mut failed_to_start = false;
        let mut process = loop {
            let spawned = match self.start() {
                Ok(start) => ConsumerProcess::spawn(&self.program, &start)
                    .await
                    .map_err(|e| format!("cannot start the consumer process {}: {e}", self.program.path.display())),
                Err(e) => Err(e.to_string()),
            };
            match spawned {
                Ok(process) => break process,
                Err(e) => {
                    let delay = backoff.next();
                    warn!(subscription = %sub.id, "{e}; retrying in {delay:?}");
                    self.status.set_state(&sub.id, ConsumerState::Restarting { reason: e });
                    failed_to_start = true;
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => continue,
                        _ = cancel.cancelled() => return Ok(()),
                    }
                }
            }
        };
        if failed_to_start {
            self.status.set_state(&sub.id, ConsumerState::Starting);
        }
        info!(subscription = %sub.id, source = %sub.source(), sink = %sub.sink(), group = sub.group_id(), "consuming");
        let mut feeds = Feeds {
            worker: self,
            controls: process.controls.clone(),
            cancel: cancel.clone(),
            assigned: HashMap::new(),
            topic_id: None,
            feeds: HashMap::new(),
            workers: JoinSet::new(),
            permits: FuturesUnordered::new(),
            feeds_started: 0,
        };
        let labels = [("subscription", sub.id.clone())];
        // Whether the consumer said the topic is missing since it last
        // consumed.
        let mut topic_missing = false;
        let failure = loop {
            tokio::select! {
                _ = cancel.cancelled() => break None,
                Some(joined) = feeds.workers.join_next(), if !feeds.workers.is_empty() => {
                    if let Err(e) = joined {
                        if e.is_panic() {
                            break Some(format!("a partition worker panicked: {}", ferry_telemetry::panic_message(e.into_panic().as_ref())));
                        }
                    }
                }
                Some((partition, feed, permit)) = feeds.permits.next(), if !feeds.permits.is_empty() => {
                    feeds.unstall(partition, feed, permit);
                }
                event = process.events.recv() => match event {
                    None => break Some(process.exit_reason().await),
                    Some(Event::Records { partition, records }) => {
                        if std::mem::take(&mut topic_missing) {
                            self.status.set_state(&sub.id, ConsumerState::Consuming);
                        }
                        metrics::counter!("ferry_ingress_records_consumed_total", &labels).increment(records.len() as u64);
                        for record in records {
                            feeds.deliver(partition, record);
                        }
                    }
                    Some(Event::Assigned { topic_id, partitions }) => {
                        if topic_id != feeds.topic_id {
                            info!(subscription = %sub.id, topic = %sub.topic, "topic id {}", topic_id.as_deref().unwrap_or("(none)"));
                        }
                        feeds.topic_id = topic_id;
                        feeds.assigned.extend(partitions);
                        topic_missing = false;
                        self.status.set_state(&sub.id, ConsumerState::Consuming);
                    }
                    Some(Event::Revoked { partitions }) => {
                        for partition in partitions {
                            feeds.revoke(partition);
                            self.status.remove_lag(&self.lag_key(partition));
                        }
                    }
                    Some(Event::Lag { partition, lag }) => {
                        if feeds.assigned.contains_key(&partition) {
                            self.status.set_lag(self.lag_key(partition), lag);
                        }
                    }
                    Some(Event::Error { message, topic_missing: missing }) => {
                        warn!(subscription = %sub.id, topic = %sub.topic, "Kafka consumer error: {message}");
                        metrics::counter!("ferry_ingress_consumer_errors_total", &labels).increment(1);
                        if missing {
                            topic_missing = true;
                            self.status.set_state(&sub.id, ConsumerState::TopicMissing { message });
                        }
                    }
                    Some(Event::Log { level, message }) => match level {
                        LogLevel::Error => error!(subscription = %sub.id, "{message}"),
                        LogLevel::Warn => warn!(subscription = %sub.id, "{message}"),
                        LogLevel::Info => info!(subscription = %sub.id, "{message}"),
                        LogLevel::Debug => debug!(subscription = %sub.id, "{message}"),
                    },
                },
            }
        };
        let Feeds { feeds: senders, mut workers, .. } = feeds;
        drop(senders);
        if let Some(failure) = failure {
            workers.shutdown().await;
            // A consumer still running leaves its group before it is
            // started again, so its partitions need not wait for the
            // session timeout.
            process.stop().await;
            return Err(failure);
        }
        while workers.join_next().await.is_some() {}
        process.stop().await;
        info!(subscription = %sub.id, "consumer stopped");
        Ok(())
    }

    fn lag_key(&self, partition: i32) -> LagKey {
        LagKey { subscription: self.subscription.id.clone(), topic: self.subscription.topic.clone(), partition }
    }

    /// Starts the worker of `partition` under assignment `generation`.
    fn start_worker(
        &self,
        controls: &Controls,
        workers: &mut JoinSet<()>,
        partition: i32,
        generation: u64,
        topic_id: Option<&str>,
        token: CancellationToken,
    ) -> mpsc::Sender<Record> {
        let sub = &self.subscription;
        let settings = Settings::parse(&sub.options);
        let (tx, rx) = mpsc::channel(self.options.batch_records_max);
        let worker = PartitionWorker {
            log: self.log.clone(),
            controls: controls.clone(),
            generation,
            subscription: sub.clone(),
            origin: Origin {
                subscription: sub.id.clone(),
                topic: sub.topic.clone(),
                partition,
                producer: kafka_producer_id(&sub.id, sub.group_id(), &sub.topic, topic_id, partition),
                ordered: settings.as_ref().is_ok_and(|s| s.ordered),
                dead_letter: settings.ok().and_then(|s| s.dead_letter_topic(&sub.cluster)),
            },
            options: self.options.clone(),
            retention: self.retention,
            labels: [("subscription", sub.id.clone())],
            assignment: token.clone(),
        };
        workers.spawn(worker.run(rx, token));
        tx
    }
}

/// A permit to send one record to a partition's worker, once it has room:
/// (partition, the feed it was asked for, the permit).
type Permit = (i32, u64, Result<mpsc::OwnedPermit<Record>, mpsc::error::SendError<()>>);

/// Hands records from the consumer to the worker of their Kafka partition
/// without ever waiting on one: a worker that is full (its Raft partition
/// takes no appends) gets its partition held back in the consumer process
/// and its records kept here, while every other partition goes on.
struct Feeds<'a> {
    worker: &'a SubscriptionWorker,
    controls: Controls,
    cancel: CancellationToken,
    /// The assignment generation of each assigned partition.
    assigned: HashMap<i32, u64>,
    /// The topic's id as of the last assignment.
    topic_id: Option<String>,
    feeds: HashMap<i32, Feed>,
    workers: JoinSet<()>,
    permits: FuturesUnordered<futures::future::BoxFuture<'static, Permit>>,
    /// Numbers the feeds, so that a permit of a replaced one is told apart.
    feeds_started: u64,
}

struct Feed {
    id: u64,
    /// The assignment its worker reads for.
    generation: u64,
    tx: mpsc::Sender<Record>,
    /// Cancelled when the partition is revoked.
    token: CancellationToken,
    /// Records read while the worker was full, oldest first.
    stalled: VecDeque<Record>,
}

impl Feeds<'_> {
    /// Hands `record` to its partition's worker, starting one if the
    /// partition has none (newly assigned).
    fn deliver(&mut self, partition: i32, record: Record) {
        if !self.feeds.contains_key(&partition) {
            let Some(&generation) = self.assigned.get(&partition) else {
                debug!(subscription = %self.worker.subscription.id, partition, offset = record.offset, "record of an unassigned partition dropped");
                return;
            };
            let token = self.cancel.child_token();
            let tx = self.worker.start_worker(
                &self.controls,
                &mut self.workers,
                partition,
                generation,
                self.topic_id.as_deref(),
                token.clone(),
            );
            self.feeds_started += 1;
            let feed = Feed { id: self.feeds_started, generation, tx, token, stalled: VecDeque::new() };
            self.feeds.insert(partition, feed);
        }
        let feed = self.feeds.get_mut(&partition).expect("a feed per partition");
        if !feed.stalled.is_empty() {
            feed.stalled.push_back(record);
            return;
        }
        match feed.tx.try_send(record) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(record)) => {
                feed.stalled.push_back(record);
                let (id, generation, tx) = (feed.id, feed.generation, feed.tx.clone());
                self.hold(partition, generation, true);
                self.permits.push(Box::pin(async move { (partition, id, tx.reserve_owned().await) }));
            }
            // The worker ended (it was revoked): the records of its
            // partition are read again by whoever owns it now.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Tears down the worker of a revoked partition: it stores no offset
    /// from now on, and its records are read again by the partition's next
    /// owner.
    fn revoke(&mut self, partition: i32) {
        self.assigned.remove(&partition);
        if let Some(feed) = self.feeds.remove(&partition) {
            feed.token.cancel();
        }
    }

    /// The worker of `partition` has room again: hands it what waits.
    fn unstall(
        &mut self,
        partition: i32,
        id: u64,
        permit: Result<mpsc::OwnedPermit<Record>, mpsc::error::SendError<()>>,
    ) {
        // A permit of a feed since replaced (its worker was revoked) is void.
        let Some(feed) = self.feeds.get_mut(&partition).filter(|feed| feed.id == id) else { return };
        let generation = feed.generation;
        let Ok(permit) = permit else {
            // The worker is gone; its partition was revoked.
            feed.stalled.clear();
            self.hold(partition, generation, false);
            return;
        };
        let Some(first) = feed.stalled.pop_front() else { return };
        permit.send(first);
        while let Some(record) = feed.stalled.pop_front() {
            match feed.tx.try_send(record) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(record)) => {
                    feed.stalled.push_front(record);
                    let tx = feed.tx.clone();
                    self.permits.push(Box::pin(async move { (partition, id, tx.reserve_owned().await) }));
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => feed.stalled.clear(),
            }
        }
        self.hold(partition, generation, false);
    }

    /// Holds `partition` back in the consumer process, or releases it. The
    /// process stops handing over its records and librdkafka keeps what it
    /// prefetched, up to its queue limits; the records already on their way
    /// wait here.
    fn hold(&self, partition: i32, generation: u64, hold: bool) {
        let what = if hold { "held back: its worker is full" } else { "released" };
        debug!(subscription = %self.worker.subscription.id, partition, "{what}");
        if hold {
            let labels = [("subscription", self.worker.subscription.id.clone())];
            metrics::counter!("ferry_ingress_partition_holds_total", &labels).increment(1);
        }
        self.controls.send(if hold {
            Control::Hold { partition, generation }
        } else {
            Control::Release { partition, generation }
        });
    }
}

/// Records of one target partition waiting for their turn to be appended.
#[derive(Default)]
struct Lane {
    invokes: Vec<Invoke>,
    offsets: Vec<i64>,
    timestamps: Vec<Option<i64>>,
    /// The ingest and append spans of traced records, closed on commit.
    spans: Vec<Span>,
    busy: bool,
}

struct PartitionWorker {
    log: Log,
    controls: Controls,
    /// The assignment this worker reads for: its stores name it.
    generation: u64,
    subscription: Subscription,
    origin: Origin,
    options: Options,
    retention: RetentionPolicy,
    labels: [(&'static str, String); 1],
    /// Cancelled when the partition is revoked from this consumer.
    assignment: CancellationToken,
}

/// An append that committed: its target partition, the offsets it carried,
/// the record timestamps (for the record-to-commit latency) and the spans it
/// ends.
type Appended = (PartitionId, Vec<i64>, Vec<Option<i64>>, Vec<Span>, Response);

impl PartitionWorker {
    async fn run(self, mut rx: mpsc::Receiver<Record>, cancel: CancellationToken) {
        let partitions = self.log.partitions();
        let mut lanes: HashMap<PartitionId, Lane> = HashMap::new();
        let mut in_flight = FuturesUnordered::new();
        // Offsets read but not yet committed in Raft.
        let mut pending: BTreeSet<i64> = BTreeSet::new();
        let mut buffered = 0usize;
        let mut highest_read: Option<i64> = None;
        let mut stored: Option<i64> = None;
        let mut batch = Vec::with_capacity(self.options.batch_records_max);
        let mut closed = false;
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                appended = in_flight.next(), if !in_flight.is_empty() => {
                    let Some((partition, offsets, timestamps, spans, response)): Option<Appended> = appended else { continue };
                    drop(spans);
                    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
                    let latency = metrics::histogram!("ferry_ingress_record_commit_latency_seconds", &self.labels);
                    for timestamp in timestamps.into_iter().flatten() {
                        latency.record((now_ms - timestamp).max(0) as f64 / 1000.0);
                    }
                    let (created, deduplicated) = match response {
                        Response::Invoked { created, deduplicated } => (created, deduplicated),
                        other => panic!("unexpected response to an invoke batch: {other:?}"),
                    };
                    metrics::counter!("ferry_ingress_records_appended_total", &self.labels).increment(created as u64);
                    metrics::counter!("ferry_ingress_records_deduplicated_total", &self.labels).increment(deduplicated as u64);
                    buffered -= offsets.len();
                    for offset in &offsets {
                        pending.remove(offset);
                    }
                    let lane = lanes.get_mut(&partition).expect("lane of an append");
                    lane.busy = false;
                    if !lane.invokes.is_empty() {
                        in_flight.push(self.append(partition, lane));
                    }
                    stored = self.store_progress(&pending, highest_read, stored);
                }
                received = rx.recv_many(&mut batch, self.options.batch_records_max),
                    if !closed && buffered < self.options.buffer_records_max => {
                    // Tests make a partition worker panic here.
                    fail::fail_point!("ingress-partition-worker");
                    if received == 0 {
                        closed = true;
                        if in_flight.is_empty() {
                            return;
                        }
                        continue;
                    }
                    let sink = self.log.read_metadata(|m| Sink::resolve(m, &self.subscription, self.retention));
                    if let Some(reason) = &sink.unavailable {
                        warn!(subscription = %self.subscription.id, "{reason}; records fail");
                    }
                    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
                    let tracing_on = ferry_telemetry::exporting();
                    for record in batch.drain(..) {
                        let (offset, timestamp_ms) = (record.offset, record.timestamp_ms);
                        highest_read = highest_read.max(Some(offset));
                        pending.insert(offset);
                        buffered += 1;
                        let (partition, mut invoke) = record::invoke(&self.origin, &sink, record, partitions, now_ms);
                        let lane = lanes.entry(partition).or_default();
                        if tracing_on {
                            let ingest = self.ingest_span(&invoke, offset, partition);
                            let append = crate::append_span(&ingest, partition, &invoke.id);
                            invoke.trace = ferry_telemetry::TraceContext::of(&append);
                            lane.spans.extend([ingest, append]);
                        }
                        if let Some((_, reason)) = &invoke.failure {
                            debug!(subscription = %self.origin.subscription, topic = %self.origin.topic,
                                partition = self.origin.partition, offset, "undeliverable record: {reason}");
                            metrics::counter!("ferry_ingress_records_undeliverable_total", &self.labels).increment(1);
                        }
                        lane.timestamps.push(timestamp_ms);
                        lane.invokes.push(invoke);
                        lane.offsets.push(offset);
                    }
                    for (&partition, lane) in lanes.iter_mut() {
                        if !lane.busy && !lane.invokes.is_empty() {
                            in_flight.push(self.append(partition, lane));
                        }
                    }
                }
            }
            if closed && in_flight.is_empty() {
                return;
            }
        }
    }

    /// Appends the oldest records queued in `lane`, at most
    /// `batch-bytes-max` of them (at least one), retrying until they commit.
    fn append(&self, partition: PartitionId, lane: &mut Lane) -> impl std::future::Future<Output = Appended> {
        lane.busy = true;
        let mut bytes = 0;
        let count = lane
            .invokes
            .iter()
            .take_while(|invoke| {
                bytes += record::invoke_bytes(invoke);
                bytes <= self.options.batch_bytes_max
            })
            .count()
            .max(1);
        let rest = lane.invokes.split_off(count);
        let batch = Arc::new(std::mem::replace(&mut lane.invokes, rest));
        let rest = lane.offsets.split_off(count);
        let offsets = std::mem::replace(&mut lane.offsets, rest);
        let rest = lane.timestamps.split_off(count);
        let timestamps = std::mem::replace(&mut lane.timestamps, rest);
        let spans = std::mem::take(&mut lane.spans);
        let log = self.log.clone();
        let mut backoff = self.options.backoff();
        let origin = self.origin.clone();
        async move {
            loop {
                // Tests make appends to one partition fail here: `ingress-append-<partition>`.
                let injected = (|| {
                    fail::fail_point!(&format!("ingress-append-{partition}"), |_| true);
                    false
                })();
                let appended = match injected {
                    true => {
                        Err(ferry_log::Error::Write { group: partition_group(partition), message: "injected".into() })
                    }
                    false => log.propose(partition_group(partition), Command::Invoke(batch.clone())).await,
                };
                match appended {
                    Ok(response) => return (partition, offsets, timestamps, spans, response),
                    Err(e) => {
                        let delay = backoff.next();
                        warn!(subscription = %origin.subscription, topic = %origin.topic, partition = origin.partition,
                            offset = offsets[0], "append to partition {partition} failed: {e}; retrying in {delay:?}");
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        }
    }

    /// The span of one record from its arrival until its invocation is
    /// committed, with OpenTelemetry's messaging attributes.
    fn ingest_span(&self, invoke: &Invoke, offset: i64, partition: PartitionId) -> Span {
        let origin = &self.origin;
        tracing::debug_span!(
            parent: None,
            "ingest",
            otel.name = format!("process {}", origin.topic),
            otel.kind = "consumer",
            messaging.system = "kafka",
            messaging.operation.type = "process",
            messaging.destination.name = %origin.topic,
            messaging.destination.partition.id = %origin.partition,
            messaging.kafka.offset = offset,
            messaging.consumer.group.name = self.subscription.group_id(),
            ferry.subscription = %origin.subscription,
            ferry.partition = partition,
            restate.invocation.id = %invoke.id,
        )
    }

    /// Stores the highest offset below which everything is committed in Raft,
    /// so that the next auto-commit hands it to Kafka. Never moves backwards.
    fn store_progress(&self, pending: &BTreeSet<i64>, highest_read: Option<i64>, stored: Option<i64>) -> Option<i64> {
        let done = match pending.first() {
            Some(&lowest) => lowest - 1,
            None => match highest_read {
                Some(h) => h,
                None => return stored,
            },
        };
        if stored.is_some_and(|s| done <= s) || done < 0 || self.assignment.is_cancelled() {
            return stored;
        }
        // The consumer process stores it only if this worker's assignment
        // still stands there.
        self.controls.send(Control::Store {
            partition: self.origin.partition,
            generation: self.generation,
            offset: done,
        });
        Some(done)
    }
}
