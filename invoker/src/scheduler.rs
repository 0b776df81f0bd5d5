//! Runs the invocations of the partitions this node leads.
//!
//! One task per partition watches the applied state. While this node leads the
//! partition it starts an attempt for every runnable invocation (up to the
//! concurrency bound), proposes a wake-up for every due timer, and stops
//! attempts whose invocation was killed or changed under them. Each attempt
//! ends with one [`Effect`]; the effects of a partition are batched into one
//! log entry per proposal. An invocation counts as running until its effect is
//! applied, so it never runs twice at once on one node.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use ferry_log::{partition_group, GroupId, PartitionId};
use ferry_partition::partitioner::{attach_producer, outbox_producer, partition_of, reply_producer};
use ferry_partition::state::Resolved;
use ferry_partition::store::key;
use ferry_partition::watch::Watch;
use ferry_partition::wire::v1::{
    Attach, AttemptId, Command, Dedup, Effect, HandlerType, Invoke, JournalEntry, Notice, Notification, Outcome,
    Outgoing, ProtocolMode, Response, Retention, RetentionPolicy, ServiceType, Timeouts,
};
use ferry_partition::{Log, LogReads};
use ferry_telemetry::TraceContext;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::field::Empty;
use tracing::{debug, error, info, warn, Instrument, Span};

use crate::client::{Client, Endpoint, Next};
use crate::codec::{encode_raw, Message, ProtocolVersion};
use crate::journal::{self, reply_entry, Job, Targets};
use crate::retry::RetryPolicy;
use crate::Error;

/// How soon a leader without its lease looks again whether it may start attempts.
const LEASE_RETRY_MS: u64 = 50;

/// How the invoker runs attempts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct Options {
    /// Attempts running at once per partition.
    pub concurrency_per_partition: usize,
    /// An attempt that takes longer fails (and is retried); a streaming
    /// one fails when its handler sends nothing for this long after its
    /// request closed. A handler's manifest may set its own
    /// (`abortTimeout`).
    #[serde(with = "humantime_serde")]
    pub attempt_timeout: Duration,
    /// Effects proposed in one log entry at most.
    pub max_effects_per_entry: usize,
    /// Whether attempts of HTTP/2 deployments in bidirectional mode stream:
    /// the request stays open, each run's result is committed and answered
    /// while the handler goes on, instead of a new attempt after each.
    pub streaming: bool,
    /// How long a streaming attempt waits without a message from its
    /// handler before it closes the request, so that a handler waiting for
    /// something the stream does not bring (an awakeable) suspends. A
    /// handler's manifest may set its own (`inactivityTimeout`).
    #[serde(with = "humantime_serde")]
    pub stream_inactivity: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            concurrency_per_partition: 64,
            attempt_timeout: Duration::from_secs(60),
            max_effects_per_entry: 2048,
            streaming: true,
            stream_inactivity: Duration::from_millis(250),
        }
    }
}

/// Runs invocations on the partitions this node leads.
pub struct Invoker {
    log: Log,
    client: Client,
    options: Options,
    retry: Arc<RetryPolicy>,
    retention: RetentionPolicy,
}

impl Invoker {
    /// `retention` is the node's default for the invocations that handlers start.
    pub fn new(log: Log, options: Options, retry: RetryPolicy, retention: RetentionPolicy) -> Invoker {
        // A stall of half the lease's margin closes connections: what the
        // lease allowed reaches the deployment within the margin or not at all.
        let client = Client::new(options.attempt_timeout, log.lease_margin() / 2);
        Invoker { log, client, options, retry: Arc::new(retry), retention }
    }

    /// Runs until `cancel` fires; attempts still running then are dropped and
    /// run again from their journal after a restart.
    pub async fn run(self, cancel: CancellationToken) {
        let mut partitions = JoinSet::new();
        for partition in 0..self.log.partitions() {
            let (effects, rx) = mpsc::channel(self.options.max_effects_per_entry * 4);
            let group = partition_group(partition);
            partitions.spawn(write_effects(self.log.clone(), group, rx, self.options.max_effects_per_entry));
            let (crowded, crowded_rx) = watch::channel(false);
            let scheduler = PartitionScheduler {
                partition,
                concurrency: self.options.concurrency_per_partition,
                shared: Attempts {
                    group,
                    log: self.log.clone(),
                    client: self.client.clone(),
                    retry: self.retry.clone(),
                    retention: self.retention,
                    effects: EffectSender(effects),
                    streaming: self.options.streaming.then_some(self.options.stream_inactivity),
                    crowded: crowded_rx,
                },
                crowded,
                attempts: JoinSet::new(),
                running: HashMap::new(),
                waking: HashSet::new(),
                expiring: false,
                forgetting: false,
                delivering: false,
                outdated_checked_ms: 0,
            };
            partitions.spawn(scheduler.run(cancel.clone()));
        }
        while partitions.join_next().await.is_some() {}
    }
}

/// Sends effects to a partition's writer and waits for their outcome.
#[derive(Clone)]
struct EffectSender(mpsc::Sender<(Effect, oneshot::Sender<Option<Outcome>>)>);

impl EffectSender {
    /// The outcome once applied; `None` if the proposal failed (for example
    /// because leadership moved).
    async fn apply(&self, effect: Effect) -> Option<Outcome> {
        let (tx, rx) = oneshot::channel();
        self.0.send((effect, tx)).await.ok()?;
        rx.await.ok().flatten()
    }
}

