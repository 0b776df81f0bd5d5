//! Version 1 of the log-entry format: the commands proposed to a group and the
//! responses of applying them. Until the first release this version still
//! changes; after it, fields are only ever added in a new version.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use ferry_telemetry::TraceContext;
use serde::{Deserialize, Serialize};

/// A command proposed to a Raft group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    /// Create invocations in a partition, dropping duplicates. Many records
    /// share one entry; the batch is shared so a proposer can retry it
    /// without copying.
    Invoke(Arc<Vec<Invoke>>),
    /// Change cluster metadata (metadata group only).
    Metadata(MetadataCommand),
    /// What the invoker or an operator did to invocations of a partition,
    /// stamped with the proposer's clock.
    Effects { at_ms: u64, effects: Vec<Effect> },
    /// Drop what the retention of completed invocations no longer keeps at
    /// `at_ms` (the proposer's clock): at most `max` steps, the earliest due first.
    Expire { at_ms: u64, max: u32 },
    /// Drop the dedup entries of a deleted subscription (partition groups);
    /// records of it that still arrive are dropped too.
    ForgetSubscription { id: String },
    /// Drop the outbox rows up to `upto`: they are delivered.
    TruncateOutbox { upto: u64 },
    /// Append call results and signals to their invocations' journals,
    /// dropping duplicates; stamped with the proposer's clock.
    Notify { at_ms: u64, notifications: Vec<Notification> },
    /// Handlers ask for the results of invocations of this partition,
    /// dropping duplicates.
    Attach(Vec<Attach>),
    /// An operator replaces the state of a Virtual Object or Workflow key.
    SetState(SetState),
    /// Drop the egress rows up to `upto` (none without it: a new leader's
    /// first entry): they are in Kafka. The partitions they went to have
    /// reached `positions` (each only ever moves forward): a new leader reads
    /// from there to find rows already produced.
    TruncateEgress { upto: Option<u64>, positions: Vec<EgressPosition> },
}

/// How far a partition's egress has got in one Kafka topic partition: every
/// record it produced there before `offset` is accounted for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressPosition {
    pub cluster: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// A record for Kafka, kept in a partition's egress table until produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KafkaRecord {
    /// Names the record among all that any Ferry cluster produces (the
    /// invocation it comes from and why), in its [`EGRESS_ID_HEADER`].
    pub id: String,
    pub cluster: String,
    pub topic: String,
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Vec<(String, Bytes)>,
}

/// The header of every record the egress produces that names it
/// ([`KafkaRecord::id`]): how a new leader finds what its predecessor produced.
pub const EGRESS_ID_HEADER: &str = "ferry.egress.id";

/// The headers a dead-letter record carries besides the record's own: the
/// failure's message and code, the subscription and Kafka coordinates the
/// record came from, and the invocation that failed.
pub const DEAD_LETTER_HEADERS: [&str; 7] = [
    "ferry.dead-letter.reason",
    "ferry.dead-letter.code",
    "ferry.dead-letter.subscription",
    "ferry.dead-letter.topic",
    "ferry.dead-letter.partition",
    "ferry.dead-letter.offset",
    "ferry.dead-letter.invocation",
];

/// A Kafka topic of a cluster Ferry knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KafkaTopic {
    pub cluster: String,
    pub topic: String,
}

/// Replace the state of `key` of `service` with `state`: only while no
/// invocation holds the key and, if `version` is given, only if the current
/// state has that version ([`crate::state::state_version`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetState {
    pub service: String,
    pub key: String,
    pub version: Option<String>,
    pub state: Vec<(Bytes, Bytes)>,
}

/// A handler asks for invocation `id`'s result: to wait for it
/// ([`ReplyKind::Attach`]) or to have it if it is there
/// ([`ReplyKind::Output`]). The answer goes back as an [`Outgoing::Reply`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attach {
    pub id: String,
    pub to: ReplyTo,
    pub dedup: Dedup,
}

/// Something for invocation `id` from outside it: `entry` (the notification)
/// is appended to its journal, and wakes it if it is suspended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Notification {
    pub id: String,
    pub notice: Notice,
    pub entry: JournalEntry,
    /// If set, applied only if `seq` is above the last one of `producer` here.
    pub dedup: Option<Dedup>,
}

