//! The deterministic state machines. `apply` takes the state and a command and
//! returns the response; it reads no clock, draws no randomness and does no
//! I/O, so replicas with the same log hold the same state.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use bytes::Bytes;
use ferry_telemetry::TraceContext;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

pub use crate::wire::v1::Completion;
use crate::wire::v1::{
    AttemptId, Command, Deployment, Effect, Invoke, JournalEntry, MetadataCommand, MetadataResponse, Outcome, Response,
    Retention, ServiceDef, Sleep, Source, StateOp, Subscription, Target,
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
            Command::Effects { at_ms, effects } => self.partition.apply_effects(at_ms, effects),
            Command::Expire { at_ms, max } => self.partition.apply_expire(at_ms, max),
            Command::ForgetSubscription { id } => self.partition.forget_subscription(id),
        }
    }

    /// A 128-bit hash of everything the group has applied. Replicas that
    /// applied the same log have the same digest: maps are hashed in key
    /// order, whatever order they were filled in.
    pub fn digest(&self) -> u128 {
        let p = &self.partition;
        let canonical = (
            p.dedup.iter().collect::<BTreeMap<_, _>>(),
            &p.invocations,
            p.inboxes.iter().collect::<BTreeMap<_, _>>(),
            p.objects.iter().collect::<BTreeMap<_, _>>(),
            &p.runnable,
            p.next_run_seq,
            &p.timers,
            &p.expiries,
            &p.producers,
            &p.forgotten,
            &self.metadata,
        );
        let mut hasher = Hasher(Xxh3::new());
        bincode::serialize_into(&mut hasher, &canonical).expect("hashing cannot fail");
        hasher.0.digest128()
    }
}

/// Feeds an encoder's output to a hash, so nothing is buffered.
struct Hasher(Xxh3);

impl std::io::Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Invocations, the dedup table, per-key inboxes, object state and timers of
/// one partition.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct PartitionState {
    /// The last sequence number applied per producer.
    dedup: HashMap<u64, u64>,
    /// The producers in `dedup` of each subscription.
    producers: BTreeMap<String, BTreeSet<u64>>,
    /// Deleted subscriptions whose dedup entries were dropped here; records
    /// of them are dropped.
    forgotten: BTreeSet<String>,
    invocations: BTreeMap<String, Invocation>,
    /// Exclusive invocations per (service, key), in arrival order; the head is
    /// the one allowed to run.
    inboxes: HashMap<ObjectId, VecDeque<String>>,
    /// The state of every Virtual Object and Workflow key.
    objects: HashMap<ObjectId, BTreeMap<Bytes, Bytes>>,
    /// Invocations allowed to run, in the order they became so.
    runnable: BTreeMap<u64, String>,
    next_run_seq: u64,
    /// (due time, invocation) of every backing-off, sleeping or delayed invocation.
    timers: BTreeSet<(u64, String)>,
    /// (due time, invocation) of the next retention step of every completed
    /// invocation: dropping its journal, or the invocation.
    expiries: BTreeSet<(u64, String)>,
    /// Results of invocations removed lately. Kept on each node, not
    /// replicated, never encoded.
    #[serde(skip)]
    removed: Removed,
    /// How many invocations are in each status, by [`Status::index`]. Derived
    /// from `invocations`, so never encoded: [`PartitionState::recount`]
    /// rebuilds it after decoding.
    #[serde(skip)]
    status_counts: [u64; Status::ALL.len()],
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
    pub status: Status,
    pub created_at_ms: u64,
    pub modified_at_ms: u64,
    /// Failed attempts since the journal last grew.
    pub attempts: u32,
    pub last_failure: Option<String>,
    pub completion: Option<Completion>,
    /// The journal after the input entry, as the handler wrote it.
    pub journal: Vec<JournalEntry>,
    /// State changes in the journal, applied when the invocation completes.
    pub state_ops: Vec<StateOp>,
    /// Sleeps not yet due.
    pub sleeps: Vec<Sleep>,
    /// When a timer wakes the invocation.
    pub wake_at_ms: Option<u64>,
    /// The sampled span its attempts are traced under.
    pub trace: Option<TraceContext>,
    run_seq: Option<u64>,
    pub retention: Retention,
    pub completed_at_ms: Option<u64>,
    /// When its next retention step is due (see [`PartitionState::expiries`]).
    expires_at_ms: Option<u64>,
}

