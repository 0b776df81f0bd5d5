//! Between the log and the protocol: the request body of an attempt is built
//! from an invocation's journal, and what the deployment answered becomes the
//! one [`Effect`] the invoker appends to the log.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferry_partition::partitioner::invocation_ids;
use ferry_partition::state::{Completion, Invocation, Resolved};
use ferry_partition::store::key;
use ferry_partition::wire::v1::{
    AttemptId, Effect, HandlerType, Invoke, JournalEntry, Retention, ServiceType, Sleep, Source, StateOp, Target,
};
use ferry_proto::service_protocol as pb;
use ferry_telemetry::TraceContext;

use crate::client::{Attempt, Ending};
use crate::codec::{encode, encode_raw, Message};
use crate::retry::{OnMaxAttempts, RetryPolicy};

/// Resolves the handlers that invocations started by a handler target.
pub trait Targets {
    /// What an invocation of `service`'s `handler` is; an error message if
    /// there is no such handler, with the retention to keep that failure for.
    fn resolve(&self, service: &str, handler: &str, idempotent: bool) -> Result<Resolved, (String, Retention)>;
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
    /// Whether sleeps are pending, so that a suspension is expected.
    pub sleeping: bool,
    /// Start, Input and the journal, encoded.
    pub body: Bytes,
    /// The span the invocation's attempts are traced under.
    pub trace: Option<TraceContext>,
}