/// What a [`Notification`] brings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Notice {
    /// The result of a call the invocation awaits.
    CallResult,
    /// A signal: by index (an awakeable's, 17 and up; a second one of the
    /// same index is dropped), or by name (`None`).
    Signal(Option<u32>),
    /// The built-in signal 1: cancel the invocation.
    Cancel,
}

/// Where an invocation's result goes: the invocation that asked for it and
/// the completion id it waits on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyTo {
    pub caller: String,
    pub completion_id: u32,
    pub kind: ReplyKind,
}

/// How the invocation that gets a result asked for it, which names the
/// notification it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplyKind {
    /// It called the invocation.
    Call,
    /// It attached to it: waits for the result.
    Attach,
    /// It asked for the output: gets the result if it is there, else nothing.
    Output,
}

/// A row of a partition's outbox: something to deliver to a partition once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Outgoing {
    /// Create an invocation (a handler's call or send).
    Invoke(Box<Invoke>),
    /// An invocation's result, for the partition of the one that asked (by
    /// calling it, attaching to it, or asking for its output: `None` is no
    /// output yet).
    Reply { to: ReplyTo, result: Option<Completion> },
    /// Ask for invocation `id`'s result, for `to`.
    Attach { id: String, to: ReplyTo },
    /// A signal for invocation `id` (an awakeable's completion, a signal a
    /// handler sent), its notification encoded.
    Signal { id: String, notice: Notice, entry: JournalEntry },
    /// Kill invocation `id`: a child of an invocation that was killed.
    Kill { id: String },
}

/// One change to an existing invocation. Effects of an attempt name the
/// [`AttemptId`] they come from: one that is no longer current is stale and
/// ignored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Effect {
    /// An attempt suspended: its new journal entries and state changes are
    /// kept. The invocation runs again at once when `run_now`, else when its
    /// first sleep is due.
    Progress {
        id: String,
        attempt: AttemptId,
        entries: Vec<JournalEntry>,
        state: Vec<StateOp>,
        sleeps: Vec<Sleep>,
        run_now: bool,
        /// What the handler started elsewhere (calls and one-way calls,
        /// signals), delivered through this partition's outbox. A call's
        /// result comes back as a [`Notification`].
        sends: Vec<Outgoing>,
        /// The handler waits for a signal (an awakeable), which comes from
        /// outside: it is suspended, not paused, even if it awaits nothing else.
        awaits_signal: bool,
        /// What the handler did with its workflow's promises, answered as
        /// the effect applies.
        promises: Vec<PromiseOp>,
        /// How many of what arrived for the invocation during the attempt
        /// (call results, signals) the handler was told before it sent
        /// `entries`: the first ones, which join the journal before them.
        arrived: u32,
    },
    /// The handler ended: its state changes apply together with the result,
    /// and what it started elsewhere is sent.
    Complete {
        id: String,
        attempt: AttemptId,
        state: Vec<StateOp>,
        result: Completion,
        sends: Vec<Outgoing>,
        promises: Vec<PromiseOp>,
    },
    /// An attempt failed. It is retried at `retry_at_ms`; without one the
    /// invocation completes failed, or is paused (holding its key) when `pause`.
    Failed { id: String, attempt: AttemptId, message: String, retry_at_ms: Option<u64>, pause: bool },
    /// A timer (backoff, sleep, delayed start) is due.
    Wake { id: String },
    /// Tell the handler it is cancelled: `signal` is appended to its journal.
    /// An invocation that has not started completes at once.
    Cancel { id: String, signal: JournalEntry },
    /// Complete at once as failed, without telling the handler; its calls
    /// and one-way calls are killed too.
    Kill { id: String },
    /// Forget a completed invocation.
    Purge { id: String },
    /// Run a paused, backing-off or suspended invocation now.
    Resume { id: String },
    /// Drop the journal of a completed invocation now, keeping its result.
    PurgeJournal { id: String },
    /// An attempt that goes on (streaming) made its journal so far durable:
    /// its new entries, state changes and what it started elsewhere are
    /// kept, and the invocation stays running. The attempt's later effects
    /// name the longer journal as their base. `arrived` as in
    /// [`Effect::Progress`].
    Checkpoint {
        id: String,
        attempt: AttemptId,
        entries: Vec<JournalEntry>,
        state: Vec<StateOp>,
        sends: Vec<Outgoing>,
        arrived: u32,
    },
    /// Stop a running, backing-off or suspended invocation until it is
    /// resumed: its attempt is abandoned, its key stays held, and results
    /// that arrive meanwhile wait in its journal.
    Pause { id: String },
}