/// The results of the invocations removed last, for callers that wait for
/// one: with a retention of zero an invocation is removed in the very apply
/// that completes it.
#[derive(Debug, Default, Clone)]
struct Removed {
    results: HashMap<String, Completion>,
    order: VecDeque<String>,
}

/// How many results of removed invocations [`Removed`] keeps.
const REMOVED_KEPT: usize = 16_384;

impl Removed {
    fn push(&mut self, id: String, completion: Completion) {
        if self.order.len() >= REMOVED_KEPT {
            if let Some(oldest) = self.order.pop_front() {
                self.results.remove(&oldest);
            }
        }
        if self.results.insert(id.clone(), completion).is_none() {
            self.order.push_back(id);
        }
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
    /// Waiting for a sleep to end.
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
            Source::Ingress => Vec::new(),
        };
        headers.extend(self.headers.iter().cloned());
        headers
    }

    /// The attempt that may run now: `None` unless the invocation is ready.
    pub fn attempt(&self) -> Option<AttemptId> {
        match (self.status, self.run_seq) {
            (Status::Ready, Some(run)) => Some(AttemptId { run, base: self.journal.len() as u32 }),
            _ => None,
        }
    }

    fn object(&self) -> Option<ObjectId> {
        Some((self.target.service.clone(), self.target.key.clone()?))
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
}

impl PartitionState {
    fn apply_invoke(&mut self, batch: std::sync::Arc<Vec<Invoke>>) -> Response {
        let (mut created, mut deduplicated) = (0, 0);
        // Entries read back from the log hold the only reference.
        let batch = std::sync::Arc::try_unwrap(batch).unwrap_or_else(|shared| (*shared).clone());
        for invoke in batch {
            let subscription = match &invoke.source {
                Source::Kafka(kafka) => Some(&kafka.subscription),
                Source::Ingress => None,
            };
            if subscription.is_some_and(|s| self.forgotten.contains(s)) {
                deduplicated += 1;
                continue;
            }
            if let Some(dedup) = invoke.dedup {
                match self.dedup.get_mut(&dedup.producer) {
                    Some(last) if dedup.seq <= *last => {
                        deduplicated += 1;
                        continue;
                    }
                    Some(last) => *last = dedup.seq,
                    None => {
                        self.dedup.insert(dedup.producer, dedup.seq);
                        if let Some(subscription) = subscription {
                            self.producers.entry(subscription.clone()).or_default().insert(dedup.producer);
                        }
                    }
                }
            }
            // Ids derived from an idempotency key repeat: the first one wins.
            if self.invocations.contains_key(&invoke.id) {
                deduplicated += 1;
                continue;
            }
            let id = invoke.id.clone();
            self.invocations.insert(
                id.clone(),
                Invocation {
                    id: invoke.id,
                    target: invoke.target,
                    payload: invoke.payload,
                    headers: invoke.headers,
                    source: invoke.source,
                    status: Status::Scheduled,
                    created_at_ms: invoke.created_at_ms,
                    modified_at_ms: invoke.created_at_ms,
                    attempts: 0,
                    last_failure: None,
                    completion: None,
                    journal: Vec::new(),
                    state_ops: Vec::new(),
                    sleeps: Vec::new(),
                    wake_at_ms: None,
                    trace: invoke.trace,
                    run_seq: None,
                    retention: invoke.retention,
                    completed_at_ms: None,
                    expires_at_ms: None,
                },
            );
            self.status_counts[Status::Scheduled.index()] += 1;
            match (invoke.failure, invoke.not_before_ms) {
                (Some(message), _) => {
                    self.complete(&id, Completion::Failure { code: 400, message }, invoke.created_at_ms)
                }
                (None, Some(at)) => self.set_timer(&id, at),
                (None, None) => self.enqueue(&id),
            }
            created += 1;
        }
        Response::Invoked { created, deduplicated }
    }

    fn apply_effects(&mut self, at_ms: u64, effects: Vec<Effect>) -> Response {
        Response::Effects(effects.into_iter().map(|effect| self.apply_effect(at_ms, effect)).collect())
    }

    /// Applies one effect; only an applied one changes `modified_at_ms`.
    fn apply_effect(&mut self, at_ms: u64, effect: Effect) -> Outcome {
        let id = effect.id().to_owned();
        let outcome = self.change(at_ms, effect);
        if outcome == Outcome::Applied {
            if let Some(inv) = self.invocations.get_mut(&id) {
                inv.modified_at_ms = at_ms;
            }
        }
        outcome
    }

