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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ferry_log::partitioner::kafka_producer_id;
use ferry_log::wire::v1::{Command, Invoke, Response, Subscription};
use ferry_log::{partition_group, LogNode, PartitionId};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientContext, Statistics, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, trace, warn, Span};

use crate::record::{self, Origin, Record, Sink};
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

    /// Properties with secret values hidden, for display.
    pub fn redacted_properties(&self) -> BTreeMap<String, String> {
        self.properties
            .iter()
            .map(|(k, v)| {
                let secret = ["password", "secret", "token", "key"].iter().any(|s| k.to_ascii_lowercase().contains(s));
                (k.clone(), if secret { "***".to_owned() } else { v.to_string() })
            })
            .collect()
    }
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

/// Builds the librdkafka configuration of a subscription's consumer.
pub fn consumer_config(cluster: &ClusterOptions, subscription: &Subscription, client_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", cluster.brokers.join(","));
    config.set("client.id", client_id);
    // Incremental rebalances move only the partitions that change owner, so a
    // node joining or leaving does not pause every other node's partitions.
    config.set("partition.assignment.strategy", "cooperative-sticky");
    for (k, v) in &cluster.properties {
        config.set(k, v.to_string());
    }
    for (k, v) in &subscription.options {
        config.set(k, v);
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

/// The consumer lag of every Kafka partition the subscriptions consume on
/// this node: records in the partition after the offset Ferry stored for
/// commit, that is after everything already committed in the partition log.
/// Entries come from librdkafka's statistics (every `statistics.interval.ms`)
/// and leave when the partition is revoked or the subscription stops. Each
/// entry is also the gauge `ferry_ingress_consumer_lag{subscription, topic,
/// partition}`, which drops to 0 when the entry leaves. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct LagTable {
    entries: Arc<Mutex<BTreeMap<LagKey, i64>>>,
}

impl LagTable {
    /// Every entry, in (subscription, topic, partition) order.
    pub fn entries(&self) -> Vec<(LagKey, i64)> {
        self.lock().iter().map(|(key, &lag)| (key.clone(), lag)).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<LagKey, i64>> {
        self.entries.lock().expect("lag table lock poisoned")
    }

    fn set(&self, key: LagKey, lag: i64) {
        gauge(&key).set(lag as f64);
        self.lock().insert(key, lag);
    }

    fn remove(&self, key: &LagKey) {
        if self.lock().remove(key).is_some() {
            gauge(key).set(0.0);
        }
    }

    fn remove_subscription(&self, subscription: &str) {
        let mut entries = self.lock();
        let removed: Vec<LagKey> = entries.keys().filter(|k| k.subscription == subscription).cloned().collect();
        for key in removed {
            entries.remove(&key);
            gauge(&key).set(0.0);
        }
    }
}

fn gauge(key: &LagKey) -> metrics::Gauge {
    metrics::gauge!(
        "ferry_ingress_consumer_lag",
        "subscription" => key.subscription.clone(),
        "topic" => key.topic.clone(),
        "partition" => key.partition.to_string(),
    )
}

/// Runs the consumers of every subscription on this node.
pub struct KafkaIngress {
    log: LogNode,
    clusters: Arc<Vec<ClusterOptions>>,
    options: Options,
    lag: LagTable,
}

impl KafkaIngress {
    /// An ingress whose consumers report their lag into `lag`.
    pub fn new(log: LogNode, clusters: Vec<ClusterOptions>, options: Options, lag: LagTable) -> Self {
        KafkaIngress { log, clusters: Arc::new(clusters), options, lag }
    }

    /// Follows the subscriptions until `cancel` fires, then stops every consumer.
    pub async fn run(self, cancel: CancellationToken) {
        let tracker = TaskTracker::new();
        let mut changes = self.log.metadata_changes();
        let mut running: HashMap<String, CancellationToken> = HashMap::new();
        loop {
            // Tests make the ingress itself fail here.
            fail::fail_point!("kafka-ingress");
            let desired = self.log.read_metadata(|m| m.subscriptions.clone());
            running.retain(|id, token| {
                let keep = desired.contains_key(id);
                if !keep {
                    info!(subscription = %id, "subscription deleted, stopping its consumer");
                    token.cancel();
                }
                keep
            });
            for (id, subscription) in desired {
                if running.contains_key(&id) {
                    continue;
                }
                let token = cancel.child_token();
                running.insert(id, token.clone());
                let worker = SubscriptionWorker {
                    log: self.log.clone(),
                    clusters: self.clusters.clone(),
                    options: self.options.clone(),
                    subscription,
                    lag: self.lag.clone(),
                };
                tracker.spawn(worker.supervise(token));
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                _ = cancel.cancelled() => break,
            }
        }
        for token in running.values() {
            token.cancel();
        }
        tracker.close();
        tracker.wait().await;
    }
}

/// The context of a subscription's consumer: logs rebalances and commits,
/// and turns statistics into the lag of the partitions assigned to it.
struct ConsumerLog {
    subscription: String,
    lag: LagTable,
    /// (topic, partition) assigned to this consumer.
    assigned: Mutex<BTreeSet<(String, i32)>>,
    /// Set when the consumer stops, after which statistics are ignored.
    stopped: AtomicBool,
    /// The token of each assigned partition's worker. Revoking a partition
    /// cancels its worker under this lock, and a worker stores offsets only
    /// under it while its token stands: a worker of a revoked partition never
    /// stores an offset, even one whose append commits later.
    workers: Mutex<HashMap<i32, CancellationToken>>,
}

impl ConsumerLog {
    fn new(subscription: String, lag: LagTable) -> Self {
        ConsumerLog {
            subscription,
            lag,
            assigned: Mutex::default(),
            stopped: AtomicBool::new(false),
            workers: Mutex::default(),
        }
    }

    fn key(&self, topic: &str, partition: i32) -> LagKey {
        LagKey { subscription: self.subscription.clone(), topic: topic.to_owned(), partition }
    }

    fn lock_workers(&self) -> std::sync::MutexGuard<'_, HashMap<i32, CancellationToken>> {
        self.workers.lock().expect("workers lock poisoned")
    }

    /// Stops reporting lag and removes this subscription's entries.
    fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.lag.remove_subscription(&self.subscription);
    }
}