impl Job {
    /// Reads what an attempt of `invocation` sends; `state` is its object's
    /// state, sent eagerly and complete.
    pub fn new(invocation: &Invocation, state: Option<&BTreeMap<Bytes, Bytes>>, now_ms: u64) -> Job {
        let start = pb::StartMessage {
            id: Bytes::copy_from_slice(invocation.id.as_bytes()),
            debug_id: invocation.id.clone(),
            known_entries: 1 + invocation.journal.len() as u32,
            state_map: state
                .into_iter()
                .flatten()
                .map(|(key, value)| pb::start_message::StateEntry { key: key.clone(), value: value.clone() })
                .collect(),
            partial_state: false,
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
            sleeping: !invocation.sleeps.is_empty(),
            body: body.freeze(),
            trace: invocation.trace,
        }
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
            Err(message) => return self.failed(message, None, Behavior::Retry, retry, now_ms),
        };
        let mut entries = Vec::new();
        let mut state = Vec::new();
        let mut sleeps = Vec::new();
        let mut output = None;
        let mut run_now = false;
        let mut sends = Vec::new();
        for message in attempt.messages {
            let ty = message.message_type();
            match message {
                Message::OutputCommand(out) => {
                    output = Some(match out.result {
                        Some(pb::output_command_message::Result::Failure(f)) => failure(f),
                        Some(pb::output_command_message::Result::Value(v)) => Completion::Success(v.content),
                        None => Completion::Success(Bytes::new()),
                    });
                }
                Message::SetStateCommand(ref set) => {
                    let value = set.value.as_ref().map(|v| v.content.clone()).unwrap_or_default();
                    state.push(StateOp::Set { key: set.key.clone(), value });
                    entries.push(entry(&message));
                }
                Message::ClearStateCommand(ref clear) => {
                    state.push(StateOp::Clear { key: clear.key.clone() });
                    entries.push(entry(&message));
                }
                Message::ClearAllStateCommand(_) => {
                    state.push(StateOp::ClearAll);
                    entries.push(entry(&message));
                }
                Message::SleepCommand(ref sleep) => {
                    let notification = Message::SleepCompletionNotification(pb::SleepCompletionNotificationMessage {
                        completion_id: sleep.result_completion_id,
                        void: Some(pb::Void {}),
                    });
                    sleeps.push(Sleep { wake_at_ms: sleep.wake_up_time, notification: entry(&notification) });
                    entries.push(entry(&message));
                }
                Message::ProposeRunCompletion(proposal) => {
                    use pb::propose_run_completion_message::Result as Proposed;
                    use pb::run_completion_notification_message::Result as Stored;
                    let result = proposal.message.result.map(|r| match r {
                        Proposed::Value(content) => Stored::Value(pb::Value { content }),
                        Proposed::Failure(f) => Stored::Failure(f),
                    });
                    let notification = Message::RunCompletionNotification(pb::RunCompletionNotificationMessage {
                        completion_id: proposal.message.result_completion_id,
                        result,
                    });
                    entries.push(entry(&notification));
                    run_now = true;
                }
                Message::OneWayCallCommand(ref send) => {
                    let invoke = self.started(send, targets, now_ms);
                    let notification = Message::CallInvocationIdCompletionNotification(
                        pb::CallInvocationIdCompletionNotificationMessage {
                            completion_id: send.invocation_id_notification_idx,
                            invocation_id: invoke.id.clone(),
                        },
                    );
                    entries.push(entry(&message));
                    entries.push(entry(&notification));
                    sends.push(invoke);
                    // A handler that waits for the id finds it journaled.
                    run_now = true;
                }
                Message::GetEagerStateCommand(_)
                | Message::GetEagerStateKeysCommand(_)
                | Message::RunCommand(_)
                | Message::Custom(_) => entries.push(entry(&message)),
                Message::Error(error) => {
                    let behavior = match pb::ErrorBehavior::try_from(error.behavior) {
                        Ok(pb::ErrorBehavior::Pause) => Behavior::Pause,
                        Ok(pb::ErrorBehavior::Fail) => Behavior::Fail,
                        _ => Behavior::Retry,
                    };
                    let message = format!("[{}] {}", error.code, error.message);
                    let delay = error.next_retry_delay.map(Duration::from_millis);
                    return self.failed(message, delay, behavior, retry, now_ms);
                }
                Message::End(_) | Message::Suspension(_) | Message::AwaitingOn(_) => {}
                _ => {
                    let message = format!("the handler used {ty}, which Ferry does not support");
                    return Effect::Complete {
                        id: self.id.clone(),
                        attempt: self.attempt,
                        state: Vec::new(),
                        result: Completion::Failure { code: 501, message },
                        sends: Vec::new(),
                    };
                }
            }
        }
        match attempt.ending {
            Ending::End => Effect::Complete {
                id: self.id.clone(),
                attempt: self.attempt,
                state,
                result: output.unwrap_or(Completion::Success(Bytes::new())),
                sends,
            },
            Ending::Suspended if entries.is_empty() && sleeps.is_empty() && !self.sleeping => self.failed(
                "the handler suspended waiting for something that will not happen".to_owned(),
                None,
                Behavior::Retry,
                retry,
                now_ms,
            ),
            Ending::Suspended => {
                Effect::Progress { id: self.id.clone(), attempt: self.attempt, entries, state, sleeps, run_now, sends }
            }
            Ending::Failed => unreachable!("an Error message returns above"),
        }
    }

    /// The invocation a one-way call starts. Its id derives from this
    /// invocation's and the call's index (or from its idempotency key), so
    /// an attempt that is run again starts the same one. A call to a handler
    /// that does not exist creates an invocation failed with the reason.
    fn started(&self, send: &pb::OneWayCallCommandMessage, targets: &dyn Targets, now_ms: u64) -> Invoke {
        let idempotency_key = send.idempotency_key.as_deref().filter(|k| !k.is_empty());
        let (resolved, failure) =
            match targets.resolve(&send.service_name, &send.handler_name, idempotency_key.is_some()) {
                Ok(resolved) => (resolved, None),
                Err((message, retention)) => {
                    let unknown =
                        Resolved { service_ty: ServiceType::Service, handler_ty: HandlerType::Shared, retention };
                    (unknown, Some(message))
                }
            };
        let target = Target {
            service: send.service_name.clone(),
            handler: send.handler_name.clone(),
            key: resolved.service_ty.is_keyed().then(|| send.key.clone()),
            service_ty: resolved.service_ty,
            handler_ty: resolved.handler_ty,
        };
        let mut seed = xxhash_rust::xxh3::Xxh3::new();
        seed.update(self.id.as_bytes());
        seed.update(&send.invocation_id_notification_idx.to_le_bytes());
        let (partition_key, unique) = invocation_ids(&target, idempotency_key, seed.digest());
        Invoke {
            id: key::id(partition_key, unique),
            target,
            payload: send.parameter.clone(),
            headers: send.headers.iter().map(|h| (h.key.clone(), h.value.clone())).collect(),
            source: Source::Service { caller: self.id.clone() },
            dedup: None,
            created_at_ms: now_ms,
            failure,
            not_before_ms: (send.invoke_time > now_ms).then_some(send.invoke_time),
            trace: self.trace,
            retention: resolved.retention,
        }
    }

    fn failed(
        &self,
        message: String,
        delay: Option<Duration>,
        behavior: Behavior,
        retry: &RetryPolicy,
        now_ms: u64,
    ) -> Effect {
        let failed_attempts = self.attempts + 1;
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
            attempt: self.attempt,
            message,
            retry_at_ms: delay.map(|d| now_ms + d.as_millis() as u64),
            pause,
        }
    }
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
                }),
                _ => Err((format!("service {service} not found"), Retention::FOREVER)),
            }
        }
    }

    fn job(id: &str) -> Job {
        Job {
            id: id.to_owned(),
            service: "Caller".to_owned(),
            handler: "run".to_owned(),
            attempt: AttemptId { run: 3, base: 0 },
            attempts: 0,
            sleeping: false,
            body: Bytes::new(),
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
        let caller = job("inv_00000000000000070000000000000001");
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
        assert_eq!(unknown.failure.as_deref(), Some("service Nope not found"));
        assert_eq!(unknown.target.key, None);

        // The attempt run again starts the same invocations; another caller others.
        let Effect::Complete { sends: again, .. } =
            caller.effect(attempt(messages(), Ending::End), &Counter, &retry, 2_000)
        else {
            panic!("the handler ended");
        };
        assert_eq!(again.iter().map(|i| &i.id).collect::<Vec<_>>(), sends.iter().map(|i| &i.id).collect::<Vec<_>>());
        let other = job("inv_00000000000000070000000000000002");
        let Effect::Complete { sends: others, .. } =
            other.effect(attempt(messages(), Ending::End), &Counter, &retry, 1_000)
        else {
            panic!("the handler ended");
        };
        assert_ne!(others[2].id, sends[2].id);
    }

    #[test]
    fn a_suspended_attempt_journals_each_call_with_its_invocation_id() {
        let caller = job("inv_00000000000000070000000000000001");
        let retry = RetryPolicy::default();
        let effect = caller.effect(attempt(vec![send("Counter", "k", 1, 0)], Ending::Suspended), &Counter, &retry, 0);
        let Effect::Progress { entries, sends, .. } = effect else { panic!("the handler suspended") };
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
