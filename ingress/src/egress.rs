//! The Kafka egress: the leader of each partition produces the records its
//! state machine put in the partition's egress table (dead letters), in
//! order, and then drops them through the log with how far each Kafka
//! partition it wrote to has got.
//!
//! Each record is produced once, whatever node fails when, without Kafka
//! transactions:
//!
//! - Only the leader holding its lease starts producing a batch, with an
//!   idempotent producer (no duplicates from librdkafka's own retries) whose
//!   records time out after [`MESSAGE_TIMEOUT`]. A new leader is elected only
//!   after the old one lost its lease, and waits [`FENCE`] more before it
//!   reads anything back: by then whatever the old leader sent is in Kafka or
//!   never will be.
//! - Every record carries its id ([`EGRESS_ID_HEADER`]). Each truncation
//!   records, for every topic partition its rows went to, the offset just
//!   after them. A leader that did not produce a partition's current rows
//!   itself (it was just elected, or a delivery or truncation failed) reads
//!   each topic partition from its recorded offset (or its beginning) to its
//!   end and skips the rows it finds there.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_log::{partition_group, PartitionId};
use ferry_partition::wire::v1::{Command, EgressPosition, KafkaRecord, EGRESS_ID_HEADER};
use ferry_partition::{Log, LogReads};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::kafka::{cluster_config, find_cluster, ClusterOptions};

/// How long librdkafka may try to deliver a record before it fails it.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a new leader waits before it reads back what its predecessor
/// may have produced: a record's timeout, and slack for the request that
/// carried it to reach the broker.
const FENCE: Duration = Duration::from_secs(7);
/// Most rows produced in one batch, and most bytes of them.
const BATCH_ROWS: usize = 1_000;
const BATCH_BYTES: usize = 4 << 20;
/// How long a metadata request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a read back may go without a record or an end of partition
/// before it is given up (and tried again with a new consumer).
const READ_BACK_STALL: Duration = Duration::from_secs(10);
/// How often a partition looks at its egress without a change to wake it.
const IDLE_CHECK: Duration = Duration::from_secs(1);
/// The least time between two looks: changes that come faster (every
/// append does) are taken together.
const STEP_INTERVAL: Duration = Duration::from_millis(20);

/// Produces every partition's egress on the node that leads it.
pub struct Egress {
    log: Log,
    clusters: Arc<Vec<ClusterOptions>>,
}

impl Egress {
    /// `clusters` are those of the config file; registered ones are read
    /// from the metadata when a record names them.
    pub fn new(log: Log, clusters: Vec<ClusterOptions>) -> Self {
        Egress { log, clusters: Arc::new(clusters) }
    }

    pub async fn run(self, cancel: CancellationToken) {
        let producers = Arc::new(Producers::default());
        let mut partitions = JoinSet::new();
        for partition in 0..self.log.partitions() {
            let worker = PartitionEgress {
                partition,
                log: self.log.clone(),
                clusters: self.clusters.clone(),
                producers: producers.clone(),
                leading_since: None,
                checked: false,
                found: HashSet::new(),
            };
            partitions.spawn(worker.run(cancel.clone()));
        }
        while partitions.join_next().await.is_some() {}
    }
}

/// One producer per cluster, made when a record first needs it and again
/// when the cluster's options change.
#[derive(Default)]
struct Producers(Mutex<HashMap<String, (ClusterOptions, FutureProducer)>>);

impl Producers {
    fn get(&self, cluster: &ClusterOptions) -> Result<FutureProducer, String> {
        let mut producers = self.0.lock().expect("producers lock");
        if let Some((options, producer)) = producers.get(&cluster.name) {
            if options == cluster {
                return Ok(producer.clone());
            }
        }
        let mut config = cluster_config(cluster, "ferry-egress");
        config
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", MESSAGE_TIMEOUT.as_millis().to_string())
            .set("linger.ms", "5");
        let producer: FutureProducer =
            config.create().map_err(|e| format!("cannot make a producer for Kafka cluster {}: {e}", cluster.name))?;
        producers.insert(cluster.name.clone(), (cluster.clone(), producer.clone()));
        Ok(producer)
    }
}

struct PartitionEgress {
    partition: PartitionId,
    log: Log,
    clusters: Arc<Vec<ClusterOptions>>,
    producers: Arc<Producers>,
    /// Since when this node has led the partition, while it does.
    leading_since: Option<Instant>,
    /// Whether the rows pending now may be produced without reading back
    /// first: this leader produced every earlier attempt at them itself.
    checked: bool,
    /// Ids of pending rows found in Kafka by the last read back.
    found: HashSet<String>,
}

/// A (cluster, topic) the egress writes to.
type Destination = (String, String);

