//! Turns a Kafka record into an invoke command: target, dedup information and
//! the partition that owns it. Pure, so it is tested without a broker.

use bytes::Bytes;
use ferry_log::PartitionId;
use ferry_partition::partitioner::{key_hash, partition_of, producer_seq_hash};
use ferry_partition::state::MetadataState;
use ferry_partition::store::key;
use ferry_partition::wire::v1::{
    ordering_key, Dedup, HandlerType, Invoke, KafkaSource, KafkaTopic, Retention, RetentionPolicy, ServiceType, Source,
    Subscription, Target, ORDERED_PARTITIONS,
};

/// A record read from Kafka.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub offset: i64,
    pub key: Option<Bytes>,
    pub payload: Bytes,
    pub headers: Vec<(String, String)>,
    pub timestamp_ms: Option<i64>,
}

/// Where a subscription's records go: the sink as the subscription recorded
/// it, and whether it can take records now (read from metadata once per batch).
#[derive(Debug, Clone)]
pub struct Sink {
    pub service: String,
    pub handler: String,
    pub service_ty: ServiceType,
    pub handler_ty: HandlerType,
    /// Why records cannot be delivered now: the service or handler is not
    /// registered (any more), or no longer of the recorded kind.
    pub unavailable: Option<String>,
    /// How long its invocations are kept once completed.
    pub retention: Retention,
}

impl Sink {
    /// The sink of `subscription` as `metadata` has it now; its invocations
    /// are kept as `defaults` say, unless the service or handler says otherwise.
    pub fn resolve(metadata: &MetadataState, subscription: &Subscription, defaults: RetentionPolicy) -> Sink {
        let (service, handler) = (&subscription.service, &subscription.handler);
        let recorded = (subscription.service_ty, subscription.handler_ty);
        let def = metadata.services.get(service).and_then(|s| Some((s, s.def.handler(handler)?)));
        let current = def.map(|(service, handler)| (service.def.ty, handler.ty));
        let retention = match def {
            Some((service, handler)) => service.def.retention(handler, defaults, &service.config, false),
            None => defaults.retention(subscription.handler_ty, false),
        };
        let unavailable = match current {
            None => Some(format!("handler {service}/{handler} is not registered")),
            Some(kind) if kind != recorded => Some(format!(
                "handler {service}/{handler} is now {kind:?}, not {recorded:?} as when subscription {} was \
                 created; create the subscription again",
                subscription.id
            )),
            Some(_) => None,
        };
        Sink {
            service: service.clone(),
            handler: handler.clone(),
            service_ty: recorded.0,
            handler_ty: recorded.1,
            unavailable,
            retention,
        }
    }
}

/// The fixed part of every record of one Kafka partition.
#[derive(Debug, Clone)]
pub struct Origin {
    pub subscription: String,
    pub topic: String,
    pub partition: i32,
    pub producer: u64,
    /// One record at a time per Kafka partition (`ferry.ordering`).
    pub ordered: bool,
    /// Where records whose invocation ends failed go (`ferry.dead-letter.topic`).
    pub dead_letter: Option<KafkaTopic>,
}

/// The largest record taken as it is: a larger one is created failed,
/// without its payload and headers, so that it fits in a command and does not
/// hold up its Kafka partition.
pub const RECORD_BYTES_MAX: usize = ferry_log::COMMAND_BYTES_MAX - (64 << 10);

impl Record {
    /// The bytes of the record's key, payload and headers.
    pub fn bytes(&self) -> usize {
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        self.key.as_ref().map_or(0, Bytes::len) + self.payload.len() + headers
    }
}

/// About how many bytes `invoke` takes in an entry.
pub fn invoke_bytes(invoke: &Invoke) -> usize {
    let headers: usize = invoke.headers.iter().map(|(k, v)| k.len() + v.len() + 16).sum();
    invoke.payload.len() + headers + invoke.id.len() + 256
}

