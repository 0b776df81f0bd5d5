//! The admin operations, shared by the gRPC service and the REST gateway.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ferry_ingress::kafka::{find_cluster, is_secret, REDACTED};
use ferry_ingress::subscription;
use ferry_ingress::{ClusterOptions, IngressStatus};
use ferry_invoker::Discovery;
use ferry_log::node::{GroupStatus, StateDigest};
use ferry_log::{partition_group, PartitionId, METADATA_GROUP};
use ferry_partition::partitioner::{invocation_ids, key_hash, partition_of};
use ferry_partition::state::{Completion, Invocation, MetadataState, RegisteredService};
use ferry_partition::store::key;
use ferry_partition::wire::v1::{
    Command, Deployment, Effect, HandlerType, Invoke, KafkaCluster, MetadataCommand, MetadataResponse, Outcome,
    ProtocolMode, Response, RetentionPolicy, ServiceType, SetState, Source, Subscription, Target,
};
use ferry_partition::{Log, LogReads};
use ferry_proto::admin as pb;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::Error;
use tracing::{debug, info, warn};

/// Admin API versions this node serves, as `/version` reports them: the
/// paths are served under `/v{N}` for each, and without a prefix.
pub const MIN_ADMIN_API_VERSION: u32 = 1;
pub const MAX_ADMIN_API_VERSION: u32 = 4;

const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 10_000;

/// The admin API of a node; cheap to clone.
#[derive(Clone)]
pub struct Admin {
    log: Log,
    discovery: Discovery,
    ingress: IngressStatus,
    query: ferry_query::Engine,
    settings: Arc<Settings>,
}

/// What the admin API tells of the node's configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The Kafka clusters of the config file.
    pub clusters: Vec<ClusterOptions>,
    /// The configured `node-name` of each node.
    pub names: BTreeMap<u64, String>,
    /// Limits of each SQL query.
    pub query: ferry_query::Limits,
    /// Where this node's HTTP ingress is reached, as `/version` tells.
    pub ingress_endpoint: String,
    /// Retention defaults, which a deployment's manifest overrides.
    pub retention: RetentionPolicy,
    /// The invoker's attempt timeouts, which a manifest overrides.
    pub inactivity_timeout: Duration,
    pub abort_timeout: Duration,
    /// When the node started (milliseconds since the epoch): when its
    /// configured Kafka clusters were made.
    pub started_at_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn timestamp(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// A new id in Restate's form: `dp_1...`, `sub_1...`.
fn new_id(prefix: &str) -> String {
    key::resource_id(prefix, ulid::Ulid::new().0)
}

/// A duration as Restate's API takes it: "1d", "12h", "90 s", "1h 30m" or
/// ISO 8601 ("PT1H", "P1D"); a day is 24 hours.
fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let span: jiff::Span = text.trim().parse().map_err(|e| format!("invalid duration {text:?}: {e}"))?;
    let duration = span
        .to_duration(jiff::SpanRelativeTo::days_are_24_hours())
        .map_err(|e| format!("invalid duration {text:?}: {e}"))?;
    let duration = Duration::try_from(duration).map_err(|_| format!("duration {text:?} is negative"))?;
    Ok(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}

fn duration(ms: u64) -> String {
    humantime::format_duration(Duration::from_millis(ms)).to_string()
}

impl Settings {
    fn service_to_proto(&self, service: &RegisteredService) -> pb::Service {
        let (def, set) = (&service.def, &service.config);
        let retention = self.retention.overridden(&def.retention).overridden(&set.retention);
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        pb::Service {
            name: def.name.clone(),
            ty: def.ty.as_str().to_owned(),
            deployment_id: service.deployment_id.clone(),
            revision: service.revision,
            public: set.is_public(),
            handlers: def
                .handlers
                .iter()
                .map(|h| pb::Handler {
                    name: h.name.clone(),
                    ty: h.ty.as_str().to_owned(),
                    input_description: String::new(),
                    output_description: String::new(),
                    enable_lazy_state: h.lazy_state,
                    inactivity_timeout: set.timeouts.inactivity_ms.or(h.timeouts.inactivity_ms).map(duration),
                    abort_timeout: set.timeouts.abort_ms.or(h.timeouts.abort_ms).map(duration),
                })
                .collect(),
            journal_retention: duration(retention.journal_ms),
            idempotency_retention: duration(retention.idempotency_ms),
            workflow_completion_retention: (def.ty == ServiceType::Workflow)
                .then(|| duration(retention.workflow_completion_ms)),
            inactivity_timeout: duration(set.timeouts.inactivity_ms.unwrap_or(ms(self.inactivity_timeout))),
            abort_timeout: duration(set.timeouts.abort_ms.unwrap_or(ms(self.abort_timeout))),
        }
    }
}

fn deployment_to_proto(d: &Deployment, metadata: &MetadataState) -> pb::Deployment {
    pb::Deployment {
        id: d.id.clone(),
        uri: d.uri.clone(),
        protocol_type: match d.protocol_mode {
            ProtocolMode::RequestResponse => "RequestResponse",
            ProtocolMode::BidiStream => "BidiStream",
        }
        .to_owned(),
        http_version: if d.http2 { "HTTP/2.0" } else { "HTTP/1.1" }.to_owned(),
        created_at: timestamp(d.created_at_ms),
        min_protocol_version: d.min_protocol_version,
        max_protocol_version: d.max_protocol_version,
        services: d
            .services
            .iter()
            .map(|s| pb::ServiceRevision {
                name: s.name.clone(),
                revision: metadata.services.get(&s.name).map_or(0, |r| r.revision),
            })
            .collect(),
        additional_headers: d.additional_headers.clone().into_iter().collect(),
    }
}

/// New properties of a cluster with each secret sent back as reads show it
/// (`***`) given its `current` value.
fn unredacted(
    mut properties: BTreeMap<String, String>,
    current: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    for (key, value) in &mut properties {
        if value == REDACTED && is_secret(key) {
            if let Some(kept) = current.get(key) {
                value.clone_from(kept);
            }
        }
    }
    properties
}

/// A cluster as the API shows it: secrets redacted, its brokers among its
/// properties as `bootstrap.servers`.
fn cluster_to_proto(cluster: &ClusterOptions, created_at_ms: u64, configured: bool) -> pb::KafkaCluster {
    let mut properties: std::collections::HashMap<String, String> = cluster.redacted_properties().into_iter().collect();
    properties.entry("bootstrap.servers".to_owned()).or_insert_with(|| cluster.brokers.join(","));
    pb::KafkaCluster {
        name: cluster.name.clone(),
        brokers: cluster.brokers.clone(),
        properties,
        created_at: timestamp(created_at_ms),
        subscriptions: Vec::new(),
        configured,
    }
}

fn subscription_to_proto(s: &Subscription) -> pb::Subscription {
    pb::Subscription {
        id: s.id.clone(),
        source: s.source(),
        sink: s.sink(),
        options: s.options.clone().into_iter().collect(),
        paused: s.paused,
        draining: s.draining,
    }
}

/// What the cluster says of a subscription's topic.
enum TopicCheck {
    Found,
    /// The topic, or a partition the subscription names, does not exist.
    Missing(String),
    /// The cluster did not answer.
    Unknown(String),
}

/// Asks the cluster whether `topic` exists with each of `partitions`.
fn check_topic(consumer: &BaseConsumer, topic: &str, partitions: &[i32]) -> TopicCheck {
    const TIMEOUT: Duration = Duration::from_secs(5);
    let metadata = match consumer.fetch_metadata(Some(topic), TIMEOUT) {
        Ok(metadata) => metadata,
        Err(e) => return TopicCheck::Unknown(e.to_string()),
    };
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return TopicCheck::Missing(format!("the cluster has no topic {topic}"));
    };
    match found.error() {
        None => {}
        Some(rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) => {
            return TopicCheck::Missing(format!("the cluster has no topic {topic}"));
        }
        Some(other) => return TopicCheck::Unknown(format!("topic {topic}: {other:?}")),
    }
    let count = found.partitions().len() as i32;
    let existing: std::collections::BTreeSet<i32> = found.partitions().iter().map(|p| p.id()).collect();
    match partitions.iter().find(|p| !existing.contains(p)) {
        Some(p) => TopicCheck::Missing(format!("topic {topic} has {count} partitions and no partition {p}")),
        None => TopicCheck::Found,
    }
}