impl ClientContext for ConsumerLog {
    fn stats(&self, statistics: Statistics) {
        if self.stopped.load(Ordering::SeqCst) {
            return;
        }
        let assigned = self.assigned.lock().expect("assignment lock poisoned");
        for (topic, stats) in &statistics.topics {
            for (&partition, p) in &stats.partitions {
                if !assigned.contains(&(topic.clone(), partition)) {
                    continue;
                }
                trace!(subscription = %self.subscription, topic, partition, fetch_state = %p.fetch_state,
                    lo = p.lo_offset, hi = p.hi_offset, ls = p.ls_offset, next = p.next_offset,
                    app = p.app_offset, stored = p.stored_offset, committed = p.committed_offset,
                    consumer_lag = p.consumer_lag, consumer_lag_stored = p.consumer_lag_stored, "partition statistics");
                if let Some(lag) = partition_lag(p) {
                    self.lag.set(self.key(topic, partition), lag);
                }
            }
        }
    }
}

impl ConsumerContext for ConsumerLog {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                info!(subscription = %self.subscription, "assigned {}", describe(tpl));
                let mut assigned = self.assigned.lock().expect("assignment lock poisoned");
                assigned.extend(tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())));
            }
            Rebalance::Revoke(tpl) => {
                info!(subscription = %self.subscription, "revoked {}", describe(tpl));
                let mut assigned = self.assigned.lock().expect("assignment lock poisoned");
                let mut workers = self.lock_workers();
                for e in tpl.elements() {
                    assigned.remove(&(e.topic().to_owned(), e.partition()));
                    self.lag.remove(&self.key(e.topic(), e.partition()));
                    if let Some(worker) = workers.remove(&e.partition()) {
                        worker.cancel();
                    }
                }
            }
            Rebalance::Error(e) => warn!(subscription = %self.subscription, "rebalance failed: {e}"),
        }
    }

    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => debug!(subscription = %self.subscription, "committed {}", describe(offsets)),
            Err(e) => warn!(subscription = %self.subscription, "offset commit failed: {e}"),
        }
    }
}

fn describe(tpl: &TopicPartitionList) -> String {
    let parts: Vec<String> =
        tpl.elements().iter().map(|e| format!("{}/{}@{:?}", e.topic(), e.partition(), e.offset())).collect();
    parts.join(", ")
}

type KafkaConsumer = StreamConsumer<ConsumerLog>;

/// The lag of one assigned partition from its statistics: the partition's end
/// (the high watermark of the last fetch, or the last stable offset under
/// `read_committed`) minus the offset Ferry stored, or the committed one
/// before it stored any. `None` while neither is known, unless the consumer
/// has read nothing and waits at the end.
///
/// The end comes from fetch responses, which tansu 0.6 answers correctly;
/// its `ListOffsets(latest)` is wrong for multi-record batches, so nothing
/// here asks for the watermarks.
fn partition_lag(p: &rdkafka::statistics::Partition) -> Option<i64> {
    if p.consumer_lag_stored >= 0 {
        return Some(p.consumer_lag_stored);
    }
    if p.consumer_lag >= 0 {
        return Some(p.consumer_lag);
    }
    let waiting_at_end = p.app_offset < 0 && p.next_offset >= 0 && p.next_offset == p.hi_offset;
    waiting_at_end.then_some(0)
}