impl Effect {
    /// The attempt an effect of an attempt comes from.
    pub fn attempt(&self) -> Option<AttemptId> {
        match self {
            Effect::Progress { attempt, .. }
            | Effect::Complete { attempt, .. }
            | Effect::Failed { attempt, .. }
            | Effect::Checkpoint { attempt, .. } => Some(*attempt),
            _ => None,
        }
    }

    pub fn id(&self) -> &str {
        match self {
            Effect::Progress { id, .. }
            | Effect::Complete { id, .. }
            | Effect::Failed { id, .. }
            | Effect::Wake { id }
            | Effect::Cancel { id, .. }
            | Effect::Kill { id }
            | Effect::Purge { id }
            | Effect::Resume { id }
            | Effect::PurgeJournal { id }
            | Effect::Pause { id }
            | Effect::Checkpoint { id, .. } => id,
        }
    }
}

/// A handler's use of a promise of its workflow (its service and key). Each
/// is answered in its journal under `completion_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PromiseOp {
    /// Wait for the promise: answered once it is completed.
    Get { name: String, completion_id: u32 },
    /// Its result if it is completed, else nothing, at once.
    Peek { name: String, completion_id: u32 },
    /// Complete it, unless it is completed already (then a 409 failure).
    Complete { name: String, result: Completion, completion_id: u32 },
}

/// Which attempt of an invocation an effect comes from: the invocation's run
/// (a number its partition hands out each time an invocation becomes
/// runnable, never twice, not even to an invocation re-created under the same
/// id) and the journal length the attempt started from. An effect applies
/// only while both still describe the invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptId {
    pub run: u64,
    pub base: u32,
}

/// A service-protocol message kept in an invocation's journal: its type id and
/// protobuf body, sent back as they are when the invocation is replayed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub ty: u16,
    pub body: Bytes,
}

/// A change to a Virtual Object's or Workflow's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StateOp {
    Set { key: Bytes, value: Bytes },
    Clear { key: Bytes },
    ClearAll,
}

/// A durable timer of a handler: at `wake_at_ms`, `notification` is appended
/// to the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sleep {
    pub wake_at_ms: u64,
    pub notification: JournalEntry,
}

/// How an invocation ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Completion {
    Success(Bytes),
    Failure { code: u16, message: String },
}

/// The result of one [`Effect`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Applied,
    /// From an attempt that is no longer current; nothing changed.
    Stale,
    NotFound,
    /// Not allowed in the invocation's status.
    NotAllowed(String),
}