/// Refuses a subscription whose `topic` (or a partition of it) the cluster
/// `consumer` connects to does not have; `what` names the option in the
/// refusal. A cluster that does not answer is not asked.
async fn require_topic(consumer: BaseConsumer, topic: &str, partitions: Vec<i32>, what: &str) -> Result<(), Error> {
    let name = topic.to_owned();
    let checked = tokio::task::spawn_blocking(move || check_topic(&consumer, &name, &partitions))
        .await
        .map_err(|e| Error::Internal(e.to_string()))?;
    match checked {
        TopicCheck::Found => Ok(()),
        TopicCheck::Missing(why) => Err(Error::BadRequest(format!("{what}: {why}"))),
        TopicCheck::Unknown(why) => {
            warn!(topic, "cannot check {what}, subscribing anyway: {why}");
            Ok(())
        }
    }
}

/// What an operator can do to an invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Cancel,
    Kill,
    Purge,
    PurgeJournal,
    Resume,
    Pause,
}

impl Action {
    fn verb(self) -> &'static str {
        match self {
            Action::Cancel => "cancel",
            Action::Kill => "kill",
            Action::Purge => "purge",
            Action::PurgeJournal => "purge the journal of",
            Action::Resume => "resume",
            Action::Pause => "pause",
        }
    }
}

fn invocation_to_proto(inv: &Invocation, partition: PartitionId) -> pb::Invocation {
    let (completion_result, completion_failure) = match &inv.completion {
        Some(Completion::Success(_)) => ("success", String::new()),
        Some(Completion::Failure { code, message }) => ("failure", format!("[{code}] {message}")),
        None => ("", String::new()),
    };
    let (invoked_by, source) = match &inv.source {
        Source::Kafka(k) => (
            "subscription",
            Some(pb::KafkaSource {
                subscription_id: k.subscription.clone(),
                topic: k.topic.clone(),
                partition: k.partition,
                offset: k.offset,
                timestamp_ms: k.timestamp_ms.unwrap_or(0),
            }),
        ),
        Source::Ingress => ("ingress", None),
        Source::Service { .. } => ("service", None),
    };
    let invoked_by_id = match &inv.source {
        Source::Service { caller } => caller.clone(),
        _ => String::new(),
    };
    pb::Invocation {
        id: inv.id.clone(),
        target: inv.target.to_string(),
        target_service_name: inv.target.service.clone(),
        target_service_key: inv.target.key.clone().unwrap_or_default(),
        target_handler_name: inv.target.handler.clone(),
        target_service_ty: inv.target.service_ty.as_str().to_owned(),
        status: inv.status.as_str().to_owned(),
        partition,
        created_at: timestamp(inv.created_at_ms),
        modified_at: timestamp(inv.modified_at_ms),
        invoked_by: invoked_by.to_owned(),
        invoked_by_id,
        source,
        attempts: inv.attempts,
        last_failure: inv.last_failure.clone().unwrap_or_default(),
        completion_result: completion_result.to_owned(),
        completion_failure,
        headers: inv.all_headers().into_iter().collect(),
        payload_size: inv.payload.len() as u64,
        next_retry_at: inv.wake_at_ms.map(timestamp).unwrap_or_default(),
        journal_length: inv.journal.len() as u32,
        completed_at: inv.completed_at_ms.map(timestamp).unwrap_or_default(),
        retained_until: inv
            .completed_at_ms
            .and_then(|at| at.checked_add(inv.retention.completion_ms))
            .map(timestamp)
            .unwrap_or_default(),
    }
}