    fn change(&mut self, at_ms: u64, effect: Effect) -> Outcome {
        let Some(inv) = self.invocations.get_mut(effect.id()) else {
            return Outcome::NotFound;
        };
        let status = inv.status;
        // An attempt's effect counts only if nothing changed the invocation since the attempt started.
        let current = |attempt: AttemptId| inv.attempt() == Some(attempt);
        match effect {
            Effect::Progress { id, attempt, entries, state, sleeps, run_now } => {
                if !current(attempt) {
                    return Outcome::Stale;
                }
                inv.journal.extend(entries);
                inv.state_ops.extend(state);
                inv.sleeps.extend(sleeps);
                inv.attempts = 0;
                inv.last_failure = None;
                if !run_now {
                    match inv.sleeps.iter().map(|s| s.wake_at_ms).min() {
                        Some(at) => {
                            self.unrun(&id, Status::Suspended);
                            self.set_timer(&id, at);
                        }
                        None => self.unrun(&id, Status::Paused),
                    }
                }
            }
            Effect::Complete { id, attempt, state, result } => {
                if !current(attempt) {
                    return Outcome::Stale;
                }
                inv.state_ops.extend(state);
                let ops = std::mem::take(&mut inv.state_ops);
                if let Some(object) = inv.object() {
                    let values = self.objects.entry(object.clone()).or_default();
                    for op in ops {
                        match op {
                            StateOp::Set { key, value } => {
                                values.insert(key, value);
                            }
                            StateOp::Clear { key } => {
                                values.remove(&key);
                            }
                            StateOp::ClearAll => values.clear(),
                        }
                    }
                    if values.is_empty() {
                        self.objects.remove(&object);
                    }
                }
                self.complete(&id, result, at_ms);
            }
            Effect::Failed { id, attempt, message, retry_at_ms, pause } => {
                if !current(attempt) {
                    return Outcome::Stale;
                }
                inv.attempts += 1;
                inv.last_failure = Some(message.clone());
                match retry_at_ms {
                    Some(at) => {
                        self.unrun(&id, Status::BackingOff);
                        self.set_timer(&id, at);
                    }
                    None if pause => self.unrun(&id, Status::Paused),
                    None => self.complete(&id, Completion::Failure { code: 500, message }, at_ms),
                }
            }
            Effect::Wake { id } => {
                let Some(due) = inv.wake_at_ms.filter(|&t| t <= at_ms) else {
                    return Outcome::Stale;
                };
                self.timers.remove(&(due, id.clone()));
                let inv = self.invocations.get_mut(&id).expect("present");
                inv.wake_at_ms = None;
                match status {
                    Status::Scheduled => self.enqueue(&id),
                    Status::BackingOff => self.make_runnable(&id),
                    Status::Suspended => {
                        let (due, later): (Vec<_>, Vec<_>) =
                            std::mem::take(&mut inv.sleeps).into_iter().partition(|s| s.wake_at_ms <= at_ms);
                        inv.journal.extend(due.into_iter().map(|s| s.notification));
                        inv.sleeps = later;
                        self.make_runnable(&id);
                    }
                    _ => return Outcome::Stale,
                }
            }
            Effect::Cancel { id, signal } => match status {
                Status::Completed => return Outcome::NotAllowed("the invocation is completed".to_owned()),
                // Not started yet: nothing to tell the handler.
                Status::Scheduled | Status::Pending => {
                    self.complete(&id, Completion::Failure { code: 409, message: "canceled".to_owned() }, at_ms)
                }
                _ => {
                    inv.journal.push(signal);
                    inv.attempts = 0;
                    self.make_runnable(&id);
                }
            },
            Effect::Kill { id } => {
                if status == Status::Completed {
                    return Outcome::NotAllowed("the invocation is completed".to_owned());
                }
                self.complete(&id, Completion::Failure { code: 409, message: "killed".to_owned() }, at_ms);
            }
            Effect::Purge { id } => {
                if status != Status::Completed {
                    return Outcome::NotAllowed(format!("the invocation is {}", status.as_str()));
                }
                if let Some(at) = inv.expires_at_ms {
                    self.expiries.remove(&(at, id.clone()));
                }
                self.invocations.remove(&id);
                self.status_counts[status.index()] -= 1;
            }
            Effect::PurgeJournal { id } => {
                if status != Status::Completed {
                    return Outcome::NotAllowed(format!("the invocation is {}", status.as_str()));
                }
                inv.journal = Vec::new();
                self.retire(&id, at_ms);
            }
            Effect::Resume { id } => {
                if status != Status::Paused {
                    return Outcome::NotAllowed(format!("the invocation is {}", status.as_str()));
                }
                inv.attempts = 0;
                self.make_runnable(&id);
            }
        }
        Outcome::Applied
    }

