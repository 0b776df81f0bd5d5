//! Ingress: turns Kafka records and HTTP requests into invocations in the
//! partition log.
//!
//! [`kafka::KafkaIngress`] runs one consumer per subscription on this node, in
//! the subscription's consumer group, each in a process of its own
//! ([`consumer`]), and one task per assigned Kafka partition. A record's offset is stored for commit only once it and every
//! earlier offset of its partition are committed in Raft. [`http`] serves
//! Restate's ingress paths on port 8080.

pub mod consumer;
pub mod egress;
pub mod http;
pub mod kafka;
pub mod record;
pub mod subscription;

pub use kafka::{ClusterOptions, ConsumerProgram, ConsumerState, IngressStatus, KafkaIngress, LagKey, Options};

use ferry_log::PartitionId;
use ferry_partition::partitioner::invocation_ids;
use ferry_partition::wire::v1::Target;
use tracing::Span;

/// The span of appending invocation `id` to `partition` until it commits, a
/// child of `parent`; disabled when `parent` is.
pub(crate) fn append_span(parent: &Span, partition: PartitionId, id: &str) -> Span {
    if parent.is_disabled() {
        return Span::none();
    }
    tracing::debug_span!(parent: parent, "append", ferry.partition = partition, restate.invocation.id = id)
}

/// The partition key and the unique part of a new invocation's id; see
/// [`invocation_ids`].
pub(crate) fn ids(target: &Target, idempotency_key: Option<&str>) -> (u64, u64) {
    invocation_ids(target, idempotency_key, rand_u64())
}

fn rand_u64() -> u64 {
    let ulid = ulid::Ulid::new();
    xxhash_rust::xxh3::xxh3_64(&ulid.to_bytes())
}

/// Errors of the ingress.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown Kafka cluster {name}: neither in the config file nor registered with POST /kafka-clusters")]
    UnknownCluster { name: String },
    #[error("subscription {subscription}: cannot create a Kafka consumer: {source}")]
    Consumer { subscription: String, source: rdkafka::error::KafkaError },
    #[error("subscription {id}: {reason}")]
    InvalidSubscription { id: String, reason: String },
    #[error("invalid Kafka cluster {name}: {reason}")]
    InvalidCluster { name: String, reason: String },
}
