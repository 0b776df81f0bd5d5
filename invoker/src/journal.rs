//! Between the log and the protocol: the request body of an attempt is built
//! from an invocation's journal, and what the deployment answered becomes the
//! one [`Effect`] the invoker appends to the log.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferry_partition::state::{Completion, Invocation};
use ferry_partition::wire::v1::{AttemptId, Effect, JournalEntry, Sleep, StateOp};
use ferry_proto::service_protocol as pb;
use ferry_telemetry::TraceContext;

use crate::client::{Attempt, Ending};
use crate::codec::{encode, encode_raw, Message};
use crate::retry::{OnMaxAttempts, RetryPolicy};

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

    /// The effect of an attempt that ended with `result` at `now_ms`.
    pub fn effect(&self, result: Result<Attempt, String>, retry: &RetryPolicy, now_ms: u64) -> Effect {
        let attempt = match result {
            Ok(attempt) => attempt,
            Err(message) => return self.failed(message, None, Behavior::Retry, retry, now_ms),
        };
        let mut entries = Vec::new();
        let mut state = Vec::new();
        let mut sleeps = Vec::new();
        let mut output = None;
        let mut proposed_run = false;
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
                    proposed_run = true;
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
            },
            Ending::Suspended if entries.is_empty() && sleeps.is_empty() && !self.sleeping => self.failed(
                "the handler suspended waiting for something that will not happen".to_owned(),
                None,
                Behavior::Retry,
                retry,
                now_ms,
            ),
            Ending::Suspended => Effect::Progress {
                id: self.id.clone(),
                attempt: self.attempt,
                entries,
                state,
                sleeps,
                run_now: proposed_run,
            },
            Ending::Failed => unreachable!("an Error message returns above"),
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