/// The result of applying a [`Command`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// A membership or blank entry.
    Empty,
    Invoked {
        created: u32,
        deduplicated: u32,
    },
    Metadata(MetadataResponse),
    /// One outcome per effect, in order.
    Effects(Vec<Outcome>),
    /// What an [`Command::Expire`] dropped.
    Expired {
        invocations: u32,
        journals: u32,
    },
    /// How many producers' dedup entries a [`Command::ForgetSubscription`] dropped.
    Forgotten {
        producers: u32,
    },
    /// How many rows a [`Command::TruncateOutbox`] or
    /// [`Command::TruncateEgress`] dropped.
    Truncated {
        rows: u32,
    },
    /// What a [`Command::Attach`] did: requests answered at once or kept
    /// until their invocation completes, and duplicates dropped.
    Attached {
        accepted: u32,
        dropped: u32,
    },
    /// What a [`Command::Notify`] did: results appended to a journal, and
    /// duplicates or results for invocations that no longer wait.
    Notified {
        appended: u32,
        dropped: u32,
    },
    /// What a [`Command::SetState`] did: `Applied`, or `NotAllowed` with why.
    StateSet(Outcome),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetadataResponse {
    Done,
    NotFound,
    Conflict(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MetadataCommand {
    /// Register a deployment and the services it serves (replacing older
    /// revisions of those services).
    PutDeployment(Deployment),
    RemoveDeployment {
        id: String,
    },
    PutSubscription(Subscription),
    RemoveSubscription {
        id: String,
    },
    /// Stop consuming a subscription (`paused`) or start again; its consumer
    /// group keeps its offsets meanwhile.
    PauseSubscription {
        id: String,
        paused: bool,
    },
    /// Stop consuming a subscription for good; it is removed
    /// ([`MetadataCommand::RemoveSubscription`]) once the invocations of the
    /// records it appended have completed.
    DrainSubscription {
        id: String,
    },
    /// Replace what an operator set for a registered service.
    ConfigureService {
        name: String,
        config: ServiceConfig,
    },
    /// Register a Kafka cluster (`create`: refused if the name is taken) or
    /// replace the properties of a registered one (refused if there is none).
    PutKafkaCluster {
        cluster: KafkaCluster,
        create: bool,
    },
    /// Forget a Kafka cluster; refused while subscriptions read from it,
    /// unless `force` (they then wait for a cluster of that name).
    RemoveKafkaCluster {
        name: String,
        force: bool,
    },
}

/// A request to run one handler.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Invoke {
    /// `inv_` + 16 hex digits of partition key + 16 hex digits of a unique part.
    pub id: String,
    pub target: Target,
    pub payload: Bytes,
    /// The request's own headers (for Kafka: the record's headers).
    pub headers: Vec<(String, String)>,
    pub source: Source,
    /// When set, the invocation is created only if `seq` is above the last
    /// sequence number stored for `producer` in this partition.
    pub dedup: Option<Dedup>,
    /// Stamped by the proposer.
    pub created_at_ms: u64,
    /// The invocation cannot run (an undeliverable record, a call to an
    /// unknown handler): it is created completed with this failure code and
    /// message, so that it holds up nothing (its Kafka partition, its caller).
    pub failure: Option<(u16, String)>,
    /// Start no earlier than this time.
    pub not_before_ms: Option<u64>,
    /// The sampled span the invocation's attempts are traced under.
    pub trace: Option<TraceContext>,
    /// How long it is kept once completed.
    pub retention: Retention,
    /// A call's caller, which gets the result.
    pub reply: Option<ReplyTo>,
    /// The idempotency key its id was made from.
    pub idempotency_key: Option<String>,
}

/// How long a completed invocation is kept, fixed when it is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// Its journal, from its completion.
    pub journal_ms: u64,
    /// The invocation and its result, from its completion; never shorter
    /// than `journal_ms`.
    pub completion_ms: u64,
}

impl Retention {
    /// Kept for ever: what an invocation gets unless its creator says otherwise.
    pub const FOREVER: Retention = Retention { journal_ms: u64::MAX, completion_ms: u64::MAX };
}

/// Retention a deployment asks for, per service and per handler (endpoint
/// manifest v3 and later); each one unset falls back to the next level.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionOverrides {
    pub journal_ms: Option<u64>,
    pub idempotency_ms: Option<u64>,
    pub workflow_completion_ms: Option<u64>,
}

/// The retention of every kind of invocation: the configured defaults,
/// overridden by a service and its handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionPolicy {
    pub journal_ms: u64,
    pub idempotency_ms: u64,
    pub workflow_completion_ms: u64,
}

impl RetentionPolicy {
    /// Restate's defaults: a day for each.
    pub const DEFAULT: RetentionPolicy =
        RetentionPolicy { journal_ms: 86_400_000, idempotency_ms: 86_400_000, workflow_completion_ms: 86_400_000 };

    /// This policy with what `overrides` sets.
    pub fn overridden(self, overrides: &RetentionOverrides) -> RetentionPolicy {
        RetentionPolicy {
            journal_ms: overrides.journal_ms.unwrap_or(self.journal_ms),
            idempotency_ms: overrides.idempotency_ms.unwrap_or(self.idempotency_ms),
            workflow_completion_ms: overrides.workflow_completion_ms.unwrap_or(self.workflow_completion_ms),
        }
    }

