//! The tables of a partition's state and the encoding of their keys. The
//! tables are read and written through `ferry_store`'s traits, so `apply`
//! runs the same against memory (unit tests, [`MemStore`]) and against the
//! node's embedded store.
//!
//! Keys sort as bytes: integers are big-endian, and a string followed by
//! more is length-prefixed, so a prefix scan finds exactly one owner's rows.

pub use ferry_store::{scan_prefix, MemStore, Row, Store, StoreError, StoreRead, TableSet, Visit};

/// The tables of a partition's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// [`key::invocation`] of the id -> [`crate::state::Invocation`].
    Invocations,
    /// run sequence -> id: the invocations allowed to run, in the order they became so.
    Runnable,
    /// (due time, id) -> (): backing-off, sleeping and delayed invocations.
    Timers,
    /// (due time, id) -> (): the next retention step of completed invocations.
    Expiries,
    /// (object, sequence) -> id: exclusive invocations per key, in arrival order.
    Inboxes,
    /// (object, state key) -> value: Virtual Object and Workflow state.
    Objects,
    /// producer -> last sequence number applied.
    Dedup,
    /// (subscription, producer) -> (): the producers in `Dedup` of each subscription.
    Producers,
    /// subscription -> (): deleted subscriptions whose dedup entries were dropped.
    Forgotten,
    /// name -> u64: sequence counters and per-status counts.
    Counters,
    /// sequence -> [`crate::wire::v1::Outgoing`]: invocations started here,
    /// call results and signals, to deliver to their partitions.
    Outbox,
    /// (workflow, key, promise name) -> a workflow promise: its result, or
    /// who awaits it.
    Promises,
    /// sequence -> [`crate::wire::v1::KafkaRecord`]: records to produce to
    /// Kafka (dead letters), in order.
    Egress,
    /// (cluster, topic, partition) -> offset: how far the egress has got in
    /// each Kafka partition it produced to ([`crate::wire::v1::EgressPosition`]).
    EgressPositions,
}

impl Table {
    /// Every table, in the order of [`Table::index`].
    pub const ALL: [Table; 14] = [
        Table::Invocations,
        Table::Runnable,
        Table::Timers,
        Table::Expiries,
        Table::Inboxes,
        Table::Objects,
        Table::Dedup,
        Table::Producers,
        Table::Forgotten,
        Table::Counters,
        Table::Outbox,
        Table::Promises,
        Table::Egress,
        Table::EgressPositions,
    ];

    /// The position of this table in [`Table::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The table's name on disk.
    pub const fn name(self) -> &'static str {
        match self {
            Table::Invocations => "invocations",
            Table::Runnable => "runnable",
            Table::Timers => "timers",
            Table::Expiries => "expiries",
            Table::Inboxes => "inboxes",
            Table::Objects => "objects",
            Table::Dedup => "dedup",
            Table::Producers => "producers",
            Table::Forgotten => "forgotten",
            Table::Counters => "counters",
            Table::Outbox => "outbox",
            Table::Promises => "promises",
            Table::Egress => "egress",
            Table::EgressPositions => "egress_positions",
        }
    }
}

impl TableSet for Table {
    const ALL: &'static [Table] = &Table::ALL;

    fn index(self) -> usize {
        self as usize
    }

    fn name(self) -> &'static str {
        Table::name(self)
    }
}

/// Key encodings.
pub mod key {
    /// Appends `s` with its length first, so that it sorts and prefixes exactly.
    pub fn push_str(buf: &mut Vec<u8>, s: &str) {
        buf.extend_from_slice(&(s.len() as u32).to_be_bytes());
        buf.extend_from_slice(s.as_bytes());
    }

    /// Splits a string written by [`push_str`] off the front of `buf`.
    pub fn take_str(buf: &[u8]) -> Option<(&str, &[u8])> {
        let (len, rest) = buf.split_first_chunk::<4>()?;
        let len = u32::from_be_bytes(*len) as usize;
        if rest.len() < len {
            return None;
        }
        let (s, rest) = rest.split_at(len);
        Some((std::str::from_utf8(s).ok()?, rest))
    }

    /// A Virtual Object or Workflow instance: (service, key).
    pub fn object(service: &str, key: &str) -> Vec<u8> {
        let mut buf = Vec::with_capacity(8 + service.len() + key.len());
        push_str(&mut buf, service);
        push_str(&mut buf, key);
        buf
    }

