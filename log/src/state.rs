//! The deterministic state machines. `apply` takes the state and a command and
//! returns the response; it reads no clock, draws no randomness and does no
//! I/O, so replicas with the same log hold the same state.

use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::wire::v1::{
    Command, Deployment, Invoke, MetadataCommand, MetadataResponse, Response, ServiceDef, Source, Subscription, Target,
};

/// The state of one Raft group. The metadata group only uses `metadata`;
/// partition groups only use `partition`.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct GroupState {
    pub partition: PartitionState,
    pub metadata: MetadataState,
}

impl GroupState {
    pub fn apply(&mut self, command: Command) -> Response {
        match command {
            Command::Invoke(batch) => self.partition.apply_invoke(batch),
            Command::Metadata(command) => Response::Metadata(self.metadata.apply(command)),
        }
    }
}

/// Invocations, the dedup table and per-key inboxes of one partition.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct PartitionState {
    /// The last sequence number applied per producer.
    dedup: HashMap<u64, u64>,
    invocations: BTreeMap<String, Invocation>,
    /// Exclusive invocations per (service, key), in arrival order; the head is
    /// the one allowed to run.
    inboxes: HashMap<(String, String), VecDeque<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invocation {
    pub id: String,
    pub target: Target,
    pub payload: Bytes,
    pub headers: Vec<(String, String)>,
    pub source: Source,
    pub status: Status,
    pub created_at_ms: u64,
    pub modified_at_ms: u64,
    pub attempts: u32,
    pub last_failure: Option<String>,
    pub completion: Option<Completion>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Waiting in its key's inbox behind another exclusive invocation.
    Pending,
    /// May run now.
    Ready,
    Running,
    BackingOff,
    Completed,
}

impl Invocation {
    /// Every header the handler receives: source metadata, then the request's own.
    pub fn all_headers(&self) -> Vec<(String, String)> {
        let mut headers = match &self.source {
            Source::Kafka(source) => source.metadata_headers().map(|(k, v)| (k.to_owned(), v)).to_vec(),
            Source::Ingress => Vec::new(),
        };
        headers.extend(self.headers.iter().cloned());
        headers
    }
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Ready => "ready",
            Status::Running => "running",
            Status::BackingOff => "backing-off",
            Status::Completed => "completed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Completion {
    Success(Bytes),
    Failure { code: u16, message: String },
}

impl PartitionState {
    fn apply_invoke(&mut self, batch: std::sync::Arc<Vec<Invoke>>) -> Response {
        let (mut created, mut deduplicated) = (0, 0);
        // Entries read back from the log hold the only reference.
        let batch = std::sync::Arc::try_unwrap(batch).unwrap_or_else(|shared| (*shared).clone());
        for invoke in batch {
            if let Some(dedup) = invoke.dedup {
                match self.dedup.get_mut(&dedup.producer) {
                    Some(last) if dedup.seq <= *last => {
                        deduplicated += 1;
                        continue;
                    }
                    Some(last) => *last = dedup.seq,
                    None => {
                        self.dedup.insert(dedup.producer, dedup.seq);
                    }
                }
            }
            assert!(!self.invocations.contains_key(&invoke.id), "invocation {} created twice", invoke.id);
            let (status, completion) = match invoke.failure {
                Some(message) => (Status::Completed, Some(Completion::Failure { code: 400, message })),
                None if invoke.target.is_exclusive() => {
                    let key = invoke.target.key.clone().unwrap_or_default();
                    let inbox = self.inboxes.entry((invoke.target.service.clone(), key)).or_default();
                    inbox.push_back(invoke.id.clone());
                    let status = if inbox.len() == 1 { Status::Ready } else { Status::Pending };
                    (status, None)
                }
                None => (Status::Ready, None),
            };
            let invocation = Invocation {
                id: invoke.id,
                target: invoke.target,
                payload: invoke.payload,
                headers: invoke.headers,
                source: invoke.source,
                status,
                created_at_ms: invoke.created_at_ms,
                modified_at_ms: invoke.created_at_ms,
                attempts: 0,
                last_failure: None,
                completion,
            };
            self.invocations.insert(invocation.id.clone(), invocation);
            created += 1;
        }
        Response::Invoked { created, deduplicated }
    }

    pub fn invocation(&self, id: &str) -> Option<&Invocation> {
        self.invocations.get(id)
    }

