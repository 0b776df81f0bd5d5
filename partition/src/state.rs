//! The deterministic state machines. `apply` takes the state and a command and
//! returns the response; it reads no clock, draws no randomness and does no
//! I/O but through its [`Store`], so replicas with the same log hold the same
//! state.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::{Bound, ControlFlow};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use ferry_telemetry::TraceContext;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use crate::notifications;
use crate::store::{key, scan_prefix, MemStore, Row, Store, StoreError, StoreRead, Table, Visit};
use crate::watch::{Watch, Watches};
pub use crate::wire::v1::Completion;
use crate::wire::v1::{
    Attach, AttemptId, Command, Dedup, Deployment, Effect, EgressPosition, HandlerType, Invoke, JournalEntry,
    KafkaCluster, KafkaRecord, MetadataCommand, MetadataResponse, Notice, Notification, Outcome, Outgoing, PromiseOp,
    ReplyKind, ReplyTo, Response, Retention, RetentionPolicy, ServiceConfig, ServiceDef, ServiceType, SetState, Sleep,
    Source, StateOp, Subscription, Target, DEAD_LETTER_HEADERS, ORDERED_PARTITIONS,
};
use crate::wire::{decode, encode};

/// Applies `command` to a group's state: partition tables in `store`, the
/// cluster metadata in `metadata`. Only a failing store fails it.
pub fn apply<S: Store<Table> + ?Sized>(
    store: &mut S,
    local: &Local,
    metadata: &mut MetadataState,
    command: Command,
) -> Result<Response, StoreError> {
    let mut partition = Partition { store, local, counters: BTreeMap::new() };
    let response = match command {
        Command::Invoke(batch) => partition.apply_invoke(batch)?,
        Command::Metadata(command) => Response::Metadata(metadata.apply(command)),
        Command::Effects { at_ms, effects } => {
            let outcomes = effects.into_iter().map(|e| partition.apply_effect(at_ms, e)).collect::<Result<_, _>>()?;
            Response::Effects(outcomes)
        }
        Command::Expire { at_ms, max } => partition.apply_expire(at_ms, max)?,
        Command::ForgetSubscription { id } => partition.forget_subscription(id)?,
        Command::TruncateOutbox { upto } => partition.truncate_outbox(upto)?,
        Command::Notify { at_ms, notifications } => partition.apply_notify(at_ms, notifications)?,
        Command::Attach(requests) => partition.apply_attach(requests)?,
        Command::SetState(set) => Response::StateSet(partition.set_state(set)?),
        Command::TruncateEgress { upto, positions } => partition.truncate_egress(upto, positions)?,
    };
    partition.write_counters()?;
    Ok(response)
}

/// A 128-bit hash of a group's state. Replicas that applied the same log
/// have the same digest: tables are hashed in key order.
pub fn digest(store: &(impl StoreRead<Table> + ?Sized), metadata: &MetadataState) -> Result<u128, StoreError> {
    let mut hasher = Xxh3::new();
    for table in Table::ALL {
        hasher.update(table.name().as_bytes());
        store.scan(table, Bound::Unbounded, Bound::Unbounded, &mut |k, v| {
            hasher.update(&(k.len() as u64).to_le_bytes());
            hasher.update(k);
            hasher.update(&(v.len() as u64).to_le_bytes());
            hasher.update(v);
            ControlFlow::Continue(())
        })?;
    }
    hasher.update(&encode(metadata));
    Ok(hasher.digest128())
}

/// The state of one Raft group, in memory. The metadata group only uses
/// `metadata`; partition groups only use the partition tables.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct GroupState {
    tables: MemStore<Table>,
    pub metadata: MetadataState,
    /// Kept on each node, not replicated, never encoded.
    #[serde(skip)]
    local: Local,
}

impl GroupState {
    pub fn apply(&mut self, command: Command) -> Response {
        let response =
            apply(&mut self.tables, &self.local, &mut self.metadata, command).expect("memory stores do not fail");
        self.local.watches.publish();
        response
    }

    /// Waits for changes of invocation `id` applied from now on.
    pub fn watch(&self, id: &str) -> Watch {
        self.local.watches.watch(id)
    }

    pub fn digest(&self) -> u128 {
        digest(&self.tables, &self.metadata).expect("memory stores do not fail")
    }

    /// Reads of the partition state.
    pub fn partition(&self) -> PartitionRead<'_, dyn StoreRead<Table> + '_> {
        PartitionRead { store: &self.tables, removed: &self.local.removed }
    }

    /// The partition tables, to change by hand in tests.
    pub fn tables_mut(&mut self) -> &mut MemStore<Table> {
        &mut self.tables
    }
}

/// A Virtual Object or Workflow instance: (service, key).
pub type ObjectId = (String, String);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invocation {
    pub id: String,
    pub target: Target,
    pub payload: Bytes,
    pub headers: Vec<(String, String)>,
    pub source: Source,
    /// The idempotency key its id was made from.
    pub idempotency_key: Option<String>,
    pub status: Status,
    pub created_at_ms: u64,
    pub modified_at_ms: u64,
    /// Failed attempts since the journal last grew.
    pub attempts: u32,
    pub last_failure: Option<String>,
    pub completion: Option<Completion>,
    /// The journal after the input entry, as the handler wrote it.
    pub journal: Vec<JournalEntry>,
    /// Sleeps not yet due.
    pub sleeps: Vec<Sleep>,
    /// When a timer wakes the invocation.
    pub wake_at_ms: Option<u64>,
    /// The sampled span its attempts are traced under.
    pub trace: Option<TraceContext>,
    /// Its row in [`Table::Runnable`] while it may run.
    run_seq: Option<u64>,
    pub retention: Retention,
    pub completed_at_ms: Option<u64>,
    /// When its next retention step is due (its row in [`Table::Expiries`]).
    expires_at_ms: Option<u64>,
    /// Its row in its key's inbox ([`Table::Inboxes`]) while it is queued there.
    inbox_seq: Option<u64>,
    /// The callers that get its result when it completes.
    pub replies: Vec<ReplyTo>,
    /// Calls it made whose results have not come back.
    pub awaiting: u32,
    /// The invocations it started (calls and one-way calls): killed with it.
    pub children: Vec<String>,
    /// The indexes of the signals it received (awakeables' completions): a
    /// signal comes once.
    pub signals: Vec<u32>,
    /// Results of its calls that came while an attempt may be running: they
    /// join the journal when the attempt ends, which keeps the attempt
    /// current (a journal that grew under it would make its effect stale).
    arrived: Vec<JournalEntry>,
}

/// What a group keeps on each node beside its replicated state, for the
/// node's readers: not replicated, never encoded, and nothing that apply
/// reads back.
#[derive(Debug, Default)]
pub struct Local {
    pub removed: Removed,
    pub watches: Watches,
}

impl Clone for Local {
    /// The removed results; waiters stay with the original.
    fn clone(&self) -> Self {
        Local { removed: self.removed.clone(), watches: Watches::default() }
    }
}

/// The results of the invocations removed last, for callers that wait for
/// one: with a retention of zero an invocation is removed in the very apply
/// that completes it. Kept on each node, not replicated; shared between
/// apply and readers.
#[derive(Debug, Default)]
pub struct Removed(Mutex<RemovedResults>);

#[derive(Debug, Default, Clone)]
struct RemovedResults {
    results: HashMap<String, Completion>,
    order: VecDeque<String>,
}

/// How many results of removed invocations [`Removed`] keeps.
const REMOVED_KEPT: usize = 16_384;

impl Removed {
    fn push(&self, id: String, completion: Completion) {
        let mut removed = self.0.lock().expect("removed results lock poisoned");
        if removed.order.len() >= REMOVED_KEPT {
            if let Some(oldest) = removed.order.pop_front() {
                removed.results.remove(&oldest);
            }
        }
        if removed.results.insert(id.clone(), completion).is_none() {
            removed.order.push_back(id);
        }
    }

    fn get(&self, id: &str) -> Option<Completion> {
        self.0.lock().expect("removed results lock poisoned").results.get(id).cloned()
    }
}

impl Clone for Removed {
    fn clone(&self) -> Self {
        Removed(Mutex::new(self.0.lock().expect("removed results lock poisoned").clone()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Created with a delay that has not passed.
    Scheduled,
    /// Waiting in its key's inbox behind another exclusive invocation.
    Pending,
    /// May run now.
    Ready,
    /// Waiting for the retry of a failed attempt.
    BackingOff,
    /// Waiting for a sleep to end or a call's result.
    Suspended,
    /// Out of attempts; waits for an operator to resume or kill it.
    Paused,
    Completed,
}

impl Invocation {
    /// Every header the handler receives: source metadata, then the request's own.
    pub fn all_headers(&self) -> Vec<(String, String)> {
        let mut headers = match &self.source {
            Source::Kafka(source) => source.metadata_headers().map(|(k, v)| (k.to_owned(), v)).to_vec(),
            Source::Ingress | Source::Service { .. } => Vec::new(),
        };
        headers.extend(self.headers.iter().cloned());
        headers
    }

    /// What arrived for it (call results, signals) while an attempt may be
    /// running, in order: not in the journal yet.
    pub fn arrived(&self) -> &[JournalEntry] {
        &self.arrived
    }

    /// The attempt that may run now: `None` unless the invocation is ready.
    pub fn attempt(&self) -> Option<AttemptId> {
        match (self.status, self.run_seq) {
            (Status::Ready, Some(run)) => Some(AttemptId { run, base: self.journal.len() as u32 }),
            _ => None,
        }
    }

    /// Whether results of its calls are yet to come, or came during its
    /// current attempt.
    pub fn awaits_results(&self) -> bool {
        self.awaiting > 0 || !self.arrived.is_empty()
    }

    /// The row prefix of its object's state and inbox, if it is keyed.
    fn object_key(&self) -> Option<Vec<u8>> {
        Some(key::object(&self.target.service, self.target.key.as_deref()?))
    }

    /// The inbox it queues in, one invocation running at a time: its
    /// object's for an exclusive handler, its Kafka partition's for a record
    /// of a subscription ordered per partition.
    fn inbox_key(&self) -> Option<Vec<u8>> {
        if self.target.is_exclusive() {
            return self.object_key();
        }
        match &self.source {
            Source::Kafka(kafka) => kafka.ordering_key().map(|k| key::object(ORDERED_PARTITIONS, &k)),
            _ => None,
        }
    }
}

impl Status {
    /// Every status, in the order of [`Status::index`].
    pub const ALL: [Status; 7] = [
        Status::Scheduled,
        Status::Pending,
        Status::Ready,
        Status::BackingOff,
        Status::Suspended,
        Status::Paused,
        Status::Completed,
    ];

    /// The position of this status in [`Status::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Scheduled => "scheduled",
            Status::Pending => "pending",
            Status::Ready => "ready",
            Status::BackingOff => "backing-off",
            Status::Suspended => "suspended",
            Status::Paused => "paused",
            Status::Completed => "completed",
        }
    }

    /// Its row in [`Table::Counters`].
    fn counter(self) -> [u8; 7] {
        let mut name = *b"status/";
        name[6] = b'0' + self.index() as u8;
        name
    }
}

/// A workflow promise, a row of [`Table::Promises`].
#[derive(Debug, Serialize, Deserialize)]
enum Promise {
    Completed(Completion),
    /// Not completed; these (invocation, completion id) wait for it.
    Awaited(Vec<(String, u32)>),
}

/// A state entry of a Virtual Object or Workflow key, as a scan reads it.
#[derive(Debug, Clone, Copy)]
pub struct StateEntry<'a> {
    pub service: &'a str,
    pub key: &'a str,
    pub name: &'a [u8],
    pub value: &'a [u8],
}

/// A row of a key's inbox: the head holds the key, the others wait for it.
#[derive(Debug, Clone, Copy)]
pub struct InboxEntry<'a> {
    pub service: &'a str,
    pub key: &'a str,
    pub seq: u64,
    pub id: &'a str,
    pub head: bool,
}

/// A workflow promise: its result once completed.
#[derive(Debug, Clone)]
pub struct PromiseEntry<'a> {
    pub service: &'a str,
    pub key: &'a str,
    pub name: &'a str,
    pub result: Option<Completion>,
}

/// The state of the object whose rows start with `object` ([`key::object`]).
fn object_state(store: &(impl StoreRead<Table> + ?Sized), object: &[u8]) -> Result<BTreeMap<Bytes, Bytes>, StoreError> {
    let mut state = BTreeMap::new();
    scan_prefix(store, Table::Objects, object, &mut |k, v| {
        state.insert(Bytes::copy_from_slice(&k[object.len()..]), Bytes::copy_from_slice(v));
        ControlFlow::Continue(())
    })?;
    Ok(state)
}

/// The version of an object's state, as Restate computes it for state
/// edits: SHA-256 over the entries in key order (each its index as a
/// big-endian u64, 1, the key, 2, the value, 3), in URL-safe base64
/// without padding.
pub fn state_version(state: &BTreeMap<Bytes, Bytes>) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    let mut hash = sha2::Sha256::new();
    for (i, (name, value)) in state.iter().enumerate() {
        hash.update((i as u64).to_be_bytes());
        hash.update([1]);
        hash.update(name);
        hash.update([2]);
        hash.update(value);
        hash.update([3]);
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(hash.finalize())
}

/// Splits a row that starts with [`key::object`] into (service, key, rest).
fn split_object(row: &[u8]) -> Option<(&str, &str, &[u8])> {
    let (service, rest) = key::take_str(row)?;
    let (key, rest) = key::take_str(rest)?;
    Some((service, key, rest))
}

/// The object key of the workflow `inv` is the run of, if it is one: its
/// promises go when it goes.
fn workflow_of(inv: &Invocation) -> Option<Vec<u8>> {
    (inv.target.handler_ty == HandlerType::Workflow).then(|| inv.object_key()).flatten()
}

/// What a row of [`Table::Expiries`] says is due: the invocation's journal
/// goes, or the invocation (then, for a workflow's run, the workflow's
/// object key follows).
const EXPIRY_JOURNAL: u8 = 0;
const EXPIRY_REMOVE: u8 = 1;

/// Rows of [`Table::Counters`].
const NEXT_RUN_SEQ: &[u8] = b"next_run_seq";
const NEXT_INBOX_SEQ: &[u8] = b"next_inbox_seq";
const NEXT_OUTBOX_SEQ: &[u8] = b"next_outbox_seq";
const NEXT_EGRESS_SEQ: &[u8] = b"next_egress_seq";
/// Prefix of the count of a subscription's invocations not completed yet.
const OPEN_PREFIX: &[u8] = b"open/";

fn open_counter(subscription: &str) -> Vec<u8> {
    [OPEN_PREFIX, subscription.as_bytes()].concat()
}

/// The counter of the subscription `inv` comes from, if any.
fn open_counter_of(inv: &Invocation) -> Option<Vec<u8>> {
    match &inv.source {
        Source::Kafka(kafka) => Some(open_counter(&kafka.subscription)),
        Source::Ingress | Source::Service { .. } => None,
    }
}

fn counter(store: &(impl StoreRead<Table> + ?Sized), name: &[u8]) -> Result<u64, StoreError> {
    Ok(store.get(Table::Counters, name)?.as_deref().and_then(key::u64_of).unwrap_or(0))
}

fn load(store: &(impl StoreRead<Table> + ?Sized), id: &str) -> Result<Option<Invocation>, StoreError> {
    Ok(store.get(Table::Invocations, &key::invocation(id))?.map(|bytes| decode(&bytes)).transpose()?)
}

/// The first row of `table` whose key starts with `prefix`.
fn first_with_prefix(
    store: &(impl StoreRead<Table> + ?Sized),
    table: Table,
    prefix: &[u8],
) -> Result<Option<Row>, StoreError> {
    let mut first = None;
    scan_prefix(store, table, prefix, &mut |k, v| {
        first = Some((k.to_vec(), v.to_vec()));
        ControlFlow::Break(())
    })?;
    Ok(first)
}

/// What [`Partition::retire`] did.
struct Retired {
    /// The invocation is gone: its copy must not be stored again.
    removed: bool,
    journals: u32,
}

/// The writes of one partition's commands. Every change to an invocation is
/// made on a copy the caller stores back when it is done with it.
struct Partition<'a, S: ?Sized> {
    store: &'a mut S,
    local: &'a Local,
    /// The counters read or changed by this command, and whether they
    /// changed: written back once, at its end.
    counters: BTreeMap<Vec<u8>, (u64, bool)>,
}