    /// (time, id): timers and expiries, in due order.
    pub fn due(at_ms: u64, id: &str) -> Vec<u8> {
        let mut buf = Vec::with_capacity(8 + id.len());
        buf.extend_from_slice(&at_ms.to_be_bytes());
        buf.extend_from_slice(id.as_bytes());
        buf
    }

    /// Splits a key written by [`due`].
    pub fn split_due(key: &[u8]) -> Option<(u64, &str)> {
        let (at, id) = key.split_first_chunk::<8>()?;
        Some((u64::from_be_bytes(*at), std::str::from_utf8(id).ok()?))
    }

    /// The row key of invocation `id` ([`id`]): unique part first, so
    /// invocations whose unique parts grow (Kafka records, in offset order)
    /// are written at the end of the table, not all over it. Any other
    /// string is kept as it is, after a different first byte.
    pub fn invocation(id: &str) -> Vec<u8> {
        match id_parts(id) {
            Some((partition_key, unique)) => {
                let mut buf = Vec::with_capacity(17);
                buf.push(0);
                buf.extend_from_slice(&unique.to_be_bytes());
                buf.extend_from_slice(&partition_key.to_be_bytes());
                buf
            }
            None => {
                let mut buf = Vec::with_capacity(1 + id.len());
                buf.push(1);
                buf.extend_from_slice(id.as_bytes());
                buf
            }
        }
    }

    /// The id of a row key written by [`invocation`].
    pub fn invocation_id(key: &[u8]) -> Option<String> {
        match key.split_first()? {
            (0, rest) => {
                let (unique, partition_key) = rest.split_first_chunk::<8>()?;
                let partition_key = u64_of(partition_key)?;
                Some(self::id(partition_key, u64::from_be_bytes(*unique)))
            }
            (1, id) => std::str::from_utf8(id).ok().map(str::to_owned),
            _ => None,
        }
    }

    /// The invocation id of a partition key and a unique part, in Restate's
    /// form, which its tools parse: `inv_1`, the partition key in 11 base62
    /// digits, then a 128-bit uuid (here the unique part) in 22.
    pub fn id(partition_key: u64, unique: u64) -> String {
        let mut id = String::with_capacity(INVOCATION_ID.len() + 33);
        id.push_str(INVOCATION_ID);
        push_base62(&mut id, u128::from(partition_key.swap_bytes()), 11);
        push_base62(&mut id, u128::from(unique).swap_bytes(), 22);
        id
    }

    /// The partition key and unique part of an id made by [`id`].
    pub fn id_parts(id: &str) -> Option<(u64, u64)> {
        let digits = id.strip_prefix(INVOCATION_ID).filter(|d| d.len() == 33)?;
        let partition_key = u64::try_from(base62(&digits[..11])?).ok()?.swap_bytes();
        let unique = u64::try_from(base62(&digits[11..])?.swap_bytes()).ok()?;
        Some((partition_key, unique))
    }

    const INVOCATION_ID: &str = "inv_1";

    /// The id of a deployment (`dp`), subscription (`sub`) or other
    /// resource named by a 128-bit value, in Restate's form:
    /// `<prefix>_1` and the value in 22 base62 digits.
    pub fn resource_id(prefix: &str, value: u128) -> String {
        let mut id = String::with_capacity(prefix.len() + 24);
        id.push_str(prefix);
        id.push_str("_1");
        push_base62(&mut id, value.swap_bytes(), 22);
        id
    }

    /// Digits of base62 as Restate writes them: `0-9`, `a-z`, `A-Z`.
    const BASE62: &[u8; 62] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

    /// Appends `value` in `width` (at most 30) base62 digits, zeros first.
    fn push_base62(out: &mut String, value: u128, width: usize) {
        // Ten digits at a time in u64 arithmetic: 62^10 < 2^64.
        const LIMB: u128 = 62u128.pow(10);
        let mut digits = [b'0'; 30];
        let mut rest = value;
        for limb in digits.rchunks_mut(10) {
            let mut part = (rest % LIMB) as u64;
            rest /= LIMB;
            for digit in limb.iter_mut().rev() {
                *digit = BASE62[(part % 62) as usize];
                part /= 62;
            }
        }
        debug_assert!(
            rest == 0 && digits[..30 - width].iter().all(|&d| d == b'0'),
            "{value} needs more than {width} digits"
        );
        out.push_str(std::str::from_utf8(&digits[30 - width..]).expect("base62 digits are ASCII"));
    }