/// Splits `<scheme>://<a>/<b>` into (a, b).
fn parse_uri<'a>(value: &'a str, scheme: &str, what: &str) -> Result<(&'a str, &'a str), Error> {
    let rest = value.strip_prefix(scheme).and_then(|r| r.strip_prefix("://")).ok_or_else(|| {
        Error::BadRequest(format!("{what} {value:?} must look like {scheme}://<{}>", expected_parts(scheme)))
    })?;
    match rest.split_once('/') {
        Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains('/') => Ok((a, b)),
        _ => Err(Error::BadRequest(format!("{what} {value:?} must look like {scheme}://<{}>", expected_parts(scheme)))),
    }
}

fn expected_parts(scheme: &str) -> &'static str {
    if scheme == "kafka" {
        "cluster>/<topic"
    } else {
        "service>/<handler"
    }
}

fn group_to_proto(status: GroupStatus, state: Option<StateDigest>) -> pb::GroupStatus {
    pb::GroupStatus {
        group: status.group,
        partition: status.group.checked_sub(partition_group(0)),
        leader: status.leader,
        role: status.role.as_str().to_owned(),
        term: status.term,
        last_log_index: status.last_log_index,
        committed_index: status.committed_index,
        last_applied_index: status.last_applied_index,
        voters: status.voters,
        learners: status.learners,
        state: state.map(|s| pb::StateDigest { applied_index: s.applied_index, digest: format!("{:032x}", s.digest) }),
    }
}

impl Admin {
    /// The admin API of `log`'s node; `ingress` is where its Kafka consumers
    /// report how they do; `names` holds the name of each node.
    pub fn new(log: Log, discovery: Discovery, ingress: IngressStatus, settings: Settings) -> Self {
        Admin {
            query: ferry_query::Engine::new(log.clone(), settings.query.clone()),
            log,
            discovery,
            ingress,
            settings: Arc::new(settings),
        }
    }

    /// Runs a SQL query over the cluster's state ([`ferry_query`]).
    pub async fn query(&self, sql: &str) -> Result<ferry_query::Answer, Error> {
        self.query.query(sql).await.map_err(|e| match e {
            ferry_query::Error::Query(message) => Error::BadRequest(message),
            ferry_query::Error::Internal(message) => Error::Internal(message),
        })
    }

    pub fn ingress_endpoint(&self) -> &str {
        &self.settings.ingress_endpoint
    }

    /// The nodes (every member of any group), each group as this node sees
    /// it, how the consumer of each subscription on this node does, and the
    /// lag of the Kafka partitions it consumes. With
    /// `state_digests`, each group also carries the digest of its applied
    /// state.
    pub fn cluster_status(&self, request: &pb::GetClusterStatusRequest) -> pb::ClusterStatus {
        let groups = self.log.group_statuses();
        let mut digests = if request.state_digests { self.log.state_digests() } else { BTreeMap::new() };
        let nodes: BTreeMap<u64, String> = groups.iter().flat_map(|g| g.nodes.clone()).collect();
        pb::ClusterStatus {
            node_id: self.log.node_id(),
            nodes: nodes
                .into_iter()
                .map(|(id, address)| {
                    let name = self.settings.names.get(&id).cloned().unwrap_or_else(|| format!("node-{id}"));
                    pb::ClusterNode { id, address, name }
                })
                .collect(),
            groups: groups
                .into_iter()
                .map(|g| {
                    let digest = digests.remove(&g.group);
                    group_to_proto(g, digest)
                })
                .collect(),
            consumer_lag: self
                .ingress
                .lag()
                .into_iter()
                .map(|(key, lag)| pb::ConsumerLag {
                    subscription_id: key.subscription,
                    topic: key.topic,
                    partition: key.partition,
                    lag,
                })
                .collect(),
            consumers: self
                .ingress
                .consumers()
                .into_iter()
                .map(|(subscription_id, state)| pb::SubscriptionConsumer {
                    subscription_id,
                    state: state.name().to_owned(),
                    detail: state.detail().to_owned(),
                })
                .collect(),
        }
    }

    async fn propose_metadata(&self, command: MetadataCommand) -> Result<MetadataResponse, Error> {
        match self.log.propose_and_read(METADATA_GROUP, Command::Metadata(command)).await? {
            Response::Metadata(response) => Ok(response),
            other => Err(Error::Internal(format!("unexpected response {other:?}"))),
        }
    }

