//! The process that runs a subscription's Kafka consumer.
//!
//! librdkafka runs in a child process of the node (`ferry-server
//! kafka-consumer`), one per subscription, so that a crash in its C code
//! costs a restarted consumer and not the node: librdkafka 2.12 dereferences
//! a null topic name in its metadata cache when a subscribed topic is deleted
//! under it, and no setting avoids that path.
//!
//! The node and the child speak over the child's stdin and stdout in frames
//! of a little-endian `u32` length and a bincode body. The node sends one
//! [`Start`], then [`Control`]s; the child answers with [`Event`]s. The
//! child exits as soon as its stdin closes, so it never outlives the node,
//! and when the node has been silent for [`NODE_SILENCE_MAX`].
//!
//! Offsets are stored for commit only by the child, under the lock that its
//! rebalances take: a store names the assignment generation it was made for,
//! and one for a partition revoked since (or assigned again since) is
//! dropped.
//!
//! Each assigned partition has its own librdkafka queue. A partition the
//! node holds back (its worker is full) is simply not polled: librdkafka
//! keeps what it prefetched and stops fetching once the queue is at its
//! limits, and polling goes on from the next record when the node releases
//! it. Nothing is dropped and fetched again, so a hold never moves the read
//! position (a fetch from inside a stored batch is where brokers differ).

use std::collections::{HashMap, HashSet};
use std::io::{BufWriter, Read, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Statistics};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::record::Record;
use crate::subscription::StartPosition;

/// The largest frame either side accepts: a batch of records is cut at the
/// batch byte limit, and one record alone is at most what librdkafka
/// receives.
pub(crate) const FRAME_BYTES_MAX: usize = 1 << 30;

/// What the node tells the child first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Start {
    pub subscription: String,
    pub topic: String,
    /// Where partitions without a committed offset start.
    pub start: StartPosition,
    /// Every librdkafka property of the consumer.
    pub config: Vec<(String, String)>,
    /// Most records, and most bytes of records, in one [`Event::Records`].
    pub batch_records_max: usize,
    pub batch_bytes_max: usize,
}

/// What the node asks of the child.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Control {
    /// Hand over no more records of `partition` until it is released, if it
    /// is still assigned under `generation`.
    Hold { partition: i32, generation: u64 },
    /// Hand over its records again, from the one after the last handed over.
    Release { partition: i32, generation: u64 },
    /// Store `offset` (everything up to it is in the partition log) for the
    /// next commit, if the partition is still assigned under `generation`.
    Store { partition: i32, generation: u64, offset: i64 },
    /// Commit what is stored, leave the group and exit.
    Stop,
    /// The node is alive: sent every [`PING_INTERVAL`].
    Ping,
}

/// How often the node tells the child that it is alive.
pub(crate) const PING_INTERVAL: Duration = Duration::from_secs(1);

/// How long the child waits without hearing from the node before it exits.
/// A node that is frozen (stopped, or its runtime stuck) must not hold its
/// Kafka partitions: once the child is gone the group hands them to other
/// nodes after the session timeout, as it would if the whole node froze.
const NODE_SILENCE_MAX: Duration = Duration::from_secs(10);

/// What the child reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Event {
    /// Partitions newly assigned to this consumer, each with its assignment
    /// generation, and the topic's id (`None` if the broker has none).
    Assigned {
        topic_id: Option<String>,
        partitions: Vec<(i32, u64)>,
    },
    Revoked {
        partitions: Vec<i32>,
    },
    Records {
        partition: i32,
        records: Vec<Record>,
    },
    /// A partition's consumer lag, from librdkafka's statistics.
    Lag {
        partition: i32,
        lag: i64,
    },
    /// An error the consumer reported, and whether it says that the topic
    /// does not exist.
    Error {
        message: String,
        topic_missing: bool,
    },
    Log {
        level: LogLevel,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
}

/// Writes one frame.
pub(crate) fn write_frame<T: Serialize>(out: &mut impl Write, value: &T) -> std::io::Result<()> {
    let body = bincode::serialize(value).map_err(std::io::Error::other)?;
    out.write_all(&(body.len() as u32).to_le_bytes())?;
    out.write_all(&body)
}

/// Reads one frame; `None` at the end of the stream.
fn read_frame<T: DeserializeOwned>(input: &mut impl Read) -> std::io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(std::io::Error::other(format!("frame of {len} bytes")));
    }
    let mut body = vec![0; len];
    input.read_exact(&mut body)?;
    bincode::deserialize(&body).map(Some).map_err(std::io::Error::other)
}