    /// The retention of an invocation of a `handler_ty` handler, with an
    /// idempotency key or not. As in Restate: a workflow's run keeps its
    /// result for the workflow completion retention, an idempotent call for
    /// the idempotency retention, any other for the journal retention; the
    /// journal is kept for the journal retention, capped by the result's.
    pub fn retention(&self, handler_ty: HandlerType, idempotent: bool) -> Retention {
        let completion_ms = match (handler_ty, idempotent) {
            (HandlerType::Workflow, _) => self.workflow_completion_ms,
            (_, true) => self.idempotency_ms,
            _ => self.journal_ms,
        };
        Retention { journal_ms: self.journal_ms.min(completion_ms), completion_ms }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dedup {
    pub producer: u64,
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub service: String,
    pub handler: String,
    /// The Virtual Object or Workflow key; `None` for Services.
    pub key: Option<String>,
    pub service_ty: ServiceType,
    pub handler_ty: HandlerType,
}

impl Target {
    /// Whether invocations of this target queue behind each other per key.
    pub fn is_exclusive(&self) -> bool {
        self.key.is_some() && matches!(self.handler_ty, HandlerType::Exclusive | HandlerType::Workflow)
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.key {
            Some(key) => write!(f, "{}/{}/{}", self.service, key, self.handler),
            None => write!(f, "{}/{}", self.service, self.handler),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    Kafka(KafkaSource),
    Ingress,
    /// A call or one-way call of another invocation.
    Service {
        caller: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KafkaSource {
    pub subscription: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<Bytes>,
    /// Of a subscription ordered per Kafka partition (`ferry.ordering`):
    /// it runs after the record before it in its Kafka partition completed.
    pub ordered: bool,
    /// Where the record goes if its invocation ends failed
    /// (`ferry.dead-letter.topic`).
    pub dead_letter: Option<KafkaTopic>,
}

/// The service name of the inboxes that order records per Kafka partition,
/// which no registered service can have.
pub const ORDERED_PARTITIONS: &str = "";

/// The inbox key of the ordered records of one Kafka partition.
pub fn ordering_key(subscription: &str, topic: &str, partition: i32) -> String {
    format!("{subscription}/{topic}/{partition}")
}

impl KafkaSource {
    /// The inbox key this record's invocation queues under, if its
    /// subscription is ordered per Kafka partition: one per (subscription,
    /// topic, partition).
    pub fn ordering_key(&self) -> Option<String> {
        self.ordered.then(|| ordering_key(&self.subscription, &self.topic, self.partition))
    }

    /// The Kafka metadata headers every invocation from a record receives,
    /// derived here rather than stored with each record.
    pub fn metadata_headers(&self) -> [(&'static str, String); 6] {
        [
            ("restate.subscription.id", self.subscription.clone()),
            ("kafka.topic", self.topic.clone()),
            ("kafka.partition", self.partition.to_string()),
            ("kafka.offset", self.offset.to_string()),
            ("kafka.timestamp", self.timestamp_ms.map(|t| t.to_string()).unwrap_or_default()),
            ("kafka.key", self.key.as_deref().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default()),
        ]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceType {
    Service,
    VirtualObject,
    Workflow,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::Service => "Service",
            ServiceType::VirtualObject => "VirtualObject",
            ServiceType::Workflow => "Workflow",
        }
    }

    pub fn is_keyed(self) -> bool {
        !matches!(self, ServiceType::Service)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandlerType {
    Exclusive,
    Shared,
    Workflow,
}

impl HandlerType {
    pub fn as_str(self) -> &'static str {
        match self {
            HandlerType::Exclusive => "Exclusive",
            HandlerType::Shared => "Shared",
            HandlerType::Workflow => "Workflow",
        }
    }
}

/// An HTTP endpoint serving services written with a Restate SDK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    /// `dp_...`
    pub id: String,
    pub uri: String,
    pub protocol_mode: ProtocolMode,
    pub http2: bool,
    pub min_protocol_version: u32,
    pub max_protocol_version: u32,
    pub additional_headers: BTreeMap<String, String>,
    pub services: Vec<ServiceDef>,
    pub created_at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProtocolMode {
    RequestResponse,
    BidiStream,
}

impl ProtocolMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ProtocolMode::RequestResponse => "REQUEST_RESPONSE",
            ProtocolMode::BidiStream => "BIDI_STREAM",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceDef {
    pub name: String,
    pub ty: ServiceType,
    pub handlers: Vec<HandlerDef>,
    pub retention: RetentionOverrides,
}

impl ServiceDef {
    pub fn handler(&self, name: &str) -> Option<&HandlerDef> {
        self.handlers.iter().find(|h| h.name == name)
    }

    /// The retention of an invocation of `handler`: `defaults`, overridden
    /// by the service, by the handler, then by what an operator set.
    pub fn retention(
        &self,
        handler: &HandlerDef,
        defaults: RetentionPolicy,
        config: &ServiceConfig,
        idempotent: bool,
    ) -> Retention {
        let policy = defaults.overridden(&self.retention).overridden(&handler.retention).overridden(&config.retention);
        policy.retention(handler.ty, idempotent)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandlerDef {
    pub name: String,
    pub ty: HandlerType,
    pub retention: RetentionOverrides,
    /// The handler reads its object's state lazily (the manifest's
    /// `enableLazyState`): its attempts start without the state.
    pub lazy_state: bool,
    /// The manifest's timeouts for its attempts (the handler's, else its
    /// service's); unset ones are the invoker's.
    pub timeouts: Timeouts,
}

/// How long an attempt may wait for its handler, as a deployment asks
/// (the manifest's `inactivityTimeout` and `abortTimeout`, in milliseconds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeouts {
    /// A streaming attempt whose handler sends nothing for this long closes
    /// its request, so that the handler suspends.
    pub inactivity_ms: Option<u64>,
    /// An attempt whose request is complete (sent whole, or closed) fails
    /// when its handler sends nothing more for this long.
    pub abort_ms: Option<u64>,
}

/// What an operator set for a service (Restate's `PATCH /services/{name}`):
/// each value set overrides the deployment's manifest and the defaults,
/// until a deployment registers the service again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceConfig {
    /// `Some(false)`: called only by other services, not through the HTTP ingress.
    pub public: Option<bool>,
    pub retention: RetentionOverrides,
    pub timeouts: Timeouts,
}

impl ServiceConfig {
    pub fn is_public(&self) -> bool {
        self.public.unwrap_or(true)
    }
}

/// A Kafka cluster registered through the admin API (the config file's
/// clusters are not in the log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KafkaCluster {
    pub name: String,
    /// librdkafka properties, `bootstrap.servers` among them.
    pub properties: BTreeMap<String, String>,
    pub created_at_ms: u64,
}

/// `kafka://<cluster>/<topic>` -> `service://<service>/<handler>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    /// `sub_...`
    pub id: String,
    pub cluster: String,
    pub topic: String,
    pub service: String,
    pub handler: String,
    /// The sink's kind when the subscription was created. Where a record goes
    /// (partition, id, dedup) follows from it and the record alone, never
    /// from how a node resolves the sink when it reads the record.
    pub service_ty: ServiceType,
    pub handler_ty: HandlerType,
    /// librdkafka options, including the resolved `group.id`, and Ferry's own
    /// (`ferry.`).
    pub options: BTreeMap<String, String>,
    pub created_at_ms: u64,
    /// Paused: no node consumes it until it is resumed.
    pub paused: bool,
    /// Being deleted: no node consumes it, and it goes once every invocation
    /// of its records has completed.
    pub draining: bool,
}

impl Subscription {
    pub fn source(&self) -> String {
        format!("kafka://{}/{}", self.cluster, self.topic)
    }

    pub fn sink(&self) -> String {
        format!("service://{}/{}", self.service, self.handler)
    }

    pub fn group_id(&self) -> &str {
        self.options.get("group.id").map(String::as_str).unwrap_or(&self.id)
    }
}