    pub fn version(&self) -> pb::VersionInfo {
        pb::VersionInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            min_admin_api_version: MIN_ADMIN_API_VERSION,
            max_admin_api_version: MAX_ADMIN_API_VERSION,
            features: vec!["kafka-ingress".to_owned()],
        }
    }

    pub async fn register_deployment(
        &self,
        request: pb::RegisterDeploymentRequest,
    ) -> Result<pb::RegisterDeploymentResponse, Error> {
        if request.uri.is_empty() {
            return Err(Error::BadRequest("uri is required".to_owned()));
        }
        let headers: BTreeMap<String, String> = request.additional_headers.into_iter().collect();
        let discovered = self
            .discovery
            .discover(&request.uri, &headers, request.use_http_11)
            .await
            .map_err(|e| Error::BadRequest(e.to_string()))?;
        let existing = self.log.read_metadata(|m| {
            m.deployments.values().find(|d| d.uri.trim_end_matches('/') == request.uri.trim_end_matches('/')).cloned()
        });
        let force = request.force.unwrap_or(true);
        let (id, created) = match existing {
            Some(d) if !force && d.services != discovered.services => {
                return Err(Error::Conflict(format!(
                    "deployment {} already serves {} with other services; pass force to replace it",
                    d.id, d.uri
                )))
            }
            Some(d) => (d.id, false),
            None => (new_id("dp"), true),
        };
        // A service may change deployments but not its kind.
        self.log.read_metadata(|m| {
            for def in &discovered.services {
                if let Some(registered) = m.services.get(&def.name) {
                    if registered.def.ty != def.ty {
                        return Err(Error::Conflict(format!(
                            "service {} is registered as {}, the deployment serves it as {}",
                            def.name,
                            registered.def.ty.as_str(),
                            def.ty.as_str()
                        )));
                    }
                }
            }
            Ok(())
        })?;
        let deployment = Deployment {
            id: id.clone(),
            uri: request.uri,
            protocol_mode: discovered.protocol_mode,
            http2: discovered.http2,
            min_protocol_version: discovered.min_protocol_version,
            max_protocol_version: discovered.max_protocol_version,
            additional_headers: headers,
            services: discovered.services,
            created_at_ms: now_ms(),
        };
        let (min, max) = (deployment.min_protocol_version, deployment.max_protocol_version);
        let services = if request.dry_run {
            // What registering would make: each service's next revision.
            self.log.read_metadata(|m| {
                let services = deployment.services.iter().map(|def| {
                    let revision = m.services.get(&def.name).map_or(1, |r| r.revision + 1);
                    RegisteredService {
                        def: def.clone(),
                        deployment_id: id.clone(),
                        revision,
                        config: Default::default(),
                    }
                });
                services.map(|s| self.settings.service_to_proto(&s)).collect()
            })
        } else {
            let names: Vec<String> = deployment.services.iter().map(|s| s.name.clone()).collect();
            match self.propose_metadata(MetadataCommand::PutDeployment(deployment)).await? {
                MetadataResponse::Done => {}
                other => return Err(Error::Conflict(format!("{other:?}"))),
            }
            self.log.read_metadata(|m| {
                names.iter().filter_map(|n| m.services.get(n)).map(|s| self.settings.service_to_proto(s)).collect()
            })
        };
        Ok(pb::RegisterDeploymentResponse {
            id,
            services,
            min_protocol_version: min,
            max_protocol_version: max,
            created,
        })
    }

    pub fn list_deployments(&self) -> pb::ListDeploymentsResponse {
        self.log.read_metadata(|m| pb::ListDeploymentsResponse {
            deployments: m.deployments.values().map(|d| deployment_to_proto(d, m)).collect(),
        })
    }

    /// The services of deployment `id` as it registered them.
    pub fn deployment_services(&self, id: &str) -> Result<Vec<pb::Service>, Error> {
        self.log.read_metadata(|m| {
            let deployment =
                m.deployments.get(id).ok_or_else(|| Error::NotFound(format!("deployment {id} not found")))?;
            Ok(deployment
                .services
                .iter()
                .map(|def| {
                    let (revision, config) =
                        m.services.get(&def.name).map_or((0, Default::default()), |r| (r.revision, r.config));
                    let registered =
                        RegisteredService { def: def.clone(), deployment_id: id.to_owned(), revision, config };
                    self.settings.service_to_proto(&registered)
                })
                .collect())
        })
    }

    pub fn get_deployment(&self, id: &str) -> Result<pb::Deployment, Error> {
        self.log
            .read_metadata(|m| m.deployments.get(id).map(|d| deployment_to_proto(d, m)))
            .ok_or_else(|| Error::NotFound(format!("deployment {id} not found")))
    }

    pub async fn remove_deployment(&self, id: &str) -> Result<(), Error> {
        match self.propose_metadata(MetadataCommand::RemoveDeployment { id: id.to_owned() }).await? {
            MetadataResponse::Done => Ok(()),
            MetadataResponse::NotFound => Err(Error::NotFound(format!("deployment {id} not found"))),
            MetadataResponse::Conflict(message) => Err(Error::Conflict(message)),
        }
    }

    pub fn list_services(&self) -> pb::ListServicesResponse {
        self.log.read_metadata(|m| pb::ListServicesResponse {
            services: m.services.values().map(|s| self.settings.service_to_proto(s)).collect(),
        })
    }

    pub fn get_service(&self, name: &str) -> Result<pb::Service, Error> {
        self.log
            .read_metadata(|m| m.services.get(name).map(|s| self.settings.service_to_proto(s)))
            .ok_or_else(|| Error::NotFound(format!("service {name} not found")))
    }

    /// Changes what an operator sets of a service: what `request` leaves
    /// unset stays as it is.
    pub async fn modify_service(&self, request: pb::ModifyServiceRequest) -> Result<pb::Service, Error> {
        let name = request.name;
        let (ty, mut config) = self
            .log
            .read_metadata(|m| m.services.get(&name).map(|s| (s.def.ty, s.config)))
            .ok_or_else(|| Error::NotFound(format!("service {name} not found")))?;
        if request.workflow_completion_retention.is_some() && ty != ServiceType::Workflow {
            return Err(Error::BadRequest(format!(
                "workflow_completion_retention: {name} is a {}, not a Workflow",
                ty.as_str()
            )));
        }
        let set = |field: &str, value: Option<String>, to: &mut Option<u64>| -> Result<(), Error> {
            if let Some(text) = value {
                *to = Some(parse_duration_ms(&text).map_err(|e| Error::BadRequest(format!("{field}: {e}")))?);
            }
            Ok(())
        };
        set("journal_retention", request.journal_retention, &mut config.retention.journal_ms)?;
        set("idempotency_retention", request.idempotency_retention, &mut config.retention.idempotency_ms)?;
        set(
            "workflow_completion_retention",
            request.workflow_completion_retention,
            &mut config.retention.workflow_completion_ms,
        )?;
        set("inactivity_timeout", request.inactivity_timeout, &mut config.timeouts.inactivity_ms)?;
        set("abort_timeout", request.abort_timeout, &mut config.timeouts.abort_ms)?;
        if let Some(public) = request.public {
            config.public = Some(public);
        }
        match self.propose_metadata(MetadataCommand::ConfigureService { name: name.clone(), config }).await? {
            MetadataResponse::Done => self.get_service(&name),
            MetadataResponse::NotFound => Err(Error::NotFound(format!("service {name} not found"))),
            MetadataResponse::Conflict(message) => Err(Error::Conflict(message)),
        }
    }

    /// Kafka cluster `name`, of the config file or registered.
    fn cluster(&self, name: &str) -> Result<ClusterOptions, Error> {
        self.log.read_metadata(|m| {
            find_cluster(&self.settings.clusters, m, name).ok_or_else(|| {
                let configured = self.settings.clusters.iter().map(|c| c.name.as_str());
                let known: Vec<&str> = configured.chain(m.kafka_clusters.keys().map(String::as_str)).collect();
                Error::BadRequest(format!("unknown Kafka cluster {name:?}; known clusters: [{}]", known.join(", ")))
            })
        })
    }

    pub async fn create_subscription(&self, request: pb::CreateSubscriptionRequest) -> Result<pb::Subscription, Error> {
        let (cluster_name, topic) = parse_uri(&request.source, "kafka", "source")?;
        let (service, handler) = parse_uri(&request.sink, "service", "sink")?;
        let cluster = self.cluster(cluster_name)?;
        let (service_ty, handler_ty) = self.log.read_metadata(|m| {
            let s = m
                .services
                .get(service)
                .ok_or_else(|| Error::BadRequest(format!("sink {}: unknown service {service}", request.sink)))?;
            let h = s.def.handler(handler).ok_or_else(|| {
                Error::BadRequest(format!("sink {}: service {service} has no handler {handler}", request.sink))
            })?;
            Ok::<_, Error>((s.def.ty, h.ty))
        })?;
        let id = new_id("sub");
        let mut options: BTreeMap<String, String> = request.options.into_iter().collect();
        let settings = subscription::Settings::parse(&options).map_err(Error::BadRequest)?;
        if settings.ordered && service_ty.is_keyed() {
            return Err(Error::BadRequest(format!(
                "{} ferry.ordering applies to Services: a {} runs one invocation at a time per key already",
                request.sink,
                service_ty.as_str()
            )));
        }
        options.entry("group.id".to_owned()).or_insert_with(|| id.clone());
        let subscription = Subscription {
            id,
            cluster: cluster_name.to_owned(),
            topic: topic.to_owned(),
            service: service.to_owned(),
            handler: handler.to_owned(),
            service_ty,
            handler_ty,
            options,
            created_at_ms: now_ms(),
            paused: false,
            draining: false,
        };
        // librdkafka checks every option name and value when a client is made.
        let config =
            ferry_ingress::kafka::consumer_config(&cluster, &subscription, &settings, "ferry-admin-validation");
        let consumer: BaseConsumer =
            config.create().map_err(|e| Error::BadRequest(format!("invalid subscription options: {e}")))?;
        let what = format!("source {}", request.source);
        require_topic(consumer, &subscription.topic, settings.partitions(), &what).await?;
        if let Some(dead_letter) = settings.dead_letter_topic(cluster_name) {
            let cluster = self.cluster(&dead_letter.cluster).map_err(|e| match e {
                Error::BadRequest(why) => Error::BadRequest(format!("{}: {why}", subscription::DEAD_LETTER_CLUSTER)),
                other => other,
            })?;
            let config = ferry_ingress::kafka::cluster_config(&cluster, "ferry-admin-validation");
            let consumer: BaseConsumer = config
                .create()
                .map_err(|e| Error::BadRequest(format!("Kafka cluster {}: {e}", dead_letter.cluster)))?;
            require_topic(consumer, &dead_letter.topic, Vec::new(), subscription::DEAD_LETTER_TOPIC).await?;
        }
        match self.propose_metadata(MetadataCommand::PutSubscription(subscription.clone())).await? {
            MetadataResponse::Done => Ok(subscription_to_proto(&subscription)),
            other => Err(Error::Conflict(format!("{other:?}"))),
        }
    }

    pub fn list_subscriptions(&self, request: &pb::ListSubscriptionsRequest) -> pb::ListSubscriptionsResponse {
        self.log.read_metadata(|m| pb::ListSubscriptionsResponse {
            subscriptions: m
                .subscriptions
                .values()
                .filter(|s| request.sink.is_empty() || s.sink() == request.sink)
                .filter(|s| request.source.is_empty() || s.source() == request.source)
                .map(subscription_to_proto)
                .collect(),
        })
    }

    pub fn get_subscription(&self, id: &str) -> Result<pb::Subscription, Error> {
        self.log
            .read_metadata(|m| m.subscriptions.get(id).map(subscription_to_proto))
            .ok_or_else(|| Error::NotFound(format!("subscription {id} not found")))
    }

    /// Pauses (or resumes) subscription `id` on every node.
    pub async fn pause_subscription(&self, id: &str, paused: bool) -> Result<pb::Subscription, Error> {
        let command = MetadataCommand::PauseSubscription { id: id.to_owned(), paused };
        match self.propose_metadata(command).await? {
            MetadataResponse::Done => self.get_subscription(id),
            MetadataResponse::NotFound => Err(Error::NotFound(format!("subscription {id} not found"))),
            MetadataResponse::Conflict(message) => Err(Error::Conflict(message)),
        }
    }

    /// Deletes subscription `id`: its consumers stop at once; it goes once
    /// the invocations of its records have completed, or at once with
    /// `skip_drain`, which kills those that have not.
    pub async fn delete_subscription(&self, id: &str, skip_drain: bool) -> Result<(), Error> {
        let command = match skip_drain {
            false => MetadataCommand::DrainSubscription { id: id.to_owned() },
            true => MetadataCommand::RemoveSubscription { id: id.to_owned() },
        };
        match self.propose_metadata(command).await? {
            MetadataResponse::Done => {}
            MetadataResponse::NotFound => return Err(Error::NotFound(format!("subscription {id} not found"))),
            MetadataResponse::Conflict(message) => return Err(Error::Conflict(message)),
        }
        if skip_drain {
            let (admin, id) = (self.clone(), id.to_owned());
            tokio::spawn(async move { admin.kill_open_invocations(&id).await });
        }
        Ok(())
    }

    /// Kills every invocation of subscription `id`'s records that has not
    /// completed.
    async fn kill_open_invocations(&self, id: &str) {
        let mut killed = 0;
        let mut page_token = String::new();
        loop {
            let request = pb::ListInvocationsRequest {
                subscription: id.to_owned(),
                limit: MAX_PAGE,
                page_token: std::mem::take(&mut page_token),
                ..Default::default()
            };
            let page = match self.list_invocations(&request) {
                Ok(page) => page,
                Err(e) => {
                    warn!(subscription = %id, "listing the invocations to kill: {e}");
                    return;
                }
            };
            for inv in page.invocations.iter().filter(|inv| inv.status != "completed") {
                match self.act_on_invocation(&inv.id, Action::Kill).await {
                    Ok(_) => killed += 1,
                    Err(e) => debug!(subscription = %id, invocation = %inv.id, "kill: {e}"),
                }
            }
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        info!(subscription = %id, killed, "deleted without draining: killed the invocations that had not completed");
    }

    /// Every Kafka cluster: those of the config file, then the registered ones.
    fn clusters(&self, m: &MetadataState) -> Vec<pb::KafkaCluster> {
        let configured = self.settings.clusters.iter().map(|c| cluster_to_proto(c, self.settings.started_at_ms, true));
        let registered = m.kafka_clusters.values().filter_map(|c| {
            let options = ClusterOptions::from_registered(c).ok()?;
            Some(cluster_to_proto(&options, c.created_at_ms, false))
        });
        configured.chain(registered).collect()
    }

    pub fn list_kafka_clusters(&self) -> pb::ListKafkaClustersResponse {
        pb::ListKafkaClustersResponse { clusters: self.log.read_metadata(|m| self.clusters(m)) }
    }

    /// A cluster with the subscriptions that read from it.
    pub fn get_kafka_cluster(&self, name: &str) -> Result<pb::KafkaCluster, Error> {
        self.log.read_metadata(|m| {
            let mut cluster = self
                .clusters(m)
                .into_iter()
                .find(|c| c.name == name)
                .ok_or_else(|| Error::NotFound(format!("Kafka cluster {name} not found")))?;
            cluster.subscriptions =
                m.subscriptions.values().filter(|s| s.cluster == name).map(subscription_to_proto).collect();
            Ok(cluster)
        })
    }

    /// Registers a Kafka cluster in the metadata group.
    pub async fn create_kafka_cluster(
        &self,
        request: pb::CreateKafkaClusterRequest,
    ) -> Result<pb::KafkaCluster, Error> {
        let name = request.name;
        if name.is_empty()
            || name.len() > 253
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(Error::BadRequest(format!(
                "invalid Kafka cluster name {name:?}: use 1 to 253 letters, digits, '-', '_' or '.'"
            )));
        }
        if self.settings.clusters.iter().any(|c| c.name == name) {
            return Err(Error::Conflict(format!("Kafka cluster {name} exists in the config file")));
        }
        let cluster =
            KafkaCluster { name, properties: request.properties.into_iter().collect(), created_at_ms: now_ms() };
        self.put_kafka_cluster(cluster, true).await
    }

    /// Replaces the properties of a registered Kafka cluster.
    pub async fn update_kafka_cluster(
        &self,
        request: pb::UpdateKafkaClusterRequest,
    ) -> Result<pb::KafkaCluster, Error> {
        let name = request.name;
        self.refuse_configured(&name, "change it there")?;
        let current = self.log.read_metadata(|m| m.kafka_clusters.get(&name).cloned());
        let current = current.ok_or_else(|| Error::NotFound(format!("Kafka cluster {name} not found")))?;
        let properties = unredacted(request.properties.into_iter().collect(), &current.properties);
        self.put_kafka_cluster(KafkaCluster { name, properties, created_at_ms: current.created_at_ms }, false).await
    }

    /// Checks `cluster` the way its consumers will use it, then proposes it.
    async fn put_kafka_cluster(&self, cluster: KafkaCluster, create: bool) -> Result<pb::KafkaCluster, Error> {
        let options = ClusterOptions::from_registered(&cluster)
            .map_err(|e| Error::BadRequest(format!("Kafka cluster {}: {e}", cluster.name)))?;
        // librdkafka checks every property name and value when a client is made.
        let mut config = rdkafka::config::ClientConfig::new();
        config.set("bootstrap.servers", options.brokers.join(",")).set("group.id", "ferry-admin-validation");
        for (k, v) in &options.properties {
            config.set(k, v.to_string());
        }
        config
            .create::<BaseConsumer>()
            .map_err(|e| Error::BadRequest(format!("Kafka cluster {}: invalid properties: {e}", cluster.name)))?;
        let name = cluster.name.clone();
        let created_at_ms = cluster.created_at_ms;
        match self.propose_metadata(MetadataCommand::PutKafkaCluster { cluster, create }).await? {
            MetadataResponse::Done => {}
            MetadataResponse::NotFound => return Err(Error::NotFound(format!("Kafka cluster {name} not found"))),
            MetadataResponse::Conflict(message) => return Err(Error::Conflict(message)),
        }
        Ok(cluster_to_proto(&options, created_at_ms, false))
    }

    /// Forgets a registered Kafka cluster.
    pub async fn delete_kafka_cluster(&self, name: &str, force: bool) -> Result<(), Error> {
        self.refuse_configured(name, "remove it there")?;
        match self.propose_metadata(MetadataCommand::RemoveKafkaCluster { name: name.to_owned(), force }).await? {
            MetadataResponse::Done => Ok(()),
            MetadataResponse::NotFound => Err(Error::NotFound(format!("Kafka cluster {name} not found"))),
            MetadataResponse::Conflict(message) => Err(Error::Conflict(message)),
        }
    }

    fn refuse_configured(&self, name: &str, what_to_do: &str) -> Result<(), Error> {
        if self.settings.clusters.iter().any(|c| c.name == name) {
            return Err(Error::Conflict(format!("Kafka cluster {name} comes from the config file: {what_to_do}")));
        }
        Ok(())
    }

    /// The partition an invocation id belongs to, from its partition key.
    fn partition_of_id(&self, id: &str) -> Option<PartitionId> {
        let (partition_key, _) = key::id_parts(id)?;
        Some(partition_of(partition_key, self.log.partitions()))
    }

    pub fn get_invocation(&self, id: &str) -> Result<pb::Invocation, Error> {
        let not_found = || Error::NotFound(format!("invocation {id} not found"));
        let partition = self.partition_of_id(id).ok_or_else(not_found)?;
        self.log
            .read_partition(partition, |p| Ok(p.invocation(id)?.map(|inv| invocation_to_proto(&inv, partition))))?
            .ok_or_else(not_found)
    }

    /// Replaces the state of a Virtual Object or Workflow key.
    pub async fn set_state(&self, request: pb::SetStateRequest) -> Result<(), Error> {
        let service = &request.service;
        match self.log.read_metadata(|m| m.services.get(service).map(|s| s.def.ty)) {
            // A service removed since may still have state to clear.
            None if !request.state.is_empty() => return Err(Error::NotFound(format!("service {service} not found"))),
            Some(ServiceType::Service) => {
                return Err(Error::BadRequest(format!(
                    "{service} is a Service: only Virtual Objects and Workflows have state"
                )))
            }
            _ => {}
        }
        let partition = partition_of(key_hash(service, &request.key), self.log.partitions());
        let command = Command::SetState(SetState {
            service: request.service,
            key: request.key,
            version: request.version,
            state: request.state.into_iter().map(|(k, v)| (Bytes::from(k), Bytes::from(v))).collect(),
        });
        match self.log.propose_and_read(partition_group(partition), command).await? {
            Response::StateSet(Outcome::Applied) => Ok(()),
            Response::StateSet(Outcome::NotAllowed(why)) => Err(Error::Conflict(why)),
            other => Err(Error::Internal(format!("unexpected response {other:?}"))),
        }
    }

    /// Applies an operator's action to an invocation.
    pub async fn act_on_invocation(&self, id: &str, action: Action) -> Result<pb::InvocationActionResponse, Error> {
        let partition =
            self.partition_of_id(id).ok_or_else(|| Error::NotFound(format!("invocation {id} not found")))?;
        let id = id.to_owned();
        // A pause of a paused invocation changes nothing and says so.
        let was_paused = action == Action::Pause
            && self.log.read_partition(partition, |p| {
                Ok(p.invocation(&id)?.is_some_and(|i| i.status == ferry_partition::state::Status::Paused))
            })?;
        let effect = match action {
            Action::Cancel => Effect::Cancel { id: id.clone(), signal: ferry_invoker::journal::cancel_signal() },
            Action::Kill => Effect::Kill { id: id.clone() },
            Action::Purge => Effect::Purge { id: id.clone() },
            Action::PurgeJournal => Effect::PurgeJournal { id: id.clone() },
            Action::Resume => Effect::Resume { id: id.clone() },
            Action::Pause => Effect::Pause { id: id.clone() },
        };
        let command = Command::Effects { at_ms: now_ms(), effects: vec![effect] };
        let outcome = match self.log.propose_and_read(partition_group(partition), command).await? {
            Response::Effects(mut outcomes) if outcomes.len() == 1 => outcomes.remove(0),
            other => return Err(Error::Internal(format!("unexpected response {other:?}"))),
        };
        match outcome {
            Outcome::Applied => {
                let completed = self
                    .log
                    .read_partition(partition, |p| Ok(p.invocation(&id)?.is_none_or(|i| i.completion.is_some())))?;
                let accepted = match action {
                    Action::Cancel => !completed,
                    Action::Pause => !was_paused,
                    _ => false,
                };
                Ok(pb::InvocationActionResponse { accepted })
            }
            Outcome::NotFound => Err(Error::NotFound(format!("invocation {id} not found"))),
            Outcome::NotAllowed(why) => {
                Err(Error::Conflict(format!("cannot {} invocation {id}: {why}", action.verb())))
            }
            Outcome::Stale => Err(Error::Conflict(format!("invocation {id} changed meanwhile; try again"))),
        }
    }

    /// Starts a new invocation of a completed one's handler, with its input
    /// and headers, under a new id (Restate's restart-as-new, from the start
    /// of the journal).
    pub async fn restart_as_new(&self, id: &str) -> Result<pb::RestartAsNewResponse, Error> {
        let not_found = || Error::NotFound(format!("invocation {id} not found"));
        let partition = self.partition_of_id(id).ok_or_else(not_found)?;
        let old = self.log.read_partition(partition, |p| p.invocation(id))?.ok_or_else(not_found)?;
        if old.completion.is_none() {
            return Err(Error::Conflict(format!(
                "invocation {id} is {}: only a completed invocation restarts as new",
                old.status.as_str()
            )));
        }
        if old.target.handler_ty == HandlerType::Workflow {
            return Err(Error::Conflict(format!("invocation {id} runs a workflow, which runs once per key")));
        }
        let (service, handler) = (&old.target.service, &old.target.handler);
        let resolved = self
            .log
            .read_metadata(|m| m.resolve(service, handler, self.settings.retention, false))
            .map_err(|(_, why)| Error::Conflict(format!("cannot restart invocation {id}: {why}")))?;
        let target = Target { service_ty: resolved.service_ty, handler_ty: resolved.handler_ty, ..old.target };
        // The low 64 bits of a ULID are random.
        let seed = ulid::Ulid::new().0 as u64;
        let (partition_key, unique) = invocation_ids(&target, None, seed);
        let new_id = key::id(partition_key, unique);
        let invoke = Invoke {
            id: new_id.clone(),
            target,
            payload: old.payload,
            headers: old.headers,
            source: Source::Ingress,
            dedup: None,
            created_at_ms: now_ms(),
            failure: None,
            not_before_ms: None,
            trace: None,
            retention: resolved.retention,
            reply: None,
            idempotency_key: None,
        };
        let group = partition_group(partition_of(partition_key, self.log.partitions()));
        match self.log.propose_and_read(group, Command::Invoke(vec![invoke].into())).await? {
            Response::Invoked { created: 1, .. } => Ok(pb::RestartAsNewResponse { new_invocation_id: new_id }),
            other => Err(Error::Internal(format!("unexpected response {other:?}"))),
        }
    }

    /// Invocations in id order (which is partition order), filtered, one page at a time.
    pub fn list_invocations(&self, request: &pb::ListInvocationsRequest) -> Result<pb::ListInvocationsResponse, Error> {
        const STATUSES: [&str; 7] =
            ["scheduled", "pending", "ready", "backing-off", "suspended", "paused", "completed"];
        if !request.status.is_empty() && !STATUSES.contains(&request.status.as_str()) {
            return Err(Error::BadRequest(format!(
                "unknown status {:?}; expected one of {}",
                request.status,
                STATUSES.join(", ")
            )));
        }
        let limit = match request.limit {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        } as usize;
        let (first_partition, after) = if request.page_token.is_empty() {
            (0, None)
        } else {
            let partition = self
                .partition_of_id(&request.page_token)
                .ok_or_else(|| Error::BadRequest(format!("invalid page_token {:?}", request.page_token)))?;
            (partition, Some(request.page_token.as_str()))
        };
        let (service, handler) = match request.target.split_once('/') {
            Some((s, h)) => (s, Some(h)),
            None => (request.target.as_str(), None),
        };
        let matches = |inv: &Invocation| {
            (request.status.is_empty() || inv.status.as_str() == request.status)
                && (service.is_empty() || inv.target.service == service)
                && handler.is_none_or(|h| inv.target.handler == h)
                && (request.subscription.is_empty()
                    || matches!(&inv.source, Source::Kafka(k) if k.subscription == request.subscription))
        };
        let mut invocations = Vec::new();
        let mut more = false;
        for partition in first_partition..self.log.partitions() {
            let after = if partition == first_partition { after } else { None };
            self.log.read_partition(partition, |p| {
                p.invocations_after(after, |inv| {
                    if !matches(&inv) {
                        return ControlFlow::Continue(());
                    }
                    if invocations.len() == limit {
                        more = true;
                        return ControlFlow::Break(());
                    }
                    invocations.push(invocation_to_proto(&inv, partition));
                    ControlFlow::Continue(())
                })
            })?;
            if more {
                break;
            }
        }
        let next_page_token =
            if more { invocations.last().map(|i| i.id.clone()).unwrap_or_default() } else { String::new() };
        Ok(pb::ListInvocationsResponse { invocations, next_page_token })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_sent_back_redacted_keep_their_value() {
        let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
        };
        let current = map(&[("sasl.password", "hunter2"), ("sasl.username", "me"), ("client.id", "a")]);
        let sent = map(&[("sasl.password", "***"), ("sasl.username", "you"), ("client.id", "***"), ("x.token", "***")]);
        let expected =
            map(&[("sasl.password", "hunter2"), ("sasl.username", "you"), ("client.id", "***"), ("x.token", "***")]);
        assert_eq!(unredacted(sent, &current), expected, "only a secret that exists is kept");
    }

    #[test]
    fn durations_parse_as_restate_writes_them() {
        for (text, ms) in [("1d", 86_400_000), ("12h", 43_200_000), ("5m", 300_000), ("90 s", 90_000)] {
            assert_eq!(parse_duration_ms(text), Ok(ms), "{text}");
        }
        assert_eq!(parse_duration_ms("1h 30m"), Ok(5_400_000));
        assert_eq!(parse_duration_ms("PT1H"), Ok(3_600_000));
        assert_eq!(parse_duration_ms("P1D"), Ok(86_400_000));
        for bad in ["", "bogus", "-5m", "5 parsecs"] {
            assert!(parse_duration_ms(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn uris_parse_or_explain() {
        assert_eq!(parse_uri("kafka://c/t", "kafka", "source").unwrap(), ("c", "t"));
        assert_eq!(parse_uri("service://S/h", "service", "sink").unwrap(), ("S", "h"));
        for bad in ["kafka:/c/t", "http://c/t", "kafka://c", "kafka:///t", "kafka://c/", "kafka://c/t/x"] {
            let err = parse_uri(bad, "kafka", "source").unwrap_err().to_string();
            assert!(err.contains("kafka://<cluster>/<topic>"), "{bad}: {err}");
        }
    }
}
