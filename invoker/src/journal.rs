//! Between the log and the protocol: the request body of an attempt is built
//! from an invocation's journal, and what the deployment answered becomes the
//! one [`Effect`] the invoker appends to the log.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferry_partition::partitioner::invocation_ids;
use ferry_partition::state::{Completion, Invocation, Resolved};
use ferry_partition::store::key;
use ferry_partition::wire::v1::{
    AttemptId, Effect, HandlerType, Invoke, JournalEntry, Notice, Outgoing, PromiseOp, ReplyKind, ReplyTo, Retention,
    ServiceType, Sleep, Source, StateOp, Target,
};
use ferry_proto::service_protocol as pb;
use ferry_telemetry::TraceContext;

use crate::client::{Attempt, Ending};
use crate::codec::{encode, encode_raw, Message};
use crate::retry::{OnMaxAttempts, RetryPolicy};

/// Resolves the handlers that invocations started by a handler target.
pub trait Targets: Sync {
    /// What an invocation of `service`'s `handler` is; an error message if
    /// there is no such handler, with the retention to keep that failure for.
    fn resolve(&self, service: &str, handler: &str, idempotent: bool) -> Result<Resolved, (String, Retention)>;

    /// The name of workflow `service`'s run handler, if it is a workflow.
    fn workflow_run(&self, service: &str) -> Option<String>;
}

/// What an attempt needs of an invocation, read from the applied state.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: String,
    pub service: String,
    pub handler: String,
    /// The invocation's run and the journal length the attempt starts from.
    pub attempt: AttemptId,
    /// Failed attempts since the journal last grew.
    pub attempts: u32,
    /// Whether sleeps or call results are pending, so that a suspension is
    /// expected.
    pub waiting: bool,
    /// Start, Input and the journal, encoded.
    pub body: Bytes,
    /// The object's state as the invocation sees it when the attempt starts
    /// (its own earlier changes applied): what lazy reads answer from.
    pub state: Option<Arc<BTreeMap<Bytes, Bytes>>>,
    /// The span the invocation's attempts are traced under.
    pub trace: Option<TraceContext>,
}

/// The most state an attempt's Start carries: a larger object's state goes
/// in part (its first keys up to this many bytes), and the handler reads the
/// rest lazily.
pub const EAGER_STATE_BYTES_MAX: usize = 1 << 20;

impl Job {
    /// Reads what an attempt of `invocation` sends; `state` is its object's
    /// committed state, sent eagerly (in part if it is large), or not at all
    /// to a handler that reads it `lazy`ly.
    pub fn new(invocation: &Invocation, state: Option<BTreeMap<Bytes, Bytes>>, lazy: bool, now_ms: u64) -> Job {
        let mut state_map = Vec::new();
        let mut partial_state = lazy && state.is_some();
        let mut bytes = 0;
        for (key, value) in state.iter().flatten().take_while(|_| !lazy) {
            bytes += key.len() + value.len();
            if bytes > EAGER_STATE_BYTES_MAX {
                partial_state = true;
                break;
            }
            state_map.push(pb::start_message::StateEntry { key: key.clone(), value: value.clone() });
        }
        let view = state.map(Arc::new);
        let start = pb::StartMessage {
            id: Bytes::copy_from_slice(invocation.id.as_bytes()),
            debug_id: invocation.id.clone(),
            known_entries: 1 + invocation.journal.len() as u32,
            state_map,
            partial_state,
            key: invocation.target.key.clone().unwrap_or_default(),
            retry_count_since_last_stored_entry: invocation.attempts,
            duration_since_last_stored_entry: now_ms.saturating_sub(invocation.modified_at_ms),
            random_seed: xxhash_rust::xxh3::xxh3_64(invocation.id.as_bytes()),
            ..Default::default()
        };
        let input = pb::InputCommandMessage {
            headers: invocation.all_headers().into_iter().map(|(key, value)| pb::Header { key, value }).collect(),
            value: Some(pb::Value { content: invocation.payload.clone() }),
            ..Default::default()
        };
        let journal_len: usize = invocation.journal.iter().map(|e| e.body.len() + 16).sum();
        let mut body = BytesMut::with_capacity(256 + invocation.payload.len() + journal_len);
        encode(&Message::Start(start), &mut body);
        encode(&Message::InputCommand(input), &mut body);
        for entry in &invocation.journal {
            encode_raw(entry.ty, &entry.body, &mut body);
        }
        Job {
            id: invocation.id.clone(),
            service: invocation.target.service.clone(),
            handler: invocation.target.handler.clone(),
            attempt: invocation.attempt().expect("only a ready invocation runs"),
            attempts: invocation.attempts,
            waiting: !invocation.sleeps.is_empty() || invocation.awaits_results(),
            body: body.freeze(),
            state: view,
            trace: invocation.trace,
        }
    }

    /// `key`'s value as the handler sees it after `earlier` and `ops`, its
    /// changes in this attempt so far.
    fn lazy_value(&self, earlier: &[StateOp], ops: &[StateOp], key: &Bytes) -> Option<Bytes> {
        for op in earlier.iter().chain(ops).rev() {
            match op {
                StateOp::Set { key: k, value } if k == key => return Some(value.clone()),
                StateOp::Clear { key: k } if k == key => return None,
                StateOp::ClearAll => return None,
                _ => {}
            }
        }
        self.state.as_ref()?.get(key).cloned()
    }

    /// The keys the handler sees after `earlier` and `ops`, in order.
    fn lazy_keys(&self, earlier: &[StateOp], ops: &[StateOp]) -> Vec<Bytes> {
        let mut keys: BTreeSet<Bytes> = self.state.iter().flat_map(|s| s.keys().cloned()).collect();
        for op in earlier.iter().chain(ops) {
            match op {
                StateOp::Set { key, .. } => {
                    keys.insert(key.clone());
                }
                StateOp::Clear { key } => {
                    keys.remove(key);
                }
                StateOp::ClearAll => keys.clear(),
            }
        }
        keys.into_iter().collect()
    }

    /// The effect of an attempt that ended with `result` at `now_ms`;
    /// `targets` resolves the handlers it started invocations of.
    pub fn effect(
        &self,
        result: Result<Attempt, String>,
        targets: &dyn Targets,
        retry: &RetryPolicy,
        now_ms: u64,
    ) -> Effect {
        let attempt = match result {
            Ok(attempt) => attempt,
            Err(message) => return self.recorder(targets, retry, now_ms).fail(message),
        };
        let mut recorder = self.recorder(targets, retry, now_ms);
        for message in attempt.messages {
            if let Err(effect) = recorder.push(message) {
                return *effect;
            }
        }
        recorder.finish(attempt.ending)
    }