    /// Queues a new or delayed invocation: exclusive ones in their key's inbox.
    fn enqueue(&mut self, id: &str) {
        let inv = &self.invocations[id];
        if inv.target.is_exclusive() {
            let inbox = self.inboxes.entry(inv.object().expect("exclusive targets are keyed")).or_default();
            inbox.push_back(id.to_owned());
            if inbox.len() > 1 {
                self.set_status(id, Status::Pending);
                return;
            }
        }
        self.make_runnable(id);
    }

    fn make_runnable(&mut self, id: &str) {
        self.set_status(id, Status::Ready);
        let inv = self.invocations.get_mut(id).expect("present");
        if inv.run_seq.is_none() {
            inv.run_seq = Some(self.next_run_seq);
            self.runnable.insert(self.next_run_seq, id.to_owned());
            self.next_run_seq += 1;
        }
    }

    /// Takes an invocation out of the runnable set, into `status`.
    fn unrun(&mut self, id: &str, status: Status) {
        self.set_status(id, status);
        let inv = self.invocations.get_mut(id).expect("present");
        if let Some(seq) = inv.run_seq.take() {
            self.runnable.remove(&seq);
        }
    }

    /// The one place an invocation's status changes, keeping the counts.
    fn set_status(&mut self, id: &str, status: Status) {
        let inv = self.invocations.get_mut(id).expect("present");
        self.status_counts[inv.status.index()] -= 1;
        self.status_counts[status.index()] += 1;
        inv.status = status;
    }

    fn set_timer(&mut self, id: &str, at_ms: u64) {
        let inv = self.invocations.get_mut(id).expect("present");
        if let Some(old) = inv.wake_at_ms.replace(at_ms) {
            self.timers.remove(&(old, id.to_owned()));
        }
        self.timers.insert((at_ms, id.to_owned()));
    }

    /// Completes an invocation at `at_ms`, lets the next one of its key run,
    /// and keeps it (and its journal) as long as its retention says.
    fn complete(&mut self, id: &str, result: Completion, at_ms: u64) {
        let status = self.invocations[id].status;
        self.unrun(id, Status::Completed);
        let inv = self.invocations.get_mut(id).expect("present");
        inv.completion = Some(result);
        inv.completed_at_ms = Some(at_ms);
        inv.state_ops = Vec::new();
        inv.sleeps = Vec::new();
        if let Some(at) = inv.wake_at_ms.take() {
            self.timers.remove(&(at, id.to_owned()));
        }
        self.release_key(id, status);
        self.retire(id, at_ms);
    }

    /// Lets the next exclusive invocation of a completed one's key run.
    fn release_key(&mut self, id: &str, status: Status) {
        let inv = &self.invocations[id];
        if status == Status::Scheduled || !inv.target.is_exclusive() {
            return;
        }
        let object = inv.object().expect("exclusive targets are keyed");
        let Some(inbox) = self.inboxes.get_mut(&object) else { return };
        if let Some(at) = inbox.iter().position(|queued| queued == id) {
            inbox.remove(at);
        }
        match inbox.front().cloned() {
            Some(next) if self.invocations[&next].status == Status::Pending => self.make_runnable(&next),
            Some(_) => {}
            None => {
                self.inboxes.remove(&object);
            }
        }
    }

    /// Takes the next retention step of a completed invocation if it is due
    /// at `now`: drops its journal, or the invocation (its result kept in
    /// [`Removed`] for whoever still waits for it). Then sets when the next
    /// step is due. Returns (invocations, journals) dropped.
    fn retire(&mut self, id: &str, now: u64) -> (u32, u32) {
        let inv = self.invocations.get_mut(id).expect("present");
        if let Some(at) = inv.expires_at_ms.take() {
            self.expiries.remove(&(at, id.to_owned()));
        }
        let completed = inv.completed_at_ms.expect("retired invocations are completed");
        if completed.saturating_add(inv.retention.completion_ms) <= now {
            let inv = self.invocations.remove(id).expect("present");
            self.status_counts[Status::Completed.index()] -= 1;
            if let Some(result) = inv.completion {
                self.removed.push(inv.id, result);
            }
            return (1, 0);
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
            self.expiries.insert((next, id.to_owned()));
        }
        (0, journals)
    }

