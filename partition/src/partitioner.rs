//! Maps keys to partitions. Partitions own contiguous ranges of a 64-bit
//! partition key, so ids that start with their partition key sort by partition.

use xxhash_rust::xxh3::xxh3_64;

use crate::wire::v1::{HandlerType, Target};
use crate::PartitionId;

/// The partition key of a keyed target (a Virtual Object or Workflow key).
pub fn key_hash(service: &str, key: &str) -> u64 {
    let mut buf = Vec::with_capacity(service.len() + key.len() + 1);
    buf.extend_from_slice(service.as_bytes());
    buf.push(0);
    buf.extend_from_slice(key.as_bytes());
    xxh3_64(&buf)
}

/// The partition key of an unkeyed record: spreads one producer over all partitions.
pub fn producer_seq_hash(producer: u64, seq: u64) -> u64 {
    let mut buf = [0u8; 16];
    buf[..8].copy_from_slice(&producer.to_le_bytes());
    buf[8..].copy_from_slice(&seq.to_le_bytes());
    xxh3_64(&buf)
}

/// The producer id of a Kafka partition read by a subscription: stable across
/// restarts and nodes, so re-read records are recognised as duplicates. It
/// includes the topic's id (where the broker gives topics ids): a topic
/// deleted and created again under the same name is a new producer, whose
/// offsets start again at 0.
pub fn kafka_producer_id(subscription: &str, group: &str, topic: &str, topic_id: Option<&str>, partition: i32) -> u64 {
    let topic_id = topic_id.unwrap_or_default();
    let mut buf = Vec::with_capacity(subscription.len() + group.len() + topic.len() + topic_id.len() + 8);
    for part in [subscription, group, topic, topic_id] {
        buf.extend_from_slice(part.as_bytes());
        buf.push(0);
    }
    buf.extend_from_slice(&partition.to_le_bytes());
    xxh3_64(&buf)
}

/// The partition key and the unique part of a new invocation's id. With an
/// idempotency key both derive from the target and the key, so that a
/// repeated request names the invocation of the first; a workflow's run is
/// named by its key. Otherwise the target's key (if any) gives the partition
/// key and `seed` the rest: random for a request from outside, a hash of the
/// caller and its call for an invocation another one starts.
pub fn invocation_ids(target: &Target, idempotency_key: Option<&str>, seed: u64) -> (u64, u64) {
    let idempotency_key = match target.handler_ty {
        HandlerType::Workflow => Some(""),
        _ => idempotency_key,
    };
    let partition_key = match (&target.key, idempotency_key) {
        (Some(key), _) => key_hash(&target.service, key),
        (None, Some(idempotency_key)) => key_hash(&target.service, idempotency_key),
        (None, None) => seed,
    };
    let unique = match idempotency_key {
        Some(idempotency_key) => {
            let scope = format!("{}\0{}\0{}", target, target.handler, idempotency_key);
            xxh3_64(scope.as_bytes())
        }
        None => xxh3_64(&seed.to_le_bytes()),
    };
    (partition_key, unique)
}

/// The producer id under which a partition's outbox creates invocations in
/// other partitions (and its own): their sequence numbers are its outbox's.
pub fn outbox_producer(partition: PartitionId) -> u64 {
    let mut buf = *b"ferry-outbox\0\0\0\0";
    buf[12..].copy_from_slice(&partition.to_le_bytes());
    xxh3_64(&buf)
}

/// The producer id under which a partition's outbox appends call results
/// to their callers' journals: their sequence numbers are its outbox's. Not
/// [`outbox_producer`]: results and invocations go in different commands,
/// which may reach a partition in either order.
pub fn reply_producer(partition: PartitionId) -> u64 {
    let mut buf = *b"ferry-replies\0\0\0\0";
    buf[13..].copy_from_slice(&partition.to_le_bytes());
    xxh3_64(&buf)
}

/// The producer id under which a partition's outbox asks other partitions
/// for results (attach, output): a third kind of command, so a third sequence.
pub fn attach_producer(partition: PartitionId) -> u64 {
    let mut buf = *b"ferry-attach\0\0\0\0";
    buf[12..].copy_from_slice(&partition.to_le_bytes());
    xxh3_64(&buf)
}

/// The partition that owns `partition_key` among `partitions` equal ranges.
pub fn partition_of(partition_key: u64, partitions: u32) -> PartitionId {
    ((partition_key as u128 * partitions as u128) >> 64) as PartitionId
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first partition key owned by `partition`.
    fn range_start(partition: PartitionId, partitions: u32) -> u64 {
        let start = (partition as u128) << 64;
        start.div_ceil(partitions as u128) as u64
    }

    #[test]
    fn ranges_cover_the_key_space_in_order() {
        for n in [1u32, 3, 8, 64] {
            assert_eq!(partition_of(0, n), 0);
            assert_eq!(partition_of(u64::MAX, n), n - 1);
            for p in 0..n {
                let start = range_start(p, n);
                assert_eq!(partition_of(start, n), p, "start of {p}/{n}");
                if p > 0 {
                    assert_eq!(partition_of(start - 1, n), p - 1, "end of {}/{n}", p - 1);
                }
            }
        }
    }

    #[test]
    fn producer_ids_depend_on_every_part() {
        let id = Some("Pv2m0rGsR8eFl3nDzEGl6g");
        let base = kafka_producer_id("sub_a", "g", "t", id, 0);
        assert_eq!(base, kafka_producer_id("sub_a", "g", "t", id, 0));
        assert_ne!(base, kafka_producer_id("sub_b", "g", "t", id, 0));
        assert_ne!(base, kafka_producer_id("sub_a", "h", "t", id, 0));
        assert_ne!(base, kafka_producer_id("sub_a", "g", "u", id, 0));
        assert_ne!(base, kafka_producer_id("sub_a", "g", "t", Some("3AvgC0bAQ0ikMTmZ4o9vNQ"), 0));
        assert_ne!(base, kafka_producer_id("sub_a", "g", "t", None, 0));
        assert_ne!(base, kafka_producer_id("sub_a", "g", "t", id, 1));
        // Field boundaries matter: ("ab","c") is not ("a","bc").
        assert_ne!(kafka_producer_id("ab", "c", "t", id, 0), kafka_producer_id("a", "bc", "t", id, 0));
    }
}