/// Builds the invoke command of `record`, stamped with `now_ms`, and the
/// partition it belongs to. A record that cannot be delivered still yields an
/// invocation, created failed, so that it never blocks its Kafka partition.
pub fn invoke(origin: &Origin, sink: &Sink, mut record: Record, partitions: u32, now_ms: u64) -> (PartitionId, Invoke) {
    let seq = record.offset as u64;
    let oversized = match record.bytes() {
        bytes if bytes > RECORD_BYTES_MAX => {
            record.payload = Bytes::new();
            record.headers = Vec::new();
            Some(format!("the record is {bytes} bytes, over the limit of {RECORD_BYTES_MAX}"))
        }
        _ => None,
    };
    let unkeyed = producer_seq_hash(origin.producer, seq);
    let (service_ty, handler_ty) = (sink.service_ty, sink.handler_ty);
    let (key, failure) = match record.key.as_deref().map(std::str::from_utf8) {
        _ if !service_ty.is_keyed() => (None, None),
        Some(Ok(key)) => (Some(key.to_owned()), None),
        Some(Err(e)) => {
            (None, Some(format!("record key is not valid UTF-8 ({e}); {} needs a string key", sink.service)))
        }
        None => (None, Some(format!("record has no key; {} needs one", sink.service))),
    };
    let failure = sink.unavailable.clone().or(failure);
    let failure = oversized.or(failure);
    let target = Target { service: sink.service.clone(), handler: sink.handler.clone(), key, service_ty, handler_ty };
    let (partition_key, unique) = match &target.key {
        // A workflow runs once per key, whichever record or request starts
        // it: every one of them names the same invocation, and the first wins.
        Some(_) if handler_ty == HandlerType::Workflow => crate::ids(&target, None),
        // The unique part is the offset, then 16 bits of the producer: a
        // re-read record gets the same id as its first copy, and a partition
        // creates the invocations of one Kafka partition in id order. The
        // rare record whose id another producer's record took gets another
        // from the partition.
        Some(key) => (key_hash(&sink.service, key), offset_unique(origin.producer, seq)),
        // Ordered records of a Kafka partition share a Ferry partition,
        // where they queue in one inbox.
        None if origin.ordered => {
            let ordering = ordering_key(&origin.subscription, &origin.topic, origin.partition);
            (key_hash(ORDERED_PARTITIONS, &ordering), offset_unique(origin.producer, seq))
        }
        None => (unkeyed, offset_unique(origin.producer, seq)),
    };
    let invoke = Invoke {
        id: key::id(partition_key, unique),
        target,
        payload: record.payload,
        headers: record.headers,
        source: Source::Kafka(KafkaSource {
            subscription: origin.subscription.clone(),
            topic: origin.topic.clone(),
            partition: origin.partition,
            offset: record.offset,
            timestamp_ms: record.timestamp_ms,
            key: record.key,
            ordered: origin.ordered && !service_ty.is_keyed(),
            dead_letter: origin.dead_letter.clone(),
        }),
        dedup: Some(Dedup { producer: origin.producer, seq }),
        created_at_ms: now_ms,
        failure: failure.map(|message| (400, message)),
        not_before_ms: None,
        trace: None,
        retention: sink.retention,
        reply: None,
        idempotency_key: None,
    };
    (partition_of(partition_key, partitions), invoke)
}