impl<S: Store<Table> + ?Sized> Partition<'_, S> {
    fn apply_invoke(&mut self, batch: Arc<Vec<Invoke>>) -> Result<Response, StoreError> {
        let (mut created, mut deduplicated) = (0, 0);
        // Entries read back from the log hold the only reference.
        let batch = Arc::try_unwrap(batch).unwrap_or_else(|shared| (*shared).clone());
        for invoke in batch {
            let subscription = match &invoke.source {
                Source::Kafka(kafka) => Some(kafka.subscription.as_str()),
                Source::Ingress | Source::Service { .. } => None,
            };
            if let Some(subscription) = subscription {
                if self.store.get(Table::Forgotten, subscription.as_bytes())?.is_some() {
                    deduplicated += 1;
                    continue;
                }
            }
            if let Some(dedup) = invoke.dedup {
                let Some(last) = self.advance(dedup)? else {
                    deduplicated += 1;
                    continue;
                };
                if let (None, Some(subscription)) = (last, subscription) {
                    let mut row = Vec::with_capacity(12 + subscription.len());
                    key::push_str(&mut row, subscription);
                    row.extend_from_slice(&dedup.producer.to_be_bytes());
                    self.store.put(Table::Producers, &row, &[])?;
                }
            }
            let mut id = invoke.id;
            if let Some(row) = self.store.get(Table::Invocations, &key::invocation(&id))? {
                // Ids derived from an idempotency key or a workflow's key
                // repeat: the first one wins, and a caller of a later one
                // gets its result.
                let record = subscription.is_some() && invoke.dedup.is_some();
                if !record || invoke.target.handler_ty == HandlerType::Workflow {
                    deduplicated += 1;
                    if let Some(reply) = invoke.reply {
                        self.attach(&mut decode(&row)?, reply)?;
                    }
                    continue;
                }
                // A Kafka record that passed dedup is new; its id, made of
                // its offset and part of its producer, is another producer's.
                id = self.unused_id(&id)?;
            }
            let mut inv = Invocation {
                id,
                target: invoke.target,
                payload: invoke.payload,
                headers: invoke.headers,
                source: invoke.source,
                idempotency_key: invoke.idempotency_key,
                status: Status::Scheduled,
                created_at_ms: invoke.created_at_ms,
                modified_at_ms: invoke.created_at_ms,
                attempts: 0,
                last_failure: None,
                completion: None,
                journal: Vec::new(),
                sleeps: Vec::new(),
                wake_at_ms: None,
                trace: invoke.trace,
                run_seq: None,
                retention: invoke.retention,
                completed_at_ms: None,
                expires_at_ms: None,
                inbox_seq: None,
                replies: invoke.reply.into_iter().collect(),
                awaiting: 0,
                children: Vec::new(),
                signals: Vec::new(),
                arrived: Vec::new(),
            };
            self.count(Status::Scheduled, 1)?;
            if let Some(open) = open_counter_of(&inv) {
                self.count_open(&open, 1)?;
            }
            let kept = match (invoke.failure, invoke.not_before_ms) {
                (Some((code, message)), _) => {
                    self.complete(&mut inv, Completion::Failure { code, message }, invoke.created_at_ms)?
                }
                (None, Some(at)) => {
                    self.set_timer(&mut inv, at)?;
                    true
                }
                (None, None) => {
                    self.enqueue(&mut inv)?;
                    true
                }
            };
            if kept {
                self.save(&inv)?;
            }
            created += 1;
        }
        Ok(Response::Invoked { created, deduplicated })
    }

    /// Records `dedup`'s sequence number as its producer's last, unless it
    /// is at or below the last one: `None` then (a duplicate), else the
    /// last one before it.
    fn advance(&mut self, dedup: Dedup) -> Result<Option<Option<u64>>, StoreError> {
        let producer = dedup.producer.to_be_bytes();
        let last = self.store.get(Table::Dedup, &producer)?.as_deref().and_then(key::u64_of);
        if last.is_some_and(|last| dedup.seq <= last) {
            return Ok(None);
        }
        self.store.put(Table::Dedup, &producer, &dedup.seq.to_be_bytes())?;
        Ok(Some(last))
    }

    /// Puts what an attempt of `inv` started in the outbox, in order; `inv`
    /// awaits the results of the calls among them.
    fn send(&mut self, inv: &mut Invocation, sends: Vec<Outgoing>) -> Result<(), StoreError> {
        for outgoing in sends {
            match &outgoing {
                Outgoing::Invoke(invoke) => {
                    inv.children.push(invoke.id.clone());
                    if invoke.reply.is_some() {
                        inv.awaiting += 1;
                    }
                }
                Outgoing::Attach { .. } => inv.awaiting += 1,
                Outgoing::Reply { .. } | Outgoing::Signal { .. } | Outgoing::Kill { .. } => {}
            }
            self.put_outgoing(&outgoing)?;
        }
        Ok(())
    }

    fn put_outgoing(&mut self, outgoing: &Outgoing) -> Result<(), StoreError> {
        let seq = self.next(NEXT_OUTBOX_SEQ)?;
        self.store.put(Table::Outbox, &seq.to_be_bytes(), &encode(outgoing))
    }

    /// Gives `reply` the result of `inv`: now if it is completed, else when
    /// it completes (or, for an output, nothing now).
    fn attach(&mut self, inv: &mut Invocation, reply: ReplyTo) -> Result<(), StoreError> {
        match &inv.completion {
            Some(result) => self.put_outgoing(&Outgoing::Reply { to: reply, result: Some(result.clone()) }),
            None if reply.kind == ReplyKind::Output => self.put_outgoing(&Outgoing::Reply { to: reply, result: None }),
            None => {
                inv.replies.push(reply);
                self.save(inv)
            }
        }
    }

    /// Answers handlers that ask for the results of invocations here; one
    /// that is not here (never was, or its retention ended) answers 404.
    fn apply_attach(&mut self, requests: Vec<Attach>) -> Result<Response, StoreError> {
        let (mut accepted, mut dropped) = (0, 0);
        for Attach { id, to, dedup } in requests {
            if self.advance(dedup)?.is_none() {
                dropped += 1;
                continue;
            }
            accepted += 1;
            match load(self.store, &id)? {
                Some(mut inv) => self.attach(&mut inv, to)?,
                None => {
                    let result = Completion::Failure { code: 404, message: format!("invocation {id} not found") };
                    self.put_outgoing(&Outgoing::Reply { to, result: Some(result) })?;
                }
            }
        }
        Ok(Response::Attached { accepted, dropped })
    }

    /// Appends call results and signals to their invocations' journals. A
    /// suspended invocation runs again; one that may be running gets them
    /// when its attempt ends; one that completed meanwhile (or was never
    /// there) drops them. A cancel signal cancels, as [`Effect::Cancel`].
    fn apply_notify(&mut self, at_ms: u64, notifications: Vec<Notification>) -> Result<Response, StoreError> {
        let (mut appended, mut dropped) = (0, 0);
        for Notification { id, notice, entry, dedup } in notifications {
            let fresh = match dedup {
                Some(dedup) => self.advance(dedup)?.is_some(),
                None => true,
            };
            let Some(mut inv) = fresh.then(|| load(self.store, &id)).transpose()?.flatten() else {
                dropped += 1;
                continue;
            };
            let applied = match notice {
                Notice::Cancel => {
                    let (outcome, kept) = self.change(&mut inv, at_ms, Effect::Cancel { id, signal: entry })?;
                    if kept {
                        self.save(&inv)?;
                    }
                    outcome == Outcome::Applied
                }
                Notice::Signal(Some(index)) if inv.signals.contains(&index) => false,
                _ => self.notify(&mut inv, notice, entry)?,
            };
            if applied {
                appended += 1;
            } else {
                dropped += 1;
            }
        }
        Ok(Response::Notified { appended, dropped })
    }

    /// Gives `inv` a call result or a signal; answers whether it took it.
    fn notify(&mut self, inv: &mut Invocation, notice: Notice, entry: JournalEntry) -> Result<bool, StoreError> {
        match inv.status {
            Status::Completed | Status::Scheduled | Status::Pending => return Ok(false),
            Status::Ready => {
                inv.arrived.push(entry);
                self.local.watches.mark(&inv.id);
            }
            Status::Suspended => {
                inv.journal.push(entry);
                self.make_runnable(inv)?;
            }
            Status::BackingOff | Status::Paused => inv.journal.push(entry),
        }
        match notice {
            Notice::CallResult => inv.awaiting = inv.awaiting.saturating_sub(1),
            Notice::Signal(Some(index)) => inv.signals.push(index),
            Notice::Signal(None) | Notice::Cancel => {}
        }
        self.save(inv)?;
        Ok(true)
    }

    fn truncate_outbox(&mut self, upto: u64) -> Result<Response, StoreError> {
        Ok(Response::Truncated { rows: self.remove_through(Table::Outbox, upto)? })
    }

    /// Removes the rows of `table`, keyed by sequence number, up to `upto`;
    /// answers how many.
    fn remove_through(&mut self, table: Table, upto: u64) -> Result<u32, StoreError> {
        let mut rows = Vec::new();
        self.store.scan(table, Bound::Unbounded, Bound::Included(&upto.to_be_bytes()), &mut |k, _| {
            rows.push(k.to_vec());
            ControlFlow::Continue(())
        })?;
        for row in &rows {
            self.store.remove(table, row)?;
        }
        Ok(rows.len() as u32)
    }

    /// Puts the record of an invocation that ended failed in the egress, for
    /// its subscription's dead-letter topic: its key, value and headers as
    /// they came, and why and where from in [`DEAD_LETTER_HEADERS`].
    fn dead_letter(&mut self, inv: &Invocation, result: &Completion) -> Result<(), StoreError> {
        let (Source::Kafka(kafka), Completion::Failure { code, message }) = (&inv.source, result) else {
            return Ok(());
        };
        let Some(to) = &kafka.dead_letter else { return Ok(()) };
        let mut headers: Vec<(String, Bytes)> =
            inv.headers.iter().map(|(k, v)| (k.clone(), Bytes::copy_from_slice(v.as_bytes()))).collect();
        let [reason, code_header, subscription, topic, partition, offset, invocation] = DEAD_LETTER_HEADERS;
        headers.extend(
            [
                (reason, message.clone()),
                (code_header, code.to_string()),
                (subscription, kafka.subscription.clone()),
                (topic, kafka.topic.clone()),
                (partition, kafka.partition.to_string()),
                (offset, kafka.offset.to_string()),
                (invocation, inv.id.clone()),
            ]
            .map(|(name, value)| (name.to_owned(), Bytes::from(value))),
        );
        let record = KafkaRecord {
            id: format!("{}/dead-letter", inv.id),
            cluster: to.cluster.clone(),
            topic: to.topic.clone(),
            key: kafka.key.clone(),
            value: inv.payload.clone(),
            headers,
        };
        let seq = self.next(NEXT_EGRESS_SEQ)?;
        self.store.put(Table::Egress, &seq.to_be_bytes(), &encode(&record))
    }

    /// Drops the egress rows up to `upto` and moves the positions forward.
    fn truncate_egress(&mut self, upto: Option<u64>, positions: Vec<EgressPosition>) -> Result<Response, StoreError> {
        for position in positions {
            let row = key::egress_position(&position.cluster, &position.topic, position.partition);
            let known = self.store.get(Table::EgressPositions, &row)?.as_deref().and_then(key::u64_of);
            if known.is_none_or(|known| (known as i64) < position.offset) {
                self.store.put(Table::EgressPositions, &row, &(position.offset.max(0) as u64).to_be_bytes())?;
            }
        }
        let rows = match upto {
            Some(upto) => self.remove_through(Table::Egress, upto)?,
            None => 0,
        };
        Ok(Response::Truncated { rows })
    }

    /// An id in the partition of `taken` that no invocation has: the same
    /// partition key, and a unique part derived from `taken`'s.
    fn unused_id(&self, taken: &str) -> Result<String, StoreError> {
        let (partition_key, mut unique) = key::id_parts(taken).unwrap_or((0, xxh3_64(taken.as_bytes())));
        loop {
            unique = xxh3_64(&unique.to_be_bytes());
            let id = key::id(partition_key, unique);
            if self.store.get(Table::Invocations, &key::invocation(&id))?.is_none() {
                return Ok(id);
            }
        }
    }

    /// Applies one effect; only an applied one changes `modified_at_ms`.
    fn apply_effect(&mut self, at_ms: u64, effect: Effect) -> Result<Outcome, StoreError> {
        let Some(mut inv) = load(self.store, effect.id())? else {
            return Ok(Outcome::NotFound);
        };
        let (outcome, kept) = self.change(&mut inv, at_ms, effect)?;
        if kept {
            if outcome == Outcome::Applied {
                inv.modified_at_ms = at_ms;
            }
            self.save(&inv)?;
        }
        Ok(outcome)
    }

    /// Changes `inv` as `effect` says; answers whether `inv` still exists.
    fn change(&mut self, inv: &mut Invocation, at_ms: u64, effect: Effect) -> Result<(Outcome, bool), StoreError> {
        let status = inv.status;
        // An attempt's effect counts only if nothing changed the invocation since the attempt started.
        let current = inv.attempt();
        let stale = Ok((Outcome::Stale, true));
        match effect {
            Effect::Progress {
                attempt,
                entries,
                state,
                sleeps,
                run_now,
                sends,
                awaits_signal,
                promises,
                arrived,
                ..
            } => {
                if current != Some(attempt) || inv.arrived.len() < arrived as usize {
                    return stale;
                }
                self.send(inv, sends)?;
                inv.journal.extend(inv.arrived.drain(..arrived as usize));
                inv.journal.extend(entries);
                let answered = self.apply_promises(inv, promises)?;
                // Results that came during the attempt: the next one sees them.
                let arrived = answered || !inv.arrived.is_empty();
                inv.journal.append(&mut inv.arrived);
                self.change_state(inv, state)?;
                inv.sleeps.extend(sleeps);
                inv.attempts = 0;
                inv.last_failure = None;
                if !run_now && !arrived {
                    match inv.sleeps.iter().map(|s| s.wake_at_ms).min() {
                        Some(at) => {
                            self.unrun(inv, Status::Suspended)?;
                            self.set_timer(inv, at)?;
                        }
                        None if inv.awaiting > 0 || awaits_signal => self.unrun(inv, Status::Suspended)?,
                        None => self.unrun(inv, Status::Paused)?,
                    }
                }
            }
            Effect::Checkpoint { attempt, entries, state, sends, arrived, .. } => {
                if current != Some(attempt) || inv.arrived.len() < arrived as usize {
                    return stale;
                }
                self.send(inv, sends)?;
                inv.journal.extend(inv.arrived.drain(..arrived as usize));
                inv.journal.extend(entries);
                self.change_state(inv, state)?;
                inv.attempts = 0;
                inv.last_failure = None;
            }
            Effect::Complete { attempt, state, result, sends, promises, .. } => {
                if current != Some(attempt) {
                    return stale;
                }
                self.send(inv, sends)?;
                self.apply_promises(inv, promises)?;
                self.change_state(inv, state)?;
                let kept = self.complete(inv, result, at_ms)?;
                return Ok((Outcome::Applied, kept));
            }
            Effect::Failed { attempt, message, retry_at_ms, pause, .. } => {
                if current != Some(attempt) {
                    return stale;
                }
                inv.attempts += 1;
                inv.last_failure = Some(message.clone());
                inv.journal.append(&mut inv.arrived);
                match retry_at_ms {
                    Some(at) => {
                        self.unrun(inv, Status::BackingOff)?;
                        self.set_timer(inv, at)?;
                    }
                    None if pause => self.unrun(inv, Status::Paused)?,
                    None => {
                        let kept = self.complete(inv, Completion::Failure { code: 500, message }, at_ms)?;
                        return Ok((Outcome::Applied, kept));
                    }
                }
            }
            Effect::Wake { .. } => {
                let Some(due) = inv.wake_at_ms.filter(|&t| t <= at_ms) else {
                    return stale;
                };
                self.store.remove(Table::Timers, &key::due(due, &inv.id))?;
                inv.wake_at_ms = None;
                match status {
                    Status::Scheduled => self.enqueue(inv)?,
                    Status::BackingOff => self.make_runnable(inv)?,
                    Status::Suspended => {
                        let (due, later): (Vec<_>, Vec<_>) =
                            std::mem::take(&mut inv.sleeps).into_iter().partition(|s| s.wake_at_ms <= at_ms);
                        inv.journal.extend(due.into_iter().map(|s| s.notification));
                        inv.sleeps = later;
                        self.make_runnable(inv)?;
                    }
                    _ => return stale,
                }
            }
            Effect::Cancel { signal, .. } => match status {
                Status::Completed => {
                    return Ok((Outcome::NotAllowed("the invocation is completed".to_owned()), true));
                }
                // Not started yet: nothing to tell the handler.
                Status::Scheduled | Status::Pending => {
                    let canceled = Completion::Failure { code: 409, message: "canceled".to_owned() };
                    let kept = self.complete(inv, canceled, at_ms)?;
                    return Ok((Outcome::Applied, kept));
                }
                _ => {
                    inv.journal.append(&mut inv.arrived);
                    inv.journal.push(signal);
                    inv.attempts = 0;
                    self.make_runnable(inv)?;
                }
            },
            Effect::Kill { .. } => {
                if status == Status::Completed {
                    return Ok((Outcome::NotAllowed("the invocation is completed".to_owned()), true));
                }
                for id in std::mem::take(&mut inv.children) {
                    self.put_outgoing(&Outgoing::Kill { id })?;
                }
                let killed = Completion::Failure { code: 409, message: "killed".to_owned() };
                let kept = self.complete(inv, killed, at_ms)?;
                return Ok((Outcome::Applied, kept));
            }
            Effect::Purge { .. } => {
                if status != Status::Completed {
                    return Ok((Outcome::NotAllowed(format!("the invocation is {}", status.as_str())), true));
                }
                if let Some(at) = inv.expires_at_ms.take() {
                    self.store.remove(Table::Expiries, &key::due(at, &inv.id))?;
                }
                self.store.remove(Table::Invocations, &key::invocation(&inv.id))?;
                if let Some(workflow) = workflow_of(inv) {
                    self.forget_promises(&workflow)?;
                }
                self.count(status, -1)?;
                return Ok((Outcome::Applied, false));
            }
            Effect::PurgeJournal { .. } => {
                if status != Status::Completed {
                    return Ok((Outcome::NotAllowed(format!("the invocation is {}", status.as_str())), true));
                }
                inv.journal = Vec::new();
                let retired = self.retire(inv, at_ms)?;
                return Ok((Outcome::Applied, !retired.removed));
            }
            // As in Restate: a paused invocation runs again with its
            // attempts counted anew, a backing-off or suspended one runs now,
            // a running one goes on.
            Effect::Resume { .. } => match status {
                Status::Paused | Status::BackingOff | Status::Suspended => {
                    if let Some(at) = inv.wake_at_ms.take() {
                        self.store.remove(Table::Timers, &key::due(at, &inv.id))?;
                    }
                    if status == Status::Paused {
                        inv.attempts = 0;
                    }
                    self.make_runnable(inv)?;
                }
                Status::Ready => {}
                Status::Scheduled | Status::Pending | Status::Completed => {
                    return Ok((Outcome::NotAllowed(format!("the invocation is {}", status.as_str())), true));
                }
            },
            Effect::Pause { .. } => match status {
                Status::Ready | Status::BackingOff | Status::Suspended => {
                    // Its sleeps and backoff wait for the resume: the handler
                    // asks for them again when it runs.
                    if let Some(at) = inv.wake_at_ms.take() {
                        self.store.remove(Table::Timers, &key::due(at, &inv.id))?;
                    }
                    inv.journal.append(&mut inv.arrived);
                    self.unrun(inv, Status::Paused)?;
                }
                Status::Paused => {}
                Status::Scheduled | Status::Pending | Status::Completed => {
                    let why = format!("the invocation is {}: only a started one can pause", status.as_str());
                    return Ok((Outcome::NotAllowed(why), true));
                }
            },
        }
        Ok((Outcome::Applied, true))
    }

    /// Applies what `inv`'s attempt did with its workflow's promises and
    /// answers each in its journal (a wait for a promise not completed yet,
    /// when it is); says whether it answered any, so that the handler runs
    /// again to see the answers. Completing a promise answers whoever waits
    /// for it.
    fn apply_promises(&mut self, inv: &mut Invocation, ops: Vec<PromiseOp>) -> Result<bool, StoreError> {
        let mut answered = false;
        for op in ops {
            // The SDKs offer promises to workflow handlers only, which are keyed.
            let Some(workflow) = inv.object_key() else { continue };
            let (PromiseOp::Get { name, completion_id }
            | PromiseOp::Peek { name, completion_id }
            | PromiseOp::Complete { name, completion_id, .. }) = &op;
            let (row, completion_id) = ([&workflow[..], name.as_bytes()].concat(), *completion_id);
            let stored: Option<Promise> = self.store.get(Table::Promises, &row)?.map(|v| decode(&v)).transpose()?;
            match (op, stored) {
                (PromiseOp::Get { .. }, Some(Promise::Completed(result))) => {
                    inv.journal.push(notifications::get_promise(completion_id, &result));
                    answered = true;
                }
                (PromiseOp::Get { .. }, waiting) => {
                    let mut waiting = match waiting {
                        Some(Promise::Awaited(waiting)) => waiting,
                        _ => Vec::new(),
                    };
                    waiting.push((inv.id.clone(), completion_id));
                    self.store.put(Table::Promises, &row, &encode(&Promise::Awaited(waiting)))?;
                    inv.awaiting += 1;
                }
                (PromiseOp::Peek { .. }, stored) => {
                    let result = match &stored {
                        Some(Promise::Completed(result)) => Some(result),
                        _ => None,
                    };
                    inv.journal.push(notifications::peek_promise(completion_id, result));
                    answered = true;
                }
                (PromiseOp::Complete { .. }, Some(Promise::Completed(_))) => {
                    inv.journal.push(notifications::complete_promise(completion_id, true));
                    answered = true;
                }
                (PromiseOp::Complete { result, .. }, waiting) => {
                    for (id, waiter) in waiting.into_iter().flat_map(|w| match w {
                        Promise::Awaited(waiting) => waiting,
                        Promise::Completed(_) => Vec::new(),
                    }) {
                        let entry = notifications::get_promise(waiter, &result);
                        if id == inv.id {
                            inv.journal.push(entry);
                            inv.awaiting = inv.awaiting.saturating_sub(1);
                        } else if let Some(mut other) = load(self.store, &id)? {
                            self.notify(&mut other, Notice::CallResult, entry)?;
                        }
                    }
                    self.store.put(Table::Promises, &row, &encode(&Promise::Completed(result)))?;
                    inv.journal.push(notifications::complete_promise(completion_id, false));
                    answered = true;
                }
            }
        }
        Ok(answered)
    }

    /// Drops the promises of `workflow` (its object key), whose run is gone.
    fn forget_promises(&mut self, workflow: &[u8]) -> Result<(), StoreError> {
        self.remove_prefix(Table::Promises, workflow)
    }

    /// Drops the rows of `table` whose key starts with `prefix`.
    fn set_state(&mut self, set: SetState) -> Result<Outcome, StoreError> {
        let object = key::object(&set.service, &set.key);
        if let Some((_, holder)) = first_with_prefix(self.store, Table::Inboxes, &object)? {
            let holder = String::from_utf8_lossy(&holder);
            return Ok(Outcome::NotAllowed(format!(
                "invocation {holder} holds {}/{}; change its state once it is done",
                set.service, set.key
            )));
        }
        if let Some(expected) = &set.version {
            let current = state_version(&object_state(self.store, &object)?);
            if *expected != current {
                return Ok(Outcome::NotAllowed(format!(
                    "the state of {}/{} changed: its version is {current}, not {expected}",
                    set.service, set.key
                )));
            }
        }
        self.remove_prefix(Table::Objects, &object)?;
        for (name, value) in set.state {
            self.store.put(Table::Objects, &[&object[..], &name[..]].concat(), &value)?;
        }
        Ok(Outcome::Applied)
    }

    fn remove_prefix(&mut self, table: Table, prefix: &[u8]) -> Result<(), StoreError> {
        let mut rows = Vec::new();
        scan_prefix(self.store, table, prefix, &mut |k, _| {
            rows.push(k.to_vec());
            ControlFlow::Continue(())
        })?;
        for row in rows {
            self.store.remove(table, &row)?;
        }
        Ok(())
    }

    /// Applies a completed invocation's state changes to its object.
    /// Applies the state changes an effect of `inv` carries to its object's
    /// state, as its journal takes them (so a shared handler sees them).
    fn change_state(&mut self, inv: &Invocation, ops: Vec<StateOp>) -> Result<(), StoreError> {
        match inv.object_key() {
            Some(object) if !ops.is_empty() => self.change_object(&object, ops),
            _ => Ok(()),
        }
    }

    fn change_object(&mut self, object: &[u8], ops: Vec<StateOp>) -> Result<(), StoreError> {
        let row = |key: &[u8]| [object, key].concat();
        for op in ops {
            match op {
                StateOp::Set { key, value } => self.store.put(Table::Objects, &row(&key), &value)?,
                StateOp::Clear { key } => self.store.remove(Table::Objects, &row(&key))?,
                StateOp::ClearAll => self.remove_prefix(Table::Objects, object)?,
            }
        }
        Ok(())
    }

    fn save(&mut self, inv: &Invocation) -> Result<(), StoreError> {
        self.store.put(Table::Invocations, &key::invocation(&inv.id), &encode(inv))
    }

    /// The value of counter `name`, for this command to change.
    fn counter_mut(&mut self, name: &[u8]) -> Result<&mut (u64, bool), StoreError> {
        if !self.counters.contains_key(name) {
            let value = counter(self.store, name)?;
            self.counters.insert(name.to_vec(), (value, false));
        }
        Ok(self.counters.get_mut(name).expect("inserted"))
    }

    /// Adds `delta` to the count of invocations in `status`.
    fn count(&mut self, status: Status, delta: i64) -> Result<(), StoreError> {
        let count = self.counter_mut(&status.counter())?;
        count.0 = count.0.checked_add_signed(delta).expect("status counts stay positive");
        count.1 = true;
        Ok(())
    }

    /// Adds `delta` to a subscription's count of open invocations. It only
    /// tells when a deleted subscription has drained, so it stops at zero
    /// rather than fail the command.
    fn count_open(&mut self, name: &[u8], delta: i64) -> Result<(), StoreError> {
        let count = self.counter_mut(name)?;
        count.0 = count.0.saturating_add_signed(delta);
        count.1 = true;
        Ok(())
    }

    /// Takes the next value of sequence counter `name`.
    fn next(&mut self, name: &[u8]) -> Result<u64, StoreError> {
        let counter = self.counter_mut(name)?;
        let next = counter.0;
        *counter = (next + 1, true);
        Ok(next)
    }

    fn write_counters(&mut self) -> Result<(), StoreError> {
        for (name, (value, changed)) in std::mem::take(&mut self.counters) {
            if !changed {
                continue;
            }
            // A subscription with nothing open keeps no row.
            if value == 0 && name.starts_with(OPEN_PREFIX) {
                self.store.remove(Table::Counters, &name)?;
            } else {
                self.store.put(Table::Counters, &name, &value.to_be_bytes())?;
            }
        }
        Ok(())
    }

    /// Queues a new or delayed invocation: exclusive ones in their key's
    /// inbox, ordered records in their Kafka partition's.
    fn enqueue(&mut self, inv: &mut Invocation) -> Result<(), StoreError> {
        if let Some(object) = inv.inbox_key() {
            let seq = self.next(NEXT_INBOX_SEQ)?;
            inv.inbox_seq = Some(seq);
            let head = first_with_prefix(self.store, Table::Inboxes, &object)?;
            self.store.put(Table::Inboxes, &[&object[..], &seq.to_be_bytes()].concat(), inv.id.as_bytes())?;
            if head.is_some() {
                return self.set_status(inv, Status::Pending);
            }
        }
        self.make_runnable(inv)
    }

    fn make_runnable(&mut self, inv: &mut Invocation) -> Result<(), StoreError> {
        self.set_status(inv, Status::Ready)?;
        if inv.run_seq.is_none() {
            let seq = self.next(NEXT_RUN_SEQ)?;
            inv.run_seq = Some(seq);
            self.store.put(Table::Runnable, &seq.to_be_bytes(), inv.id.as_bytes())?;
        }
        Ok(())
    }

    /// Takes an invocation out of the runnable set, into `status`.
    fn unrun(&mut self, inv: &mut Invocation, status: Status) -> Result<(), StoreError> {
        self.set_status(inv, status)?;
        if let Some(seq) = inv.run_seq.take() {
            self.store.remove(Table::Runnable, &seq.to_be_bytes())?;
        }
        Ok(())
    }

    /// The one place an invocation's status changes, keeping the counts.
    fn set_status(&mut self, inv: &mut Invocation, status: Status) -> Result<(), StoreError> {
        if inv.status != status {
            self.count(inv.status, -1)?;
            self.count(status, 1)?;
            inv.status = status;
        }
        Ok(())
    }

    fn set_timer(&mut self, inv: &mut Invocation, at_ms: u64) -> Result<(), StoreError> {
        if let Some(old) = inv.wake_at_ms.replace(at_ms) {
            self.store.remove(Table::Timers, &key::due(old, &inv.id))?;
        }
        self.store.put(Table::Timers, &key::due(at_ms, &inv.id), &[])
    }

    /// Completes an invocation at `at_ms`, lets the next one of its key run,
    /// and keeps it (and its journal) as long as its retention says. Answers
    /// whether it is kept.
    fn complete(&mut self, inv: &mut Invocation, result: Completion, at_ms: u64) -> Result<bool, StoreError> {
        let status = inv.status;
        self.unrun(inv, Status::Completed)?;
        if let Some(open) = open_counter_of(inv) {
            self.count_open(&open, -1)?;
        }
        for to in std::mem::take(&mut inv.replies) {
            self.put_outgoing(&Outgoing::Reply { to, result: Some(result.clone()) })?;
        }
        self.dead_letter(inv, &result)?;
        inv.completion = Some(result);
        inv.completed_at_ms = Some(at_ms);
        self.local.watches.mark(&inv.id);
        inv.sleeps = Vec::new();
        inv.arrived = Vec::new();
        inv.awaiting = 0;
        inv.children = Vec::new();
        inv.signals = Vec::new();
        if let Some(at) = inv.wake_at_ms.take() {
            self.store.remove(Table::Timers, &key::due(at, &inv.id))?;
        }
        self.release_key(inv, status)?;
        Ok(!self.retire(inv, at_ms)?.removed)
    }

    /// Takes a completed invocation out of its inbox and lets the next one
    /// there run.
    fn release_key(&mut self, inv: &mut Invocation, status: Status) -> Result<(), StoreError> {
        if status == Status::Scheduled {
            return Ok(());
        }
        let Some(object) = inv.inbox_key() else { return Ok(()) };
        if let Some(seq) = inv.inbox_seq.take() {
            self.store.remove(Table::Inboxes, &[&object[..], &seq.to_be_bytes()].concat())?;
        }
        let Some((_, next)) = first_with_prefix(self.store, Table::Inboxes, &object)? else {
            return Ok(());
        };
        let next = std::str::from_utf8(&next).map_err(|e| StoreError(format!("inbox row: {e}")))?;
        let mut next =
            load(self.store, next)?.ok_or_else(|| StoreError(format!("queued invocation {next} is gone")))?;
        if next.status == Status::Pending {
            self.make_runnable(&mut next)?;
            self.save(&next)?;
        }
        Ok(())
    }

    /// Takes the next retention step of a completed invocation if it is due
    /// at `now`: drops its journal, or the invocation (its result kept in
    /// [`Removed`] for whoever still waits for it). Then sets when the next
    /// step is due.
    fn retire(&mut self, inv: &mut Invocation, now: u64) -> Result<Retired, StoreError> {
        if let Some(at) = inv.expires_at_ms.take() {
            self.store.remove(Table::Expiries, &key::due(at, &inv.id))?;
        }
        let completed = inv.completed_at_ms.expect("retired invocations are completed");
        if completed.saturating_add(inv.retention.completion_ms) <= now {
            self.store.remove(Table::Invocations, &key::invocation(&inv.id))?;
            if let Some(workflow) = workflow_of(inv) {
                self.forget_promises(&workflow)?;
            }
            self.count(Status::Completed, -1)?;
            if let Some(result) = inv.completion.take() {
                self.local.removed.push(std::mem::take(&mut inv.id), result);
            }
            return Ok(Retired { removed: true, journals: 0 });
        }
        let journal_until = completed.saturating_add(inv.retention.journal_ms);
        let mut journals = 0;
        if !inv.journal.is_empty() && journal_until <= now {
            inv.journal = Vec::new();
            journals = 1;
        }
        let next =
            if inv.journal.is_empty() { completed.saturating_add(inv.retention.completion_ms) } else { journal_until };
        // Kept for ever: nothing to look at again.
        if next != u64::MAX {
            inv.expires_at_ms = Some(next);
            // The removal of a workflow's run names the workflow, whose
            // promises go with it, as the invocation is not read then.
            let value = match (inv.journal.is_empty(), workflow_of(inv)) {
                (true, Some(workflow)) => [&[EXPIRY_REMOVE][..], &workflow].concat(),
                (true, None) => vec![EXPIRY_REMOVE],
                (false, _) => vec![EXPIRY_JOURNAL],
            };
            self.store.put(Table::Expiries, &key::due(next, &inv.id), &value)?;
        }
        Ok(Retired { removed: false, journals })
    }

    /// Takes the retention steps due at `at_ms`, at most `max` of them. An
    /// invocation whose time is up goes without being read: its result is
    /// no longer kept anywhere.
    fn apply_expire(&mut self, at_ms: u64, max: u32) -> Result<Response, StoreError> {
        let mut due = Vec::new();
        self.store.scan(Table::Expiries, Bound::Unbounded, Bound::Unbounded, &mut |k, v| match key::split_due(k) {
            Some((at, id)) if at <= at_ms && due.len() < max as usize => {
                due.push((
                    k.to_vec(),
                    id.to_owned(),
                    v.first() == Some(&EXPIRY_REMOVE),
                    v.get(1..).unwrap_or_default().to_vec(),
                ));
                ControlFlow::Continue(())
            }
            _ => ControlFlow::Break(()),
        })?;
        let (mut invocations, mut journals) = (0, 0);
        for (row, id, remove, workflow) in due {
            self.store.remove(Table::Expiries, &row)?;
            if remove {
                self.store.remove(Table::Invocations, &key::invocation(&id))?;
                if !workflow.is_empty() {
                    self.forget_promises(&workflow)?;
                }
                self.count(Status::Completed, -1)?;
                invocations += 1;
                continue;
            }
            let mut inv =
                load(self.store, &id)?.ok_or_else(|| StoreError(format!("expiring invocation {id} is gone")))?;
            inv.expires_at_ms = None;
            let retired = self.retire(&mut inv, at_ms)?;
            if retired.removed {
                invocations += 1;
            } else {
                self.save(&inv)?;
            }
            journals += retired.journals;
        }
        Ok(Response::Expired { invocations, journals })
    }

    /// Drops the dedup entries of deleted subscription `id`.
    fn forget_subscription(&mut self, id: String) -> Result<Response, StoreError> {
        let mut prefix = Vec::new();
        key::push_str(&mut prefix, &id);
        let mut rows = Vec::new();
        scan_prefix(self.store, Table::Producers, &prefix, &mut |k, _| {
            rows.push(k.to_vec());
            ControlFlow::Continue(())
        })?;
        for row in &rows {
            self.store.remove(Table::Producers, row)?;
            self.store.remove(Table::Dedup, &row[prefix.len()..])?;
        }
        self.store.put(Table::Forgotten, id.as_bytes(), &[])?;
        Ok(Response::Forgotten { producers: rows.len() as u32 })
    }
}