    /// Takes an attempt's messages one by one, for an attempt that streams.
    pub fn recorder<'a>(&'a self, targets: &'a dyn Targets, retry: &'a RetryPolicy, now_ms: u64) -> Recorder<'a> {
        Recorder {
            job: self,
            targets,
            retry,
            now_ms,
            attempt: self.attempt,
            attempts: self.attempts,
            waiting: self.waiting,
            earlier: Vec::new(),
            answered: BTreeSet::new(),
            elsewhere: self.waiting,
            part: Part::default(),
        }
    }

    /// The invocation a call or one-way call starts. Its id derives from
    /// this invocation's and the call's index (or from its idempotency key),
    /// so an attempt that is run again starts the same one. A call to a
    /// handler that does not exist creates an invocation failed with 404 and
    /// the reason, which a caller gets as the call's result.
    fn started(&self, call: Call<'_>, targets: &dyn Targets, now_ms: u64) -> Invoke {
        let idempotency_key = call.idempotency_key.filter(|k| !k.is_empty());
        let (resolved, failure) = match targets.resolve(call.service, call.handler, idempotency_key.is_some()) {
            Ok(resolved) => (resolved, None),
            Err((message, retention)) => {
                let unknown = Resolved {
                    service_ty: ServiceType::Service,
                    handler_ty: HandlerType::Shared,
                    retention,
                    public: true,
                };
                (unknown, Some((404, message)))
            }
        };
        let target = Target {
            service: call.service.to_owned(),
            handler: call.handler.to_owned(),
            key: resolved.service_ty.is_keyed().then(|| call.key.to_owned()),
            service_ty: resolved.service_ty,
            handler_ty: resolved.handler_ty,
        };
        let mut seed = xxhash_rust::xxh3::Xxh3::new();
        seed.update(self.id.as_bytes());
        seed.update(&call.index.to_le_bytes());
        let (partition_key, unique) = invocation_ids(&target, idempotency_key, seed.digest());
        Invoke {
            id: key::id(partition_key, unique),
            target,
            payload: call.parameter.clone(),
            headers: call.headers.iter().map(|h| (h.key.clone(), h.value.clone())).collect(),
            source: Source::Service { caller: self.id.clone() },
            dedup: None,
            created_at_ms: now_ms,
            failure,
            not_before_ms: (call.invoke_time > now_ms).then_some(call.invoke_time),
            trace: self.trace,
            retention: resolved.retention,
            reply: call.result.map(|completion_id| ReplyTo {
                caller: self.id.clone(),
                completion_id,
                kind: ReplyKind::Call,
            }),
            idempotency_key: idempotency_key.map(str::to_owned),
        }
    }

    /// The effect of attempt `attempt` failing, after `attempts` failed ones.
    #[allow(clippy::too_many_arguments)]
    fn failed_at(
        &self,
        attempt: AttemptId,
        attempts: u32,
        message: String,
        delay: Option<Duration>,
        behavior: Behavior,
        retry: &RetryPolicy,
        now_ms: u64,
    ) -> Effect {
        let failed_attempts = attempts + 1;
        let delay = match behavior {
            Behavior::Retry => retry.delay_after(failed_attempts).map(|d| delay.unwrap_or(d)),
            Behavior::Pause | Behavior::Fail => None,
        };
        let pause = match behavior {
            Behavior::Pause => true,
            Behavior::Fail => false,
            Behavior::Retry => retry.on_max_attempts == OnMaxAttempts::Pause,
        };
        Effect::Failed {
            id: self.id.clone(),
            attempt,
            message,
            retry_at_ms: delay.map(|d| now_ms + d.as_millis() as u64),
            pause,
        }
    }
}

/// An attempt's journal as its messages come: the effect they make, and
/// what the handler may be told at once. An attempt that streams makes
/// what it has so far durable in checkpoints, and goes on.
pub struct Recorder<'a> {
    job: &'a Job,
    targets: &'a dyn Targets,
    retry: &'a RetryPolicy,
    now_ms: u64,
    /// The attempt as the invocation knows it: its base grows with each checkpoint.
    attempt: AttemptId,
    attempts: u32,
    waiting: bool,
    /// State changes of the checkpoints so far, which lazy reads see.
    earlier: Vec<StateOp>,
    /// Completions the attempt answers itself: run proposals, lazy reads
    /// and the ids of calls.
    answered: BTreeSet<u32>,
    /// Whether the handler did something whose answer only a later attempt
    /// brings it (a sleep, a call's result, a promise).
    elsewhere: bool,
    part: Part,
}

/// What the messages since the last checkpoint make.
#[derive(Default)]
struct Part {
    entries: Vec<JournalEntry>,
    state: Vec<StateOp>,
    sleeps: Vec<Sleep>,
    output: Option<Completion>,
    run_now: bool,
    awaits_signal: bool,
    sends: Vec<Outgoing>,
    promises: Vec<PromiseOp>,
    /// The answers to run proposals, for the handler once they are durable.
    acks: Vec<Message>,
    /// Whether the handler waits for something only a later attempt brings.
    waits_elsewhere: bool,
    /// How many of what arrived for the invocation (first ones first) the
    /// handler was told before it sent `entries`.
    arrived: u32,
}

/// The completion a notification answers.
fn completion_of(notification: &Message) -> Option<u32> {
    match notification {
        Message::CallInvocationIdCompletionNotification(n) => Some(n.completion_id),
        Message::GetLazyStateCompletionNotification(n) => Some(n.completion_id),
        Message::GetLazyStateKeysCompletionNotification(n) => Some(n.completion_id),
        _ => None,
    }
}