struct SubscriptionWorker {
    log: LogNode,
    clusters: Arc<Vec<ClusterOptions>>,
    options: Options,
    subscription: Subscription,
    lag: LagTable,
}

impl SubscriptionWorker {
    fn create_consumer(&self) -> Result<KafkaConsumer, Error> {
        let sub = &self.subscription;
        let cluster = self.clusters.iter().find(|c| c.name == sub.cluster).ok_or_else(|| Error::UnknownCluster {
            name: sub.cluster.clone(),
            known: self.clusters.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", "),
        })?;
        let client_id = format!("ferry-{}-{}", self.log.node_id(), sub.id);
        let consumer: KafkaConsumer = consumer_config(cluster, sub, &client_id)
            .create_with_context(ConsumerLog::new(sub.id.clone(), self.lag.clone()))
            .map_err(|source| Error::Consumer { subscription: sub.id.clone(), source })?;
        consumer.subscribe(&[&sub.topic]).map_err(|source| Error::Consumer { subscription: sub.id.clone(), source })?;
        Ok(consumer)
    }

    /// Runs the subscription's consumer until `cancel` fires. If it fails (a
    /// partition worker panicked), it is torn down and started again after a
    /// backoff: consumption resumes from the offsets committed to Kafka, and
    /// what is read twice is dropped as duplicates by the partition log.
    async fn supervise(self, cancel: CancellationToken) {
        let mut backoff = self.options.backoff();
        loop {
            let run = std::panic::AssertUnwindSafe(self.run(cancel.clone()));
            let failure = match futures::FutureExt::catch_unwind(run).await {
                Ok(Ok(())) if cancel.is_cancelled() => return,
                Ok(Ok(())) => "the consumer stopped".to_owned(),
                Ok(Err(e)) => e,
                Err(panic) => ferry_telemetry::panic_message(panic.as_ref()).to_owned(),
            };
            let delay = backoff.next();
            error!(subscription = %self.subscription.id, "subscription failed: {failure}; restarting in {delay:?}");
            metrics::counter!("ferry_ingress_subscription_restarts_total", "subscription" => self.subscription.id.clone())
                .increment(1);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = cancel.cancelled() => return,
            }
        }
    }

    /// Consumes until `cancel` fires; `Err` when a partition worker failed.
    async fn run(&self, cancel: CancellationToken) -> Result<(), String> {
        let sub = &self.subscription;
        let mut backoff = self.options.backoff();
        let consumer = loop {
            match self.create_consumer() {
                Ok(consumer) => break Arc::new(consumer),
                Err(e) => {
                    let delay = backoff.next();
                    warn!(subscription = %sub.id, "{e}; retrying in {delay:?}");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => continue,
                        _ = cancel.cancelled() => return Ok(()),
                    }
                }
            }
        };
        info!(subscription = %sub.id, source = %sub.source(), sink = %sub.sink(), group = sub.group_id(), "consuming");
        let mut feeds = Feeds {
            worker: self,
            consumer: consumer.clone(),
            cancel: cancel.clone(),
            feeds: HashMap::new(),
            workers: JoinSet::new(),
            permits: FuturesUnordered::new(),
            feeds_started: 0,
        };
        let labels = [("subscription", sub.id.clone())];
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
                message = consumer.recv() => match message {
                    Ok(message) => {
                        let partition = message.partition();
                        let record = record_of(&message);
                        drop(message);
                        metrics::counter!("ferry_ingress_records_consumed_total", &labels).increment(1);
                        feeds.deliver(partition, record);
                    }
                    Err(e) => {
                        // librdkafka reconnects with its own backoff
                        // (reconnect.backoff.ms); errors here only report it.
                        warn!(subscription = %sub.id, topic = %sub.topic, "Kafka consumer error: {e}");
                        metrics::counter!("ferry_ingress_consumer_errors_total", &labels).increment(1);
                    }
                },
            }
        };
        let Feeds { feeds: senders, mut workers, .. } = feeds;
        drop(senders);
        if let Some(failure) = failure {
            workers.shutdown().await;
            consumer.context().stop();
            return Err(failure);
        }
        while workers.join_next().await.is_some() {}
        let closing = consumer.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = closing.commit_consumer_state(CommitMode::Sync) {
                debug!("final offset commit: {e}");
            }
            closing.unsubscribe();
        })
        .await;
        consumer.context().stop();
        info!(subscription = %sub.id, "consumer stopped");
        Ok(())
    }

    /// Starts the worker of `partition`, replacing any earlier one.
    fn start_worker(
        &self,
        consumer: &Arc<KafkaConsumer>,
        workers: &mut JoinSet<()>,
        partition: i32,
        cancel: &CancellationToken,
    ) -> mpsc::Sender<Record> {
        let sub = &self.subscription;
        let (tx, rx) = mpsc::channel(self.options.batch_records_max);
        let token = cancel.child_token();
        if let Some(earlier) = consumer.context().lock_workers().insert(partition, token.clone()) {
            earlier.cancel();
        }
        let worker = PartitionWorker {
            log: self.log.clone(),
            consumer: consumer.clone(),
            subscription: sub.clone(),
            origin: Origin {
                subscription: sub.id.clone(),
                topic: sub.topic.clone(),
                partition,
                producer: kafka_producer_id(&sub.id, sub.group_id(), &sub.topic, partition),
            },
            options: self.options.clone(),
            labels: [("subscription", sub.id.clone())],
            assignment: token.clone(),
        };
        workers.spawn(worker.run(rx, token));
        tx
    }
}