/// Reads of one partition's state.
pub struct PartitionRead<'a, S: ?Sized> {
    store: &'a S,
    removed: &'a Removed,
}

impl<'a, S: StoreRead<Table> + ?Sized> PartitionRead<'a, S> {
    pub fn new(store: &'a S, removed: &'a Removed) -> Self {
        PartitionRead { store, removed }
    }

    /// The subscriptions with dedup entries here.
    pub fn subscriptions_with_dedup(&self) -> Result<Vec<String>, StoreError> {
        let mut subscriptions: Vec<String> = Vec::new();
        self.store.scan(Table::Producers, Bound::Unbounded, Bound::Unbounded, &mut |k, _| {
            if let Some((subscription, _)) = key::take_str(k) {
                if subscriptions.last().is_none_or(|last| last != subscription) {
                    subscriptions.push(subscription.to_owned());
                }
            }
            ControlFlow::Continue(())
        })?;
        Ok(subscriptions)
    }

    /// When the next retention step is due.
    pub fn next_expiry(&self) -> Result<Option<u64>, StoreError> {
        let mut next = None;
        self.store.scan(Table::Expiries, Bound::Unbounded, Bound::Unbounded, &mut |k, _| {
            next = key::split_due(k).map(|(at, _)| at);
            ControlFlow::Break(())
        })?;
        Ok(next)
    }