/// Decodes a frame body read by the node.
pub(crate) fn decode<T: DeserializeOwned>(body: &[u8]) -> std::io::Result<T> {
    bincode::deserialize(body).map_err(std::io::Error::other)
}

/// The child's output. A failed write means the node is gone: the child
/// exits.
struct Output(Mutex<BufWriter<std::io::Stdout>>);

impl Output {
    fn send(&self, event: &Event) {
        let mut out = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if write_frame(&mut *out, event).is_err() {
            std::process::exit(0);
        }
    }

    fn flush(&self) {
        let mut out = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if out.flush().is_err() {
            std::process::exit(0);
        }
    }

    fn log(&self, level: LogLevel, message: String) {
        self.send(&Event::Log { level, message });
    }
}

struct ChildContext {
    topic: String,
    start: StartPosition,
    out: Arc<Output>,
    /// The generation of each assigned partition. Rebalances change it and
    /// stores and holds read it under this lock.
    assigned: Mutex<HashMap<i32, u64>>,
    generations: AtomicU64,
    /// The consumer this context belongs to, which splits off partition
    /// queues.
    consumer: OnceLock<Weak<BaseConsumer<ChildContext>>>,
    /// The queue of each assigned partition. Lock order: `assigned`, then
    /// `queues`, then `held`.
    queues: Mutex<HashMap<i32, PartitionQueue<ChildContext>>>,
    /// Partitions the node holds back.
    held: Mutex<HashSet<i32>>,
    /// Set when a queue has records or a held partition is released.
    wake: Arc<Wake>,
}

/// Wakes the polling loop: librdkafka calls it when a queue goes from empty
/// to not empty, the control thread when a partition is released.
#[derive(Default)]
struct Wake {
    ready: Mutex<bool>,
    signal: Condvar,
}

impl Wake {
    fn notify(&self) {
        *self.ready.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.signal.notify_one();
    }

    /// Waits until notified (or `timeout`), and clears the notice.
    fn wait(&self, timeout: Duration) {
        let ready = self.ready.lock().unwrap_or_else(|e| e.into_inner());
        let (mut ready, _) =
            self.signal.wait_timeout_while(ready, timeout, |ready| !*ready).unwrap_or_else(|e| e.into_inner());
        *ready = false;
    }
}

impl ChildContext {
    fn lock_assigned(&self) -> std::sync::MutexGuard<'_, HashMap<i32, u64>> {
        self.assigned.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_queues(&self) -> std::sync::MutexGuard<'_, HashMap<i32, PartitionQueue<ChildContext>>> {
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, HashSet<i32>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives each partition of `tpl` a queue of its own, before it is
    /// assigned: librdkafka then keeps its records there and never forwards
    /// them to the consumer's queue.
    fn split_queues(&self, tpl: &TopicPartitionList) {
        let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else { return };
        let mut queues = self.lock_queues();
        let mut held = self.lock_held();
        for element in tpl.elements().iter().filter(|e| e.topic() == self.topic) {
            let partition = element.partition();
            held.remove(&partition);
            match consumer.split_partition_queue(&self.topic, partition) {
                Some(mut queue) => {
                    let wake = self.wake.clone();
                    queue.set_nonempty_callback(move || wake.notify());
                    queues.insert(partition, queue);
                }
                None => self.out.log(
                    LogLevel::Warn,
                    format!("partition {partition} has no queue of its own: it cannot be held back"),
                ),
            }
        }
    }

    /// Holds `partition` back (or releases it) if it is still assigned under
    /// `generation`.
    fn hold(&self, partition: i32, generation: u64, hold: bool) {
        let assigned = self.lock_assigned();
        if assigned.get(&partition) != Some(&generation) {
            return;
        }
        let mut held = self.lock_held();
        if hold {
            held.insert(partition);
        } else if held.remove(&partition) {
            self.wake.notify();
        }
    }

    /// Reports an error the consumer cannot go on after, and exits: the node
    /// starts it again.
    fn fail(&self, message: String) -> ! {
        self.out.send(&Event::Error { message, topic_missing: false });
        self.out.flush();
        std::process::exit(3);
    }