/// Copies a record out of librdkafka's buffer.
fn record_of(message: &rdkafka::message::BorrowedMessage<'_>) -> Record {
    Record {
        offset: message.offset(),
        key: message.key().map(Bytes::copy_from_slice),
        payload: message.payload().map(Bytes::copy_from_slice).unwrap_or_default(),
        headers: message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|h| (h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
                    .collect()
            })
            .unwrap_or_default(),
        timestamp_ms: message.timestamp().to_millis(),
    }
}

/// A permit to send one record to a partition's worker, once it has room:
/// (partition, the feed it was asked for, the permit).
type Permit = (i32, u64, Result<mpsc::OwnedPermit<Record>, mpsc::error::SendError<()>>);

/// Hands records from the consumer to the worker of their Kafka partition
/// without ever waiting on one: a worker that is full (its Raft partition
/// takes no appends) gets its partition paused in the consumer and its
/// records held here, while every other partition goes on.
struct Feeds<'a> {
    worker: &'a SubscriptionWorker,
    consumer: Arc<KafkaConsumer>,
    cancel: CancellationToken,
    feeds: HashMap<i32, Feed>,
    workers: JoinSet<()>,
    permits: FuturesUnordered<futures::future::BoxFuture<'static, Permit>>,
    /// Numbers the feeds, so that a permit of a replaced one is told apart.
    feeds_started: u64,
}

struct Feed {
    id: u64,
    tx: mpsc::Sender<Record>,
    /// Records read while the worker was full, oldest first.
    stalled: VecDeque<Record>,
}

impl Feeds<'_> {
    /// Hands `record` to its partition's worker, starting one if the
    /// partition has none (newly assigned, or its worker was revoked).
    fn deliver(&mut self, partition: i32, record: Record) {
        if self.feeds.get(&partition).is_none_or(|feed| feed.tx.is_closed()) {
            let tx = self.worker.start_worker(&self.consumer, &mut self.workers, partition, &self.cancel);
            self.feeds_started += 1;
            self.feeds.insert(partition, Feed { id: self.feeds_started, tx, stalled: VecDeque::new() });
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
                let (id, tx) = (feed.id, feed.tx.clone());
                self.pause(partition, true);
                self.permits.push(Box::pin(async move { (partition, id, tx.reserve_owned().await) }));
            }
            // The worker ended after the check above (revoked): the records
            // of its partition are read again by whoever owns it now.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
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
        let Ok(permit) = permit else {
            // The worker is gone; its partition was revoked.
            feed.stalled.clear();
            self.pause(partition, false);
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
        self.pause(partition, false);
    }

    /// Pauses or resumes fetching `partition`. While paused, librdkafka drops
    /// what it prefetched and, once resumed, fetches again from the record
    /// after the last one it delivered.
    fn pause(&self, partition: i32, paused: bool) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.worker.subscription.topic, partition);
        let result = if paused { self.consumer.pause(&tpl) } else { self.consumer.resume(&tpl) };
        let what = if paused { "paused" } else { "resumed" };
        match result {
            Ok(()) => debug!(subscription = %self.worker.subscription.id, partition, "{what}: its worker is full"),
            Err(e) => debug!(subscription = %self.worker.subscription.id, partition, "could not be {what}: {e}"),
        }
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
    log: LogNode,
    consumer: Arc<KafkaConsumer>,
    subscription: Subscription,
    origin: Origin,
    options: Options,
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
                    let sink = self.log.read_metadata(|m| Sink::resolve(m, &self.subscription));
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
                        if let Some(reason) = &invoke.failure {
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
        if stored.is_some_and(|s| done <= s) || done < 0 {
            return stored;
        }
        let _workers = self.consumer.context().lock_workers();
        if self.assignment.is_cancelled() {
            return stored;
        }
        // librdkafka commits the stored offset + 1: the next record to read.
        if let Err(e) = self.consumer.store_offset(&self.origin.topic, self.origin.partition, done) {
            debug!(subscription = %self.origin.subscription, partition = self.origin.partition, "store offset {done}: {e}");
            return stored;
        }
        Some(done)
    }
}