    /// How many retention steps are due at `now`, counting at most `max`.
    pub fn expiries_due(&self, now: u64, max: usize) -> Result<usize, StoreError> {
        let mut due = 0;
        self.store.scan(Table::Expiries, Bound::Unbounded, Bound::Unbounded, &mut |k, _| match key::split_due(k) {
            Some((at, _)) if at <= now && due < max => {
                due += 1;
                ControlFlow::Continue(())
            }
            _ => ControlFlow::Break(()),
        })?;
        Ok(due)
    }

    /// The result of invocation `id`: `Some(None)` while it runs, `None` if
    /// there is no such invocation. An invocation removed lately by its
    /// retention still answers with its result.
    pub fn result_of(&self, id: &str) -> Result<Option<Option<Completion>>, StoreError> {
        Ok(match load(self.store, id)? {
            Some(inv) => Some(inv.completion),
            None => self.removed.get(id).map(Some),
        })
    }

    pub fn invocation(&self, id: &str) -> Result<Option<Invocation>, StoreError> {
        load(self.store, id)
    }

    /// The first rows of the outbox, at most `max_rows` of them and, past
    /// the first, at most `max_bytes` encoded: (sequence number, what to
    /// deliver).
    pub fn outbox(&self, max_rows: usize, max_bytes: usize) -> Result<Vec<(u64, Outgoing)>, StoreError> {
        self.sequenced(Table::Outbox, max_rows, max_bytes)
    }

    /// The first rows of the egress, bounded as [`PartitionRead::outbox`]'s.
    pub fn egress(&self, max_rows: usize, max_bytes: usize) -> Result<Vec<(u64, KafkaRecord)>, StoreError> {
        self.sequenced(Table::Egress, max_rows, max_bytes)
    }

    /// How many rows the egress holds: from its first to the last taken.
    pub fn egress_pending(&self) -> Result<u64, StoreError> {
        let first = first_with_prefix(self.store, Table::Egress, &[])?;
        let next = counter(self.store, NEXT_EGRESS_SEQ)?;
        Ok(first.and_then(|(k, _)| key::u64_of(&k)).map_or(0, |first| next.saturating_sub(first)))
    }

    /// How far the egress has got in each Kafka partition it produced to.
    pub fn egress_positions(&self) -> Result<Vec<EgressPosition>, StoreError> {
        let mut positions = Vec::new();
        self.store.scan(Table::EgressPositions, Bound::Unbounded, Bound::Unbounded, &mut |k, v| {
            if let (Some((cluster, topic, partition)), Some(offset)) = (key::egress_position_parts(k), key::u64_of(v)) {
                let (cluster, topic) = (cluster.to_owned(), topic.to_owned());
                positions.push(EgressPosition { cluster, topic, partition, offset: offset as i64 });
            }
            ControlFlow::Continue(())
        })?;
        Ok(positions)
    }