    /// Sets the start offset of each partition of `tpl` that the group has
    /// no committed offset for, as the subscription's start position says.
    /// Offsets the position leaves to librdkafka (`auto.offset.reset`) stay
    /// unset.
    fn start_offsets(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) -> Result<(), String> {
        const TIMEOUT: Duration = Duration::from_secs(10);
        if matches!(self.start, StartPosition::GroupOffsets | StartPosition::Earliest | StartPosition::Latest) {
            return Ok(());
        }
        let mut mine = TopicPartitionList::new();
        for element in tpl.elements().iter().filter(|e| e.topic() == self.topic) {
            mine.add_partition(&self.topic, element.partition());
        }
        let committed =
            consumer.committed_offsets(mine, TIMEOUT).map_err(|e| format!("reading committed offsets: {e}"))?;
        let fresh: Vec<i32> =
            committed.elements().iter().filter(|e| e.offset() == Offset::Invalid).map(|e| e.partition()).collect();
        let starts: Vec<(i32, Offset)> = match &self.start {
            StartPosition::SpecificOffsets(offsets) => {
                fresh.iter().filter_map(|p| offsets.get(p).map(|&offset| (*p, Offset::Offset(offset)))).collect()
            }
            StartPosition::AtTimestamp(ms) if !fresh.is_empty() => {
                let mut times = TopicPartitionList::new();
                for &partition in &fresh {
                    times
                        .add_partition_offset(&self.topic, partition, Offset::Offset(*ms))
                        .map_err(|e| format!("partition {partition}: {e}"))?;
                }
                let found =
                    consumer.offsets_for_times(times, TIMEOUT).map_err(|e| format!("finding offsets by time: {e}"))?;
                found
                    .elements()
                    .iter()
                    .map(|e| match e.offset() {
                        Offset::Offset(offset) if offset >= 0 => (e.partition(), Offset::Offset(offset)),
                        // No record at or after the time: wait after the last.
                        _ => (e.partition(), Offset::End),
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        for (partition, offset) in starts {
            tpl.set_partition_offset(&self.topic, partition, offset)
                .map_err(|e| format!("starting partition {partition} at {offset:?}: {e}"))?;
            self.out.log(
                LogLevel::Info,
                format!("partition {partition} has no committed offset: starts at {offset:?} ({})", self.start.name()),
            );
        }
        Ok(())
    }

    /// Assigns `tpl` and reports it with the topic's id, which the node
    /// makes part of the records' producer.
    fn assign(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let topic_id = match describe_topic_id(consumer, &self.topic) {
            Ok(id) => id,
            // Without the id the records' producer is unknown: start over.
            Err(message) => self.fail(format!("cannot read topic {}'s id: {message}", self.topic)),
        };
        let mut tpl = tpl.clone();
        if let Err(message) = self.start_offsets(consumer, &mut tpl) {
            self.fail(format!("cannot find where to start ({}): {message}", self.start.name()));
        }
        let tpl = &tpl;
        let mut assigned = self.lock_assigned();
        let partitions: Vec<(i32, u64)> = tpl
            .elements()
            .iter()
            .filter(|e| e.topic() == self.topic)
            .map(|e| (e.partition(), self.generations.fetch_add(1, Ordering::SeqCst) + 1))
            .collect();
        assigned.extend(partitions.iter().copied());
        self.split_queues(tpl);
        let result = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => consumer.incremental_assign(tpl),
            _ => consumer.assign(tpl),
        };
        if let Err(e) = result {
            self.out.log(LogLevel::Warn, format!("assigning {}: {e}", describe(tpl)));
        }
        self.out.log(LogLevel::Info, format!("assigned {}", describe(tpl)));
        self.out.send(&Event::Assigned { topic_id, partitions });
    }

    fn revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let partitions: Vec<i32> = {
            let mut assigned = self.lock_assigned();
            let mut queues = self.lock_queues();
            let mut held = self.lock_held();
            tpl.elements()
                .iter()
                .filter_map(|e| {
                    queues.remove(&e.partition());
                    held.remove(&e.partition());
                    assigned.remove(&e.partition()).map(|_| e.partition())
                })
                .collect()
        };
        self.out.log(LogLevel::Info, format!("revoked {}", describe(tpl)));
        self.out.send(&Event::Revoked { partitions });
        self.out.flush();
        let result = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => consumer.incremental_unassign(tpl),
            _ => consumer.unassign(),
        };
        if let Err(e) = result {
            self.out.log(LogLevel::Warn, format!("revoking {}: {e}", describe(tpl)));
        }
    }

    /// Stores `offset` if `partition` is still assigned under `generation`.
    fn store(&self, consumer: &BaseConsumer<Self>, partition: i32, generation: u64, offset: i64) {
        let assigned = self.lock_assigned();
        if assigned.get(&partition) != Some(&generation) {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        // A stored offset is the next one to read.
        let stored = tpl.add_partition_offset(&self.topic, partition, Offset::Offset(offset + 1));
        if let Err(e) = stored {
            self.out.log(LogLevel::Debug, format!("store offset {offset} of partition {partition}: {e}"));
            return;
        }
        if let Err(e) = consumer.store_offsets(&tpl) {
            self.out.log(LogLevel::Debug, format!("store offset {offset} of partition {partition}: {e}"));
        }
    }
}

impl ClientContext for ChildContext {
    fn stats(&self, statistics: Statistics) {
        let assigned: Vec<i32> = self.lock_assigned().keys().copied().collect();
        let Some(topic) = statistics.topics.get(&self.topic) else { return };
        for partition in assigned {
            if let Some(lag) = topic.partitions.get(&partition).and_then(partition_lag) {
                self.out.send(&Event::Lag { partition, lag });
            }
        }
        self.out.flush();
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        let level = match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                LogLevel::Error
            }
            RDKafkaLogLevel::Warning => LogLevel::Warn,
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => LogLevel::Info,
            RDKafkaLogLevel::Debug => LogLevel::Debug,
        };
        self.out.log(level, format!("librdkafka {fac}: {message}"));
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.out.send(&Event::Error { message: format!("{error}: {reason}"), topic_missing: topic_missing(&error) });
        self.out.flush();
    }
}