impl Recorder<'_> {
    /// Sets the clock for what comes next (a streaming attempt's messages
    /// come over time): the time calls are made at, and retries counted from.
    pub fn at(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
    }

    /// Takes the next message. Answers a notification the handler may have
    /// at once (a lazy read, a call's invocation id), or the attempt's
    /// effect if this message ends it as failed.
    pub fn push(&mut self, message: Message) -> Result<Option<Message>, Box<Effect>> {
        let ty = message.message_type();
        let part = &mut self.part;
        let mut answer = None;
        match message {
            Message::OutputCommand(out) => {
                part.output = Some(match out.result {
                    Some(pb::output_command_message::Result::Failure(f)) => failure(f),
                    Some(pb::output_command_message::Result::Value(v)) => Completion::Success(v.content),
                    None => Completion::Success(Bytes::new()),
                });
            }
            Message::SetStateCommand(ref set) => {
                let value = set.value.as_ref().map(|v| v.content.clone()).unwrap_or_default();
                part.state.push(StateOp::Set { key: set.key.clone(), value });
                part.entries.push(entry(&message));
            }
            Message::ClearStateCommand(ref clear) => {
                part.state.push(StateOp::Clear { key: clear.key.clone() });
                part.entries.push(entry(&message));
            }
            Message::ClearAllStateCommand(_) => {
                part.state.push(StateOp::ClearAll);
                part.entries.push(entry(&message));
            }
            Message::SleepCommand(ref sleep) => {
                let notification = Message::SleepCompletionNotification(pb::SleepCompletionNotificationMessage {
                    completion_id: sleep.result_completion_id,
                    void: Some(pb::Void {}),
                });
                part.sleeps.push(Sleep { wake_at_ms: sleep.wake_up_time, notification: entry(&notification) });
                part.entries.push(entry(&message));
                part.waits_elsewhere = true;
            }
            Message::ProposeRunCompletion(proposal) => {
                use pb::propose_run_completion_message::Result as Proposed;
                use pb::run_completion_notification_message::Result as Stored;
                let completion_id = proposal.message.result_completion_id;
                let result = proposal.message.result.map(|r| match r {
                    Proposed::Value(content) => Stored::Value(pb::Value { content }),
                    Proposed::Failure(f) => Stored::Failure(f),
                });
                let notification =
                    Message::RunCompletionNotification(pb::RunCompletionNotificationMessage { completion_id, result });
                part.entries.push(entry(&notification));
                self.answered.insert(completion_id);
                part.acks.push(if proposal.requested_ack {
                    Message::ProposeRunCompletionAck(pb::ProposeRunCompletionAckMessage { completion_id })
                } else {
                    notification
                });
                part.run_now = true;
            }
            Message::CallCommand(ref call) => {
                let notification = self.start_call(&message, Call::of(call));
                // The result wakes the caller when it comes back.
                self.part.waits_elsewhere = true;
                answer = Some(notification);
            }
            Message::OneWayCallCommand(ref send) => {
                let notification = self.start_call(&message, Call::of_send(send));
                // A handler that waits for the id finds it journaled.
                self.part.run_now = true;
                answer = Some(notification);
            }
            // Read at once from the state the invocation sees; the answer is
            // journaled (a handler that does not stream runs again to read it).
            Message::GetLazyStateCommand(ref get) => {
                use pb::get_lazy_state_completion_notification_message::Result as Read;
                metrics::counter!("ferry_invoker_lazy_state_reads_total").increment(1);
                let result = match self.job.lazy_value(&self.earlier, &part.state, &get.key) {
                    Some(content) => Read::Value(pb::Value { content }),
                    None => Read::Void(pb::Void {}),
                };
                let notification =
                    Message::GetLazyStateCompletionNotification(pb::GetLazyStateCompletionNotificationMessage {
                        completion_id: get.result_completion_id,
                        result: Some(result),
                    });
                part.entries.push(entry(&message));
                part.entries.push(entry(&notification));
                part.run_now = true;
                answer = Some(notification);
            }
            Message::GetLazyStateKeysCommand(ref get) => {
                metrics::counter!("ferry_invoker_lazy_state_reads_total").increment(1);
                let notification = Message::GetLazyStateKeysCompletionNotification(
                    pb::GetLazyStateKeysCompletionNotificationMessage {
                        completion_id: get.result_completion_id,
                        state_keys: Some(pb::StateKeys { keys: self.job.lazy_keys(&self.earlier, &part.state) }),
                    },
                );
                part.entries.push(entry(&message));
                part.entries.push(entry(&notification));
                part.run_now = true;
                answer = Some(notification);
            }
            // Answered by the partition as the effect applies: only it knows
            // the promise.
            Message::GetPromiseCommand(ref get) => {
                part.promises.push(PromiseOp::Get { name: get.key.clone(), completion_id: get.result_completion_id });
                part.entries.push(entry(&message));
                part.waits_elsewhere = true;
            }
            Message::PeekPromiseCommand(ref peek) => {
                let completion_id = peek.result_completion_id;
                part.promises.push(PromiseOp::Peek { name: peek.key.clone(), completion_id });
                part.entries.push(entry(&message));
                part.waits_elsewhere = true;
            }
            Message::CompletePromiseCommand(ref complete) => {
                use pb::complete_promise_command_message::Completion as Completed;
                let result = match &complete.completion {
                    Some(Completed::CompletionValue(value)) => Completion::Success(value.content.clone()),
                    Some(Completed::CompletionFailure(f)) => failure(f.clone()),
                    None => Completion::Success(Bytes::new()),
                };
                let name = complete.key.clone();
                let completion_id = complete.result_completion_id;
                part.promises.push(PromiseOp::Complete { name, result, completion_id });
                part.entries.push(entry(&message));
                part.waits_elsewhere = true;
            }
            Message::AttachInvocationCommand(_) | Message::GetInvocationOutputCommand(_) => {
                let Some((target, completion_id, kind)) = AttachTarget::of(&message) else { return Ok(None) };
                let to = ReplyTo { caller: self.job.id.clone(), completion_id, kind };
                part.entries.push(entry(&message));
                match target.id(self.targets) {
                    Ok(id) => {
                        part.sends.push(Outgoing::Attach { id, to });
                        part.waits_elsewhere = true;
                    }
                    Err(failure) => {
                        part.entries.push(reply_entry(&to, Some(failure)));
                        part.run_now = true;
                        part.waits_elsewhere = true;
                    }
                }
            }
            Message::CompleteAwakeableCommand(ref complete) => {
                let Some((id, index)) = awakeable_target(&complete.awakeable_id) else {
                    let message = format!("{:?} is not an awakeable id of this cluster", complete.awakeable_id);
                    return Err(Box::new(self.failed(message, None, Behavior::Retry)));
                };
                use pb::complete_awakeable_command_message::Result as Completed;
                let result = match &complete.result {
                    Some(Completed::Value(value)) => SignalResult::Value(value.content.clone()),
                    Some(Completed::Failure(failure)) => SignalResult::Failure(failure.clone()),
                    None => SignalResult::Void,
                };
                let entry_ = signal(SignalId::Index(index), result);
                part.sends.push(Outgoing::Signal { id, notice: Notice::Signal(Some(index)), entry: entry_ });
                part.entries.push(entry(&message));
            }
            Message::SendSignalCommand(ref send) => {
                use pb::send_signal_command_message::{Result as Sent, SignalId as Sent_};
                let (id, notice) = match &send.signal_id {
                    Some(Sent_::Idx(CANCEL_SIGNAL)) => (SignalId::Index(CANCEL_SIGNAL), Notice::Cancel),
                    Some(Sent_::Idx(index)) => (SignalId::Index(*index), Notice::Signal(Some(*index))),
                    Some(Sent_::Name(name)) => (SignalId::Name(name.clone()), Notice::Signal(None)),
                    None => {
                        let message = "a SendSignalCommand without a signal id".to_owned();
                        return Err(Box::new(self.failed(message, None, Behavior::Retry)));
                    }
                };
                let result = match &send.result {
                    Some(Sent::Value(value)) => SignalResult::Value(value.content.clone()),
                    Some(Sent::Failure(failure)) => SignalResult::Failure(failure.clone()),
                    Some(Sent::Void(_)) | None => SignalResult::Void,
                };
                let target = send.target_invocation_id.clone();
                part.sends.push(Outgoing::Signal { id: target, notice, entry: signal(id, result) });
                part.entries.push(entry(&message));
            }
            Message::Suspension(ref suspension) => {
                part.awaits_signal = !suspension.waiting_signals.is_empty()
                    || !suspension.waiting_named_signals.is_empty()
                    || suspension.awaiting_on.as_ref().is_some_and(awaits_a_signal);
            }
            Message::GetEagerStateCommand(_)
            | Message::GetEagerStateKeysCommand(_)
            | Message::RunCommand(_)
            | Message::Custom(_) => part.entries.push(entry(&message)),
            Message::Error(error) => {
                let behavior = match pb::ErrorBehavior::try_from(error.behavior) {
                    Ok(pb::ErrorBehavior::Pause) => Behavior::Pause,
                    Ok(pb::ErrorBehavior::Fail) => Behavior::Fail,
                    _ => Behavior::Retry,
                };
                let message = format!("[{}] {}", error.code, error.message);
                let delay = error.next_retry_delay.map(Duration::from_millis);
                return Err(Box::new(self.failed(message, delay, behavior)));
            }
            Message::End(_) | Message::AwaitingOn(_) => {}
            _ => {
                let message = format!("the handler used {ty}, which Ferry does not support");
                return Err(Box::new(Effect::Complete {
                    id: self.job.id.clone(),
                    attempt: self.attempt,
                    state: Vec::new(),
                    result: Completion::Failure { code: 501, message },
                    sends: Vec::new(),
                    promises: Vec::new(),
                }));
            }
        }
        self.answered.extend(answer.as_ref().and_then(completion_of));
        Ok(answer)
    }

    /// Journals a call or a one-way call with its callee's id, and sends the
    /// callee's invoke; answers the id's notification.
    fn start_call(&mut self, command: &Message, call: Call<'_>) -> Message {
        let completion_id = call.index;
        let invoke = self.job.started(call, self.targets, self.now_ms);
        let notification =
            Message::CallInvocationIdCompletionNotification(pb::CallInvocationIdCompletionNotificationMessage {
                completion_id,
                invocation_id: invoke.id.clone(),
            });
        self.part.entries.push(entry(command));
        self.part.entries.push(entry(&notification));
        self.part.sends.push(Outgoing::Invoke(Box::new(invoke)));
        notification
    }

    /// Whether everything `future` awaits is answered by this attempt
    /// itself (its runs, lazy reads and call ids), so that the handler
    /// needs nothing the stream does not bring. SDKs await the cancel
    /// signal beside everything else; a cancellation outdates the attempt
    /// and reaches the handler in the next one.
    pub fn answers(&self, future: &pb::Future) -> bool {
        future.waiting_signals.iter().all(|&signal| signal == CANCEL_SIGNAL)
            && future.waiting_named_signals.is_empty()
            && future.waiting_completions.iter().all(|id| self.answered.contains(id))
            && future.nested_futures.iter().all(|f| self.answers(f))
    }

    /// The attempt as the invocation knows it now.
    pub fn attempt(&self) -> AttemptId {
        self.attempt
    }

    /// The journal length once the pending checkpoint applies.
    pub fn base_after_checkpoint(&self) -> u32 {
        self.attempt.base + self.part.entries.len() as u32 + self.part.arrived
    }

    /// The handler is told the next `count` of what arrived for the
    /// invocation (call results, signals): the next effect puts them in the
    /// journal before what the handler sends from now on.
    pub fn tell_arrived(&mut self, count: u32) {
        self.part.arrived += count;
    }

    /// How many of what arrived the handler was told since the last checkpoint.
    pub fn told_arrived(&self) -> u32 {
        self.part.arrived
    }

    /// Whether the handler sent anything since the last checkpoint.
    pub fn has_uncheckpointed(&self) -> bool {
        let part = &self.part;
        !part.entries.is_empty() || !part.state.is_empty() || !part.sends.is_empty()
    }

    /// Whether what came since the last checkpoint may be checkpointed.
    pub fn can_checkpoint(&self) -> bool {
        let part = &self.part;
        part.sleeps.is_empty() && part.promises.is_empty() && part.output.is_none()
    }

    /// Whether run proposals wait for a checkpoint to answer them.
    pub fn has_proposals(&self) -> bool {
        !self.part.acks.is_empty()
    }

    /// Whether the handler may wait for something that only a later attempt
    /// brings it (a sleep, a call's result, a promise): the attempt should
    /// stop streaming and let the handler suspend.
    pub fn waits_elsewhere(&self) -> bool {
        self.elsewhere || self.part.waits_elsewhere
    }

    /// A checkpoint of what came since the last one, if it can be made
    /// durable while the attempt goes on: not if it holds sleeps, promises
    /// or the output, which only the attempt's end may apply.
    pub fn checkpoint(&self) -> Option<Effect> {
        if !self.can_checkpoint() {
            return None;
        }
        let part = &self.part;
        Some(Effect::Checkpoint {
            id: self.job.id.clone(),
            attempt: self.attempt,
            entries: part.entries.clone(),
            state: part.state.clone(),
            sends: part.sends.clone(),
            arrived: part.arrived,
        })
    }

    /// The checkpoint was applied: the attempt goes on from the longer
    /// journal. Answers what the handler is told now (its run proposals
    /// are durable).
    pub fn checkpointed(&mut self) -> Vec<Message> {
        let part = std::mem::take(&mut self.part);
        self.attempt.base += part.entries.len() as u32 + part.arrived;
        self.elsewhere |= part.waits_elsewhere;
        self.attempts = 0;
        // Calls made so far bring their results later: a suspension without
        // new entries is expected.
        self.waiting |= part.sends.iter().any(|s| match s {
            Outgoing::Attach { .. } => true,
            Outgoing::Invoke(invoke) => invoke.reply.is_some(),
            _ => false,
        });
        self.earlier.extend(part.state);
        part.acks
    }

    /// The effect of the attempt ending as `ending`, with what came since
    /// the last checkpoint.
    pub fn finish(self, ending: Ending) -> Effect {
        let part = self.part;
        match ending {
            Ending::End => Effect::Complete {
                id: self.job.id.clone(),
                attempt: self.attempt,
                state: part.state,
                result: part.output.unwrap_or(Completion::Success(Bytes::new())),
                sends: part.sends,
                promises: part.promises,
            },
            Ending::Suspended
                if part.entries.is_empty() && part.sleeps.is_empty() && !self.waiting && !part.awaits_signal =>
            {
                let message = "the handler suspended waiting for something that will not happen".to_owned();
                self.job.failed_at(self.attempt, self.attempts, message, None, Behavior::Retry, self.retry, self.now_ms)
            }
            Ending::Suspended => Effect::Progress {
                id: self.job.id.clone(),
                attempt: self.attempt,
                entries: part.entries,
                state: part.state,
                sleeps: part.sleeps,
                run_now: part.run_now,
                sends: part.sends,
                awaits_signal: part.awaits_signal,
                promises: part.promises,
                arrived: part.arrived,
            },
            Ending::Failed => unreachable!("an Error message ends the attempt as it comes"),
        }
    }

    /// The effect of the attempt failing now.
    pub fn fail(&self, message: String) -> Effect {
        self.failed(message, None, Behavior::Retry)
    }

    fn failed(&self, message: String, delay: Option<Duration>, behavior: Behavior) -> Effect {
        self.job.failed_at(self.attempt, self.attempts, message, delay, behavior, self.retry, self.now_ms)
    }
}