    /// Takes the retention steps due at `at_ms`, at most `max` of them.
    fn apply_expire(&mut self, at_ms: u64, max: u32) -> Response {
        let (mut invocations, mut journals) = (0, 0);
        for _ in 0..max {
            match self.expiries.first() {
                Some((due, _)) if *due <= at_ms => {}
                _ => break,
            }
            let (_, id) = self.expiries.pop_first().expect("present");
            self.invocations.get_mut(&id).expect("expiring invocations exist").expires_at_ms = None;
            let (i, j) = self.retire(&id, at_ms);
            invocations += i;
            journals += j;
        }
        Response::Expired { invocations, journals }
    }

    /// Drops the dedup entries of deleted subscription `id`.
    fn forget_subscription(&mut self, id: String) -> Response {
        let producers = self.producers.remove(&id).unwrap_or_default();
        for producer in &producers {
            self.dedup.remove(producer);
        }
        self.forgotten.insert(id);
        Response::Forgotten { producers: producers.len() as u32 }
    }

    /// The subscriptions with dedup entries here.
    pub fn subscriptions_with_dedup(&self) -> impl Iterator<Item = &str> + '_ {
        self.producers.keys().map(String::as_str)
    }

    /// When the next retention step is due.
    pub fn next_expiry(&self) -> Option<u64> {
        self.expiries.first().map(|(at, _)| *at)
    }

    /// How many retention steps are due at `now`, counting at most `max`.
    pub fn expiries_due(&self, now: u64, max: usize) -> usize {
        self.expiries.iter().take(max).take_while(|(at, _)| *at <= now).count()
    }

    /// The result of invocation `id`: `Some(None)` while it runs, `None` if
    /// there is no such invocation. An invocation removed lately by its
    /// retention still answers with its result.
    pub fn result_of(&self, id: &str) -> Option<Option<Completion>> {
        match self.invocations.get(id) {
            Some(inv) => Some(inv.completion.clone()),
            None => self.removed.results.get(id).map(|result| Some(result.clone())),
        }
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

    /// How many invocations are in each status, in the order of [`Status::ALL`].
    pub fn status_counts(&self) -> [u64; Status::ALL.len()] {
        self.status_counts
    }

    /// Rebuilds the per-status counts from the invocations, as after decoding
    /// a snapshot.
    pub fn recount(&mut self) {
        self.status_counts = [0; Status::ALL.len()];
        for inv in self.invocations.values() {
            self.status_counts[inv.status.index()] += 1;
        }
    }

    /// Invocations allowed to run, in the order they became so.
    pub fn runnable(&self) -> impl Iterator<Item = &Invocation> + '_ {
        self.runnable.values().map(|id| &self.invocations[id])
    }

    /// The ids of [`PartitionState::runnable`], without looking them up.
    pub fn runnable_ids(&self) -> impl Iterator<Item = &str> + '_ {
        self.runnable.values().map(String::as_str)
    }

    /// Timers in due order: (due time, invocation id).
    pub fn timers(&self) -> impl Iterator<Item = (u64, &str)> + '_ {
        self.timers.iter().map(|(at, id)| (*at, id.as_str()))
    }

    /// The state of a Virtual Object or Workflow key.
    pub fn object_state(&self, service: &str, key: &str) -> Option<&BTreeMap<Bytes, Bytes>> {
        self.objects.get(&(service.to_owned(), key.to_owned()))
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
    /// Ids of deleted subscriptions: partitions drop their dedup entries.
    pub deleted_subscriptions: BTreeSet<String>,
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
                self.deleted_subscriptions.insert(id);
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
            not_before_ms: None,
            trace: None,
            retention: Retention::FOREVER,
        }
    }

    fn apply(state: &mut GroupState, batch: Vec<Invoke>) -> Response {
        let response = state.apply(Command::Invoke(batch.into()));
        assert_counts_match(&state.partition);
        response
    }

    /// The kept per-status counts equal a count of the invocations.
    fn assert_counts_match(p: &PartitionState) {
        let mut counted = p.clone();
        counted.recount();
        assert_eq!(p.status_counts(), counted.status_counts());
        assert_eq!(p.status_counts().iter().sum::<u64>(), p.invocation_count() as u64);
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
        for n in 0..100 {
            a.partition.dedup.insert(1000 + n, n);
            b.partition.dedup.insert(1000 + 99 - n, 99 - n);
        }
        assert_eq!(a.digest(), b.digest());
        b.partition.dedup.insert(7, 0);
        assert_ne!(a.digest(), b.digest(), "the dedup table is part of the state");
        let mut c = keys();
        c.partition.objects.entry(("Counter".into(), "k1".into())).or_default().insert("n".into(), "1".into());
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
        assert_counts_match(&state.partition);
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
        Effect::Complete { id: id.to_owned(), attempt, state, result: Completion::Success(Bytes::new()) }
    }

    fn runnable(state: &GroupState) -> Vec<&str> {
        state.partition.runnable().map(|inv| inv.id.as_str()).collect()
    }

    fn expire(state: &mut GroupState, at_ms: u64, max: u32) -> (u32, u32) {
        let response = state.apply(Command::Expire { at_ms, max });
        assert_counts_match(&state.partition);
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
        };
        assert_eq!(effect(state, at_ms - 1, progress), Outcome::Applied);
        let result = Completion::Success(Bytes::from_static(b"out"));
        let done = Effect::Complete { id: id.to_owned(), attempt: at(run, 2), state: vec![], result };
        assert_eq!(effect(state, at_ms, done), Outcome::Applied);
    }

    /// The journal goes at its retention, the invocation at its result's;
    /// the clock is the one the commands carry. Once removed, its record is
    /// still deduplicated, and its result still answers for a while.
    #[test]
    fn retention_drops_the_journal_then_the_invocation_at_their_times() {
        let mut state = GroupState::default();
        apply(&mut state, vec![retained("inv_1", 0, Retention { journal_ms: 100, completion_ms: 1_000 })]);
        run_to_completion(&mut state, "inv_1", 0, 50);
        let p = &state.partition;
        assert_eq!(p.invocation("inv_1").unwrap().journal.len(), 2, "kept after completion");
        assert_eq!(p.next_expiry(), Some(150));

        assert_eq!(expire(&mut state, 149, 100), (0, 0));
        assert_eq!(expire(&mut state, 150, 100), (0, 1));
        let inv = state.partition.invocation("inv_1").unwrap();
        assert!(inv.journal.is_empty() && inv.completion.is_some());
        assert_eq!(state.partition.next_expiry(), Some(1_050));
        assert_eq!(expire(&mut state, 1_049, 100), (0, 0));
        assert_eq!(expire(&mut state, 1_050, 100), (1, 0));
        let p = &state.partition;
        assert!(p.invocation("inv_1").is_none() && p.next_expiry().is_none());
        assert_eq!(p.result_of("inv_1"), Some(Some(Completion::Success(Bytes::from_static(b"out")))));

        // Kafka delivers the record again: still a duplicate.
        let again = apply(&mut state, vec![retained("inv_1", 0, Retention { journal_ms: 100, completion_ms: 1_000 })]);
        assert_eq!(again, Response::Invoked { created: 0, deduplicated: 1 });
        assert!(state.partition.invocation("inv_1").is_none());
    }

    #[test]
    fn a_deleted_subscriptions_dedup_entries_go_and_its_late_records_are_dropped() {
        let mut state = GroupState::default();
        let mut other = invoke("inv_2", None, HandlerType::Shared, Some((2, 0)));
        let Source::Kafka(kafka) = &mut other.source else { unreachable!() };
        kafka.subscription = "sub_2".to_owned();
        apply(&mut state, vec![invoke("inv_1", None, HandlerType::Shared, Some((1, 0))), other.clone()]);
        let p = &state.partition;
        assert_eq!(p.subscriptions_with_dedup().collect::<Vec<_>>(), vec!["sub_1", "sub_2"]);

        let forgotten = state.apply(Command::ForgetSubscription { id: "sub_1".to_owned() });
        assert_eq!(forgotten, Response::Forgotten { producers: 1 });
        let p = &state.partition;
        assert_eq!((p.last_seq(1), p.last_seq(2)), (None, Some(0)));
        assert_eq!(p.subscriptions_with_dedup().collect::<Vec<_>>(), vec!["sub_2"]);
        // A record of the deleted subscription still on its way is dropped;
        // the other subscription is deduplicated as before.
        let late = apply(&mut state, vec![invoke("inv_3", None, HandlerType::Shared, Some((1, 1))), other]);
        assert_eq!(late, Response::Invoked { created: 0, deduplicated: 2 });
        assert!(state.partition.invocation("inv_3").is_none());
    }

    #[test]
    fn with_retention_zero_a_completed_invocation_is_removed_at_once() {
        let mut state = GroupState::default();
        let zero = Retention { journal_ms: 0, completion_ms: 0 };
        apply(&mut state, vec![retained("inv_1", 0, zero)]);
        run_to_completion(&mut state, "inv_1", 0, 50);
        let p = &state.partition;
        assert!(p.invocation("inv_1").is_none() && p.next_expiry().is_none());
        assert_eq!(p.invocation_count(), 0);
        assert!(p.result_of("inv_1").is_some_and(|r| r.is_some()));
        // An undeliverable record completes as it is created: removed too.
        let mut bad = retained("inv_2", 1, zero);
        bad.failure = Some("no such handler".to_owned());
        apply(&mut state, vec![bad]);
        assert_eq!(state.partition.invocation_count(), 0);
        // Kept for ever: nothing ever expires.
        apply(&mut state, vec![retained("inv_3", 2, Retention::FOREVER)]);
        run_to_completion(&mut state, "inv_3", 1, 60);
        assert!(state.partition.next_expiry().is_none());
        assert_eq!(expire(&mut state, u64::MAX, 100), (0, 0));
        assert_eq!(state.partition.invocation("inv_3").unwrap().journal.len(), 2);
    }

    #[test]
    fn expiry_takes_at_most_its_bound_earliest_first_and_purge_journal_drops_a_journal() {
        let mut state = GroupState::default();
        let short = Retention { journal_ms: 10, completion_ms: 10 };
        for (n, id) in ["inv_1", "inv_2", "inv_3"].into_iter().enumerate() {
            apply(&mut state, vec![retained(id, n as u64, short)]);
            run_to_completion(&mut state, id, n as u64, 100 + n as u64);
        }
        assert_eq!(state.partition.expiries_due(1_000, 10), 3);
        assert_eq!(expire(&mut state, 1_000, 2), (2, 0));
        assert!(state.partition.invocation("inv_3").is_some(), "the latest is left for the next command");
        assert_eq!(expire(&mut state, 1_000, 2), (1, 0));

        apply(&mut state, vec![retained("inv_4", 9, Retention { journal_ms: 500, completion_ms: 500 })]);
        let purge = Effect::PurgeJournal { id: "inv_4".to_owned() };
        assert!(matches!(effect(&mut state, 200, purge.clone()), Outcome::NotAllowed(_)), "still running");
        run_to_completion(&mut state, "inv_4", 3, 300);
        assert_eq!(effect(&mut state, 301, purge), Outcome::Applied);
        let inv = state.partition.invocation("inv_4").unwrap();
        assert!(inv.journal.is_empty() && inv.completion.is_some());
        assert_eq!(state.partition.next_expiry(), Some(800));
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
        // A suspension keeps its entries and state changes; nothing is visible yet.
        let progress = Effect::Progress {
            id: "inv_1".to_owned(),
            attempt: at(0, 0),
            entries: vec![entry(0x0403, b"set"), entry(0x0411, b"run"), entry(0x8011, b"done")],
            state: vec![set(b"a", b"1")],
            sleeps: vec![],
            run_now: true,
        };
        assert_eq!(effect(&mut state, 20, progress.clone()), Outcome::Applied);
        assert_eq!(effect(&mut state, 21, progress), Outcome::Stale);
        assert!(state.partition.object_state("Counter", "k").is_none());
        assert_eq!(state.partition.invocation("inv_1").unwrap().journal.len(), 3);
        // A completion from an attempt that started before the suspension is stale.
        assert_eq!(effect(&mut state, 22, complete("inv_1", at(0, 0), vec![])), Outcome::Stale);
        assert_eq!(effect(&mut state, 23, complete("inv_1", at(0, 3), vec![set(b"b", b"2")])), Outcome::Applied);
        let values = state.partition.object_state("Counter", "k").unwrap();
        assert_eq!(values.get(&b"a"[..]).map(|v| &v[..]), Some(&b"1"[..]));
        assert_eq!(values.get(&b"b"[..]).map(|v| &v[..]), Some(&b"2"[..]));
        // The journal stays for its retention (here for ever).
        let done = state.partition.invocation("inv_1").unwrap();
        assert_eq!((done.status, done.journal.len(), done.modified_at_ms), (Status::Completed, 3, 23));
        assert_eq!(runnable(&state), vec!["inv_2"]);
        assert_eq!(state.partition.inbox("Counter", "k"), vec!["inv_2"]);
        assert_eq!(effect(&mut state, 24, complete("inv_1", at(0, 0), vec![])), Outcome::Stale);
        assert_eq!(state.partition.invocation("inv_1").unwrap().modified_at_ms, 23, "a stale effect changes nothing");
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
        let inv = state.partition.invocation("inv_1").unwrap();
        assert_eq!((inv.status, inv.attempts, inv.last_failure.as_deref()), (Status::BackingOff, 1, Some("boom")));
        // The key stays held; other keys run.
        assert_eq!(runnable(&state), vec!["inv_3"]);
        assert_eq!(state.partition.timers().collect::<Vec<_>>(), vec![(500, "inv_1")]);
        let wake = || Effect::Wake { id: "inv_1".to_owned() };
        assert_eq!(effect(&mut state, 499, wake()), Outcome::Stale);
        assert_eq!(effect(&mut state, 500, wake()), Outcome::Applied);
        assert_eq!(runnable(&state), vec!["inv_3", "inv_1"]);
        assert_eq!(state.partition.timers().count(), 0);
        assert_eq!(effect(&mut state, 505, failed(0, None, true)), Outcome::Stale, "from the run before the backoff");
        assert_eq!(effect(&mut state, 510, failed(2, None, true)), Outcome::Applied);
        assert_eq!(state.partition.invocation("inv_1").unwrap().status, Status::Paused);
        assert_eq!(runnable(&state), vec!["inv_3"]);
        assert_eq!(effect(&mut state, 520, Effect::Resume { id: "inv_1".to_owned() }), Outcome::Applied);
        assert_eq!(effect(&mut state, 525, failed(2, None, false)), Outcome::Stale, "from the run before the pause");
        assert_eq!(effect(&mut state, 530, failed(3, None, false)), Outcome::Applied);
        let inv = state.partition.invocation("inv_1").unwrap();
        assert_eq!(inv.completion, Some(Completion::Failure { code: 500, message: "boom".to_owned() }));
        assert_eq!(runnable(&state), vec!["inv_3", "inv_2"]);
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
        };
        assert_eq!(effect(&mut state, 10, progress), Outcome::Applied);
        assert_eq!(state.partition.invocation("inv_1").unwrap().status, Status::Suspended);
        assert!(runnable(&state).is_empty());
        assert_eq!(effect(&mut state, 1_000, Effect::Wake { id: "inv_1".to_owned() }), Outcome::Applied);
        let inv = state.partition.invocation("inv_1").unwrap();
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
        assert_eq!(state.partition.invocation("inv_1").unwrap().status, Status::Scheduled);
        assert_eq!(runnable(&state), vec!["inv_2"]);
        assert_eq!(effect(&mut state, 100, Effect::Wake { id: "inv_1".to_owned() }), Outcome::Applied);
        assert_eq!(state.partition.inbox("Counter", "k"), vec!["inv_2", "inv_1"]);
        assert_eq!(state.partition.invocation("inv_1").unwrap().status, Status::Pending);
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
        let inv = state.partition.invocation("inv_2").unwrap();
        assert_eq!(inv.completion, Some(Completion::Failure { code: 409, message: "canceled".to_owned() }));
        assert_eq!(state.partition.inbox("Counter", "k"), vec!["inv_1", "inv_3"]);
        // A running one is told through its journal; its current attempt becomes stale.
        assert_eq!(effect(&mut state, 2, cancel("inv_1")), Outcome::Applied);
        assert_eq!(state.partition.invocation("inv_1").unwrap().journal, vec![signal.clone()]);
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
        let first = state.partition.invocation("inv_1").unwrap().attempt().unwrap();
        assert_eq!(effect(&mut state, 1, Effect::Kill { id: "inv_1".to_owned() }), Outcome::Applied);
        assert_eq!(effect(&mut state, 2, Effect::Purge { id: "inv_1".to_owned() }), Outcome::Applied);
        apply(&mut state, vec![invoke("inv_1", None, HandlerType::Shared, None)]);
        let second = state.partition.invocation("inv_1").unwrap().attempt().unwrap();
        assert_eq!(first.base, second.base, "both start from an empty journal");
        assert_ne!(first, second);
        assert_eq!(effect(&mut state, 3, complete("inv_1", first, vec![])), Outcome::Stale);
        assert_eq!(state.partition.invocation("inv_1").unwrap().status, Status::Ready);
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
        let mut decoded: GroupState = crate::wire::decode(&crate::wire::encode(&state)).unwrap();
        assert_eq!(decoded.partition.status_counts(), [0; Status::ALL.len()], "counts are not encoded");
        decoded.partition.recount();
        let mut expected = [0; Status::ALL.len()];
        expected[Status::Ready.index()] = 1;
        expected[Status::Completed.index()] = 1;
        assert_eq!(decoded.partition.status_counts(), expected);
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
}