/// The unique part of the id of a record at `offset` of `producer`.
fn offset_unique(producer: u64, offset: u64) -> u64 {
    (offset << 16) | (producer & 0xffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> Origin {
        Origin {
            subscription: "sub_1".into(),
            topic: "t".into(),
            partition: 2,
            producer: 99,
            ordered: false,
            dead_letter: None,
        }
    }

    fn record(offset: i64, key: Option<&[u8]>) -> Record {
        Record {
            offset,
            key: key.map(Bytes::copy_from_slice),
            payload: Bytes::from_static(b"{}"),
            headers: vec![("h".into(), "v".into())],
            timestamp_ms: Some(5),
        }
    }

    fn sink(service_ty: ServiceType, handler_ty: HandlerType) -> Sink {
        let retention = Retention::FOREVER;
        Sink { service: "Counter".into(), handler: "add".into(), service_ty, handler_ty, unavailable: None, retention }
    }

    fn subscription() -> Subscription {
        Subscription {
            id: "sub_1".into(),
            cluster: "c".into(),
            topic: "t".into(),
            service: "Counter".into(),
            handler: "add".into(),
            service_ty: ServiceType::VirtualObject,
            handler_ty: HandlerType::Exclusive,
            options: Default::default(),
            created_at_ms: 1,
            paused: false,
            draining: false,
        }
    }

    /// Metadata in which `Counter/add` is registered as `ty`, or not at all.
    fn metadata(ty: Option<ServiceType>) -> MetadataState {
        use ferry_partition::wire::v1::{
            Deployment, HandlerDef, MetadataCommand, ProtocolMode, RetentionOverrides, ServiceDef,
        };
        let mut state = ferry_partition::state::GroupState::default();
        if let Some(ty) = ty {
            let handler_ty = if ty == ServiceType::Service { HandlerType::Shared } else { HandlerType::Exclusive };
            let deployment = Deployment {
                id: "dp_1".into(),
                uri: "http://127.0.0.1:9080".into(),
                protocol_mode: ProtocolMode::BidiStream,
                http2: true,
                min_protocol_version: 5,
                max_protocol_version: 5,
                additional_headers: Default::default(),
                services: vec![ServiceDef {
                    name: "Counter".into(),
                    ty,
                    handlers: vec![HandlerDef {
                        name: "add".into(),
                        ty: handler_ty,
                        retention: RetentionOverrides { journal_ms: Some(60_000), ..Default::default() },
                        lazy_state: false,
                        timeouts: Default::default(),
                    }],
                    retention: RetentionOverrides {
                        journal_ms: Some(1),
                        idempotency_ms: Some(2),
                        ..Default::default()
                    },
                }],
                created_at_ms: 1,
            };
            state.apply(ferry_partition::wire::v1::Command::Metadata(MetadataCommand::PutDeployment(deployment)));
        }
        state.metadata
    }

    /// Case 4: where a record goes never depends on how the reading node
    /// resolves its sink. One node reads it while the deployment is gone,
    /// another (after a crash, before the offset was committed) once it is
    /// back, a third after the service changed kind: all three name the same
    /// invocation in the same partition, so the log keeps one of them.
    #[test]
    fn case4_a_record_goes_to_one_partition_however_its_sink_resolves() {
        let sub = subscription();
        let views = [Some(ServiceType::VirtualObject), None, Some(ServiceType::Service)];
        let routed: Vec<(PartitionId, Invoke)> = views
            .iter()
            .map(|&ty| {
                invoke(
                    &origin(),
                    &Sink::resolve(&metadata(ty), &sub, RetentionPolicy::DEFAULT),
                    record(9, Some(b"alice")),
                    16,
                    0,
                )
            })
            .collect();
        let (partition, registered) = &routed[0];
        assert!(registered.failure.is_none(), "{:?}", registered.failure);
        for (p, other) in &routed[1..] {
            assert_eq!((p, &other.id, other.dedup), (partition, &registered.id, registered.dedup));
            assert!(other.failure.is_some());
        }
        assert!(routed[1].1.failure.as_ref().unwrap().1.contains("not registered"));
        assert!(routed[2].1.failure.as_ref().unwrap().1.contains("create the subscription again"));
        let mut state = ferry_partition::state::GroupState::default();
        let batch = routed.into_iter().map(|(_, invoke)| invoke).collect::<Vec<_>>();
        let applied = state.apply(ferry_partition::wire::v1::Command::Invoke(batch.into()));
        assert_eq!(applied, ferry_partition::wire::v1::Response::Invoked { created: 1, deduplicated: 2 });
    }

    #[test]
    fn keyed_sinks_route_by_key_and_services_spread_by_offset() {
        let object = sink(ServiceType::VirtualObject, HandlerType::Exclusive);
        let (p1, a) = invoke(&origin(), &object, record(1, Some(b"alice")), 16, 0);
        let (p2, b) = invoke(&origin(), &object, record(2, Some(b"alice")), 16, 0);
        assert_eq!(p1, p2, "one key, one partition");
        assert_eq!(a.target.key.as_deref(), Some("alice"));
        assert_ne!(a.id, b.id);
        assert!(a.failure.is_none());

        let service = sink(ServiceType::Service, HandlerType::Shared);
        let spread: std::collections::BTreeSet<_> =
            (0..64).map(|o| invoke(&origin(), &service, record(o, Some(b"alice")), 16, 0).0).collect();
        assert!(spread.len() > 8, "service records spread over partitions: {spread:?}");
        let (_, s) = invoke(&origin(), &service, record(3, Some(b"alice")), 16, 0);
        assert_eq!(s.target.key, None);
    }

    #[test]
    fn ids_are_stable_and_carry_the_partition_key() {
        let service = sink(ServiceType::Service, HandlerType::Shared);
        let (p, a) = invoke(&origin(), &service, record(7, None), 16, 0);
        let (_, again) = invoke(&origin(), &service, record(7, None), 16, 123);
        assert_eq!(a.id, again.id);
        assert_eq!(a.dedup, Some(Dedup { producer: 99, seq: 7 }));
        let (partition_key, _) = key::id_parts(&a.id).unwrap();
        assert_eq!(partition_of(partition_key, 16), p);
    }

    /// A record's invocation is kept as its handler says, else its service,
    /// else the configured defaults; one whose sink is gone as the defaults say.
    #[test]
    fn retention_comes_from_the_handler_then_the_service_then_the_defaults() {
        let defaults = RetentionPolicy { journal_ms: 10, idempotency_ms: 20, workflow_completion_ms: 30 };
        let registered = Sink::resolve(&metadata(Some(ServiceType::VirtualObject)), &subscription(), defaults);
        // The handler's journal retention; no idempotency key, so the result too.
        assert_eq!(registered.retention, Retention { journal_ms: 60_000, completion_ms: 60_000 });
        let gone = Sink::resolve(&metadata(None), &subscription(), defaults);
        assert_eq!(gone.retention, Retention { journal_ms: 10, completion_ms: 10 });
        let (_, invoke) = invoke(&origin(), &registered, record(1, Some(b"k")), 16, 0);
        assert_eq!(invoke.retention, registered.retention);
        // Idempotent calls keep their result longer than their journal; a
        // workflow's run as long as workflow retention says.
        assert_eq!(defaults.retention(HandlerType::Shared, true), Retention { journal_ms: 10, completion_ms: 20 });
        assert_eq!(defaults.retention(HandlerType::Workflow, false), Retention { journal_ms: 10, completion_ms: 30 });
        let short = RetentionPolicy { journal_ms: 50, ..defaults };
        assert_eq!(short.retention(HandlerType::Shared, true), Retention { journal_ms: 20, completion_ms: 20 });
    }

    /// Case 8: a workflow's `run` runs once per key, from Kafka as from HTTP:
    /// every record of a key names the invocation that HTTP's attach and
    /// output look up by workflow key.
    #[test]
    fn case8_kafka_into_a_workflow_run_is_once_per_key() {
        let workflow = Sink {
            service: "Flow".into(),
            handler: "run".into(),
            service_ty: ServiceType::Workflow,
            handler_ty: HandlerType::Workflow,
            unavailable: None,
            retention: Retention::FOREVER,
        };
        let (p1, first) = invoke(&origin(), &workflow, record(1, Some(b"w-1")), 16, 0);
        let (p2, second) = invoke(&origin(), &workflow, record(2, Some(b"w-1")), 16, 0);
        let (_, other) = invoke(&origin(), &workflow, record(3, Some(b"w-2")), 16, 0);
        assert_eq!((p1, &first.id), (p2, &second.id), "one key, one run");
        assert_ne!(first.id, other.id);
        let (partition_key, unique) = crate::ids(&first.target, None);
        assert_eq!(first.id, key::id(partition_key, unique), "the id HTTP derives");
        // Both records still advance the producer's sequence.
        assert_eq!((first.dedup.unwrap().seq, second.dedup.unwrap().seq), (1, 2));

        let mut state = ferry_partition::state::GroupState::default();
        let created = state.apply(ferry_partition::wire::v1::Command::Invoke(vec![first, second, other].into()));
        assert_eq!(created, ferry_partition::wire::v1::Response::Invoked { created: 2, deduplicated: 1 });
    }

    /// Case 6: a record too large for one command is created failed, without
    /// its payload, rather than failing its append for ever.
    #[test]
    fn case6_an_oversized_record_is_created_failed_and_fits_in_a_command() {
        let service = sink(ServiceType::Service, HandlerType::Shared);
        let mut big = record(4, Some(b"k"));
        big.payload = Bytes::from(vec![7u8; RECORD_BYTES_MAX + 1]);
        let (_, failed) = invoke(&origin(), &service, big, 16, 0);
        assert!(failed.failure.as_ref().unwrap().1.contains("over the limit"), "{:?}", failed.failure);
        assert!(failed.payload.is_empty());
        assert_eq!(failed.dedup.unwrap().seq, 4);
        let command = ferry_partition::wire::v1::Command::Invoke(vec![failed].into());
        assert!(ferry_partition::wire::encode(&command).len() < ferry_log::COMMAND_BYTES_MAX);
        let mut fits = record(5, Some(b"k"));
        fits.payload = Bytes::from(vec![7u8; RECORD_BYTES_MAX - 64]);
        assert!(invoke(&origin(), &service, fits, 16, 0).1.failure.is_none());
    }

    #[test]
    fn undeliverable_records_fail_with_a_reason() {
        let object = sink(ServiceType::VirtualObject, HandlerType::Exclusive);
        let (_, bad_key) = invoke(&origin(), &object, record(1, Some(&[0xff, 0xfe])), 16, 0);
        assert!(bad_key.failure.as_ref().unwrap().1.contains("UTF-8"));
        let (_, no_key) = invoke(&origin(), &object, record(2, None), 16, 0);
        assert!(no_key.failure.as_ref().unwrap().1.contains("no key"));
        let (_, gone) = invoke(
            &origin(),
            &Sink::resolve(&metadata(None), &subscription(), RetentionPolicy::DEFAULT),
            record(3, Some(b"k")),
            16,
            0,
        );
        assert!(gone.failure.as_ref().unwrap().1.contains("not registered"));
        // All still carry their dedup information and source offset.
        for (i, inv) in [bad_key, no_key, gone].iter().enumerate() {
            assert_eq!(inv.dedup.unwrap().seq, i as u64 + 1);
        }
    }
}