impl PartitionEgress {
    async fn run(mut self, cancel: CancellationToken) {
        let Ok(mut changes) = self.log.partition_changes(self.partition) else {
            return;
        };
        let group = partition_group(self.partition);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                changed = changes.changed() => if changed.is_err() { break },
                _ = tokio::time::sleep(IDLE_CHECK) => {}
            }
            if !self.log.is_leader(group) {
                if self.leading_since.take().is_some() {
                    metrics::gauge!("ferry_egress_pending", "partition" => self.partition.to_string()).set(0.0);
                }
                self.forget_checks();
                // A new leader looks within a second.
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(IDLE_CHECK) => {}
                }
                continue;
            }
            let since = *self.leading_since.get_or_insert_with(Instant::now);
            let pause = match self.step(since, &cancel).await {
                Ok(()) => STEP_INTERVAL,
                Err(e) => {
                    warn!(partition = self.partition, "Kafka egress: {e}; trying again");
                    metrics::counter!("ferry_egress_failures_total").increment(1);
                    self.forget_checks();
                    IDLE_CHECK
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    fn forget_checks(&mut self) {
        self.checked = false;
        self.found.clear();
    }

    /// Produces the next batch of rows, if this node may.
    async fn step(&mut self, leading_since: Instant, cancel: &CancellationToken) -> Result<(), String> {
        let group = partition_group(self.partition);
        let (rows, pending) = self.read()?;
        metrics::gauge!("ferry_egress_pending", "partition" => self.partition.to_string()).set(pending as f64);
        if rows.is_empty() || !self.log.holds_lease(group) {
            return Ok(());
        }
        if !self.checked {
            let wait = (leading_since + FENCE).saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                info!(
                    partition = self.partition,
                    "Kafka egress: waiting {wait:?} for the last leader's records to settle"
                );
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            // Once an entry of this leader's is applied here, so is every
            // one an earlier leader committed: the positions it recorded.
            self.truncate(None, Vec::new()).await?;
        }
        let (rows, _) = self.read()?;
        if rows.is_empty() {
            return Ok(());
        }
        let mut producers = HashMap::new();
        for (cluster_name, topic) in rows.iter().map(|(_, r)| (&r.cluster, &r.topic)) {
            if producers.contains_key(&(cluster_name.clone(), topic.clone())) {
                continue;
            }
            let cluster =
                self.log.read_metadata(|m| find_cluster(&self.clusters, m, cluster_name)).ok_or_else(|| {
                    format!("records for topic {topic} of Kafka cluster {cluster_name}, which Ferry does not know")
                })?;
            let producer = self.producers.get(&cluster)?;
            producers.insert((cluster_name.clone(), topic.clone()), (cluster, producer));
        }
        if !self.checked {
            let positions =
                self.log.read_partition(self.partition, |p| p.egress_positions()).map_err(|e| e.to_string())?;
            let mut positions: BTreeMap<Destination, BTreeMap<i32, i64>> =
                positions.into_iter().fold(BTreeMap::new(), |mut all, p| {
                    all.entry((p.cluster, p.topic)).or_default().insert(p.partition, p.offset);
                    all
                });
            let ids: HashSet<String> = rows.iter().map(|(_, r)| r.id.clone()).collect();
            for (destination, (cluster, _)) in &producers {
                let from = positions.remove(destination).unwrap_or_default();
                let (cluster, topic, ids) = (cluster.clone(), destination.1.clone(), ids.clone());
                let found = tokio::task::spawn_blocking(move || read_back(&cluster, &topic, &from, &ids))
                    .await
                    .map_err(|e| e.to_string())??;
                self.found.extend(found);
            }
            if !self.found.is_empty() {
                info!(
                    partition = self.partition,
                    found = self.found.len(),
                    "Kafka egress: records already produced are skipped"
                );
            }
            self.checked = true;
        }
        if !self.log.holds_lease(group) {
            return Ok(());
        }
        let upto = rows.last().map(|(seq, _)| *seq);
        let mut deliveries = Vec::with_capacity(rows.len());
        let mut skipped = 0u64;
        for (_, record) in &rows {
            if self.found.contains(&record.id) {
                skipped += 1;
                continue;
            }
            let (_, producer) = &producers[&(record.cluster.clone(), record.topic.clone())];
            deliveries.push((record, send(producer, record).await?));
        }
        if skipped > 0 {
            metrics::counter!("ferry_egress_records_skipped_total").increment(skipped);
        }
        let mut reached: BTreeMap<(String, String, i32), i64> = BTreeMap::new();
        for (record, delivery) in deliveries {
            let (partition, offset) = match delivery.await {
                Ok(Ok(delivered)) => (delivered.partition, delivered.offset),
                Ok(Err((e, _))) => return Err(format!("producing to {}: {e}", record.topic)),
                Err(_) => return Err(format!("producing to {}: the producer went away", record.topic)),
            };
            let (cluster, topic) = (record.cluster.clone(), record.topic.clone());
            metrics::counter!("ferry_egress_records_total", "cluster" => cluster.clone(), "topic" => topic.clone())
                .increment(1);
            let end = reached.entry((cluster, topic, partition)).or_insert(0);
            *end = (*end).max(offset + 1);
        }
        let positions = reached
            .into_iter()
            .map(|((cluster, topic, partition), offset)| EgressPosition { cluster, topic, partition, offset })
            .collect();
        if truncation_lost_for_test() {
            return Err("the truncation of the egress was lost (fail point egress-truncate)".to_owned());
        }
        self.truncate(upto, positions).await?;
        self.found.clear();
        Ok(())
    }

    /// The first rows of the egress and how many it holds.
    fn read(&self) -> Result<(Vec<(u64, KafkaRecord)>, u64), String> {
        self.log
            .read_partition(self.partition, |p| Ok((p.egress(BATCH_ROWS, BATCH_BYTES)?, p.egress_pending()?)))
            .map_err(|e| e.to_string())
    }

    async fn truncate(&self, upto: Option<u64>, positions: Vec<EgressPosition>) -> Result<(), String> {
        let command = Command::TruncateEgress { upto, positions };
        self.log
            .propose_as_leader(partition_group(self.partition), command)
            .await
            .map(drop)
            .map_err(|e| format!("truncating the egress: {e}"))
    }
}

/// Tests lose the truncation of rows just produced here, as if the leader
/// had failed between the two, so that the rows are produced again unless
/// they are found in Kafka first: `egress-truncate=return`.
fn truncation_lost_for_test() -> bool {
    fail::fail_point!("egress-truncate", |_| true);
    false
}

/// Queues `record`, waiting while librdkafka's queue is full.
async fn send(producer: &FutureProducer, record: &KafkaRecord) -> Result<rdkafka::producer::DeliveryFuture, String> {
    let mut headers = OwnedHeaders::new_with_capacity(record.headers.len() + 1);
    for (name, value) in &record.headers {
        headers = headers.insert(Header { key: name, value: Some(&value[..]) });
    }
    headers = headers.insert(Header { key: EGRESS_ID_HEADER, value: Some(record.id.as_bytes()) });
    let mut queued = FutureRecord::<[u8], [u8]>::to(&record.topic).payload(&record.value[..]).headers(headers);
    if let Some(key) = &record.key {
        queued = queued.key(&key[..]);
    }
    loop {
        match producer.send_result(queued) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                queued = back;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err((e, _)) => return Err(format!("producing to {}: {e}", record.topic)),
        }
    }
}