/// Proposes the effects of a partition, as many per entry as are waiting
/// and fit in [`EFFECTS_BYTES_MAX`].
async fn write_effects(
    log: Log,
    group: GroupId,
    mut rx: mpsc::Receiver<(Effect, oneshot::Sender<Option<Outcome>>)>,
    max_batch: usize,
) {
    let mut waiting = Vec::new();
    while rx.recv_many(&mut waiting, max_batch).await > 0 {
        for batch in batches(waiting.drain(..)) {
            propose_effects(&log, group, batch).await;
        }
    }
}

/// The most bytes of effects in one entry.
const EFFECTS_BYTES_MAX: usize = ferry_log::COMMAND_BYTES_MAX / 2;

/// The most bytes of one effect: what fits in a command beside its framing.
const EFFECT_BYTES_MAX: usize = ferry_log::COMMAND_BYTES_MAX - (64 << 10);

/// Splits effects into entries of at most [`EFFECTS_BYTES_MAX`] (or one
/// effect). An effect that could never fit in a command (an output or a
/// journal too large) becomes a failure that pauses its invocation, so that
/// an operator sees it, instead of an attempt that runs again and again.
fn batches<R>(effects: impl Iterator<Item = (Effect, R)>) -> Vec<Vec<(Effect, R)>> {
    let mut batches = vec![Vec::new()];
    let mut bytes = 0;
    for (effect, reply) in effects {
        let mut size = ferry_partition::wire::encoded_len(&effect);
        let effect = match effect.attempt() {
            Some(attempt) if size > EFFECT_BYTES_MAX => {
                let message = format!("the attempt's result is {size} bytes, over the limit of {EFFECT_BYTES_MAX}");
                warn!(id = effect.id(), "{message}");
                let failed =
                    Effect::Failed { id: effect.id().to_owned(), attempt, message, retry_at_ms: None, pause: true };
                size = ferry_partition::wire::encoded_len(&failed);
                failed
            }
            _ => effect,
        };
        let batch = batches.last_mut().expect("never empty");
        if !batch.is_empty() && bytes + size > EFFECTS_BYTES_MAX {
            batches.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        batches.last_mut().expect("never empty").push((effect, reply));
    }
    batches.retain(|b| !b.is_empty());
    batches
}

async fn propose_effects(log: &Log, group: GroupId, batch: Vec<(Effect, oneshot::Sender<Option<Outcome>>)>) {
    let (effects, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
    let count = effects.len();
    let completions: Vec<bool> = effects.iter().map(|e| matches!(e, Effect::Complete { .. })).collect();
    metrics::histogram!("ferry_invoker_effects_per_entry").record(count as f64);
    match log.propose_as_leader(group, Command::Effects { at_ms: now_ms(), effects }).await {
        Ok(Response::Effects(outcomes)) if outcomes.len() == count => {
            let completed = outcomes.iter().zip(&completions).filter(|(o, &c)| c && **o == Outcome::Applied).count();
            metrics::counter!("ferry_invoker_invocations_completed_total").increment(completed as u64);
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(Some(outcome));
            }
        }
        Ok(other) => {
            warn!(group, "effects answered with {other:?}");
        }
        Err(e) => {
            debug!(group, "proposing {count} effects failed: {e}");
        }
    }
}

enum Done {
    Attempt(String),
    Woken(Vec<String>),
    Expired,
    Forgotten,
    Delivered,
}

/// How often running attempts are checked against the state for having been
/// outdated (their invocation killed, cancelled or woken meanwhile). Their
/// effects would be stale anyway; the check only frees their slots, and
/// looking up every running invocation on every applied batch is costly.
const OUTDATED_CHECK_MS: u64 = 100;

/// How often a partition leader looks for deleted subscriptions whose dedup
/// entries it still holds.
const FORGET_INTERVAL: Duration = Duration::from_secs(5);

/// Most retention steps one entry takes: a backlog of expiries goes in
/// entries that each apply quickly.
const EXPIRE_MAX: u32 = 1024;
/// How late a retention step may be taken, so that one entry takes the
/// steps of a second rather than one entry each.
const EXPIRE_SLACK_MS: u64 = 1_000;

struct Running {
    abort: AbortHandle,
    attempt: AttemptId,
    bases: Arc<Bases>,
}

/// The journal lengths a running attempt may be based on: a streaming
/// attempt's base grows with each checkpoint, and while one is proposed,
/// both the length before and the one after are its own.
#[derive(Debug)]
struct Bases {
    low: AtomicU32,
    high: AtomicU32,
}

impl Bases {
    fn new(base: u32) -> Bases {
        Bases { low: AtomicU32::new(base), high: AtomicU32::new(base) }
    }

    /// A checkpoint that brings the journal to `base` is proposed.
    fn proposing(&self, base: u32) {
        self.high.store(base, Ordering::Release);
    }

    /// The checkpoint to `base` is applied.
    fn applied(&self, base: u32) {
        self.low.store(base, Ordering::Release);
    }

    fn hold(&self, base: u32) -> bool {
        (self.low.load(Ordering::Acquire)..=self.high.load(Ordering::Acquire)).contains(&base)
    }
}

/// Most outbox rows one delivery takes (and at most [`EFFECTS_BYTES_MAX`] of
/// them): a backlog goes in several.
const OUTBOX_BATCH: usize = 1024;

/// How long a delivery retries a partition that takes no appends before it
/// starts again from the outbox.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// What the attempts of one partition share.
#[derive(Clone)]
struct Attempts {
    group: GroupId,
    log: Log,
    client: Client,
    retry: Arc<RetryPolicy>,
    retention: RetentionPolicy,
    effects: EffectSender,
    /// The inactivity limit of streaming attempts; `None`: attempts do not stream.
    streaming: Option<Duration>,
    /// Whether invocations of the partition wait for a slot: streaming
    /// attempts then stop waiting for what arrives for them, and suspend.
    crowded: watch::Receiver<bool>,
}

impl Targets for Attempts {
    fn resolve(&self, service: &str, handler: &str, idempotent: bool) -> Result<Resolved, (String, Retention)> {
        self.log
            .read_metadata(|m| m.resolve(service, handler, self.retention, idempotent))
            .map_err(|(_, message)| (message, self.retention.retention(HandlerType::Shared, idempotent)))
    }

    fn workflow_run(&self, service: &str) -> Option<String> {
        self.log.read_metadata(|m| {
            let service = m.services.get(service).filter(|s| s.def.ty == ServiceType::Workflow)?;
            Some(service.def.handlers.iter().find(|h| h.ty == HandlerType::Workflow)?.name.clone())
        })
    }
}

struct PartitionScheduler {
    partition: PartitionId,
    concurrency: usize,
    shared: Attempts,
    attempts: JoinSet<Done>,
    running: HashMap<String, Running>,
    /// Invocations whose wake-up is proposed but not applied yet.
    waking: HashSet<String>,
    /// Whether an [`Command::Expire`] is proposed but not applied yet.
    expiring: bool,
    /// Whether [`Command::ForgetSubscription`]s are proposed but not applied yet.
    forgetting: bool,
    /// Whether outbox rows are being delivered.
    delivering: bool,
    /// When running attempts were last checked for being outdated.
    outdated_checked_ms: u64,
    crowded: watch::Sender<bool>,
}

impl PartitionScheduler {
    async fn run(mut self, cancel: CancellationToken) {
        let Ok(mut changes) = self.shared.log.partition_changes(self.partition) else {
            return;
        };
        // What the log holds already (after a restart) runs without waiting for a change.
        let mut next_timer = if self.shared.log.is_leader(self.shared.group) { self.schedule() } else { None };
        let mut forget = tokio::time::interval(FORGET_INTERVAL);
        forget.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let leader = self.shared.log.is_leader(self.shared.group);
            let timer = async {
                match next_timer {
                    Some(at) => tokio::time::sleep(Duration::from_millis(at.saturating_sub(now_ms()))).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                changed = changes.changed() => if changed.is_err() { break },
                Some(done) = self.attempts.join_next(), if !self.attempts.is_empty() => match done {
                    Ok(Done::Attempt(id)) => { self.running.remove(&id); }
                    Ok(Done::Woken(ids)) => for id in ids { self.waking.remove(&id); },
                    Ok(Done::Expired) => self.expiring = false,
                    Ok(Done::Forgotten) => self.forgetting = false,
                    Ok(Done::Delivered) => self.delivering = false,
                    // Aborted: its slot was freed by whoever aborted it. Attempts
                    // catch their own panics (see `supervised`).
                    Err(_) => {}
                },
                _ = timer, if leader => {}
                _ = tokio::time::sleep(Duration::from_millis(200)), if !leader => {}
                _ = forget.tick(), if leader => self.forget_deleted(),
            }
            if !self.shared.log.is_leader(self.shared.group) {
                if !self.running.is_empty() {
                    debug!(partition = self.partition, "not the leader: stopping attempts");
                }
                self.stop_all();
                next_timer = None;
                continue;
            }
            next_timer = self.schedule();
        }
        self.stop_all();
    }

    fn stop_all(&mut self) {
        self.attempts.abort_all();
        self.running.clear();
        self.waking.clear();
        self.expiring = false;
        self.forgetting = false;
        self.delivering = false;
    }

    /// Proposes to drop the dedup entries of subscriptions deleted since
    /// their records came here.
    fn forget_deleted(&mut self) {
        if self.forgetting {
            return;
        }
        let log = &self.shared.log;
        let Ok(here) = log.read_partition(self.partition, |p| p.subscriptions_with_dedup()) else {
            return;
        };
        let deleted: Vec<String> =
            log.read_metadata(|m| here.into_iter().filter(|s| m.deleted_subscriptions.contains(s)).collect());
        if deleted.is_empty() {
            return;
        }
        self.forgetting = true;
        let (log, group) = (log.clone(), self.shared.group);
        self.attempts.spawn(async move {
            for id in deleted {
                match log.propose_as_leader(group, Command::ForgetSubscription { id: id.clone() }).await {
                    Ok(Response::Forgotten { producers }) => {
                        info!(group, subscription = %id, producers, "dropped the dedup entries of a deleted subscription");
                        metrics::counter!("ferry_dedup_producers_forgotten_total").increment(producers.into());
                    }
                    Ok(other) => warn!(group, "forgetting {id} answered with {other:?}"),
                    Err(e) => debug!(group, "forgetting {id} failed: {e}"),
                }
            }
            Done::Forgotten
        });
    }

    /// Starts what may run and wakes what is due; returns the next timer.
    /// Starts nothing new while this node's lease on the partition is in
    /// doubt (it has not heard from a quorum lately).
    fn schedule(&mut self) -> Option<u64> {
        let now = now_ms();
        let lease = self.shared.log.holds_lease(self.shared.group);
        let free = if lease { self.concurrency.saturating_sub(self.running.len()) } else { 0 };
        let check_outdated = now >= self.outdated_checked_ms + OUTDATED_CHECK_MS;
        if check_outdated {
            self.outdated_checked_ms = now;
        }
        let running = &self.running;
        let waking = &self.waking;
        let delivering = self.delivering;
        // Handlers that read state lazily, read before the partition's state.
        let lazy_handlers: Vec<(String, String)> = self.shared.log.read_metadata(|m| {
            let services = m.services.values().map(|s| &s.def);
            services
                .flat_map(|s| s.handlers.iter().filter(|h| h.lazy_state).map(|h| (s.name.clone(), h.name.clone())))
                .collect()
        });
        let lazy_handlers: HashSet<(&str, &str)> =
            lazy_handlers.iter().map(|(s, h)| (s.as_str(), h.as_str())).collect();
        let read = self.shared.log.read_partition(self.partition, |state| {
            // Attempts whose invocation was killed, cancelled or woken meanwhile.
            let mut outdated = Vec::new();
            if check_outdated {
                for (id, r) in running {
                    let current = state.invocation(id)?.and_then(|inv| inv.attempt());
                    if !current.is_some_and(|at| at.run == r.attempt.run && r.bases.hold(at.base)) {
                        outdated.push(id.clone());
                    }
                }
            }
            let mut ids = Vec::new();
            let mut crowded = false;
            state.runnable_ids(|id| {
                if running.contains_key(id) {
                    return ControlFlow::Continue(());
                }
                if ids.len() == free {
                    crowded = true;
                    return ControlFlow::Break(());
                }
                ids.push(id.to_owned());
                ControlFlow::Continue(())
            })?;
            let mut jobs = Vec::with_capacity(ids.len());
            for id in ids {
                let Some(inv) = state.invocation(&id)? else { continue };
                let object = match inv.target.key.as_deref() {
                    Some(key) => Some(state.object_state(&inv.target.service, key)?),
                    None => None,
                };
                let lazy = lazy_handlers.contains(&(inv.target.service.as_str(), inv.target.handler.as_str()));
                jobs.push(Job::new(&inv, object, lazy, now));
            }
            let mut due = Vec::new();
            let mut next = None;
            state.timers(|at, id| {
                if at > now {
                    next = Some(at);
                    return ControlFlow::Break(());
                }
                if !waking.contains(id) {
                    due.push(id.to_owned());
                }
                ControlFlow::Continue(())
            })?;
            let outbox = if delivering { Vec::new() } else { state.outbox(OUTBOX_BATCH, EFFECTS_BYTES_MAX)? };
            Ok((outdated, jobs, due, next, state.next_expiry()?, outbox, crowded))
        });
        let Ok((outdated, jobs, due, next, expiry, outbox, crowded)) = read else {
            return None;
        };
        self.crowded.send_if_modified(|was| std::mem::replace(was, crowded) != crowded);
        if !outbox.is_empty() {
            self.delivering = true;
            self.attempts.spawn(deliver(self.shared.log.clone(), self.partition, outbox));
        }
        for id in outdated {
            if let Some(running) = self.running.remove(&id) {
                running.abort.abort();
            }
        }
        for job in jobs {
            let id = job.id.clone();
            let attempt_id = job.attempt;
            let bases = Arc::new(Bases::new(attempt_id.base));
            let abort = self.attempts.spawn(supervised(job, self.shared.clone(), bases.clone()));
            self.running.insert(id, Running { abort, attempt: attempt_id, bases });
        }
        metrics::gauge!("ferry_invoker_running", "partition" => self.partition.to_string())
            .set(self.running.len() as f64);
        if !due.is_empty() {
            self.waking.extend(due.iter().cloned());
            let effects = self.shared.effects.clone();
            self.attempts.spawn(async move {
                let wakes = due.iter().map(|id| effects.apply(Effect::Wake { id: id.clone() }));
                futures::future::join_all(wakes).await;
                Done::Woken(due)
            });
        }
        // What retention no longer keeps goes in one entry for many
        // invocations, stamped with this leader's clock.
        let next = match expiry.map(|at| at.saturating_add(EXPIRE_SLACK_MS)) {
            Some(at) if at <= now => {
                if !self.expiring {
                    self.expiring = true;
                    let (log, group) = (self.shared.log.clone(), self.shared.group);
                    self.attempts.spawn(expire(log, group));
                }
                next
            }
            Some(at) => Some(next.map_or(at, |next| next.min(at))),
            None => next,
        };
        // Attempts not checked this time are checked at the latest when the
        // interval is up.
        let next = if !check_outdated && !self.running.is_empty() {
            let check_at = self.outdated_checked_ms + OUTDATED_CHECK_MS;
            Some(next.map_or(check_at, |at| at.min(check_at)))
        } else {
            next
        };
        // Without the lease, look again shortly: it comes back with the next
        // quorum acknowledgement, which applies nothing that would wake us.
        if lease {
            next
        } else {
            Some(next.map_or(now + LEASE_RETRY_MS, |at| at.min(now + LEASE_RETRY_MS)))
        }
    }
}

/// Delivers outbox rows to their partitions, then drops the rows: creates
/// the invocations, appends results and signals to their invocations'
/// journals, and then kills the invocations to kill and asks for the
/// results that handlers attach to. Each row but a kill goes under a
/// producer of this partition (one each for invocations, for results and
/// signals, and for requests for results) with its row's sequence number,
/// so a row delivered again (after a failed append or by the next leader)
/// is dropped as a duplicate; a kill delivered again finds its invocation
/// completed. One delivery runs at a time per partition, so each partition
/// receives a producer's rows in order.
async fn deliver(log: Log, partition: PartitionId, rows: Vec<(u64, Outgoing)>) -> Done {
    let group = partition_group(partition);
    let (producer, replies, asks) = (outbox_producer(partition), reply_producer(partition), attach_producer(partition));
    let upto = rows.last().map_or(0, |(seq, _)| *seq);
    let owner =
        |id: &str| partition_of(key::id_parts(id).map_or(0, |(partition_key, _)| partition_key), log.partitions());
    let mut invokes: BTreeMap<PartitionId, Vec<Invoke>> = BTreeMap::new();
    let mut results: BTreeMap<PartitionId, Vec<Notification>> = BTreeMap::new();
    let mut kills: BTreeMap<PartitionId, Vec<Effect>> = BTreeMap::new();
    let mut attaches: BTreeMap<PartitionId, Vec<Attach>> = BTreeMap::new();
    for (seq, row) in rows {
        match row {
            Outgoing::Invoke(mut invoke) => {
                invoke.dedup = Some(Dedup { producer, seq });
                invokes.entry(owner(&invoke.id)).or_default().push(*invoke);
            }
            Outgoing::Reply { to, result } => {
                let entry = reply_entry(&to, result);
                let dedup = Some(Dedup { producer: replies, seq });
                let notification = Notification { id: to.caller, notice: Notice::CallResult, entry, dedup };
                results.entry(owner(&notification.id)).or_default().push(notification);
            }
            Outgoing::Signal { id, notice, entry } => {
                let dedup = Some(Dedup { producer: replies, seq });
                results.entry(owner(&id)).or_default().push(Notification { id, notice, entry, dedup });
            }
            Outgoing::Kill { id } => kills.entry(owner(&id)).or_default().push(Effect::Kill { id }),
            Outgoing::Attach { id, to } => {
                let dedup = Dedup { producer: asks, seq };
                attaches.entry(owner(&id)).or_default().push(Attach { id, to, dedup });
            }
        }
    }
    let at_ms = now_ms();
    let commands = invokes
        .into_iter()
        .map(|(target, batch)| (target, Command::Invoke(Arc::new(batch))))
        .chain(results.into_iter().map(|(target, notifications)| (target, Command::Notify { at_ms, notifications })));
    let mut delivered = propose_all(&log, partition, commands).await;
    // After the invocations they kill or ask about are created.
    if delivered && !(kills.is_empty() && attaches.is_empty()) {
        let commands = kills
            .into_iter()
            .map(|(target, effects)| (target, Command::Effects { at_ms, effects }))
            .chain(attaches.into_iter().map(|(target, requests)| (target, Command::Attach(requests))));
        delivered = propose_all(&log, partition, commands).await;
    }
    if delivered && !kept_for_test() {
        if let Err(e) = log.propose_as_leader(group, Command::TruncateOutbox { upto }).await {
            debug!(partition, "truncating the outbox failed: {e}");
        }
    } else {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Done::Delivered
}

/// Appends each command to its partition, retried until it commits;
/// answers whether all did.
async fn propose_all(
    log: &Log,
    partition: PartitionId,
    commands: impl Iterator<Item = (PartitionId, Command)>,
) -> bool {
    let appends = commands.map(|(target, command)| {
        let log = log.clone();
        async move {
            match log.propose_until(partition_group(target), command, DELIVERY_TIMEOUT).await {
                Ok(Response::Invoked { created, deduplicated }) => {
                    metrics::counter!("ferry_outbox_delivered_total").increment(created.into());
                    metrics::counter!("ferry_outbox_duplicates_total").increment(deduplicated.into());
                    true
                }
                Ok(Response::Notified { appended, dropped }) => {
                    metrics::counter!("ferry_outbox_results_delivered_total").increment(appended.into());
                    metrics::counter!("ferry_outbox_results_dropped_total").increment(dropped.into());
                    true
                }
                Ok(Response::Attached { .. }) => true,
                Ok(Response::Effects(outcomes)) => {
                    let killed = outcomes.iter().filter(|o| **o == Outcome::Applied).count();
                    metrics::counter!("ferry_outbox_kills_total").increment(killed as u64);
                    true
                }
                Ok(other) => {
                    warn!(partition, target, "delivering outbox rows answered with {other:?}");
                    false
                }
                Err(e) => {
                    debug!(partition, target, "delivering outbox rows failed: {e}");
                    false
                }
            }
        }
    });
    futures::future::join_all(appends).await.into_iter().all(|ok| ok)
}

/// Proposes that `group` drop what retention no longer keeps.
async fn expire(log: Log, group: GroupId) -> Done {
    match log.propose_as_leader(group, Command::Expire { at_ms: now_ms(), max: EXPIRE_MAX }).await {
        Ok(Response::Expired { invocations, journals }) => {
            metrics::counter!("ferry_invocations_expired_total", "what" => "invocation").increment(invocations.into());
            metrics::counter!("ferry_invocations_expired_total", "what" => "journal").increment(journals.into());
        }
        Ok(other) => warn!(group, "expiry answered with {other:?}"),
        Err(e) => debug!(group, "proposing expiry failed: {e}"),
    }
    Done::Expired
}

/// The deployment serving a handler, as owned values.
struct Target {
    uri: String,
    http2: bool,
    /// HTTP/2 and bidirectional: attempts may stream.
    streams: bool,
    headers: BTreeMap<String, String>,
    version: ProtocolVersion,
    /// The handler's own timeouts: an operator's, else its manifest's.
    timeouts: Timeouts,
}

fn resolve(log: &Log, service: &str, handler: &str) -> Result<Target, String> {
    log.read_metadata(|m| {
        let registered = m.services.get(service).ok_or_else(|| format!("service {service} is not registered"))?;
        let manifest = registered.def.handler(handler).map(|h| h.timeouts).unwrap_or_default();
        let set = registered.config.timeouts;
        let timeouts = Timeouts {
            inactivity_ms: set.inactivity_ms.or(manifest.inactivity_ms),
            abort_ms: set.abort_ms.or(manifest.abort_ms),
        };
        let deployment = m
            .deployments
            .get(&registered.deployment_id)
            .ok_or_else(|| format!("deployment {} of {service} is gone", registered.deployment_id))?;
        let version = ProtocolVersion::negotiate(deployment.min_protocol_version, deployment.max_protocol_version)
            .ok_or_else(|| format!("deployment {} speaks no protocol version Ferry knows", deployment.id))?;
        Ok(Target {
            uri: deployment.uri.clone(),
            http2: deployment.http2,
            streams: deployment.http2 && deployment.protocol_mode == ProtocolMode::BidiStream,
            headers: deployment.additional_headers.clone(),
            version,
            timeouts,
        })
    })
}

/// The span of one attempt, a child of the span the invocation was created
/// under; disabled when that one was not sampled or nothing is exported.
fn attempt_span(job: &Job) -> Span {
    let Some(parent) = job.trace.filter(|_| ferry_telemetry::exporting()) else {
        return Span::none();
    };
    let span = tracing::debug_span!(
        parent: None,
        "invoke",
        otel.name = format!("invoke {}/{}", job.service, job.handler),
        otel.kind = "client",
        otel.status_code = Empty,
        otel.status_description = Empty,
        rpc.system = "restate",
        rpc.service = %job.service,
        rpc.method = %job.handler,
        restate.invocation.id = %job.id,
        restate.invocation.attempt = job.attempts + 1,
        restate.journal.length = job.attempt.base,
        ferry.outcome = Empty,
    );
    parent.adopt(&span);
    span
}

/// Runs [`attempt`]; if it panics, the attempt counts as failed (retried after
/// a backoff like any failure) rather than holding its slot for ever.
async fn supervised(job: Job, shared: Attempts, bases: Arc<Bases>) -> Done {
    let fallback = job.clone();
    let run = std::panic::AssertUnwindSafe(attempt(job, shared.clone(), bases));
    match futures::FutureExt::catch_unwind(run).await {
        Ok(done) => done,
        Err(panic) => {
            let reason = ferry_telemetry::panic_message(panic.as_ref());
            error!(id = %fallback.id, "an attempt panicked: {reason}");
            metrics::counter!("ferry_invoker_attempt_panics_total").increment(1);
            let failed =
                fallback.effect(Err(format!("the attempt panicked: {reason}")), &shared, &shared.retry, now_ms());
            shared.effects.apply(failed).await;
            Done::Attempt(fallback.id)
        }
    }
}

/// Tests keep delivered outbox rows here, so that they are delivered
/// again: `outbox-truncate=3*return`.
fn kept_for_test() -> bool {
    fail::fail_point!("outbox-truncate", |_| true);
    false
}

/// Tests hold an attempt here, between the scheduler starting it and its
/// request, for the milliseconds given: `invoker-attempt-hold=return(ms)`.
fn held_for_test() -> Option<Duration> {
    fail::fail_point!("invoker-attempt-hold", |ms| ms.and_then(|ms| ms.parse().ok()).map(Duration::from_millis));
    None
}

/// Tests stop this whole process (SIGSTOP) for the milliseconds given, the
/// moment an attempt's journal has passed its lease check and before it is
/// written: `invoker-send-stop=1*return(ms)`. Always true.
fn stopped_for_test() -> bool {
    fail::fail_point!("invoker-send-stop", |ms| {
        let seconds = ms.and_then(|ms| ms.parse::<f64>().ok()).unwrap_or(1000.0) / 1000.0;
        let pid = std::process::id().to_string();
        let wake = format!("sleep {seconds}; kill -CONT {pid}");
        if std::process::Command::new("sh").args(["-c", &wake]).spawn().is_ok() {
            let _ = std::process::Command::new("kill").args(["-STOP", &pid]).status();
        }
        true
    });
    true
}

async fn attempt(job: Job, shared: Attempts, bases: Arc<Bases>) -> Done {
    // Tests make attempts panic here.
    fail::fail_point!("invoker-attempt");
    if let Some(hold) = held_for_test() {
        tokio::time::sleep(hold).await;
    }
    let targets = shared.clone();
    let Attempts { group, log, client, retry, effects, streaming, .. } = shared;
    let span = attempt_span(&job);
    let traceparent = TraceContext::of(&span).map(|c| c.traceparent());
    let started = Instant::now();
    let ran = match resolve(&log, &job.service, &job.handler) {
        Ok(target) => {
            let client = match target.timeouts.abort_ms {
                Some(ms) => client.with_timeout(Duration::from_millis(ms)),
                None => client,
            };
            let endpoint = Endpoint {
                uri: &target.uri,
                http2: target.http2,
                headers: &target.headers,
                version: target.version,
                service: &job.service,
                handler: &job.handler,
            };
            // The lease is asked again as the journal is written: the
            // scheduler's answer may be old by then.
            let lease = log.clone();
            let may_send = move || lease.holds_lease(group) && stopped_for_test();
            let traceparent = traceparent.as_deref();
            match streaming.filter(|_| target.streams) {
                Some(inactivity) => {
                    let inactivity = target.timeouts.inactivity_ms.map_or(inactivity, Duration::from_millis);
                    let stream =
                        Streamed { job: &job, targets: &targets, retry: &retry, effects: &effects, bases: &bases };
                    stream.run(&client, &endpoint, traceparent, may_send, inactivity).instrument(span.clone()).await
                }
                None => {
                    let call = client.attempt_encoded(&endpoint, job.body.clone(), traceparent, may_send);
                    match call.instrument(span.clone()).await {
                        Err(e @ (Error::NotSent { .. } | Error::Stalled { .. })) => Err(Abandoned::from(e)),
                        result => Ok(job.effect(result.map_err(|e| e.to_string()), &targets, &retry, now_ms())),
                    }
                }
            }
        }
        Err(e) => Ok(job.effect(Err(e), &targets, &retry, now_ms())),
    };
    let effect = match ran {
        Ok(effect) => effect,
        Err(abandoned) => {
            let outcome = abandoned.outcome();
            debug!(id = %job.id, "attempt abandoned: {}", abandoned.reason());
            metrics::counter!("ferry_invoker_attempts_total", "outcome" => outcome).increment(1);
            span.record("ferry.outcome", outcome);
            return Done::Attempt(job.id);
        }
    };
    metrics::histogram!("ferry_invoker_attempt_seconds").record(started.elapsed().as_secs_f64());
    let kind = match &effect {
        Effect::Complete { .. } => "completed",
        Effect::Progress { .. } => "suspended",
        _ => "failed",
    };
    span.record("ferry.outcome", kind);
    if let Effect::Failed { message, .. } = &effect {
        debug!(id = %job.id, "attempt failed: {message}");
        span.record("otel.status_code", "ERROR");
        span.record("otel.status_description", message.as_str());
    }
    metrics::counter!("ferry_invoker_attempts_total", "outcome" => kind).increment(1);
    let commit = if span.is_disabled() {
        Span::none()
    } else {
        tracing::debug_span!(parent: &span, "commit", restate.invocation.id = %job.id, ferry.outcome = kind)
    };
    effects.apply(effect).instrument(commit).await;
    Done::Attempt(job.id)
}

/// Why an attempt ended without an effect of its own. Not a failure of the
/// attempt: it runs again, from the journal as committed, if this node
/// still leads.
enum Abandoned {
    /// The lease on its partition lapsed before (the rest of) its journal
    /// was written.
    NotSent,
    /// This node stalled while it ran, so its connection was closed.
    Stalled,
    /// A checkpoint was not applied: the invocation changed meanwhile, or
    /// this node no longer leads.
    Outdated,
}

impl From<Error> for Abandoned {
    fn from(e: Error) -> Abandoned {
        match e {
            Error::Stalled { .. } => Abandoned::Stalled,
            _ => Abandoned::NotSent,
        }
    }
}

impl Abandoned {
    fn outcome(&self) -> &'static str {
        match self {
            Abandoned::NotSent => "not-sent",
            Abandoned::Stalled => "stalled",
            Abandoned::Outdated => "outdated",
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Abandoned::NotSent => "the lease on its partition lapsed",
            Abandoned::Stalled => "this node stalled while it ran",
            Abandoned::Outdated => "a checkpoint was not applied",
        }
    }
}

/// An attempt that streams: each batch of the handler's messages is taken
/// as it comes; lazy reads and call ids are answered at once, run results
/// once a checkpoint made them durable. When the handler waits for something
/// the stream does not bring itself (a call's result, a signal), what it
/// sent is checkpointed and the attempt waits with it while the partition
/// has free slots: what arrives for the invocation meanwhile (durable
/// already, beside its journal) is told to the handler, and the attempt's
/// next effect puts it in the journal where the handler saw it. The request
/// is closed (and the handler then suspends as in request-response mode)
/// when nothing came for the inactivity limit, when the handler waits for a
/// sleep or a promise, or when other invocations wait for a slot.
struct Streamed<'a> {
    job: &'a Job,
    targets: &'a Attempts,
    retry: &'a RetryPolicy,
    effects: &'a EffectSender,
    bases: &'a Bases,
}