impl ConsumerContext for ChildContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.assign(consumer, tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => self.revoke(consumer, tpl),
            other => {
                let code: RDKafkaErrorCode = other.into();
                self.out.log(LogLevel::Warn, format!("rebalance failed: {code}"));
                // As librdkafka asks: drop the assignment and rejoin.
                if let Err(e) = consumer.unassign() {
                    self.out.log(LogLevel::Warn, format!("unassigning: {e}"));
                }
                let mut assigned = self.lock_assigned();
                assigned.clear();
                self.lock_queues().clear();
                self.lock_held().clear();
            }
        }
        self.out.flush();
    }

    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => self.out.log(LogLevel::Debug, format!("committed {}", describe(offsets))),
            Err(e) => self.out.log(LogLevel::Warn, format!("offset commit failed: {e}")),
        }
    }
}

/// Whether a consumer error says that the topic does not exist.
fn topic_missing(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::UnknownPartition
        )
    )
}

fn describe(tpl: &TopicPartitionList) -> String {
    let parts: Vec<String> =
        tpl.elements().iter().map(|e| format!("{}/{}@{:?}", e.topic(), e.partition(), e.offset())).collect();
    parts.join(", ")
}

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

/// The id Kafka gave the topic (base64, as Kafka's tools print it), `None`
/// if the broker has no topic ids.
fn describe_topic_id(consumer: &BaseConsumer<ChildContext>, topic: &str) -> Result<Option<String>, String> {
    use rdkafka::bindings as rd;
    use std::ffi::{CStr, CString};

    const TIMEOUT_MS: i32 = 10_000;
    let name = CString::new(topic).map_err(|e| e.to_string())?;
    let client = consumer.client().native_ptr();
    // SAFETY: every object created here is destroyed before returning, and
    // every pointer read from the result is used before the event that owns
    // it is destroyed.
    unsafe {
        let mut names = [name.as_ptr()];
        let topics = rd::rd_kafka_TopicCollection_of_topic_names(names.as_mut_ptr(), 1);
        let options = rd::rd_kafka_AdminOptions_new(client, rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBETOPICS);
        let mut errstr = [0 as std::ffi::c_char; 256];
        rd::rd_kafka_AdminOptions_set_request_timeout(options, TIMEOUT_MS, errstr.as_mut_ptr(), errstr.len());
        let queue = rd::rd_kafka_queue_new(client);
        rd::rd_kafka_DescribeTopics(client, topics, options, queue);
        let event = rd::rd_kafka_queue_poll(queue, TIMEOUT_MS + 1_000);
        let result = if event.is_null() {
            Err("no answer".to_owned())
        } else if rd::rd_kafka_event_error(event) != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
            Err(CStr::from_ptr(rd::rd_kafka_event_error_string(event)).to_string_lossy().into_owned())
        } else {
            let described = rd::rd_kafka_event_DescribeTopics_result(event);
            let mut count = 0;
            let descriptions = rd::rd_kafka_DescribeTopics_result_topics(described, &mut count);
            if count != 1 {
                Err(format!("{count} topics described"))
            } else {
                let description = *descriptions;
                let error = rd::rd_kafka_TopicDescription_error(description);
                if !error.is_null() && rd::rd_kafka_error_code(error) != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
                    Err(CStr::from_ptr(rd::rd_kafka_error_string(error)).to_string_lossy().into_owned())
                } else {
                    let uuid = rd::rd_kafka_TopicDescription_topic_id(description);
                    let zero = uuid.is_null()
                        || (rd::rd_kafka_Uuid_most_significant_bits(uuid) == 0
                            && rd::rd_kafka_Uuid_least_significant_bits(uuid) == 0);
                    Ok((!zero)
                        .then(|| CStr::from_ptr(rd::rd_kafka_Uuid_base64str(uuid)).to_string_lossy().into_owned()))
                }
            }
        };
        if !event.is_null() {
            rd::rd_kafka_event_destroy(event);
        }
        rd::rd_kafka_queue_destroy(queue);
        rd::rd_kafka_AdminOptions_destroy(options);
        rd::rd_kafka_TopicCollection_destroy(topics);
        result
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