    fn base62(digits: &str) -> Option<u128> {
        digits.bytes().try_fold(0u128, |value, b| {
            let digit = match b {
                b'0'..=b'9' => b - b'0',
                b'a'..=b'z' => b - b'a' + 10,
                b'A'..=b'Z' => b - b'A' + 36,
                _ => return None,
            };
            value.checked_mul(62)?.checked_add(u128::from(digit))
        })
    }

    /// Reads a big-endian u64 value or key.
    pub fn u64_of(bytes: &[u8]) -> Option<u64> {
        Some(u64::from_be_bytes(*bytes.first_chunk::<8>()?))
    }

    /// The row of Kafka partition `partition` of `topic` of `cluster` in
    /// [`super::Table::EgressPositions`].
    pub fn egress_position(cluster: &str, topic: &str, partition: i32) -> Vec<u8> {
        let mut row = Vec::with_capacity(12 + cluster.len() + topic.len());
        push_str(&mut row, cluster);
        push_str(&mut row, topic);
        row.extend_from_slice(&partition.to_be_bytes());
        row
    }

    /// (cluster, topic, partition) of an [`egress_position`] row.
    pub fn egress_position_parts(row: &[u8]) -> Option<(&str, &str, i32)> {
        let (cluster, rest) = take_str(row)?;
        let (topic, rest) = take_str(rest)?;
        Some((cluster, topic, i32::from_be_bytes(*rest.first_chunk::<4>()?)))
    }
}

#[cfg(test)]
mod tests {
    use std::ops::ControlFlow;

    use super::*;

    #[test]
    fn ids_are_restates() {
        // restate-server 1.7 wrote the partition key 0x8172151ff72c5e52 so in
        // the id inv_174rq2A9bm3T40PBnc89cVFviqZNWyexSd.
        assert!(key::id(0x8172151ff72c5e52, 7).starts_with("inv_174rq2A9bm3T"));
        // A deployment id from Restate's own tests.
        assert_eq!(key::resource_id("dp", 0x019441f1be4f151534e91b9a2173692d), "dp_11nGQpCRmau6ypL82KH2TnP");
        for (partition_key, unique) in [(0, 0), (u64::MAX, u64::MAX), (0x8172151ff72c5e52, 42), (1 << 63, 1)] {
            let id = key::id(partition_key, unique);
            assert_eq!(id.len(), 38, "{id}");
            assert_eq!(key::id_parts(&id), Some((partition_key, unique)), "{id}");
            assert_eq!(key::invocation_id(&key::invocation(&id)), Some(id));
        }
        // Not ids of this form: kept as they are.
        let too_large = format!("inv_1{}", "Z".repeat(33));
        for other in
            ["inv_1", "inv_2000000000000000000000000000000000", "inv_1zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz!", &too_large]
        {
            assert_eq!(key::id_parts(other), None, "{other}");
            assert_eq!(key::invocation_id(&key::invocation(other)).as_deref(), Some(other));
        }
    }

    #[test]
    fn a_prefix_scan_finds_exactly_one_owners_rows() {
        let mut store = MemStore::default();
        for (service, k) in [("A", "k"), ("A", "k2"), ("Ak", ""), ("A", "")] {
            let mut row = key::object(service, k);
            row.extend_from_slice(b"state");
            store.put(Table::Objects, &row, service.as_bytes()).unwrap();
        }
        let mut found = Vec::new();
        scan_prefix(&store, Table::Objects, &key::object("A", "k"), &mut |k, _| {
            found.push(k.to_vec());
            ControlFlow::Continue(())
        })
        .unwrap();
        let mut expected = key::object("A", "k");
        expected.extend_from_slice(b"state");
        assert_eq!(found, vec![expected]);
    }

    #[test]
    fn keys_split_back_and_sort_by_time() {
        let (early, late) = (key::due(5, "inv_b"), key::due(300, "inv_a"));
        assert!(early < late);
        assert_eq!(key::split_due(&late), Some((300, "inv_a")));
        let mut buf = Vec::new();
        key::push_str(&mut buf, "sub");
        buf.extend_from_slice(&7u64.to_be_bytes());
        let (s, rest) = key::take_str(&buf).unwrap();
        assert_eq!((s, key::u64_of(rest)), ("sub", Some(7)));
    }
}