/// The ids among `ids` of the records in `topic` from the offsets `from`
/// (the beginning of a partition `from` has no offset for) to the end of
/// each partition. The end is where a fetch finds nothing more (librdkafka's
/// end-of-partition event): a broker's answer to a request for a partition's
/// end offset is not always current.
fn read_back(
    cluster: &ClusterOptions,
    topic: &str,
    from: &BTreeMap<i32, i64>,
    ids: &HashSet<String>,
) -> Result<HashSet<String>, String> {
    let mut found = HashSet::new();
    let mut config = cluster_config(cluster, "ferry-egress-check");
    config
        .set("group.id", "ferry-egress-check")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest");
    let consumer: BaseConsumer = config.create().map_err(|e| format!("cannot read back {topic}: {e}"))?;
    let metadata =
        consumer.fetch_metadata(Some(topic), REQUEST_TIMEOUT).map_err(|e| format!("reading back {topic}: {e}"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(format!("reading back {topic}: the Kafka cluster has no such topic"));
    }
    let mut assignment = TopicPartitionList::new();
    for &partition in &partitions {
        let offset = from.get(&partition).map_or(Offset::Beginning, |&offset| Offset::Offset(offset));
        assignment
            .add_partition_offset(topic, partition, offset)
            .map_err(|e| format!("reading back {topic}/{partition}: {e}"))?;
    }
    consumer.assign(&assignment).map_err(|e| format!("reading back {topic}: {e}"))?;
    let mut remaining: BTreeSet<i32> = partitions.into_iter().collect();
    let mut progress = std::time::Instant::now();
    let mut read = 0u64;
    while !remaining.is_empty() {
        if progress.elapsed() > READ_BACK_STALL {
            return Err(format!(
                "reading back {topic}: no record and no end of partitions {remaining:?} in {READ_BACK_STALL:?}"
            ));
        }
        match consumer.poll(Duration::from_millis(500)) {
            None => {}
            Some(Ok(message)) => {
                progress = std::time::Instant::now();
                read += 1;
                let id = message
                    .headers()
                    .and_then(|headers| headers.iter().find(|h| h.key == EGRESS_ID_HEADER).and_then(|h| h.value));
                if let Some(id) = id.and_then(|id| std::str::from_utf8(id).ok()) {
                    if ids.contains(id) {
                        found.insert(id.to_owned());
                    }
                }
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                progress = std::time::Instant::now();
                remaining.remove(&partition);
            }
            Some(Err(e)) => return Err(format!("reading back {topic}: {e}")),
        }
    }
    debug!(topic, read, found = found.len(), "read back the egress's topic");
    Ok(found)
}