/// What a streaming attempt waited for.
enum Woke {
    Handler(Result<Next, Error>),
    Arrived,
    Crowded,
}

impl Streamed<'_> {
    async fn run(
        self,
        client: &Client,
        endpoint: &Endpoint<'_>,
        traceparent: Option<&str>,
        may_send: impl Fn() -> bool + Send + Sync + 'static,
        inactivity: Duration,
    ) -> Result<Effect, Abandoned> {
        let mut recorder = self.job.recorder(self.targets, self.retry, now_ms());
        let failed = |recorder: &mut journal::Recorder<'_>, e: Error| match e {
            Error::NotSent { .. } | Error::Stalled { .. } => Err(Abandoned::from(e)),
            e => {
                recorder.at(now_ms());
                Ok(recorder.fail(e.to_string()))
            }
        };
        let mut crowded = self.targets.crowded.clone();
        let mut stream = match client.stream(endpoint, self.job.body.clone(), traceparent, may_send).await {
            Ok(stream) => stream,
            Err(e) => return failed(&mut recorder, e),
        };
        // The handler waits for what may arrive for the invocation.
        let mut waiting = false;
        // Watched from the handler's first wait on (apply takes no lock for
        // invocations nobody watches); what arrived before is read then.
        let mut watch: Option<Watch> = None;
        let mut look = false;
        loop {
            let quiet = stream.is_open().then_some(inactivity);
            let woke = match &watch {
                Some(_) if waiting && stream.is_open() && look => {
                    look = false;
                    Woke::Arrived
                }
                Some(watch) if waiting && stream.is_open() => tokio::select! {
                    next = stream.next(quiet) => Woke::Handler(next),
                    _ = watch.changed() => Woke::Arrived,
                    _ = crowded.wait_for(|crowded| *crowded) => Woke::Crowded,
                },
                _ => Woke::Handler(stream.next(quiet).await),
            };
            recorder.at(now_ms());
            let messages = match woke {
                Woke::Crowded => {
                    stream.close();
                    continue;
                }
                Woke::Arrived => {
                    // What arrived is durable already, beside the journal. The
                    // handler is told what it was not told yet; the next effect
                    // puts it in the journal before what the handler sends next.
                    let Some(arrived) = self.arrived(&recorder)? else { continue };
                    let fresh = arrived.get(recorder.told_arrived() as usize..).unwrap_or_default();
                    if fresh.is_empty() {
                        continue;
                    }
                    recorder.tell_arrived(fresh.len() as u32);
                    let mut body = BytesMut::new();
                    for entry in fresh {
                        encode_raw(entry.ty, &entry.body, &mut body);
                    }
                    stream.send_encoded(body.freeze());
                    metrics::counter!("ferry_invoker_arrivals_streamed_total").increment(fresh.len() as u64);
                    continue;
                }
                Woke::Handler(Err(e)) => return failed(&mut recorder, e),
                Woke::Handler(Ok(Next::Ended(ending))) => return Ok(recorder.finish(ending)),
                Woke::Handler(Ok(Next::Quiet)) => {
                    stream.close();
                    continue;
                }
                Woke::Handler(Ok(Next::Messages(messages))) => messages,
            };
            let mut answers = Vec::new();
            let mut awaits_elsewhere = false;
            if tracing::enabled!(tracing::Level::TRACE) {
                let types: Vec<String> = messages.iter().map(|m| m.message_type().to_string()).collect();
                tracing::trace!(id = %self.job.id, open = stream.is_open(), "handler sent {}", types.join(", "));
            }
            for message in messages {
                if let Message::AwaitingOn(awaiting) = &message {
                    awaits_elsewhere = !awaiting.executing_side_effects
                        && !awaiting.awaiting_on.as_ref().is_some_and(|f| recorder.answers(f));
                }
                match recorder.push(message) {
                    Ok(answer) => answers.extend(answer),
                    Err(effect) => return Ok(*effect),
                }
            }
            if !stream.is_open() {
                continue;
            }
            stream.send(&answers);
            waiting = false;
            if recorder.has_proposals() {
                if !recorder.can_checkpoint() {
                    stream.close();
                    continue;
                }
                self.checkpoint(&mut recorder, &mut stream).await?;
            } else if awaits_elsewhere || (endpoint.version < ProtocolVersion::V7 && recorder.waits_elsewhere()) {
                // What a sleep or a promise brings comes with a later attempt
                // only. A call waited for starts once it is checkpointed.
                if recorder.can_checkpoint() && !*crowded.borrow() {
                    if recorder.has_uncheckpointed() {
                        self.checkpoint(&mut recorder, &mut stream).await?;
                    }
                    if watch.is_none() {
                        watch = self.targets.log.machine(self.targets.group).ok().map(|m| m.watch(&self.job.id));
                        look = true;
                    }
                    waiting = true;
                } else {
                    stream.close();
                }
            }
        }
    }

    /// Makes what the handler sent since the last checkpoint durable (after
    /// what arrived that it was told before), and answers its run proposals.
    async fn checkpoint(
        &self,
        recorder: &mut journal::Recorder<'_>,
        stream: &mut crate::client::Stream,
    ) -> Result<(), Abandoned> {
        let checkpoint = recorder.checkpoint().expect("only what may be checkpointed is");
        let base = recorder.base_after_checkpoint();
        self.bases.proposing(base);
        if self.effects.apply(checkpoint).await != Some(Outcome::Applied) {
            return Err(Abandoned::Outdated);
        }
        self.bases.applied(base);
        metrics::counter!("ferry_invoker_checkpoints_total").increment(1);
        let acks = recorder.checkpointed();
        stream.send(&acks);
        Ok(())
    }

    /// What arrived for the invocation while its attempt runs, if anything;
    /// an invocation that is no longer at this attempt outdates it.
    fn arrived(&self, recorder: &journal::Recorder<'_>) -> Result<Option<Vec<JournalEntry>>, Abandoned> {
        let attempt = recorder.attempt();
        let read = self.targets.log.read(self.targets.group, |machine, view| {
            let current = machine.partition(view).invocation(&self.job.id)?;
            Ok(current.filter(|inv| inv.attempt() == Some(attempt)).map(|inv| inv.arrived().to_vec()))
        });
        match read {
            Ok(Some(arrived)) => Ok(Some(arrived).filter(|a| !a.is_empty())),
            Ok(None) | Err(_) => Err(Abandoned::Outdated),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use ferry_partition::state::Completion;

    use super::*;

    fn complete(id: &str, output_bytes: usize) -> Effect {
        Effect::Complete {
            id: id.to_owned(),
            attempt: AttemptId { run: 1, base: 0 },
            state: vec![],
            result: Completion::Success(Bytes::from(vec![0u8; output_bytes])),
            sends: vec![],
            promises: vec![],
        }
    }

    /// Case 6: effects go in entries of bounded size, and one that could
    /// never be written pauses its invocation instead of failing its entry
    /// (and every effect in it) again and again.
    #[test]
    fn case6_effects_are_batched_by_size_and_an_oversized_one_pauses() {
        let mb = 1 << 20;
        let effects = vec![complete("a", 3 * mb), complete("b", 3 * mb), complete("c", 3 * mb), complete("d", 20 * mb)];
        let batches = batches(effects.into_iter().map(|e| (e, ())));
        let ids: Vec<Vec<&str>> = batches.iter().map(|b| b.iter().map(|(e, _)| e.id()).collect()).collect();
        // "d" becomes a small failure, which fits beside "c".
        assert_eq!(ids, vec![vec!["a", "b"], vec!["c", "d"]]);
        for batch in &batches {
            let bytes: usize = batch.iter().map(|(e, _)| ferry_partition::wire::encoded_len(e)).sum();
            assert!(bytes <= EFFECTS_BYTES_MAX || batch.len() == 1, "{bytes}");
        }
        match &batches[1][1].0 {
            Effect::Failed { pause, message, retry_at_ms, attempt, .. } => {
                assert!(*pause && retry_at_ms.is_none(), "{message}");
                assert_eq!(*attempt, AttemptId { run: 1, base: 0 });
                assert!(message.contains("over the limit"), "{message}");
            }
            other => panic!("an oversized effect was kept: {}", other.id()),
        }
    }
}