    /// Invocations with ids after `after`, in id order.
    pub fn invocations_after<'a>(&'a self, after: Option<&str>) -> impl Iterator<Item = &'a Invocation> + 'a {
        use std::ops::Bound;
        let lower = match after {
            Some(id) => Bound::Excluded(id.to_owned()),
            None => Bound::Unbounded,
        };
        self.invocations.range((lower, Bound::Unbounded)).map(|(_, inv)| inv)
    }

    pub fn invocation_count(&self) -> usize {
        self.invocations.len()
    }

    /// The last sequence number applied for `producer`.
    pub fn last_seq(&self, producer: u64) -> Option<u64> {
        self.dedup.get(&producer).copied()
    }

    /// The exclusive invocations queued for a key, head first.
    pub fn inbox(&self, service: &str, key: &str) -> Vec<&str> {
        self.inboxes
            .get(&(service.to_owned(), key.to_owned()))
            .map(|q| q.iter().map(String::as_str).collect())
            .unwrap_or_default()
    }
}

/// Deployments, services and subscriptions of the cluster.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct MetadataState {
    /// Bumped by every change.
    pub version: u64,
    pub deployments: BTreeMap<String, Deployment>,
    pub services: BTreeMap<String, RegisteredService>,
    pub subscriptions: BTreeMap<String, Subscription>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisteredService {
    pub def: ServiceDef,
    pub deployment_id: String,
    pub revision: u32,
}