/// Records read but not yet sent, per partition, cut into frames of at most
/// the batch limits.
struct Pending {
    batch_records_max: usize,
    batch_bytes_max: usize,
    partitions: HashMap<i32, (Vec<Record>, usize)>,
    count: usize,
}

impl Pending {
    fn push(&mut self, out: &Output, partition: i32, record: Record) {
        let bytes = record.payload.len() + record.key.as_ref().map_or(0, |k| k.len());
        let (records, size) = self.partitions.entry(partition).or_default();
        if !records.is_empty() && (records.len() >= self.batch_records_max || *size + bytes > self.batch_bytes_max) {
            self.count -= records.len();
            out.send(&Event::Records { partition, records: std::mem::take(records) });
            *size = 0;
        }
        records.push(record);
        *size += bytes;
        self.count += 1;
    }

    fn send_all(&mut self, out: &Output) {
        for (&partition, (records, size)) in self.partitions.iter_mut() {
            if !records.is_empty() {
                out.send(&Event::Records { partition, records: std::mem::take(records) });
                *size = 0;
            }
        }
        self.count = 0;
        out.flush();
    }
}

/// The body of `ferry-server kafka-consumer`: runs one subscription's
/// consumer for the node that started this process, until the node says
/// stop or goes away.
pub fn process_main() -> ExitCode {
    let mut stdin = std::io::stdin();
    let start: Start = match read_frame(&mut stdin) {
        Ok(Some(start)) => start,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry kafka-consumer: reading the start frame: {e}");
            return ExitCode::from(2);
        }
    };
    let out = Arc::new(Output(Mutex::new(BufWriter::with_capacity(1 << 16, std::io::stdout()))));
    let mut config = ClientConfig::new();
    for (k, v) in &start.config {
        config.set(k, v);
    }
    config.set_log_level(RDKafkaLogLevel::Info);
    let wake = Arc::new(Wake::default());
    let context = ChildContext {
        topic: start.topic.clone(),
        start: start.start.clone(),
        out: out.clone(),
        assigned: Mutex::default(),
        generations: AtomicU64::new(0),
        consumer: OnceLock::new(),
        queues: Mutex::default(),
        held: Mutex::default(),
        wake: wake.clone(),
    };
    let consumer: Arc<BaseConsumer<ChildContext>> =
        match config.create_with_context::<_, BaseConsumer<ChildContext>>(context) {
            Ok(mut consumer) => {
                let wake = wake.clone();
                consumer.set_nonempty_callback(move || wake.notify());
                Arc::new(consumer)
            }
            Err(e) => {
                out.send(&Event::Error { message: format!("cannot create the consumer: {e}"), topic_missing: false });
                out.flush();
                return ExitCode::from(3);
            }
        };
    let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
    if let Err(e) = consumer.subscribe(&[&start.topic]) {
        out.send(&Event::Error { message: format!("cannot subscribe to {}: {e}", start.topic), topic_missing: false });
        out.flush();
        return ExitCode::from(3);
    }

    let stopping = Arc::new(AtomicBool::new(false));
    let heard = Arc::new(Mutex::new(std::time::Instant::now()));
    {
        let heard = heard.clone();
        let out = out.clone();
        std::thread::Builder::new()
            .name("watchdog".to_owned())
            .spawn(move || loop {
                std::thread::sleep(PING_INTERVAL / 2);
                let silent = heard.lock().unwrap_or_else(|e| e.into_inner()).elapsed();
                if silent > NODE_SILENCE_MAX {
                    eprintln!("ferry kafka-consumer: nothing heard from the node for {silent:?}; exiting");
                    drop(out);
                    std::process::exit(4);
                }
            })
            .expect("watchdog thread");
    }
    {
        let consumer = consumer.clone();
        let stopping = stopping.clone();
        std::thread::Builder::new()
            .name("control".to_owned())
            .spawn(move || loop {
                let control = read_frame::<Control>(&mut stdin);
                *heard.lock().unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
                match control {
                    Ok(Some(Control::Store { partition, generation, offset })) => {
                        consumer.context().store(&consumer, partition, generation, offset)
                    }
                    Ok(Some(Control::Hold { partition, generation })) => {
                        consumer.context().hold(partition, generation, true)
                    }
                    Ok(Some(Control::Release { partition, generation })) => {
                        consumer.context().hold(partition, generation, false)
                    }
                    Ok(Some(Control::Ping)) => {}
                    Ok(Some(Control::Stop)) => {
                        stopping.store(true, Ordering::SeqCst);
                        consumer.context().wake.notify();
                        return;
                    }
                    // The node is gone: so is this process, without a commit.
                    Ok(None) | Err(_) => std::process::exit(0),
                }
            })
            .expect("control thread");
    }

    let mut pending = Pending {
        batch_records_max: start.batch_records_max.max(1),
        batch_bytes_max: start.batch_bytes_max.max(1),
        partitions: HashMap::new(),
        count: 0,
    };
    while !stopping.load(Ordering::SeqCst) {
        let mut received = 0;
        // The consumer's own queue: rebalances, statistics, commits and
        // errors, and the records of a partition without a queue of its own.
        let mut empty_polls = 0;
        while empty_polls < 2 && received < pending.batch_records_max {
            match consumer.poll(Duration::ZERO) {
                Some(Ok(message)) => {
                    received += 1;
                    pending.push(&out, message.partition(), record_of(&message));
                }
                Some(Err(e)) => consumer_error(&out, &mut pending, &e),
                // A rebalance or commit event was served, or nothing waits.
                None => empty_polls += 1,
            }
        }
        {
            let queues = consumer.context().lock_queues();
            let held = consumer.context().lock_held();
            for (&partition, queue) in queues.iter().filter(|(partition, _)| !held.contains(partition)) {
                for _ in 0..pending.batch_records_max {
                    match queue.poll(Duration::ZERO) {
                        Some(Ok(message)) => {
                            received += 1;
                            pending.push(&out, partition, record_of(&message));
                        }
                        Some(Err(e)) => consumer_error(&out, &mut pending, &e),
                        None => break,
                    }
                }
            }
        }
        pending.send_all(&out);
        if received == 0 {
            wake.wait(IDLE_WAIT);
        }
    }
    pending.send_all(&out);
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        out.log(LogLevel::Debug, format!("final offset commit: {e}"));
    }
    consumer.unsubscribe();
    // The partition queues hold the consumer: drop them before it.
    consumer.context().lock_queues().clear();
    out.flush();
    ExitCode::SUCCESS
}

/// The longest the polling loop sleeps when nothing woke it: it serves the
/// consumer's callbacks at least this often.
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// Reports a consumer error, after the records read before it.
fn consumer_error(out: &Output, pending: &mut Pending, error: &KafkaError) {
    pending.send_all(out);
    out.send(&Event::Error { message: error.to_string(), topic_missing: topic_missing(error) });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_end_cleanly() {
        let mut buf = Vec::new();
        let controls = [
            Control::Hold { partition: 3, generation: 2 },
            Control::Store { partition: 1, generation: 7, offset: 41 },
            Control::Release { partition: 3, generation: 2 },
            Control::Stop,
        ];
        for control in &controls {
            write_frame(&mut buf, control).unwrap();
        }
        let mut input = buf.as_slice();
        for control in &controls {
            assert_eq!(read_frame::<Control>(&mut input).unwrap().as_ref(), Some(control));
        }
        assert_eq!(read_frame::<Control>(&mut input).unwrap(), None);
    }

    #[test]
    fn an_oversized_frame_is_refused() {
        let mut input: &[u8] = &((FRAME_BYTES_MAX as u32) + 1).to_le_bytes();
        assert!(read_frame::<Control>(&mut input).is_err());
    }
}