    /// The first rows of `table`, keyed by sequence number, at most
    /// `max_rows` of them and, past the first, at most `max_bytes` encoded.
    fn sequenced<T: serde::de::DeserializeOwned>(
        &self,
        table: Table,
        max_rows: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, T)>, StoreError> {
        let mut rows = Vec::new();
        let mut bytes = 0;
        let mut failed = None;
        self.store.scan(table, Bound::Unbounded, Bound::Unbounded, &mut |k, v| {
            bytes += v.len();
            if rows.len() == max_rows || (!rows.is_empty() && bytes > max_bytes) {
                return ControlFlow::Break(());
            }
            match (key::u64_of(k), decode(v)) {
                (Some(seq), Ok(outgoing)) => rows.push((seq, outgoing)),
                (_, Err(e)) => failed = Some(StoreError::from(e)),
                (None, _) => {
                    failed = Some(StoreError(format!("{} row key {k:?} is not a sequence number", table.name())))
                }
            }
            if failed.is_some() {
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        })?;
        failed.map_or(Ok(rows), Err)
    }

    /// Calls `f` with the invocations after the one named `after`, in the
    /// order of their rows ([`key::invocation`]), until it breaks.
    pub fn invocations_after(
        &self,
        after: Option<&str>,
        mut f: impl FnMut(Invocation) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        let after = after.map(key::invocation);
        let from = after.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
        let mut failed = None;
        self.store.scan(Table::Invocations, from, Bound::Unbounded, &mut |_, v| match decode(v) {
            Ok(inv) => f(inv),
            Err(e) => {
                failed = Some(e);
                ControlFlow::Break(())
            }
        })?;
        match failed {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Calls `f` with the ids of the invocations, in order, until it breaks;
    /// decodes none of them.
    pub fn invocation_ids(&self, mut f: impl FnMut(&str) -> ControlFlow<()>) -> Result<(), StoreError> {
        self.store.scan(Table::Invocations, Bound::Unbounded, Bound::Unbounded, &mut |row, _| {
            key::invocation_id(row).map_or(ControlFlow::Continue(()), |id| f(&id))
        })
    }

    pub fn invocation_count(&self) -> Result<u64, StoreError> {
        Ok(self.status_counts()?.iter().sum())
    }

    /// How many invocations of subscription `id`'s records have not completed.
    pub fn open_invocations(&self, subscription: &str) -> Result<u64, StoreError> {
        counter(self.store, &open_counter(subscription))
    }

    /// How many invocations are in each status, in the order of [`Status::ALL`].
    pub fn status_counts(&self) -> Result<[u64; Status::ALL.len()], StoreError> {
        let mut counts = [0; Status::ALL.len()];
        for status in Status::ALL {
            counts[status.index()] = counter(self.store, &status.counter())?;
        }
        Ok(counts)
    }

    /// Calls `f` with the ids of the invocations allowed to run, in the
    /// order they became so, until it breaks.
    pub fn runnable_ids(&self, mut f: impl FnMut(&str) -> ControlFlow<()>) -> Result<(), StoreError> {
        self.store.scan(Table::Runnable, Bound::Unbounded, Bound::Unbounded, &mut |_, id| {
            std::str::from_utf8(id).map_or(ControlFlow::Continue(()), &mut f)
        })
    }

    /// Calls `f` with the timers in due order, (due time, invocation id),
    /// until it breaks.
    pub fn timers(&self, mut f: impl FnMut(u64, &str) -> ControlFlow<()>) -> Result<(), StoreError> {
        self.store.scan(Table::Timers, Bound::Unbounded, Bound::Unbounded, &mut |k, _| match key::split_due(k) {
            Some((at, id)) => f(at, id),
            None => ControlFlow::Continue(()),
        })
    }

    /// The state of a Virtual Object or Workflow key.
    pub fn object_state(&self, service: &str, key: &str) -> Result<BTreeMap<Bytes, Bytes>, StoreError> {
        object_state(self.store, &key::object(service, key))
    }

    /// The last sequence number applied for `producer`.
    pub fn last_seq(&self, producer: u64) -> Result<Option<u64>, StoreError> {
        Ok(self.store.get(Table::Dedup, &producer.to_be_bytes())?.as_deref().and_then(key::u64_of))
    }

    /// Calls `f` with the state entries of every Virtual Object and Workflow
    /// key after the row `after` (a row key `f` was given), in row order,
    /// until it breaks: a scan that can be resumed.
    pub fn state_after(
        &self,
        after: Option<&[u8]>,
        mut f: impl FnMut(&[u8], StateEntry<'_>) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        self.rows_after(Table::Objects, after, &mut |row, value| match split_object(row) {
            Some((service, key, name)) => f(row, StateEntry { service, key, name, value }),
            None => ControlFlow::Continue(()),
        })
    }

    /// Calls `f` with the rows of every key's inbox after the row `after`,
    /// in row order (per key, head first), until it breaks.
    pub fn inboxes_after(
        &self,
        after: Option<&[u8]>,
        mut f: impl FnMut(&[u8], InboxEntry<'_>) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        // A row heads its inbox when the row before it is of another key.
        let mut previous = after.and_then(split_object).map(|(s, k, _)| (s.to_owned(), k.to_owned()));
        self.rows_after(Table::Inboxes, after, &mut |row, id| {
            let (Some((service, key, seq)), Ok(id)) = (split_object(row), std::str::from_utf8(id)) else {
                return ControlFlow::Continue(());
            };
            let head = previous.as_ref().is_none_or(|(s, k)| s != service || k != key);
            if head {
                previous = Some((service.to_owned(), key.to_owned()));
            }
            let seq = key::u64_of(seq).unwrap_or_default();
            f(row, InboxEntry { service, key, seq, id, head })
        })
    }

    /// Calls `f` with the workflow promises after the row `after`, in row
    /// order, until it breaks.
    pub fn promises_after(
        &self,
        after: Option<&[u8]>,
        mut f: impl FnMut(&[u8], PromiseEntry<'_>) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        let mut failed = None;
        self.rows_after(Table::Promises, after, &mut |row, value| {
            let Some((service, key, name)) = split_object(row) else { return ControlFlow::Continue(()) };
            let result = match decode::<Promise>(value) {
                Ok(Promise::Completed(result)) => Some(result),
                Ok(Promise::Awaited(_)) => None,
                Err(e) => {
                    failed = Some(e);
                    return ControlFlow::Break(());
                }
            };
            f(row, PromiseEntry { service, key, name: &String::from_utf8_lossy(name), result })
        })?;
        failed.map_or(Ok(()), |e| Err(e.into()))
    }

    fn rows_after(&self, table: Table, after: Option<&[u8]>, f: &mut Visit<'_>) -> Result<(), StoreError> {
        self.store.scan(table, after.map_or(Bound::Unbounded, Bound::Excluded), Bound::Unbounded, f)
    }

    /// The exclusive invocations queued for a key, head first.
    pub fn inbox(&self, service: &str, key: &str) -> Result<Vec<String>, StoreError> {
        let mut queued = Vec::new();
        scan_prefix(self.store, Table::Inboxes, &key::object(service, key), &mut |_, id| {
            queued.push(String::from_utf8_lossy(id).into_owned());
            ControlFlow::Continue(())
        })?;
        Ok(queued)
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
    /// Ids of deleted subscriptions: partitions drop their dedup entries.
    pub deleted_subscriptions: BTreeSet<String>,
    /// Kafka clusters registered at runtime, by name.
    pub kafka_clusters: BTreeMap<String, KafkaCluster>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisteredService {
    pub def: ServiceDef,
    pub deployment_id: String,
    pub revision: u32,
    pub config: ServiceConfig,
}

/// What an invocation of a handler is, as the registered services say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    pub service_ty: ServiceType,
    pub handler_ty: HandlerType,
    pub retention: Retention,
    /// Whether the HTTP ingress may call it.
    pub public: bool,
}

impl MetadataState {
    /// The kinds of `service`'s `handler` and the retention of an
    /// invocation of it (`defaults` overridden by the service and the
    /// handler); an error with an HTTP status if there is no such handler.
    pub fn resolve(
        &self,
        service: &str,
        handler: &str,
        defaults: RetentionPolicy,
        idempotent: bool,
    ) -> Result<Resolved, (u16, String)> {
        let registered = self.services.get(service).ok_or_else(|| (404, format!("service {service} not found")))?;
        let def = registered
            .def
            .handler(handler)
            .ok_or_else(|| (404, format!("service {service} has no handler {handler}")))?;
        Ok(Resolved {
            service_ty: registered.def.ty,
            handler_ty: def.ty,
            retention: registered.def.retention(def, defaults, &registered.config, idempotent),
            public: registered.config.is_public(),
        })
    }

    fn apply(&mut self, command: MetadataCommand) -> MetadataResponse {
        let response = match command {
            MetadataCommand::PutDeployment(deployment) => {
                // Re-registering a deployment replaces it: services it no longer
                // serves go away, the others get a new revision.
                // What an operator set goes too, as in Restate: the manifest rules.
                for def in &deployment.services {
                    let revision = self.services.get(&def.name).map_or(1, |s| s.revision + 1);
                    let registered = RegisteredService {
                        def: def.clone(),
                        deployment_id: deployment.id.clone(),
                        revision,
                        config: ServiceConfig::default(),
                    };
                    self.services.insert(def.name.clone(), registered);
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
                self.deleted_subscriptions.insert(id);
                MetadataResponse::Done
            }
            MetadataCommand::PauseSubscription { id, paused } => match self.subscriptions.get_mut(&id) {
                Some(subscription) if subscription.draining && !paused => {
                    MetadataResponse::Conflict(format!("subscription {id} is being deleted"))
                }
                Some(subscription) => {
                    subscription.paused = paused;
                    MetadataResponse::Done
                }
                None => MetadataResponse::NotFound,
            },
            MetadataCommand::DrainSubscription { id } => match self.subscriptions.get_mut(&id) {
                Some(subscription) => {
                    subscription.draining = true;
                    MetadataResponse::Done
                }
                None => MetadataResponse::NotFound,
            },
            MetadataCommand::ConfigureService { name, config } => {
                let Some(service) = self.services.get_mut(&name) else {
                    return MetadataResponse::NotFound;
                };
                service.config = config;
                MetadataResponse::Done
            }
            MetadataCommand::PutKafkaCluster { mut cluster, create } => {
                match (self.kafka_clusters.get(&cluster.name), create) {
                    (Some(_), true) => {
                        return MetadataResponse::Conflict(format!("Kafka cluster {} exists", cluster.name))
                    }
                    (None, false) => return MetadataResponse::NotFound,
                    (Some(existing), false) => cluster.created_at_ms = existing.created_at_ms,
                    (None, true) => {}
                }
                self.kafka_clusters.insert(cluster.name.clone(), cluster);
                MetadataResponse::Done
            }
            MetadataCommand::RemoveKafkaCluster { name, force } => {
                if !self.kafka_clusters.contains_key(&name) {
                    return MetadataResponse::NotFound;
                }
                let readers: Vec<&str> =
                    self.subscriptions.values().filter(|s| s.cluster == name).map(|s| s.id.as_str()).collect();
                if !force && !readers.is_empty() {
                    return MetadataResponse::Conflict(format!(
                        "Kafka cluster {name} is used by subscriptions {}; delete them first, or pass force=true",
                        readers.join(", ")
                    ));
                }
                self.kafka_clusters.remove(&name);
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
    use crate::wire::v1::{KafkaSource, KafkaTopic};
    use std::sync::Arc;
    use std::time::Duration;

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
                ordered: false,
                dead_letter: None,
            }),
            dedup: dedup.map(|(producer, seq)| Dedup { producer, seq }),
            created_at_ms: 10,
            failure: None,
            not_before_ms: None,
            trace: None,
            retention: Retention::FOREVER,
            reply: None,
            idempotency_key: None,
        }
    }

    fn apply(state: &mut GroupState, batch: Vec<Invoke>) -> Response {
        let response = state.apply(Command::Invoke(batch.into()));
        assert_counts_match(state);
        response
    }

    /// The kept per-status counts equal a count of the invocations.
    fn assert_counts_match(state: &GroupState) {
        let mut counted = [0; Status::ALL.len()];
        for inv in view(state).invocations() {
            counted[inv.status.index()] += 1;
        }
        assert_eq!(view(state).status_counts(), counted);
    }

    /// Reads of a state in memory, which cannot fail.
    struct View<'a>(PartitionRead<'a, dyn StoreRead<Table> + 'a>);

    fn view(state: &GroupState) -> View<'_> {
        View(state.partition())
    }

    impl View<'_> {
        fn invocation(&self, id: &str) -> Option<Invocation> {
            self.0.invocation(id).unwrap()
        }

        fn invocations(&self) -> Vec<Invocation> {
            let mut all = Vec::new();
            self.0
                .invocations_after(None, |inv| {
                    all.push(inv);
                    ControlFlow::Continue(())
                })
                .unwrap();
            all
        }

        fn invocation_count(&self) -> u64 {
            self.0.invocation_count().unwrap()
        }

        fn status_counts(&self) -> [u64; Status::ALL.len()] {
            self.0.status_counts().unwrap()
        }

        fn last_seq(&self, producer: u64) -> Option<u64> {
            self.0.last_seq(producer).unwrap()
        }

        fn inbox(&self, service: &str, key: &str) -> Vec<String> {
            self.0.inbox(service, key).unwrap()
        }

        fn next_expiry(&self) -> Option<u64> {
            self.0.next_expiry().unwrap()
        }

        fn expiries_due(&self, now: u64, max: usize) -> usize {
            self.0.expiries_due(now, max).unwrap()
        }

        fn result_of(&self, id: &str) -> Option<Option<Completion>> {
            self.0.result_of(id).unwrap()
        }

        fn subscriptions_with_dedup(&self) -> Vec<String> {
            self.0.subscriptions_with_dedup().unwrap()
        }

        fn object_state(&self, service: &str, key: &str) -> Option<BTreeMap<Bytes, Bytes>> {
            Some(self.0.object_state(service, key).unwrap()).filter(|state| !state.is_empty())
        }

        fn timers(&self) -> Vec<(u64, String)> {
            let mut timers = Vec::new();
            self.0
                .timers(|at, id| {
                    timers.push((at, id.to_owned()));
                    ControlFlow::Continue(())
                })
                .unwrap();
            timers
        }

        fn runnable(&self) -> Vec<String> {
            let mut ids = Vec::new();
            self.0
                .runnable_ids(|id| {
                    ids.push(id.to_owned());
                    ControlFlow::Continue(())
                })
                .unwrap();
            ids
        }
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
        assert_eq!(view(&state).last_seq(7), Some(5));
        assert_eq!(view(&state).last_seq(8), Some(0));
        assert!(view(&state).invocation("inv_c").is_none());
        assert_eq!(view(&state).invocation_count(), 3);
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
        let p = view(&state);
        assert_eq!(p.inbox("Counter", "k"), vec!["inv_1", "inv_3"]);
        assert_eq!(p.inbox("Counter", "j"), vec!["inv_2"]);
        assert_eq!(p.invocation("inv_1").unwrap().status, Status::Ready);
        assert_eq!(p.invocation("inv_2").unwrap().status, Status::Ready);
        assert_eq!(p.invocation("inv_3").unwrap().status, Status::Pending);
        // Shared handlers never queue.
        assert_eq!(p.invocation("inv_4").unwrap().status, Status::Ready);
    }

    #[test]
    fn a_subscriptions_open_invocations_are_counted_until_they_complete() {
        let mut state = GroupState::default();
        let mut failed = invoke("inv_3", None, HandlerType::Shared, Some((1, 3)));
        failed.failure = Some((400, "undeliverable".to_owned()));
        apply(
            &mut state,
            vec![
                invoke("inv_1", Some("k"), HandlerType::Exclusive, Some((1, 1))),
                invoke("inv_2", Some("k"), HandlerType::Exclusive, Some((1, 2))),
                failed,
            ],
        );
        let open = |state: &GroupState| view(state).0.open_invocations("sub_1").unwrap();
        assert_eq!(open(&state), 2, "created failed, the third is not open");
        state.apply(Command::Effects { at_ms: 20, effects: vec![Effect::Kill { id: "inv_1".to_owned() }] });
        assert_eq!(open(&state), 1);
        state.apply(Command::Effects { at_ms: 21, effects: vec![Effect::Kill { id: "inv_2".to_owned() }] });
        assert_eq!(open(&state), 0);
        assert_eq!(view(&state).0.open_invocations("sub_2").unwrap(), 0);
    }

    #[test]
    fn ordered_records_run_one_at_a_time_per_kafka_partition() {
        let ordered = |id: &str, partition: i32, offset: u64| {
            let mut invoke = invoke(id, None, HandlerType::Shared, Some((7 + partition as u64, offset)));
            if let Source::Kafka(kafka) = &mut invoke.source {
                (kafka.ordered, kafka.partition) = (true, partition);
            }
            invoke
        };
        let mut state = GroupState::default();
        apply(
            &mut state,
            vec![ordered("inv_1", 0, 1), ordered("inv_2", 0, 2), ordered("inv_3", 1, 1), ordered("inv_4", 0, 3)],
        );
        let status = |state: &GroupState, id: &str| view(state).invocation(id).unwrap().status;
        assert_eq!(
            ["inv_1", "inv_2", "inv_3", "inv_4"].map(|id| status(&state, id)),
            [Status::Ready, Status::Pending, Status::Ready, Status::Pending]
        );
        assert_eq!(view(&state).inbox(ORDERED_PARTITIONS, "sub_1/t/0"), vec!["inv_1", "inv_2", "inv_4"]);
        // The next record of partition 0 runs once the one before it is done.
        state.apply(Command::Effects { at_ms: 20, effects: vec![Effect::Kill { id: "inv_1".to_owned() }] });
        assert_eq!(status(&state, "inv_2"), Status::Ready);
        assert_eq!(status(&state, "inv_4"), Status::Pending);
        // Records of an unordered subscription never queue.
        apply(&mut state, vec![invoke("inv_5", None, HandlerType::Shared, Some((9, 1)))]);
        assert_eq!(status(&state, "inv_5"), Status::Ready);
    }

    #[test]
    fn scans_of_inboxes_and_state_resume_after_any_row() {
        let mut state = GroupState::default();
        apply(
            &mut state,
            vec![
                invoke("inv_1", Some("k"), HandlerType::Exclusive, None),
                invoke("inv_2", Some("j"), HandlerType::Exclusive, None),
                invoke("inv_3", Some("k"), HandlerType::Exclusive, None),
                invoke("inv_5", Some("k"), HandlerType::Exclusive, None),
            ],
        );
        for (key, name, value) in [("k", "a", "1"), ("k", "b", "2"), ("j", "a", "3")] {
            let row = [key::object("Counter", key), name.as_bytes().to_vec()].concat();
            state.tables_mut().put(Table::Objects, &row, value.as_bytes()).unwrap();
        }
        // One row per call, each call resuming after the row before.
        let mut inbox = Vec::new();
        let mut cursor: Option<Vec<u8>> = None;
        loop {
            let mut read = None;
            state
                .partition()
                .inboxes_after(cursor.as_deref(), |row, entry| {
                    read = Some((row.to_vec(), (entry.key.to_owned(), entry.id.to_owned(), entry.head)));
                    ControlFlow::Break(())
                })
                .unwrap();
            let Some((row, entry)) = read else { break };
            inbox.push(entry);
            cursor = Some(row);
        }
        let expected = [("j", "inv_2", true), ("k", "inv_1", true), ("k", "inv_3", false), ("k", "inv_5", false)];
        assert_eq!(inbox, expected.map(|(k, id, head)| (k.to_owned(), id.to_owned(), head)));

        let mut entries = Vec::new();
        let mut cursor: Option<Vec<u8>> = None;
        loop {
            let mut read = None;
            state
                .partition()
                .state_after(cursor.as_deref(), |row, e| {
                    read =
                        Some((row.to_vec(), format!("{}/{}/{}={}", e.service, e.key, ascii(e.name), ascii(e.value))));
                    ControlFlow::Break(())
                })
                .unwrap();
            let Some((row, entry)) = read else { break };
            entries.push(entry);
            cursor = Some(row);
        }
        assert_eq!(entries, ["Counter/j/a=3", "Counter/k/a=1", "Counter/k/b=2"]);
    }

    #[test]
    fn state_edits_check_the_version_and_wait_for_the_key() {
        // Restate's own test vectors.
        let version = |entries: &[(&str, &str)]| {
            let state = entries.iter().map(|(k, v)| (Bytes::from(k.to_string()), Bytes::from(v.to_string()))).collect();
            state_version(&state)
        };
        assert_eq!(version(&[]), "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU");
        assert_eq!(version(&[("name", "bob")]), "tDqA04Lj3_qJ-PgNPTecXDGZgpwy6jm2Ni2BYqJIthM");
        assert_eq!(version(&[("b", "bbb"), ("a", "aaa")]), "RVM17P6x18Wp-JnzQ01BzmqCvhAunTOQI_az6Px3Zyk");
        assert_eq!(version(&[("count", "42")]), "c3mP9LOZwAnBc5yV0kY-6ZMFceRVkt4bU2-CptjrHtg");

        let mut state = GroupState::default();
        apply(&mut state, vec![invoke("inv_1", Some("k"), HandlerType::Exclusive, None)]);
        let set = |key: &str, version: Option<String>, count: &str| {
            let entry = (Bytes::from_static(b"count"), Bytes::from(count.to_owned()));
            Command::SetState(SetState { service: "Counter".into(), key: key.into(), version, state: vec![entry] })
        };
        let refused = |response: Response| matches!(response, Response::StateSet(Outcome::NotAllowed(_)));
        assert!(refused(state.apply(set("k", None, "1"))), "inv_1 holds k");
        assert_eq!(state.apply(set("j", Some(version(&[])), "1")), Response::StateSet(Outcome::Applied));
        assert!(refused(state.apply(set("j", Some(version(&[])), "2"))), "the state changed meanwhile");
        assert_eq!(state.apply(set("j", Some(version(&[("count", "1")])), "2")), Response::StateSet(Outcome::Applied));
        assert_eq!(state.apply(set("j", None, "3")), Response::StateSet(Outcome::Applied), "no version: always");
        let current = state.partition().object_state("Counter", "j").unwrap();
        assert_eq!(current, BTreeMap::from([(Bytes::from_static(b"count"), Bytes::from_static(b"3"))]));
        let cleared =
            Command::SetState(SetState { service: "Counter".into(), key: "j".into(), version: None, state: vec![] });
        assert_eq!(state.apply(cleared), Response::StateSet(Outcome::Applied));
        assert!(state.partition().object_state("Counter", "j").unwrap().is_empty());
    }

    fn ascii(bytes: &[u8]) -> &str {
        std::str::from_utf8(bytes).unwrap()
    }

    #[test]
    fn undeliverable_records_complete_failed_without_holding_the_key() {
        let mut state = GroupState::default();
        let mut bad = invoke("inv_1", Some("k"), HandlerType::Exclusive, Some((1, 0)));
        bad.failure = Some((400, "handler Counter/add is gone".to_owned()));
        apply(&mut state, vec![bad, invoke("inv_2", Some("k"), HandlerType::Exclusive, Some((1, 1)))]);
        let p = view(&state);
        let failed = p.invocation("inv_1").unwrap();
        assert_eq!(failed.status, Status::Completed);
        assert!(matches!(&failed.completion, Some(Completion::Failure { message, .. }) if message.contains("gone")));
        assert_eq!(p.invocation("inv_2").unwrap().status, Status::Ready);
        assert_eq!(p.inbox("Counter", "k"), vec!["inv_2"]);
    }

    /// A record whose invocation ends failed, however it ends, goes to its
    /// subscription's dead-letter topic through the egress, once, with why
    /// and where from; one that succeeds does not. Truncation drops rows up
    /// to a sequence number and only moves positions forward.
    #[test]
    fn failed_records_with_a_dead_letter_topic_go_to_the_egress_once() {
        let mut state = GroupState::default();
        let with_dead_letter = |mut invoke: Invoke| {
            let Source::Kafka(kafka) = &mut invoke.source else { unreachable!() };
            kafka.dead_letter = Some(KafkaTopic { cluster: "c".to_owned(), topic: "dlq".to_owned() });
            kafka.key = Some(Bytes::from_static(b"k"));
            invoke
        };
        let mut undeliverable = with_dead_letter(invoke("inv_1", None, HandlerType::Exclusive, Some((1, 0))));
        undeliverable.failure = Some((400, "record has no key".to_owned()));
        apply(
            &mut state,
            vec![
                undeliverable,
                with_dead_letter(invoke("inv_2", None, HandlerType::Exclusive, Some((1, 1)))),
                with_dead_letter(invoke("inv_3", None, HandlerType::Exclusive, Some((1, 2)))),
                invoke("inv_4", None, HandlerType::Exclusive, Some((1, 3))),
            ],
        );
        // Runs: inv_2 0, inv_3 1, inv_4 2.
        run_to_completion(&mut state, "inv_2", 0, 100);
        let failed = |id: &str, run| Effect::Failed {
            id: id.to_owned(),
            attempt: at(run, 0),
            message: "boom".to_owned(),
            retry_at_ms: None,
            pause: false,
        };
        assert_eq!(effect(&mut state, 110, failed("inv_3", 1)), Outcome::Applied);
        assert_eq!(effect(&mut state, 120, failed("inv_4", 2)), Outcome::Applied, "no dead-letter topic");
        assert_eq!(effect(&mut state, 130, failed("inv_3", 1)), Outcome::Stale, "completed already");

        let rows = state.partition().egress(10, usize::MAX).unwrap();
        assert_eq!(rows.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(state.partition().egress_pending().unwrap(), 2);
        let header = |record: &KafkaRecord, name: &str| {
            record.headers.iter().find(|(k, _)| k == name).map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        let (_, first) = &rows[0];
        assert_eq!((first.cluster.as_str(), first.topic.as_str()), ("c", "dlq"));
        assert_eq!((first.key.as_deref(), &first.value[..]), (Some(&b"k"[..]), &b"1"[..]));
        assert_eq!(header(first, "kafka.offset").as_deref(), Some("0"), "the record's own headers");
        assert_eq!(header(first, DEAD_LETTER_HEADERS[0]).as_deref(), Some("record has no key"));
        assert_eq!(header(first, DEAD_LETTER_HEADERS[1]).as_deref(), Some("400"));
        assert_eq!(header(first, DEAD_LETTER_HEADERS[5]).as_deref(), Some("0"));
        assert_eq!(header(first, DEAD_LETTER_HEADERS[6]).as_deref(), Some("inv_1"));
        let (_, second) = &rows[1];
        assert_eq!(header(second, DEAD_LETTER_HEADERS[0]).as_deref(), Some("boom"));
        assert_eq!(header(second, DEAD_LETTER_HEADERS[5]).as_deref(), Some("2"));

        let position =
            |partition, offset| EgressPosition { cluster: "c".to_owned(), topic: "dlq".to_owned(), partition, offset };
        let truncate = |upto, positions| Command::TruncateEgress { upto, positions };
        assert_eq!(state.apply(truncate(None, vec![position(0, 5), position(1, 0)])), Response::Truncated { rows: 0 });
        assert_eq!(
            state.apply(truncate(Some(0), vec![position(0, 3), position(1, 7)])),
            Response::Truncated { rows: 1 }
        );
        assert_eq!(state.partition().egress_positions().unwrap(), vec![position(0, 5), position(1, 7)]);
        assert_eq!(state.partition().egress_pending().unwrap(), 1);
        assert_eq!(state.apply(truncate(Some(1), vec![])), Response::Truncated { rows: 1 });
        assert_eq!(state.partition().egress_pending().unwrap(), 0);
        assert!(state.partition().egress(10, usize::MAX).unwrap().is_empty());
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
        assert_eq!(view(&a).invocations(), view(&b).invocations());
        assert_eq!(a.digest(), b.digest());
    }

    #[test]
    fn digest_ignores_map_order_and_sees_every_change() {
        let keys = || {
            let mut state = GroupState::default();
            for n in 0..64u64 {
                let key = format!("k{n}");
                apply(&mut state, vec![invoke(&format!("inv_{n}"), Some(&key), HandlerType::Exclusive, Some((1, n)))]);
            }
            state
        };
        let (mut a, mut b) = (keys(), keys());
        assert_eq!(a.digest(), b.digest());
        // The same entries inserted in opposite orders.
        let dedup = |state: &mut GroupState, producer: u64, seq: u64| {
            state.tables_mut().put(Table::Dedup, &producer.to_be_bytes(), &seq.to_be_bytes()).unwrap()
        };
        for n in 0..100 {
            dedup(&mut a, 1000 + n, n);
            dedup(&mut b, 1000 + 99 - n, 99 - n);
        }
        assert_eq!(a.digest(), b.digest());
        dedup(&mut b, 7, 0);
        assert_ne!(a.digest(), b.digest(), "the dedup table is part of the state");
        let mut c = keys();
        let row = [key::object("Counter", "k1"), b"n".to_vec()].concat();
        c.tables_mut().put(Table::Objects, &row, b"1").unwrap();
        assert_ne!(keys().digest(), c.digest(), "object state is part of the state");
        let mut d = keys();
        d.metadata.version += 1;
        assert_ne!(keys().digest(), d.digest(), "metadata is part of the state");
    }

    fn effect(state: &mut GroupState, at_ms: u64, effect: Effect) -> Outcome {
        let outcome = match state.apply(Command::Effects { at_ms, effects: vec![effect] }) {
            Response::Effects(mut outcomes) => outcomes.remove(0),
            other => panic!("unexpected response {other:?}"),
        };
        assert_counts_match(state);
        outcome
    }

    fn entry(ty: u16, body: &'static [u8]) -> JournalEntry {
        JournalEntry { ty, body: Bytes::from_static(body) }
    }

    fn set(key: &'static [u8], value: &'static [u8]) -> StateOp {
        StateOp::Set { key: Bytes::from_static(key), value: Bytes::from_static(value) }
    }

    /// The attempt of run `run` that started from journal length `base`.
    fn at(run: u64, base: u32) -> AttemptId {
        AttemptId { run, base }
    }

    fn complete(id: &str, attempt: AttemptId, state: Vec<StateOp>) -> Effect {
        Effect::Complete {
            id: id.to_owned(),
            attempt,
            state,
            result: Completion::Success(Bytes::new()),
            sends: vec![],
            promises: vec![],
        }
    }

    fn runnable(state: &GroupState) -> Vec<String> {
        view(state).runnable()
    }

    fn expire(state: &mut GroupState, at_ms: u64, max: u32) -> (u32, u32) {
        let response = state.apply(Command::Expire { at_ms, max });
        assert_counts_match(state);
        match response {
            Response::Expired { invocations, journals } => (invocations, journals),
            other => panic!("unexpected response {other:?}"),
        }
    }

    /// `id`, a Kafka record from producer 1 at offset `seq`, kept as `retention` says.
    fn retained(id: &str, seq: u64, retention: Retention) -> Invoke {
        Invoke { retention, ..invoke(id, None, HandlerType::Shared, Some((1, seq))) }
    }

    /// Runs `id` (just created, runnable as run `run`) to completion at
    /// `at_ms`, with a journal of two entries.
    fn run_to_completion(state: &mut GroupState, id: &str, run: u64, at_ms: u64) {
        let progress = Effect::Progress {
            id: id.to_owned(),
            attempt: at(run, 0),
            entries: vec![entry(0x0411, b"run"), entry(0x8011, b"done")],
            state: vec![],
            sleeps: vec![],
            run_now: true,
            sends: vec![],
            awaits_signal: false,
            promises: vec![],
            arrived: 0,
        };
        assert_eq!(effect(state, at_ms - 1, progress), Outcome::Applied);
        let result = Completion::Success(Bytes::from_static(b"out"));
        let done = Effect::Complete {
            id: id.to_owned(),
            attempt: at(run, 2),
            state: vec![],
            result,
            sends: vec![],
            promises: vec![],
        };
        assert_eq!(effect(state, at_ms, done), Outcome::Applied);
    }

    /// The journal goes at its retention, the invocation at its result's;
    /// the clock is the one the commands carry. Once removed, its record is
    /// still deduplicated.
    #[test]
    fn retention_drops_the_journal_then_the_invocation_at_their_times() {
        let mut state = GroupState::default();
        apply(&mut state, vec![retained("inv_1", 0, Retention { journal_ms: 100, completion_ms: 1_000 })]);
        run_to_completion(&mut state, "inv_1", 0, 50);
        let p = view(&state);
        assert_eq!(p.invocation("inv_1").unwrap().journal.len(), 2, "kept after completion");
        assert_eq!(p.next_expiry(), Some(150));

        assert_eq!(expire(&mut state, 149, 100), (0, 0));
        assert_eq!(expire(&mut state, 150, 100), (0, 1));
        let inv = view(&state).invocation("inv_1").unwrap();
        assert!(inv.journal.is_empty() && inv.completion.is_some());
        assert_eq!(view(&state).next_expiry(), Some(1_050));
        assert_eq!(expire(&mut state, 1_049, 100), (0, 0));
        assert_eq!(expire(&mut state, 1_050, 100), (1, 0));
        let p = view(&state);
        assert!(p.invocation("inv_1").is_none() && p.next_expiry().is_none());
        assert_eq!(p.result_of("inv_1"), None, "its result went with it");

        // Kafka delivers the record again: still a duplicate.
        let again = apply(&mut state, vec![retained("inv_1", 0, Retention { journal_ms: 100, completion_ms: 1_000 })]);
        assert_eq!(again, Response::Invoked { created: 0, deduplicated: 1 });
        assert!(view(&state).invocation("inv_1").is_none());
    }

    #[test]
    fn a_deleted_subscriptions_dedup_entries_go_and_its_late_records_are_dropped() {
        let mut state = GroupState::default();
        let mut other = invoke("inv_2", None, HandlerType::Shared, Some((2, 0)));
        let Source::Kafka(kafka) = &mut other.source else { unreachable!() };
        kafka.subscription = "sub_2".to_owned();
        apply(&mut state, vec![invoke("inv_1", None, HandlerType::Shared, Some((1, 0))), other.clone()]);
        let p = view(&state);
        assert_eq!(p.subscriptions_with_dedup(), vec!["sub_1", "sub_2"]);

        let forgotten = state.apply(Command::ForgetSubscription { id: "sub_1".to_owned() });
        assert_eq!(forgotten, Response::Forgotten { producers: 1 });
        let p = view(&state);
        assert_eq!((p.last_seq(1), p.last_seq(2)), (None, Some(0)));
        assert_eq!(p.subscriptions_with_dedup(), vec!["sub_2"]);
        // A record of the deleted subscription still on its way is dropped;
        // the other subscription is deduplicated as before.
        let late = apply(&mut state, vec![invoke("inv_3", None, HandlerType::Shared, Some((1, 1))), other]);
        assert_eq!(late, Response::Invoked { created: 0, deduplicated: 2 });
        assert!(view(&state).invocation("inv_3").is_none());
    }

    #[test]
    fn with_retention_zero_a_completed_invocation_is_removed_at_once() {
        let mut state = GroupState::default();
        let zero = Retention { journal_ms: 0, completion_ms: 0 };
        apply(&mut state, vec![retained("inv_1", 0, zero)]);
        run_to_completion(&mut state, "inv_1", 0, 50);
        let p = view(&state);
        assert!(p.invocation("inv_1").is_none() && p.next_expiry().is_none());
        assert_eq!(p.invocation_count(), 0);
        assert!(p.result_of("inv_1").is_some_and(|r| r.is_some()));
        // An undeliverable record completes as it is created: removed too.
        let mut bad = retained("inv_2", 1, zero);
        bad.failure = Some((400, "no such handler".to_owned()));
        apply(&mut state, vec![bad]);
        assert_eq!(view(&state).invocation_count(), 0);
        // Kept for ever: nothing ever expires.
        apply(&mut state, vec![retained("inv_3", 2, Retention::FOREVER)]);
        run_to_completion(&mut state, "inv_3", 1, 60);
        assert!(view(&state).next_expiry().is_none());
        assert_eq!(expire(&mut state, u64::MAX, 100), (0, 0));
        assert_eq!(view(&state).invocation("inv_3").unwrap().journal.len(), 2);
    }

    #[test]
    fn expiry_takes_at_most_its_bound_earliest_first_and_purge_journal_drops_a_journal() {
        let mut state = GroupState::default();
        let short = Retention { journal_ms: 10, completion_ms: 10 };
        for (n, id) in ["inv_1", "inv_2", "inv_3"].into_iter().enumerate() {
            apply(&mut state, vec![retained(id, n as u64, short)]);
            run_to_completion(&mut state, id, n as u64, 100 + n as u64);
        }
        assert_eq!(view(&state).expiries_due(1_000, 10), 3);
        assert_eq!(expire(&mut state, 1_000, 2), (2, 0));
        assert!(view(&state).invocation("inv_3").is_some(), "the latest is left for the next command");
        assert_eq!(expire(&mut state, 1_000, 2), (1, 0));

        apply(&mut state, vec![retained("inv_4", 9, Retention { journal_ms: 500, completion_ms: 500 })]);
        let purge = Effect::PurgeJournal { id: "inv_4".to_owned() };
        assert!(matches!(effect(&mut state, 200, purge.clone()), Outcome::NotAllowed(_)), "still running");
        run_to_completion(&mut state, "inv_4", 3, 300);
        assert_eq!(effect(&mut state, 301, purge), Outcome::Applied);
        let inv = view(&state).invocation("inv_4").unwrap();
        assert!(inv.journal.is_empty() && inv.completion.is_some());
        assert_eq!(view(&state).next_expiry(), Some(800));
    }

    /// A streaming attempt's checkpoint keeps its entries, applies its state
    /// changes and leaves it running, its base the longer journal; a repeat of the
    /// checkpoint and anything from the old base are stale.
    #[test]
    fn a_checkpoint_keeps_the_attempt_running_from_the_longer_journal() {
        let mut state = GroupState::default();
        apply(&mut state, vec![invoke("inv_1", Some("k"), HandlerType::Exclusive, None)]);
        let checkpoint = Effect::Checkpoint {
            id: "inv_1".to_owned(),
            attempt: at(0, 0),
            entries: vec![entry(0x0403, b"set"), entry(0x0411, b"run"), entry(0x8011, b"done")],
            state: vec![set(b"a", b"1")],
            sends: vec![],
            arrived: 0,
        };
        assert_eq!(effect(&mut state, 20, checkpoint.clone()), Outcome::Applied);
        assert_eq!(effect(&mut state, 21, checkpoint), Outcome::Stale);
        let inv = view(&state).invocation("inv_1").unwrap();
        assert_eq!((inv.status, inv.attempt(), inv.journal.len()), (Status::Ready, Some(at(0, 3)), 3));
        let values = view(&state).object_state("Counter", "k").unwrap();
        assert_eq!(values.get(&b"a"[..]).map(|v| &v[..]), Some(&b"1"[..]), "visible as the journal takes it");
        assert_eq!(effect(&mut state, 22, complete("inv_1", at(0, 0), vec![])), Outcome::Stale);
        assert_eq!(effect(&mut state, 23, complete("inv_1", at(0, 3), vec![set(b"b", b"2")])), Outcome::Applied);
        let values = view(&state).object_state("Counter", "k").unwrap();
        assert_eq!(values.len(), 2);
    }

    /// What arrives while a streaming attempt runs waits beside the journal,
    /// and wakes whoever watches the invocation. The handler is told it at
    /// once; the attempt's next checkpoint (or its end) puts what it was told
    /// in the journal before the entries it sent after, and the attempt goes
    /// on from there. An effect cannot take more than arrived.
    #[tokio::test]
    async fn what_arrived_joins_the_journal_before_what_the_handler_sent_after() {
        let mut state = GroupState::default();
        apply(&mut state, vec![invoke("inv_1", None, HandlerType::Shared, None)]);
        let watch = state.watch("inv_1");
        let woken = || async { tokio::time::timeout(Duration::from_millis(20), watch.changed()).await.is_ok() };
        let result = |body: &'static [u8]| Notification {
            id: "inv_1".to_owned(),
            notice: Notice::CallResult,
            entry: entry(0x800D, body),
            dedup: None,
        };
        state.apply(Command::Notify { at_ms: 0, notifications: vec![result(b"r1"), result(b"r2")] });
        assert!(woken().await, "an arrival wakes the watch");
        let inv = view(&state).invocation("inv_1").unwrap();
        assert_eq!((inv.arrived().len(), inv.attempt()), (2, Some(at(0, 0))), "the attempt stays current");
        let checkpoint = |attempt, arrived| Effect::Checkpoint {
            id: "inv_1".to_owned(),
            attempt,
            entries: vec![entry(0x0411, b"run"), entry(0x8011, b"done")],
            state: vec![],
            sends: vec![],
            arrived,
        };
        assert_eq!(effect(&mut state, 10, checkpoint(at(0, 0), 3)), Outcome::Stale, "more than arrived");
        assert_eq!(effect(&mut state, 11, checkpoint(at(0, 0), 1)), Outcome::Applied);
        let journal = |state: &GroupState| -> Vec<Bytes> {
            view(state).invocation("inv_1").unwrap().journal.iter().map(|e| e.body.clone()).collect()
        };
        assert_eq!(journal(&state), [&b"r1"[..], b"run", b"done"]);
        let inv = view(&state).invocation("inv_1").unwrap();
        assert_eq!((inv.arrived().len(), inv.attempt()), (1, Some(at(0, 3))));
        assert!(!woken().await, "a checkpoint is no news for the watcher");

        // The handler was told r2 and r3, then suspended after one more entry.
        state.apply(Command::Notify { at_ms: 0, notifications: vec![result(b"r3"), result(b"r4")] });
        assert!(woken().await);
        let progress = Effect::Progress {
            id: "inv_1".to_owned(),
            attempt: at(0, 3),
            entries: vec![entry(0x0411, b"after")],
            state: vec![],
            sleeps: vec![],
            run_now: false,
            sends: vec![],
            awaits_signal: true,
            promises: vec![],
            arrived: 2,
        };
        assert_eq!(effect(&mut state, 12, progress), Outcome::Applied);
        assert_eq!(journal(&state)[3..], [&b"r2"[..], b"r3", b"after", b"r4"], "r4 came unseen: it goes last");
        let inv = view(&state).invocation("inv_1").unwrap();
        assert_eq!(inv.status, Status::Ready, "runs again for what it did not see");
        let run = inv.attempt().unwrap();
        assert_eq!(effect(&mut state, 13, complete("inv_1", run, vec![])), Outcome::Applied);
        assert!(woken().await, "completion wakes the watch");
    }

    #[test]
    fn completion_applies_state_and_starts_the_next_of_the_key() {
        let mut state = GroupState::default();
        apply(
            &mut state,
            vec![
                invoke("inv_1", Some("k"), HandlerType::Exclusive, None),
                invoke("inv_2", Some("k"), HandlerType::Exclusive, None),
            ],
        );
        assert_eq!(runnable(&state), vec!["inv_1"]);
        // A suspension keeps its entries; its state changes apply as they
        // are journaled, so a shared handler sees them.
        let progress = Effect::Progress {
            id: "inv_1".to_owned(),
            attempt: at(0, 0),
            entries: vec![entry(0x0403, b"set"), entry(0x0411, b"run"), entry(0x8011, b"done")],
            state: vec![set(b"a", b"1")],
            sleeps: vec![],
            run_now: true,
            sends: vec![],
            awaits_signal: false,
            promises: vec![],
            arrived: 0,
        };
        assert_eq!(effect(&mut state, 20, progress.clone()), Outcome::Applied);
        assert_eq!(effect(&mut state, 21, progress), Outcome::Stale);
        assert_eq!(view(&state).object_state("Counter", "k").map(|s| s.len()), Some(1));
        assert_eq!(view(&state).invocation("inv_1").unwrap().journal.len(), 3);
        // A completion from an attempt that started before the suspension is stale.
        assert_eq!(effect(&mut state, 22, complete("inv_1", at(0, 0), vec![])), Outcome::Stale);
        assert_eq!(effect(&mut state, 23, complete("inv_1", at(0, 3), vec![set(b"b", b"2")])), Outcome::Applied);
        let values = view(&state).object_state("Counter", "k").unwrap();
        assert_eq!(values.get(&b"a"[..]).map(|v| &v[..]), Some(&b"1"[..]));
        assert_eq!(values.get(&b"b"[..]).map(|v| &v[..]), Some(&b"2"[..]));
        // The journal stays for its retention (here for ever).
        let done = view(&state).invocation("inv_1").unwrap();
        assert_eq!((done.status, done.journal.len(), done.modified_at_ms), (Status::Completed, 3, 23));
        assert_eq!(runnable(&state), vec!["inv_2"]);
        assert_eq!(view(&state).inbox("Counter", "k"), vec!["inv_2"]);
        assert_eq!(effect(&mut state, 24, complete("inv_1", at(0, 0), vec![])), Outcome::Stale);
        assert_eq!(view(&state).invocation("inv_1").unwrap().modified_at_ms, 23, "a stale effect changes nothing");
    }

    #[test]
    fn failed_attempts_back_off_then_fail_or_pause() {
        let mut state = GroupState::default();
        apply(
            &mut state,
            vec![
                invoke("inv_1", Some("k"), HandlerType::Exclusive, None),
                invoke("inv_2", Some("k"), HandlerType::Exclusive, None),
                invoke("inv_3", Some("j"), HandlerType::Exclusive, None),
            ],
        );
        // inv_1 runs as run 0, inv_3 as run 1; each wake or resume is a new run.
        let failed = |run, retry_at_ms, pause| Effect::Failed {
            id: "inv_1".to_owned(),
            attempt: at(run, 0),
            message: "boom".to_owned(),
            retry_at_ms,
            pause,
        };
        assert_eq!(effect(&mut state, 10, failed(0, Some(500), false)), Outcome::Applied);
        let inv = view(&state).invocation("inv_1").unwrap();
        assert_eq!((inv.status, inv.attempts, inv.last_failure.as_deref()), (Status::BackingOff, 1, Some("boom")));
        // The key stays held; other keys run.
        assert_eq!(runnable(&state), vec!["inv_3"]);
        assert_eq!(view(&state).timers(), vec![(500, "inv_1".to_owned())]);
        let wake = || Effect::Wake { id: "inv_1".to_owned() };
        assert_eq!(effect(&mut state, 499, wake()), Outcome::Stale);
        assert_eq!(effect(&mut state, 500, wake()), Outcome::Applied);
        assert_eq!(runnable(&state), vec!["inv_3", "inv_1"]);
        assert!(view(&state).timers().is_empty());
        assert_eq!(effect(&mut state, 505, failed(0, None, true)), Outcome::Stale, "from the run before the backoff");
        assert_eq!(effect(&mut state, 510, failed(2, None, true)), Outcome::Applied);
        assert_eq!(view(&state).invocation("inv_1").unwrap().status, Status::Paused);
        assert_eq!(runnable(&state), vec!["inv_3"]);
        assert_eq!(effect(&mut state, 520, Effect::Resume { id: "inv_1".to_owned() }), Outcome::Applied);
        assert_eq!(effect(&mut state, 525, failed(2, None, false)), Outcome::Stale, "from the run before the pause");
        assert_eq!(effect(&mut state, 530, failed(3, None, false)), Outcome::Applied);
        let inv = view(&state).invocation("inv_1").unwrap();
        assert_eq!(inv.completion, Some(Completion::Failure { code: 500, message: "boom".to_owned() }));
        assert_eq!(runnable(&state), vec!["inv_3", "inv_2"]);

        // An operator pauses a running invocation and a backing-off one.
        let pause = |id: &str| Effect::Pause { id: id.to_owned() };
        assert_eq!(effect(&mut state, 540, pause("inv_3")), Outcome::Applied);
        assert_eq!(view(&state).invocation("inv_3").unwrap().status, Status::Paused);
        assert_eq!(runnable(&state), vec!["inv_2"]);
        assert_eq!(effect(&mut state, 541, pause("inv_3")), Outcome::Applied, "pausing again changes nothing");
        let failed_2 = Effect::Failed {
            id: "inv_2".to_owned(),
            attempt: at(4, 0),
            message: "boom".to_owned(),
            retry_at_ms: Some(900),
            pause: false,
        };
        assert_eq!(effect(&mut state, 550, failed_2), Outcome::Applied);
        assert_eq!(effect(&mut state, 560, pause("inv_2")), Outcome::Applied);
        assert!(view(&state).timers().is_empty(), "its backoff is dropped");
        assert!(runnable(&state).is_empty());
        assert!(matches!(effect(&mut state, 570, pause("inv_1")), Outcome::NotAllowed(_)), "inv_1 is completed");
        assert_eq!(effect(&mut state, 580, Effect::Resume { id: "inv_2".to_owned() }), Outcome::Applied);
        assert_eq!(runnable(&state), vec!["inv_2"]);
    }

    #[test]
    fn sleeps_suspend_until_due_and_append_their_notification() {
        let mut state = GroupState::default();
        apply(&mut state, vec![invoke("inv_1", None, HandlerType::Shared, None)]);
        let sleep = Sleep { wake_at_ms: 1_000, notification: entry(0x800C, b"woke") };
        let progress = Effect::Progress {
            id: "inv_1".to_owned(),
            attempt: at(0, 0),
            entries: vec![entry(0x040C, b"sleep")],
            state: vec![],
            sleeps: vec![sleep],
            run_now: false,
            sends: vec![],
            awaits_signal: false,
            promises: vec![],
            arrived: 0,
        };
        assert_eq!(effect(&mut state, 10, progress), Outcome::Applied);
        assert_eq!(view(&state).invocation("inv_1").unwrap().status, Status::Suspended);
        assert!(runnable(&state).is_empty());
        assert_eq!(effect(&mut state, 1_000, Effect::Wake { id: "inv_1".to_owned() }), Outcome::Applied);
        let inv = view(&state).invocation("inv_1").unwrap();
        assert_eq!(inv.journal, vec![entry(0x040C, b"sleep"), entry(0x800C, b"woke")]);
        assert!(inv.sleeps.is_empty());
        assert_eq!(runnable(&state), vec!["inv_1"]);
    }

    #[test]
    fn delayed_invocations_join_their_inbox_when_due() {
        let mut state = GroupState::default();
        let mut delayed = invoke("inv_1", Some("k"), HandlerType::Exclusive, None);
        delayed.not_before_ms = Some(100);
        apply(&mut state, vec![delayed, invoke("inv_2", Some("k"), HandlerType::Exclusive, None)]);
        assert_eq!(view(&state).invocation("inv_1").unwrap().status, Status::Scheduled);
        assert_eq!(runnable(&state), vec!["inv_2"]);
        assert_eq!(effect(&mut state, 100, Effect::Wake { id: "inv_1".to_owned() }), Outcome::Applied);
        assert_eq!(view(&state).inbox("Counter", "k"), vec!["inv_2", "inv_1"]);
        assert_eq!(view(&state).invocation("inv_1").unwrap().status, Status::Pending);
    }

    #[test]
    fn cancel_kill_and_purge() {
        let mut state = GroupState::default();
        apply(
            &mut state,
            vec![
                invoke("inv_1", Some("k"), HandlerType::Exclusive, None),
                invoke("inv_2", Some("k"), HandlerType::Exclusive, None),
                invoke("inv_3", Some("k"), HandlerType::Exclusive, None),
            ],
        );
        let signal = entry(0xFBFF, b"cancel");
        let cancel = |id: &str| Effect::Cancel { id: id.to_owned(), signal: signal.clone() };
        // A queued invocation that never started completes at once.
        assert_eq!(effect(&mut state, 1, cancel("inv_2")), Outcome::Applied);
        let inv = view(&state).invocation("inv_2").unwrap();
        assert_eq!(inv.completion, Some(Completion::Failure { code: 409, message: "canceled".to_owned() }));
        assert_eq!(view(&state).inbox("Counter", "k"), vec!["inv_1", "inv_3"]);
        // A running one is told through its journal; its current attempt becomes stale.
        assert_eq!(effect(&mut state, 2, cancel("inv_1")), Outcome::Applied);
        assert_eq!(view(&state).invocation("inv_1").unwrap().journal, vec![signal.clone()]);
        assert_eq!(effect(&mut state, 3, complete("inv_1", at(0, 0), vec![])), Outcome::Stale);
        // Kill releases the key.
        assert_eq!(effect(&mut state, 4, Effect::Kill { id: "inv_1".to_owned() }), Outcome::Applied);
        assert_eq!(runnable(&state), vec!["inv_3"]);
        assert!(matches!(effect(&mut state, 5, Effect::Kill { id: "inv_1".to_owned() }), Outcome::NotAllowed(_)));
        assert!(matches!(effect(&mut state, 6, Effect::Purge { id: "inv_3".to_owned() }), Outcome::NotAllowed(_)));
        assert_eq!(effect(&mut state, 7, Effect::Purge { id: "inv_1".to_owned() }), Outcome::Applied);
        assert_eq!(effect(&mut state, 8, Effect::Purge { id: "inv_1".to_owned() }), Outcome::NotFound);
    }

    /// Case 10: an invocation purged and created again under the same id (an
    /// idempotency key used again) starts from the same journal length as
    /// the first one did; an effect of the first one's attempt, still queued
    /// when it was purged, must not complete the second.
    #[test]
    fn case10_an_effect_of_a_purged_invocation_never_completes_its_successor() {
        let mut state = GroupState::default();
        apply(&mut state, vec![invoke("inv_1", None, HandlerType::Shared, None)]);
        let first = view(&state).invocation("inv_1").unwrap().attempt().unwrap();
        assert_eq!(effect(&mut state, 1, Effect::Kill { id: "inv_1".to_owned() }), Outcome::Applied);
        assert_eq!(effect(&mut state, 2, Effect::Purge { id: "inv_1".to_owned() }), Outcome::Applied);
        apply(&mut state, vec![invoke("inv_1", None, HandlerType::Shared, None)]);
        let second = view(&state).invocation("inv_1").unwrap().attempt().unwrap();
        assert_eq!(first.base, second.base, "both start from an empty journal");
        assert_ne!(first, second);
        assert_eq!(effect(&mut state, 3, complete("inv_1", first, vec![])), Outcome::Stale);
        assert_eq!(view(&state).invocation("inv_1").unwrap().status, Status::Ready);
        assert_eq!(effect(&mut state, 4, complete("inv_1", second, vec![])), Outcome::Applied);
    }

    #[test]
    fn status_counts_survive_encoding() {
        let mut state = GroupState::default();
        apply(
            &mut state,
            vec![
                invoke("inv_1", Some("k"), HandlerType::Exclusive, None),
                invoke("inv_2", Some("k"), HandlerType::Exclusive, None),
            ],
        );
        assert_eq!(effect(&mut state, 1, complete("inv_1", at(0, 0), vec![])), Outcome::Applied);
        let decoded: GroupState = crate::wire::decode(&crate::wire::encode(&state)).unwrap();
        let mut expected = [0; Status::ALL.len()];
        expected[Status::Ready.index()] = 1;
        expected[Status::Completed.index()] = 1;
        assert_eq!(view(&decoded).status_counts(), expected);
        assert_eq!(decoded.digest(), state.digest());
    }

    #[test]
    fn a_repeated_id_is_created_once() {
        let mut state = GroupState::default();
        let r = apply(
            &mut state,
            vec![invoke("inv_1", None, HandlerType::Shared, None), invoke("inv_1", None, HandlerType::Shared, None)],
        );
        assert_eq!(r, Response::Invoked { created: 1, deduplicated: 1 });
    }

    #[test]
    fn a_new_record_whose_id_is_taken_gets_another() {
        let id = key::id(7, 5 << 16);
        let mut state = GroupState::default();
        let r = apply(
            &mut state,
            vec![
                invoke(&id, Some("k"), HandlerType::Exclusive, Some((1, 5))),
                invoke(&id, Some("k"), HandlerType::Exclusive, Some((1 << 16 | 1, 5))),
                invoke(&id, Some("k"), HandlerType::Exclusive, Some((1, 5))),
                invoke(&id, Some("k"), HandlerType::Workflow, Some((2, 5))),
            ],
        );
        assert_eq!(
            r,
            Response::Invoked { created: 2, deduplicated: 2 },
            "a re-read record and a workflow's key repeat"
        );
        let inbox = view(&state).inbox("Counter", "k");
        assert_eq!(inbox.len(), 2);
        assert_eq!(inbox[0], id);
        assert_ne!(inbox[1], id);
        assert_eq!(key::id_parts(&inbox[1]).map(|(partition_key, _)| partition_key), Some(7), "same partition key");
        assert!(view(&state).invocation(&inbox[1]).is_some());
    }

    #[test]
    fn applied_effects_put_what_they_start_in_the_outbox_until_truncated() {
        let mut state = GroupState::default();
        apply(&mut state, vec![invoke("inv_1", None, HandlerType::Shared, None)]);
        let runs = runnable(&state);
        assert_eq!(runs, vec!["inv_1"]);
        let sent = |id: &str| {
            let mut send = invoke(id, Some("k"), HandlerType::Exclusive, None);
            send.source = Source::Service { caller: "inv_1".to_owned() };
            send
        };
        let with_sends = |attempt, ids: &[&str]| Effect::Complete {
            id: "inv_1".to_owned(),
            attempt,
            state: vec![],
            result: Completion::Success(Bytes::new()),
            sends: ids.iter().map(|id| Outgoing::Invoke(Box::new(sent(id)))).collect(),
            promises: vec![],
        };
        let attempt = view(&state).invocation("inv_1").unwrap().attempt().unwrap();
        assert_eq!(effect(&mut state, 10, with_sends(attempt, &["inv_a", "inv_b"])), Outcome::Applied);
        assert_eq!(effect(&mut state, 11, with_sends(attempt, &["inv_c"])), Outcome::Stale, "sends nothing");
        let outbox = |state: &GroupState| -> Vec<(u64, String)> {
            state
                .partition()
                .outbox(10, usize::MAX)
                .unwrap()
                .into_iter()
                .map(|(seq, row)| match row {
                    Outgoing::Invoke(invoke) => (seq, invoke.id),
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        assert_eq!(outbox(&state), vec![(0, "inv_a".to_owned()), (1, "inv_b".to_owned())]);
        assert_eq!(state.partition().outbox(1, usize::MAX).unwrap().len(), 1, "at most the rows asked for");
        assert_eq!(state.partition().outbox(10, 1).unwrap().len(), 1, "at least one row, whatever its size");
        assert_eq!(state.apply(Command::TruncateOutbox { upto: 0 }), Response::Truncated { rows: 1 });
        assert_eq!(outbox(&state), vec![(1, "inv_b".to_owned())]);
        assert_eq!(state.apply(Command::TruncateOutbox { upto: 5 }), Response::Truncated { rows: 1 });
        assert!(outbox(&state).is_empty());

        // Delivered under the outbox's producer: a row sent again is dropped.
        let delivered = |seq| {
            let mut invoke = sent("inv_a");
            invoke.dedup = Some(Dedup { producer: 42, seq });
            invoke
        };
        let mut other = GroupState::default();
        assert_eq!(apply(&mut other, vec![delivered(0)]), Response::Invoked { created: 1, deduplicated: 0 });
        assert_eq!(apply(&mut other, vec![delivered(0)]), Response::Invoked { created: 0, deduplicated: 1 });
        assert_eq!(view(&other).invocation("inv_a").unwrap().source, Source::Service { caller: "inv_1".to_owned() });
    }

    #[test]
    fn a_call_suspends_its_caller_until_the_callee_result_comes_back_once() {
        let mut caller = GroupState::default();
        apply(&mut caller, vec![invoke("inv_1", None, HandlerType::Shared, None)]);
        let call = |id: &str, completion_id| {
            let mut call = invoke(id, Some("k"), HandlerType::Exclusive, None);
            call.source = Source::Service { caller: "inv_1".to_owned() };
            call.reply = Some(ReplyTo { caller: "inv_1".to_owned(), completion_id, kind: ReplyKind::Call });
            call
        };
        let progress = |attempt, entries, sends, run_now| Effect::Progress {
            id: "inv_1".to_owned(),
            attempt,
            entries,
            state: vec![],
            sleeps: vec![],
            run_now,
            sends,
            awaits_signal: false,
            promises: vec![],
            arrived: 0,
        };
        let attempt = |state: &GroupState| view(state).invocation("inv_1").unwrap().attempt();
        let first = attempt(&caller).unwrap();
        assert_eq!(
            effect(
                &mut caller,
                10,
                progress(first, vec![entry(0x040D, b"a")], vec![Outgoing::Invoke(Box::new(call("inv_a", 2)))], false)
            ),
            Outcome::Applied
        );
        let waiting = view(&caller).invocation("inv_1").unwrap();
        assert_eq!((waiting.status, waiting.awaiting), (Status::Suspended, 1), "suspended, not paused");
        assert!(runnable(&caller).is_empty());
        let Some((_, Outgoing::Invoke(sent))) = caller.partition().outbox(10, usize::MAX).unwrap().pop() else {
            panic!("the call is in the outbox");
        };

        // The callee's partition keeps the caller and, on completion, puts
        // the result in its outbox.
        let mut callee = GroupState::default();
        apply(&mut callee, vec![Invoke { dedup: Some(Dedup { producer: 7, seq: 0 }), ..*sent }]);
        let run = view(&callee).invocation("inv_a").unwrap().attempt().unwrap();
        let done = Effect::Complete {
            id: "inv_a".to_owned(),
            attempt: run,
            state: vec![],
            result: Completion::Success(Bytes::from_static(b"42")),
            sends: vec![],
            promises: vec![],
        };
        assert_eq!(effect(&mut callee, 20, done), Outcome::Applied);
        let rows = callee.partition().outbox(10, usize::MAX).unwrap();
        let [(_, Outgoing::Reply { to, result })] = &rows[..] else { panic!("{rows:?}") };
        assert_eq!((to.caller.as_str(), to.completion_id), ("inv_1", 2));
        assert_eq!(result, &Some(Completion::Success(Bytes::from_static(b"42"))));

        // Delivered to the caller (twice): appended once, and it runs again.
        let result = |seq| Notification {
            id: "inv_1".to_owned(),
            notice: Notice::CallResult,
            entry: entry(0x800D, b"42"),
            dedup: Some(Dedup { producer: 9, seq }),
        };
        assert_eq!(
            caller.apply(Command::Notify { at_ms: 0, notifications: vec![result(0)] }),
            Response::Notified { appended: 1, dropped: 0 }
        );
        assert_eq!(
            caller.apply(Command::Notify { at_ms: 0, notifications: vec![result(0)] }),
            Response::Notified { appended: 0, dropped: 1 }
        );
        let woken = view(&caller).invocation("inv_1").unwrap();
        assert_eq!((woken.status, woken.awaiting), (Status::Ready, 0));
        assert_eq!(woken.journal.last(), Some(&entry(0x800D, b"42")));
        assert_eq!(runnable(&caller), vec!["inv_1"]);

        // A result that comes while an attempt may run waits for its end,
        // so the attempt stays current; the next attempt sees it.
        let second = attempt(&caller).unwrap();
        assert_eq!(
            effect(
                &mut caller,
                30,
                progress(second, vec![entry(0x040D, b"b")], vec![Outgoing::Invoke(Box::new(call("inv_b", 4)))], true)
            ),
            Outcome::Applied
        );
        let third = attempt(&caller).unwrap();
        caller.apply(Command::Notify {
            at_ms: 0,
            notifications: vec![Notification { entry: entry(0x800D, b"b"), ..result(1) }],
        });
        assert_eq!(attempt(&caller), Some(third), "the running attempt stays current");
        assert!(view(&caller).invocation("inv_1").unwrap().awaits_results());
        let ended = progress(third, vec![], vec![], false);
        assert_eq!(effect(&mut caller, 40, ended), Outcome::Applied);
        let after = view(&caller).invocation("inv_1").unwrap();
        assert_eq!(after.journal.last(), Some(&entry(0x800D, b"b")));
        assert_eq!(after.status, Status::Ready, "runs again to see the result");

        // A later call with the same (idempotency) id gets the result of
        // the first: at once once it is completed, else on completion.
        let again = Invoke {
            reply: Some(ReplyTo { caller: "inv_9".to_owned(), completion_id: 5, kind: ReplyKind::Call }),
            ..call("inv_a", 2)
        };
        assert_eq!(apply(&mut callee, vec![again]), Response::Invoked { created: 0, deduplicated: 1 });
        let rows = callee.partition().outbox(10, usize::MAX).unwrap();
        assert!(matches!(&rows[..], [_, (_, Outgoing::Reply { to, .. })] if to.caller == "inv_9"), "{rows:?}");
        apply(&mut callee, vec![invoke("inv_c", None, HandlerType::Shared, None)]);
        let attached = Invoke {
            reply: Some(ReplyTo { caller: "inv_9".to_owned(), completion_id: 6, kind: ReplyKind::Call }),
            ..invoke("inv_c", None, HandlerType::Shared, None)
        };
        apply(&mut callee, vec![attached]);
        assert_eq!(view(&callee).invocation("inv_c").unwrap().replies.len(), 1);
        let killed =
            callee.apply(Command::Effects { at_ms: 50, effects: vec![Effect::Kill { id: "inv_c".to_owned() }] });
        assert_eq!(killed, Response::Effects(vec![Outcome::Applied]));
        let rows = callee.partition().outbox(10, usize::MAX).unwrap();
        let Some((_, Outgoing::Reply { to, result })) = rows.last() else { panic!("{rows:?}") };
        let killed = Completion::Failure { code: 409, message: "killed".to_owned() };
        assert_eq!((to.completion_id, result), (6, &Some(killed)));
    }

    #[test]
    fn attach_waits_for_the_result_output_answers_at_once_and_unknown_ids_404() {
        let mut state = GroupState::default();
        apply(&mut state, vec![invoke("inv_t", None, HandlerType::Shared, None)]);
        let to = |completion_id, kind| ReplyTo { caller: "inv_c".to_owned(), completion_id, kind };
        let ask = |id: &str, to, seq| Attach { id: id.to_owned(), to, dedup: Dedup { producer: 3, seq } };
        let requests = vec![
            ask("inv_t", to(1, ReplyKind::Attach), 0),
            ask("inv_t", to(2, ReplyKind::Output), 1),
            ask("inv_gone", to(3, ReplyKind::Attach), 2),
        ];
        assert_eq!(state.apply(Command::Attach(requests.clone())), Response::Attached { accepted: 3, dropped: 0 });
        assert_eq!(state.apply(Command::Attach(requests)), Response::Attached { accepted: 0, dropped: 3 });
        let replies = |state: &GroupState| -> Vec<(u32, Option<Completion>)> {
            let rows = state.partition().outbox(10, usize::MAX).unwrap();
            rows.into_iter()
                .filter_map(|(_, row)| match row {
                    Outgoing::Reply { to, result } => Some((to.completion_id, result)),
                    _ => None,
                })
                .collect()
        };
        let not_found = Completion::Failure { code: 404, message: "invocation inv_gone not found".to_owned() };
        assert_eq!(replies(&state), vec![(2, None), (3, Some(not_found.clone()))], "the attach waits");
        run_to_completion(&mut state, "inv_t", 0, 20);
        let result = view(&state).invocation("inv_t").unwrap().completion.unwrap();
        assert_eq!(replies(&state), vec![(2, None), (3, Some(not_found)), (1, Some(result))]);
    }

    #[test]
    fn promises_answer_their_waiters_once_and_go_with_their_workflow() {
        let mut state = GroupState::default();
        let zero = Retention { journal_ms: 0, completion_ms: 0 };
        let run = Invoke { retention: zero, ..invoke("inv_w", Some("w"), HandlerType::Workflow, None) };
        apply(&mut state, vec![run, invoke("inv_s", Some("w"), HandlerType::Shared, None)]);
        let attempt = |state: &GroupState, id: &str| view(state).invocation(id).unwrap().attempt().unwrap();
        let progress = |id: &str, attempt, promises| Effect::Progress {
            id: id.to_owned(),
            attempt,
            entries: vec![entry(0x0409, b"cmd")],
            state: vec![],
            sleeps: vec![],
            run_now: false,
            sends: vec![],
            awaits_signal: false,
            promises,
            arrived: 0,
        };
        let act = |state: &mut GroupState, at_ms, id: &str, promises| {
            let current = attempt(state, id);
            effect(state, at_ms, progress(id, current, promises))
        };
        let get = PromiseOp::Get { name: "p".to_owned(), completion_id: 5 };
        assert_eq!(act(&mut state, 10, "inv_w", vec![get]), Outcome::Applied);
        let waiting = view(&state).invocation("inv_w").unwrap();
        assert_eq!((waiting.status, waiting.awaiting), (Status::Suspended, 1));

        // A shared handler completes it: the run wakes with the value, and
        // the completer gets its answer.
        let value = Completion::Success(Bytes::from_static(b"v"));
        let complete = |value: &Completion, id| PromiseOp::Complete {
            name: "p".to_owned(),
            result: value.clone(),
            completion_id: id,
        };
        let ops = vec![complete(&value, 2), PromiseOp::Peek { name: "p".to_owned(), completion_id: 3 }];
        assert_eq!(act(&mut state, 20, "inv_s", ops), Outcome::Applied);
        let woken = view(&state).invocation("inv_w").unwrap();
        assert_eq!((woken.status, woken.journal.last()), (Status::Ready, Some(&notifications::get_promise(5, &value))));
        let shared = view(&state).invocation("inv_s").unwrap();
        let answers = &shared.journal[shared.journal.len() - 2..];
        assert_eq!(answers, [notifications::complete_promise(2, false), notifications::peek_promise(3, Some(&value))]);
        assert_eq!(shared.status, Status::Ready, "runs again to read its answers");

        // A second completion keeps the first value.
        let other = Completion::Success(Bytes::from_static(b"other"));
        assert_eq!(act(&mut state, 30, "inv_s", vec![complete(&other, 4)]), Outcome::Applied);
        let shared = view(&state).invocation("inv_s").unwrap();
        assert_eq!(shared.journal.last(), Some(&notifications::complete_promise(4, true)));
        let get_again = PromiseOp::Get { name: "p".to_owned(), completion_id: 6 };
        act(&mut state, 40, "inv_w", vec![get_again]);
        assert_eq!(
            view(&state).invocation("inv_w").unwrap().journal.last(),
            Some(&notifications::get_promise(6, &value))
        );

        // The workflow's run is removed when it completes (retention 0),
        // and its promises with it.
        let done = Effect::Complete {
            id: "inv_w".to_owned(),
            attempt: attempt(&state, "inv_w"),
            state: vec![],
            result: value.clone(),
            sends: vec![],
            promises: vec![],
        };
        assert_eq!(effect(&mut state, 50, done), Outcome::Applied);
        assert!(view(&state).invocation("inv_w").is_none());
        let mut promises = 0;
        state
            .tables_mut()
            .scan(Table::Promises, Bound::Unbounded, Bound::Unbounded, &mut |_, _| {
                promises += 1;
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(promises, 0, "the promises went with the workflow");
    }

    #[test]
    fn invocation_rows_sort_by_unique_part_and_name_their_id() {
        let (early, late) = (key::id(u64::MAX, 1), key::id(0, 2));
        assert!(key::invocation(&early) < key::invocation(&late));
        for id in [early, late, "inv_other".to_owned(), "inv_1ABC".to_owned()] {
            assert_eq!(key::invocation_id(&key::invocation(&id)), Some(id));
        }
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
                handlers: vec![HandlerDef {
                    name: "add".to_owned(),
                    ty: HandlerType::Exclusive,
                    retention: Default::default(),
                    lazy_state: false,
                    timeouts: Default::default(),
                }],
                retention: Default::default(),
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

    #[test]
    fn kafka_clusters_are_created_replaced_and_removed_unless_in_use() {
        let cluster = |servers: &str, at: u64| KafkaCluster {
            name: "orders".to_owned(),
            properties: [("bootstrap.servers".to_owned(), servers.to_owned())].into(),
            created_at_ms: at,
        };
        let put = |cluster, create| MetadataCommand::PutKafkaCluster { cluster, create };
        let remove = |force| MetadataCommand::RemoveKafkaCluster { name: "orders".to_owned(), force };
        let mut m = MetadataState::default();
        assert_eq!(m.apply(put(cluster("a:9092", 1), false)), MetadataResponse::NotFound);
        assert_eq!(m.apply(put(cluster("a:9092", 1), true)), MetadataResponse::Done);
        assert!(matches!(m.apply(put(cluster("b:9092", 2), true)), MetadataResponse::Conflict(_)));
        // A replacement keeps when the cluster was made.
        assert_eq!(m.apply(put(cluster("b:9092", 3), false)), MetadataResponse::Done);
        assert_eq!(m.kafka_clusters["orders"], cluster("b:9092", 1));

        let subscription = Subscription {
            id: "sub_1".to_owned(),
            cluster: "orders".to_owned(),
            topic: "t".to_owned(),
            service: "Counter".to_owned(),
            handler: "add".to_owned(),
            service_ty: ServiceType::VirtualObject,
            handler_ty: HandlerType::Exclusive,
            options: BTreeMap::new(),
            created_at_ms: 1,
            paused: false,
            draining: false,
        };
        assert_eq!(m.apply(MetadataCommand::PutSubscription(subscription)), MetadataResponse::Done);
        let pause = |id: &str, paused| MetadataCommand::PauseSubscription { id: id.to_owned(), paused };
        assert_eq!(m.apply(pause("sub_1", true)), MetadataResponse::Done);
        assert!(m.subscriptions["sub_1"].paused);
        assert_eq!(m.apply(pause("sub_1", false)), MetadataResponse::Done);
        assert!(!m.subscriptions["sub_1"].paused);
        assert_eq!(m.apply(pause("sub_2", true)), MetadataResponse::NotFound);
        let drain = |id: &str| MetadataCommand::DrainSubscription { id: id.to_owned() };
        assert_eq!(m.apply(drain("sub_1")), MetadataResponse::Done);
        assert!(m.subscriptions["sub_1"].draining);
        assert!(matches!(m.apply(pause("sub_1", false)), MetadataResponse::Conflict(_)), "no resume while draining");
        assert_eq!(m.apply(drain("sub_2")), MetadataResponse::NotFound);
        match m.apply(remove(false)) {
            MetadataResponse::Conflict(why) => assert!(why.contains("sub_1"), "{why}"),
            other => panic!("removed a cluster in use: {other:?}"),
        }
        assert_eq!(m.apply(remove(true)), MetadataResponse::Done);
        assert!(m.kafka_clusters.is_empty() && m.subscriptions.contains_key("sub_1"));
        assert_eq!(m.apply(remove(true)), MetadataResponse::NotFound);
    }
}