/// What a `CallCommand` or a `OneWayCallCommand` asks for.
struct Call<'a> {
    service: &'a str,
    handler: &'a str,
    key: &'a str,
    parameter: &'a Bytes,
    headers: &'a [pb::Header],
    idempotency_key: Option<&'a str>,
    /// The completion id of the callee's id: it names the call.
    index: u32,
    invoke_time: u64,
    /// The completion id of the result, for a call (not a send).
    result: Option<u32>,
}

impl<'a> Call<'a> {
    fn of(call: &'a pb::CallCommandMessage) -> Call<'a> {
        Call {
            service: &call.service_name,
            handler: &call.handler_name,
            key: &call.key,
            parameter: &call.parameter,
            headers: &call.headers,
            idempotency_key: call.idempotency_key.as_deref(),
            index: call.invocation_id_notification_idx,
            invoke_time: 0,
            result: Some(call.result_completion_id),
        }
    }

    fn of_send(send: &'a pb::OneWayCallCommandMessage) -> Call<'a> {
        Call {
            service: &send.service_name,
            handler: &send.handler_name,
            key: &send.key,
            parameter: &send.parameter,
            headers: &send.headers,
            idempotency_key: send.idempotency_key.as_deref(),
            index: send.invocation_id_notification_idx,
            invoke_time: send.invoke_time,
            result: None,
        }
    }
}

/// The signal index that cancels an invocation.
const CANCEL_SIGNAL: u32 = 1;

/// The prefix of the ids of awakeables (signals by index), as Restate's.
const AWAKEABLE_PREFIX: &str = "sign_1";

/// URL-safe base64 that reads its input with or without padding.
const AWAKEABLE_BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    base64::engine::GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// The invocation and the signal index an awakeable id names: the SDK
/// builds it from the id the invocation was started with (its printed id)
/// and the index, as `sign_1` and URL-safe base64 of (id bytes, u32 BE index).
pub fn awakeable_target(awakeable_id: &str) -> Option<(String, u32)> {
    use base64::Engine as _;
    let bytes = AWAKEABLE_BASE64.decode(awakeable_id.strip_prefix(AWAKEABLE_PREFIX)?).ok()?;
    let (id, index) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
    let id = std::str::from_utf8(id).ok()?;
    key::id_parts(id)?;
    Some((id.to_owned(), u32::from_be_bytes(index.try_into().ok()?)))
}

/// The id of awakeable `index` of invocation `id`, as an SDK builds it.
pub fn awakeable_id(id: &str, index: u32) -> String {
    use base64::Engine as _;
    let mut bytes = id.as_bytes().to_vec();
    bytes.extend_from_slice(&index.to_be_bytes());
    format!("{AWAKEABLE_PREFIX}{}", AWAKEABLE_BASE64.encode(bytes))
}

/// Which signal a [`signal`] entry brings.
#[derive(Debug, Clone)]
pub enum SignalId {
    Index(u32),
    Name(String),
}

/// What a [`signal`] entry carries.
#[derive(Debug, Clone)]
pub enum SignalResult {
    Void,
    Value(Bytes),
    Failure(pb::Failure),
}

/// The journal entry that delivers a signal to an invocation.
pub fn signal(id: SignalId, result: SignalResult) -> JournalEntry {
    use pb::signal_notification_message::{Result as Carried, SignalId as Id};
    let signal_id = match id {
        SignalId::Index(index) => Id::Idx(index),
        SignalId::Name(name) => Id::Name(name),
    };
    let result = match result {
        SignalResult::Void => Carried::Void(pb::Void {}),
        SignalResult::Value(content) => Carried::Value(pb::Value { content }),
        SignalResult::Failure(failure) => Carried::Failure(failure),
    };
    let notification = pb::SignalNotificationMessage { signal_id: Some(signal_id), result: Some(result) };
    entry(&Message::SignalNotification(notification))
}

/// Whether an await tree (v7) waits for a signal anywhere.
fn awaits_a_signal(future: &pb::Future) -> bool {
    !future.waiting_signals.is_empty()
        || !future.waiting_named_signals.is_empty()
        || future.nested_futures.iter().any(awaits_a_signal)
}

/// Whose result an `AttachInvocationCommand` or `GetInvocationOutputCommand`
/// asks for.
enum AttachTarget<'a> {
    Id(&'a str),
    Idempotent(&'a pb::IdempotentRequestTarget),
    Workflow(&'a pb::WorkflowTarget),
    None,
}

impl<'a> AttachTarget<'a> {
    /// What an attach or output request asks for: its target, the
    /// completion id of the answer, and which answer it wants.
    fn of(message: &'a Message) -> Option<(AttachTarget<'a>, u32, ReplyKind)> {
        use pb::attach_invocation_command_message::Target as Attach;
        use pb::get_invocation_output_command_message::Target as Output;
        Some(match message {
            Message::AttachInvocationCommand(attach) => {
                let target = match &attach.target {
                    Some(Attach::InvocationId(id)) => AttachTarget::Id(id),
                    Some(Attach::IdempotentRequestTarget(t)) => AttachTarget::Idempotent(t),
                    Some(Attach::WorkflowTarget(t)) => AttachTarget::Workflow(t),
                    None => AttachTarget::None,
                };
                (target, attach.result_completion_id, ReplyKind::Attach)
            }
            Message::GetInvocationOutputCommand(get) => {
                let target = match &get.target {
                    Some(Output::InvocationId(id)) => AttachTarget::Id(id),
                    Some(Output::IdempotentRequestTarget(t)) => AttachTarget::Idempotent(t),
                    Some(Output::WorkflowTarget(t)) => AttachTarget::Workflow(t),
                    None => AttachTarget::None,
                };
                (target, get.result_completion_id, ReplyKind::Output)
            }
            _ => return None,
        })
    }

    /// The invocation's id, as the ingress or a call named it; a failure to
    /// answer with at once if there can be no such invocation.
    fn id(&self, targets: &dyn Targets) -> Result<String, Completion> {
        let not_found = |what: String| Completion::Failure { code: 404, message: format!("{what} not found") };
        let target = match self {
            AttachTarget::Id(id) if key::id_parts(id).is_some() => return Ok((*id).to_owned()),
            AttachTarget::Id(id) => return Err(not_found(format!("invocation {id}"))),
            AttachTarget::None => return Err(Completion::Failure { code: 400, message: "no target".to_owned() }),
            AttachTarget::Idempotent(t) => {
                let resolved = targets
                    .resolve(&t.service_name, &t.handler_name, true)
                    .map_err(|(message, _)| not_found(message))?;
                let key = resolved.service_ty.is_keyed().then(|| t.service_key.clone().unwrap_or_default());
                let target = Target {
                    service: t.service_name.clone(),
                    handler: t.handler_name.clone(),
                    key,
                    service_ty: resolved.service_ty,
                    handler_ty: resolved.handler_ty,
                };
                let (partition_key, unique) = invocation_ids(&target, Some(&t.idempotency_key), 0);
                return Ok(key::id(partition_key, unique));
            }
            AttachTarget::Workflow(t) => {
                let name = &t.workflow_name;
                let run = targets.workflow_run(name).ok_or_else(|| not_found(format!("workflow {name}")))?;
                Target {
                    service: name.clone(),
                    handler: run,
                    key: Some(t.workflow_key.clone()),
                    service_ty: ServiceType::Workflow,
                    handler_ty: HandlerType::Workflow,
                }
            }
        };
        let (partition_key, unique) = invocation_ids(&target, None, 0);
        Ok(key::id(partition_key, unique))
    }
}

/// The journal entry that answers `to` with an invocation's result (`None`:
/// no output yet), as the notification its kind of request gets.
pub fn reply_entry(to: &ReplyTo, result: Option<Completion>) -> JournalEntry {
    let completion_id = to.completion_id;
    let failure = |code: u16, message| pb::Failure { code: code.into(), message, ..Default::default() };
    let message = match to.kind {
        ReplyKind::Call => {
            use pb::call_completion_notification_message::Result as Of;
            let result = match result {
                Some(Completion::Success(content)) => Of::Value(pb::Value { content }),
                Some(Completion::Failure { code, message }) => Of::Failure(failure(code, message)),
                None => Of::Value(pb::Value::default()),
            };
            Message::CallCompletionNotification(pb::CallCompletionNotificationMessage {
                completion_id,
                result: Some(result),
            })
        }
        ReplyKind::Attach => {
            use pb::attach_invocation_completion_notification_message::Result as Of;
            let result = match result {
                Some(Completion::Success(content)) => Of::Value(pb::Value { content }),
                Some(Completion::Failure { code, message }) => Of::Failure(failure(code, message)),
                None => Of::Value(pb::Value::default()),
            };
            Message::AttachInvocationCompletionNotification(pb::AttachInvocationCompletionNotificationMessage {
                completion_id,
                result: Some(result),
            })
        }
        ReplyKind::Output => {
            use pb::get_invocation_output_completion_notification_message::Result as Of;
            let result = match result {
                Some(Completion::Success(content)) => Of::Value(pb::Value { content }),
                Some(Completion::Failure { code, message }) => Of::Failure(failure(code, message)),
                None => Of::Void(pb::Void {}),
            };
            Message::GetInvocationOutputCompletionNotification(pb::GetInvocationOutputCompletionNotificationMessage {
                completion_id,
                result: Some(result),
            })
        }
    };
    entry(&message)
}

/// What the handler asked to happen after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behavior {
    Retry,
    Pause,
    Fail,
}

fn entry(message: &Message) -> JournalEntry {
    JournalEntry { ty: message.message_type().id(), body: message.encode_body() }
}

fn failure(f: pb::Failure) -> Completion {
    Completion::Failure { code: u16::try_from(f.code).unwrap_or(500), message: f.message }
}

/// The journal entry that tells a handler it is cancelled.
pub fn cancel_signal() -> JournalEntry {
    entry(&Message::SignalNotification(pb::SignalNotificationMessage {
        signal_id: Some(pb::signal_notification_message::SignalId::Idx(pb::BuiltInSignal::Cancel as u32)),
        result: Some(pb::signal_notification_message::Result::Void(pb::Void {})),
    }))
}

#[cfg(test)]
mod tests {
    use ferry_partition::partitioner::key_hash;

    use super::*;

    /// Knows `Counter` (a Virtual Object with `add`) and nothing else.
    struct Counter;

    impl Targets for Counter {
        fn resolve(&self, service: &str, handler: &str, _: bool) -> Result<Resolved, (String, Retention)> {
            match (service, handler) {
                ("Counter", "add") => Ok(Resolved {
                    service_ty: ServiceType::VirtualObject,
                    handler_ty: HandlerType::Exclusive,
                    retention: Retention::FOREVER,
                    public: true,
                }),
                _ => Err((format!("service {service} not found"), Retention::FOREVER)),
            }
        }

        fn workflow_run(&self, _: &str) -> Option<String> {
            None
        }
    }

    fn job(id: &str) -> Job {
        Job {
            id: id.to_owned(),
            service: "Caller".to_owned(),
            handler: "run".to_owned(),
            attempt: AttemptId { run: 3, base: 0 },
            attempts: 0,
            waiting: false,
            body: Bytes::new(),
            state: None,
            trace: None,
        }
    }

    fn send(service: &str, key: &str, idx: u32, invoke_time: u64) -> Message {
        Message::OneWayCallCommand(pb::OneWayCallCommandMessage {
            service_name: service.to_owned(),
            handler_name: "add".to_owned(),
            parameter: Bytes::from_static(b"1"),
            invoke_time,
            headers: vec![pb::Header { key: "h".to_owned(), value: "v".to_owned() }],
            key: key.to_owned(),
            invocation_id_notification_idx: idx,
            ..Default::default()
        })
    }

    fn attempt(messages: Vec<Message>, ending: Ending) -> Result<Attempt, String> {
        Ok(Attempt { messages, ending })
    }

    #[test]
    fn one_way_calls_start_invocations_named_by_their_caller_and_index() {
        let caller = job(&key::id(7, 1));
        let messages = || {
            vec![
                send("Counter", "k", 1, 0),
                send("Counter", "k", 2, 5_000),
                send("Nope", "", 3, 0),
                Message::OutputCommand(pb::OutputCommandMessage::default()),
            ]
        };
        let retry = RetryPolicy::default();
        let Effect::Complete { sends, .. } = caller.effect(attempt(messages(), Ending::End), &Counter, &retry, 1_000)
        else {
            panic!("the handler ended");
        };
        let sends = invokes(sends);
        assert_eq!(sends.len(), 3);
        let (first, delayed, unknown) = (&sends[0], &sends[1], &sends[2]);
        assert_eq!(key::id_parts(&first.id).map(|(pk, _)| pk), Some(key_hash("Counter", "k")), "the key's partition");
        assert_ne!(first.id, delayed.id, "each call is its own invocation");
        assert_eq!(first.target.to_string(), "Counter/k/add");
        assert_eq!(first.source, Source::Service { caller: caller.id.clone() });
        assert_eq!((first.not_before_ms, delayed.not_before_ms), (None, Some(5_000)));
        assert_eq!(first.headers, vec![("h".to_owned(), "v".to_owned())]);
        assert_eq!(first.payload, Bytes::from_static(b"1"));
        assert!(first.failure.is_none() && first.dedup.is_none());
        assert_eq!(unknown.failure, Some((404, "service Nope not found".to_owned())));
        assert_eq!(unknown.target.key, None);

        // The attempt run again starts the same invocations; another caller others.
        let Effect::Complete { sends: again, .. } =
            caller.effect(attempt(messages(), Ending::End), &Counter, &retry, 2_000)
        else {
            panic!("the handler ended");
        };
        let again = invokes(again);
        assert_eq!(again.iter().map(|i| &i.id).collect::<Vec<_>>(), sends.iter().map(|i| &i.id).collect::<Vec<_>>());
        let other = job(&key::id(7, 2));
        let Effect::Complete { sends: others, .. } =
            other.effect(attempt(messages(), Ending::End), &Counter, &retry, 1_000)
        else {
            panic!("the handler ended");
        };
        assert_ne!(invokes(others)[2].id, sends[2].id);
    }

    fn run_proposal(completion_id: u32, value: &'static [u8], requested_ack: bool) -> Message {
        Message::ProposeRunCompletion(crate::codec::RunProposal {
            message: pb::ProposeRunCompletionMessage {
                result_completion_id: completion_id,
                result: Some(pb::propose_run_completion_message::Result::Value(Bytes::from_static(value))),
            },
            requested_ack,
        })
    }

    /// A streaming attempt: a lazy read and a call's id are answered at
    /// once; run proposals wait for a checkpoint, whose entries the final
    /// effect does not repeat, and which moves the attempt's base; a lazy
    /// read after it sees the state changes it carried.
    #[test]
    fn a_streaming_attempt_checkpoints_its_runs_and_ends_from_the_longer_journal() {
        let mut job = job(&key::id(7, 1));
        job.state = Some(Arc::new(BTreeMap::new()));
        let retry = RetryPolicy::default();
        let mut recorder = job.recorder(&Counter, &retry, 0);
        let set = Message::SetStateCommand(pb::SetStateCommandMessage {
            key: Bytes::from_static(b"k"),
            value: Some(pb::Value { content: Bytes::from_static(b"v") }),
            ..Default::default()
        });
        let run = Message::RunCommand(pb::RunCommandMessage { result_completion_id: 1, ..Default::default() });
        assert_eq!(recorder.push(set).unwrap(), None);
        assert_eq!(recorder.push(run).unwrap(), None);
        assert!(!recorder.has_proposals());
        assert_eq!(recorder.push(run_proposal(1, b"one", true)).unwrap(), None, "acked once durable");
        assert!(recorder.has_proposals() && !recorder.waits_elsewhere());
        let awaiting = pb::Future { waiting_completions: vec![1], ..Default::default() };
        assert!(recorder.answers(&awaiting));
        assert!(!recorder.answers(&pb::Future { waiting_completions: vec![1, 2], ..Default::default() }));
        assert!(!recorder.answers(&pb::Future { waiting_signals: vec![17], ..Default::default() }));
        let or_cancel = pb::Future { waiting_signals: vec![CANCEL_SIGNAL], ..Default::default() };
        assert!(
            recorder.answers(&pb::Future { nested_futures: vec![awaiting.clone(), or_cancel], ..Default::default() })
        );

        let Some(Effect::Checkpoint { attempt, entries, state, .. }) = recorder.checkpoint() else {
            panic!("a checkpoint");
        };
        assert_eq!((attempt, entries.len(), state.len()), (AttemptId { run: 3, base: 0 }, 3, 1));
        assert_eq!(recorder.base_after_checkpoint(), 3);
        let acks = recorder.checkpointed();
        assert_eq!(
            acks,
            vec![Message::ProposeRunCompletionAck(pb::ProposeRunCompletionAckMessage { completion_id: 1 })]
        );

        // After the checkpoint: a lazy read sees its state change, a call's
        // id is answered at once, and the handler then waits elsewhere.
        let get = Message::GetLazyStateCommand(pb::GetLazyStateCommandMessage {
            key: Bytes::from_static(b"k"),
            result_completion_id: 2,
            ..Default::default()
        });
        let Some(Message::GetLazyStateCompletionNotification(read)) = recorder.push(get).unwrap() else {
            panic!("a lazy read is answered at once");
        };
        use pb::get_lazy_state_completion_notification_message::Result as Read;
        assert_eq!(read.result, Some(Read::Value(pb::Value { content: Bytes::from_static(b"v") })));
        let call = Message::CallCommand(pb::CallCommandMessage {
            service_name: "Counter".to_owned(),
            handler_name: "add".to_owned(),
            key: "k".to_owned(),
            invocation_id_notification_idx: 3,
            result_completion_id: 4,
            ..Default::default()
        });
        let Some(Message::CallInvocationIdCompletionNotification(id)) = recorder.push(call).unwrap() else {
            panic!("a call's id is answered at once");
        };
        assert_eq!(id.completion_id, 3);
        assert!(recorder.waits_elsewhere());
        assert!(recorder.answers(&pb::Future { waiting_completions: vec![2, 3], ..Default::default() }));
        assert!(!recorder.answers(&pb::Future { waiting_completions: vec![4], ..Default::default() }));

        // What the handler sent is checkpointed (the call starts), then
        // its result arrives and the handler is told: the end puts it in
        // the journal first.
        let Some(Effect::Checkpoint { attempt, entries, arrived: 0, .. }) = recorder.checkpoint() else {
            panic!("a checkpoint");
        };
        assert_eq!(attempt.base, 3);
        let base = 3 + entries.len() as u32;
        assert!(recorder.checkpointed().is_empty(), "no run to ack");
        assert!(!recorder.has_uncheckpointed());
        recorder.tell_arrived(1);
        assert_eq!((recorder.told_arrived(), recorder.base_after_checkpoint()), (1, base + 1));

        // A sleep is no checkpoint; the end carries it, from the longer journal.
        let sleep = Message::SleepCommand(pb::SleepCommandMessage {
            wake_up_time: 9,
            result_completion_id: 5,
            ..Default::default()
        });
        recorder.push(sleep).unwrap();
        recorder.push(run_proposal(6, b"two", false)).unwrap();
        assert!(recorder.checkpoint().is_none());
        let Effect::Progress { attempt, entries, sleeps, sends, run_now, arrived, .. } =
            recorder.finish(Ending::Suspended)
        else {
            panic!("suspended");
        };
        assert_eq!((attempt, arrived), (AttemptId { run: 3, base }, 1));
        assert_eq!((entries.len(), sleeps.len(), sends.len(), run_now), (2, 1, 0, true));
    }

    fn invokes(sends: Vec<Outgoing>) -> Vec<Invoke> {
        sends
            .into_iter()
            .map(|s| match s {
                Outgoing::Invoke(invoke) => *invoke,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn lazy_reads_see_the_committed_state_with_the_invocations_own_changes() {
        let mut job = job(&key::id(7, 1));
        let committed: BTreeMap<Bytes, Bytes> = [("a", "1"), ("b", "2")]
            .map(|(k, v)| (Bytes::from_static(k.as_bytes()), Bytes::from_static(v.as_bytes())))
            .into();
        job.state = Some(Arc::new(committed));
        let get = |key: &'static str, id| {
            Message::GetLazyStateCommand(pb::GetLazyStateCommandMessage {
                key: Bytes::from_static(key.as_bytes()),
                result_completion_id: id,
                ..Default::default()
            })
        };
        let set_c = Message::SetStateCommand(pb::SetStateCommandMessage {
            key: Bytes::from_static(b"c"),
            value: Some(pb::Value { content: Bytes::from_static(b"3") }),
            ..Default::default()
        });
        let clear_a = Message::ClearStateCommand(pb::ClearStateCommandMessage {
            key: Bytes::from_static(b"a"),
            ..Default::default()
        });
        let keys = Message::GetLazyStateKeysCommand(pb::GetLazyStateKeysCommandMessage {
            result_completion_id: 4,
            ..Default::default()
        });
        let messages = vec![get("b", 1), set_c, clear_a, get("a", 2), get("c", 3), keys];
        let retry = RetryPolicy::default();
        let Effect::Progress { entries, run_now, .. } =
            job.effect(attempt(messages, Ending::Suspended), &Counter, &retry, 0)
        else {
            panic!("suspended");
        };
        assert!(run_now, "the handler runs again to read the answers");
        let answers: Vec<Message> = entries
            .iter()
            .filter(|e| e.ty == 0x8002 || e.ty == 0x8006)
            .map(|e| {
                let mut framed = BytesMut::new();
                encode_raw(e.ty, &e.body, &mut framed);
                let mut decoder = crate::codec::Decoder::new();
                decoder.push(&framed);
                decoder.try_next().unwrap().unwrap()
            })
            .collect();
        use pb::get_lazy_state_completion_notification_message::Result as Read;
        let value = |content: &'static [u8]| Some(Read::Value(pb::Value { content: Bytes::from_static(content) }));
        let Message::GetLazyStateCompletionNotification(b) = &answers[0] else { panic!() };
        assert_eq!((b.completion_id, &b.result), (1, &value(b"2")));
        let Message::GetLazyStateCompletionNotification(a) = &answers[1] else { panic!() };
        assert_eq!(a.result, Some(Read::Void(pb::Void {})), "cleared earlier in the attempt");
        let Message::GetLazyStateCompletionNotification(c) = &answers[2] else { panic!() };
        assert_eq!(c.result, value(b"3"), "set earlier in the attempt");
        let Message::GetLazyStateKeysCompletionNotification(k) = &answers[3] else { panic!() };
        assert_eq!(k.state_keys.as_ref().unwrap().keys, vec![Bytes::from_static(b"b"), Bytes::from_static(b"c")]);
    }

    #[test]
    fn awakeable_ids_name_their_invocation_and_index_with_or_without_padding() {
        let id = &key::id(7, 1);
        let awakeable = awakeable_id(id, 17);
        assert!(awakeable.starts_with("sign_1") && !awakeable.ends_with('='), "{awakeable}");
        assert_eq!(awakeable_target(&awakeable), Some((id.to_owned(), 17)));
        let padded = format!("{awakeable}{}", "=".repeat((4 - (awakeable.len() - 6) % 4) % 4));
        assert_eq!(awakeable_target(&padded), Some((id.to_owned(), 17)));
        assert_eq!(awakeable_target("prom_1abc"), None);
        assert_eq!(awakeable_target("sign_1!!"), None);
        assert_eq!(awakeable_target(&awakeable_id("not-an-id", 17)), None);
    }

    #[test]
    fn awakeables_and_signals_go_to_their_invocation_and_a_wait_for_one_suspends() {
        let job = job(&key::id(7, 1));
        let retry = RetryPolicy::default();
        let target = &key::id(9, 2);
        let complete = Message::CompleteAwakeableCommand(pb::CompleteAwakeableCommandMessage {
            awakeable_id: awakeable_id(target, 18),
            result: Some(pb::complete_awakeable_command_message::Result::Value(pb::Value {
                content: Bytes::from_static(b"ok"),
            })),
            ..Default::default()
        });
        let cancel = Message::SendSignalCommand(pb::SendSignalCommandMessage {
            target_invocation_id: target.to_owned(),
            signal_id: Some(pb::send_signal_command_message::SignalId::Idx(1)),
            result: Some(pb::send_signal_command_message::Result::Void(pb::Void {})),
            ..Default::default()
        });
        let wait = Message::Suspension(pb::SuspensionMessage { waiting_signals: vec![17], ..Default::default() });
        let effect = job.effect(attempt(vec![complete, cancel, wait], Ending::Suspended), &Counter, &retry, 0);
        let Effect::Progress { entries, sends, awaits_signal, .. } = effect else { panic!("suspended") };
        assert_eq!(entries.len(), 2);
        assert!(awaits_signal);
        let expected = signal(SignalId::Index(18), SignalResult::Value(Bytes::from_static(b"ok")));
        assert!(
            matches!(&sends[0], Outgoing::Signal { id, notice: Notice::Signal(Some(18)), entry } if id == target && *entry == expected),
            "{sends:?}"
        );
        assert!(matches!(&sends[1], Outgoing::Signal { notice: Notice::Cancel, .. }), "{sends:?}");

        // Waiting only for a signal, with nothing new: suspended, not failed.
        let wait = Message::Suspension(pb::SuspensionMessage { waiting_signals: vec![17], ..Default::default() });
        let effect = job.effect(attempt(vec![wait], Ending::Suspended), &Counter, &retry, 0);
        assert!(matches!(effect, Effect::Progress { awaits_signal: true, .. }), "{effect:?}");
    }

    #[test]
    fn a_suspended_attempt_journals_each_call_with_its_invocation_id() {
        let caller = job(&key::id(7, 1));
        let retry = RetryPolicy::default();
        let effect = caller.effect(attempt(vec![send("Counter", "k", 1, 0)], Ending::Suspended), &Counter, &retry, 0);
        let Effect::Progress { entries, sends, .. } = effect else { panic!("the handler suspended") };
        let sends = invokes(sends);
        assert_eq!(entries.len(), 2, "the command and its invocation id");
        assert_eq!(entries[1].ty, 0x800E);
        let notification =
            Message::CallInvocationIdCompletionNotification(pb::CallInvocationIdCompletionNotificationMessage {
                completion_id: 1,
                invocation_id: sends[0].id.clone(),
            });
        assert_eq!(entries[1], entry(&notification));
    }
}
