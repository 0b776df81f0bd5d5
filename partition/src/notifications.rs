//! The service-protocol notifications that only applying an effect can
//! write, because their content is the partition's: a workflow promise's
//! result. Everything else a journal gets is encoded by the invoker.

use bytes::Bytes;
use ferry_proto::service_protocol as pb;

use crate::wire::v1::{Completion, JournalEntry};

/// The message type ids of the notifications written here.
const GET_PROMISE_COMPLETION: u16 = 0x8009;
const PEEK_PROMISE_COMPLETION: u16 = 0x800A;
const COMPLETE_PROMISE_COMPLETION: u16 = 0x800B;

fn value(content: &Bytes) -> pb::Value {
    pb::Value { content: content.clone() }
}

fn failure(code: u16, message: &str) -> pb::Failure {
    pb::Failure { code: code.into(), message: message.to_owned(), ..Default::default() }
}

fn entry(ty: u16, message: &impl prost::Message) -> JournalEntry {
    JournalEntry { ty, body: Bytes::from(message.encode_to_vec()) }
}

/// The answer to a `GetPromiseCommand`: the promise's result.
pub fn get_promise(completion_id: u32, result: &Completion) -> JournalEntry {
    use pb::get_promise_completion_notification_message::Result;
    let result = match result {
        Completion::Success(content) => Result::Value(value(content)),
        Completion::Failure { code, message } => Result::Failure(failure(*code, message)),
    };
    entry(GET_PROMISE_COMPLETION, &pb::GetPromiseCompletionNotificationMessage { completion_id, result: Some(result) })
}

/// The answer to a `PeekPromiseCommand`: the result, or nothing yet.
pub fn peek_promise(completion_id: u32, result: Option<&Completion>) -> JournalEntry {
    use pb::peek_promise_completion_notification_message::Result;
    let result = match result {
        None => Result::Void(pb::Void {}),
        Some(Completion::Success(content)) => Result::Value(value(content)),
        Some(Completion::Failure { code, message }) => Result::Failure(failure(*code, message)),
    };
    entry(
        PEEK_PROMISE_COMPLETION,
        &pb::PeekPromiseCompletionNotificationMessage { completion_id, result: Some(result) },
    )
}

/// The answer to a `CompletePromiseCommand`: done, or a 409 failure for a
/// promise completed before.
pub fn complete_promise(completion_id: u32, completed_before: bool) -> JournalEntry {
    use pb::complete_promise_completion_notification_message::Result;
    let result = match completed_before {
        false => Result::Void(pb::Void {}),
        true => Result::Failure(failure(409, "promise was already completed")),
    };
    entry(
        COMPLETE_PROMISE_COMPLETION,
        &pb::CompletePromiseCompletionNotificationMessage { completion_id, result: Some(result) },
    )
}