impl MetadataState {
    fn apply(&mut self, command: MetadataCommand) -> MetadataResponse {
        let response = match command {
            MetadataCommand::PutDeployment(deployment) => {
                // Re-registering a deployment replaces it: services it no longer
                // serves go away, the others get a new revision.
                for def in &deployment.services {
                    let revision = self.services.get(&def.name).map_or(1, |s| s.revision + 1);
                    self.services.insert(
                        def.name.clone(),
                        RegisteredService { def: def.clone(), deployment_id: deployment.id.clone(), revision },
                    );
                }
                let served = |name: &String| deployment.services.iter().any(|d| &d.name == name);
                self.services.retain(|name, s| s.deployment_id != deployment.id || served(name));
                self.deployments.insert(deployment.id.clone(), deployment);
                MetadataResponse::Done
            }
            MetadataCommand::RemoveDeployment { id } => {
                if self.deployments.remove(&id).is_none() {
                    return MetadataResponse::NotFound;
                }
                self.services.retain(|_, s| s.deployment_id != id);
                MetadataResponse::Done
            }
            MetadataCommand::PutSubscription(subscription) => {
                if self.subscriptions.contains_key(&subscription.id) {
                    return MetadataResponse::Conflict(format!("subscription {} exists", subscription.id));
                }
                self.subscriptions.insert(subscription.id.clone(), subscription);
                MetadataResponse::Done
            }
            MetadataCommand::RemoveSubscription { id } => {
                if self.subscriptions.remove(&id).is_none() {
                    return MetadataResponse::NotFound;
                }
                MetadataResponse::Done
            }
        };
        self.version += 1;
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::v1::{Dedup, HandlerType, KafkaSource, ServiceType};
    use std::sync::Arc;

    fn invoke(id: &str, key: Option<&str>, handler_ty: HandlerType, dedup: Option<(u64, u64)>) -> Invoke {
        Invoke {
            id: id.to_owned(),
            target: Target {
                service: "Counter".to_owned(),
                handler: "add".to_owned(),
                key: key.map(str::to_owned),
                service_ty: if key.is_some() { ServiceType::VirtualObject } else { ServiceType::Service },
                handler_ty,
            },
            payload: Bytes::from_static(b"1"),
            headers: vec![("kafka.offset".to_owned(), "0".to_owned())],
            source: Source::Kafka(KafkaSource {
                subscription: "sub_1".to_owned(),
                topic: "t".to_owned(),
                partition: 0,
                offset: dedup.map_or(0, |d| d.1 as i64),
                timestamp_ms: None,
                key: None,
            }),
            dedup: dedup.map(|(producer, seq)| Dedup { producer, seq }),
            created_at_ms: 10,
            failure: None,
        }
    }

    fn apply(state: &mut GroupState, batch: Vec<Invoke>) -> Response {
        state.apply(Command::Invoke(batch.into()))
    }

    #[test]
    fn dedup_drops_sequence_numbers_at_or_below_the_last() {
        let mut state = GroupState::default();
        let r = apply(&mut state, vec![invoke("inv_a", None, HandlerType::Shared, Some((7, 0)))]);
        assert_eq!(r, Response::Invoked { created: 1, deduplicated: 0 });
        let r = apply(
            &mut state,
            vec![
                invoke("inv_a", None, HandlerType::Shared, Some((7, 0))),
                invoke("inv_b", None, HandlerType::Shared, Some((7, 5))),
                invoke("inv_c", None, HandlerType::Shared, Some((7, 3))),
                invoke("inv_d", None, HandlerType::Shared, Some((8, 0))),
            ],
        );
        assert_eq!(r, Response::Invoked { created: 2, deduplicated: 2 });
        assert_eq!(state.partition.last_seq(7), Some(5));
        assert_eq!(state.partition.last_seq(8), Some(0));
        assert!(state.partition.invocation("inv_c").is_none());
        assert_eq!(state.partition.invocation_count(), 3);
    }

    #[test]
    fn exclusive_invocations_queue_per_key_in_arrival_order() {
        let mut state = GroupState::default();
        apply(
            &mut state,
            vec![
                invoke("inv_1", Some("k"), HandlerType::Exclusive, None),
                invoke("inv_2", Some("j"), HandlerType::Exclusive, None),
                invoke("inv_3", Some("k"), HandlerType::Exclusive, None),
                invoke("inv_4", Some("k"), HandlerType::Shared, None),
            ],
        );
        let p = &state.partition;
        assert_eq!(p.inbox("Counter", "k"), vec!["inv_1", "inv_3"]);
        assert_eq!(p.inbox("Counter", "j"), vec!["inv_2"]);
        assert_eq!(p.invocation("inv_1").unwrap().status, Status::Ready);
        assert_eq!(p.invocation("inv_2").unwrap().status, Status::Ready);
        assert_eq!(p.invocation("inv_3").unwrap().status, Status::Pending);
        // Shared handlers never queue.
        assert_eq!(p.invocation("inv_4").unwrap().status, Status::Ready);
    }

    #[test]
    fn undeliverable_records_complete_failed_without_holding_the_key() {
        let mut state = GroupState::default();
        let mut bad = invoke("inv_1", Some("k"), HandlerType::Exclusive, Some((1, 0)));
        bad.failure = Some("handler Counter/add is gone".to_owned());
        apply(&mut state, vec![bad, invoke("inv_2", Some("k"), HandlerType::Exclusive, Some((1, 1)))]);
        let p = &state.partition;
        let failed = p.invocation("inv_1").unwrap();
        assert_eq!(failed.status, Status::Completed);
        assert!(matches!(&failed.completion, Some(Completion::Failure { message, .. }) if message.contains("gone")));
        assert_eq!(p.invocation("inv_2").unwrap().status, Status::Ready);
        assert_eq!(p.inbox("Counter", "k"), vec!["inv_2"]);
    }

    #[test]
    fn same_log_same_state() {
        let commands = || {
            vec![
                Command::Invoke(vec![invoke("inv_1", Some("k"), HandlerType::Exclusive, Some((1, 0)))].into()),
                Command::Invoke(Arc::new(vec![
                    invoke("inv_1", Some("k"), HandlerType::Exclusive, Some((1, 0))),
                    invoke("inv_2", Some("k"), HandlerType::Exclusive, Some((1, 1))),
                ])),
            ]
        };
        let (mut a, mut b) = (GroupState::default(), GroupState::default());
        for c in commands() {
            a.apply(c);
        }
        for c in commands() {
            b.apply(c);
        }
        assert_eq!(crate::wire::encode(&a.partition.invocations), crate::wire::encode(&b.partition.invocations));
    }

    #[test]
    fn metadata_replaces_service_revisions_and_removes_with_deployment() {
        use crate::wire::v1::{HandlerDef, ProtocolMode};
        let deployment = |id: &str| Deployment {
            id: id.to_owned(),
            uri: "http://127.0.0.1:9080".to_owned(),
            protocol_mode: ProtocolMode::BidiStream,
            http2: true,
            min_protocol_version: 5,
            max_protocol_version: 6,
            additional_headers: Default::default(),
            services: vec![ServiceDef {
                name: "Counter".to_owned(),
                ty: ServiceType::VirtualObject,
                handlers: vec![HandlerDef { name: "add".to_owned(), ty: HandlerType::Exclusive }],
            }],
            created_at_ms: 1,
        };
        let mut m = MetadataState::default();
        assert_eq!(m.apply(MetadataCommand::PutDeployment(deployment("dp_1"))), MetadataResponse::Done);
        // Replacing a deployment keeps its services, with a new revision.
        assert_eq!(m.apply(MetadataCommand::PutDeployment(deployment("dp_1"))), MetadataResponse::Done);
        assert_eq!(m.services["Counter"].revision, 2);
        assert_eq!(m.apply(MetadataCommand::PutDeployment(deployment("dp_2"))), MetadataResponse::Done);
        assert_eq!(m.services["Counter"].revision, 3);
        assert_eq!(m.services["Counter"].deployment_id, "dp_2");
        // Removing the older deployment keeps the newer revision.
        assert_eq!(m.apply(MetadataCommand::RemoveDeployment { id: "dp_1".to_owned() }), MetadataResponse::Done);
        assert!(m.services.contains_key("Counter"));
        assert_eq!(m.apply(MetadataCommand::RemoveDeployment { id: "dp_2".to_owned() }), MetadataResponse::Done);
        assert!(m.services.is_empty());
        assert_eq!(m.apply(MetadataCommand::RemoveDeployment { id: "dp_2".to_owned() }), MetadataResponse::NotFound);
        assert_eq!(m.version, 5);
    }
}
