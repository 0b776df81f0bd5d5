//! Framing of the Restate service protocol, the stream of messages Ferry
//! exchanges with a handler deployment inside one `POST /invoke/{service}/{handler}`.
//!
//! Every message is an 8-byte header followed by a protobuf body (the messages
//! of [`ferry_proto::service_protocol`]). The header is one big-endian `u64`:
//!
//! | bits   | field                                                         |
//! |--------|---------------------------------------------------------------|
//! | 63..48 | message type, a [`MessageType`] id                             |
//! | 47     | `REQUESTED_ACK` ([`REQUESTED_ACK_FLAG`] in the `u16` of flags) |
//! | 46..32 | reserved flags, zero                                          |
//! | 31..0  | body length in bytes                                          |
//!
//! `REQUESTED_ACK` only means something on a run proposal ([`RunProposal`]);
//! the decoder ignores flags on every other type. [`encode`] writes one
//! message; a [`Decoder`] takes the body of an HTTP stream in whatever pieces
//! it arrives and yields whole [`Message`]s.
//!
//! The version is negotiated per request through the content type (see
//! [`ProtocolVersion`]). Versions 5 to 7 share one message table; what differs
//! is which fields are filled (see `service_protocol.proto`) and two semantics
//! the invoker must follow: the shape of a suspension (v5/v6 list the awaited
//! notifications in `waiting_*`, v7 sends a [`pb::Future`] in `awaiting_on`) and
//! the answer to a run proposal (an ack when `requested_ack`, which v7 SDKs
//! always set, else the run completion notification itself).

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use ferry_proto::service_protocol as pb;

/// Length of the header before every message body.
pub const HEADER_LEN: usize = 8;

/// The `REQUESTED_ACK` bit in the header's `u16` of flags.
pub const REQUESTED_ACK_FLAG: u16 = 0x8000;

/// First type id of the custom entries (up to `0xFFFF`): opaque journal
/// entries that are stored and replayed verbatim.
pub const CUSTOM_ENTRY_FIRST_ID: u16 = 0xFC00;

/// Largest message body a [`Decoder`] accepts unless told otherwise.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 32 * 1024 * 1024;

/// A version of the service protocol Ferry speaks.
///
/// Restate's Rust SDK 0.13 and Python SDK 1.2 announce `minProtocolVersion` 5
/// and `maxProtocolVersion` 7 in their endpoint manifest; the invoker picks the
/// highest version both sides support and sends its content type as
/// `content-type` (and `accept`) of the invoke request. The SDK answers `200`
/// with the same content type, or `415` for a version it does not speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProtocolVersion {
    /// Commands and notifications (the "immutable journal").
    V5 = 5,
    /// Adds `StartMessage.random_seed` and `Failure.metadata`.
    V6 = 6,
    /// Adds the `Future` await tree (suspension, `AwaitingOn`), acked run
    /// proposals, `ErrorMessage.behavior`, scopes and limit keys.
    V7 = 7,
}

impl ProtocolVersion {
    /// Every version, oldest first.
    pub const ALL: [ProtocolVersion; 3] = [ProtocolVersion::V5, ProtocolVersion::V6, ProtocolVersion::V7];

    /// The version's number.
    pub const fn number(self) -> u32 {
        self as u32
    }

    /// The version with this number, if Ferry speaks it.
    pub const fn from_number(number: u32) -> Option<Self> {
        match number {
            5 => Some(ProtocolVersion::V5),
            6 => Some(ProtocolVersion::V6),
            7 => Some(ProtocolVersion::V7),
            _ => None,
        }
    }

    /// The content type naming this version on invoke requests and responses.
    pub const fn content_type(self) -> &'static str {
        match self {
            ProtocolVersion::V5 => "application/vnd.restate.invocation.v5",
            ProtocolVersion::V6 => "application/vnd.restate.invocation.v6",
            ProtocolVersion::V7 => "application/vnd.restate.invocation.v7",
        }
    }

    /// The version named by a content type (parameters after `;` ignored).
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        let essence = content_type.split(';').next().unwrap_or_default().trim();
        Self::ALL.into_iter().find(|v| essence.eq_ignore_ascii_case(v.content_type()))
    }

    /// The highest version Ferry shares with a deployment supporting
    /// `min..=max` (from its endpoint manifest), if any.
    pub fn negotiate(min: u32, max: u32) -> Option<Self> {
        Self::ALL.into_iter().rev().find(|v| (min..=max).contains(&v.number()))
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.number())
    }
}

/// A run proposal (type `0x0005`) with the `REQUESTED_ACK` flag of its header.
///
/// The runtime stores the proposed result as the run's completion
/// notification, then answers with a `ProposeRunCompletionAck` if
/// `requested_ack` (v7 SDKs always ask), else with the
/// `RunCompletionNotification` itself.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RunProposal {
    pub message: pb::ProposeRunCompletionMessage,
    pub requested_ack: bool,
}

/// A custom journal entry: a type id in `0xFC00..=0xFFFF` and a body the
/// runtime does not interpret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomEntry {
    type_id: u16,
    body: Bytes,
}

impl CustomEntry {
    /// A custom entry, if `type_id` is in the custom range.
    pub fn new(type_id: u16, body: Bytes) -> Option<Self> {
        (type_id >= CUSTOM_ENTRY_FIRST_ID).then_some(CustomEntry { type_id, body })
    }

    pub fn type_id(&self) -> u16 {
        self.type_id
    }

    pub fn body(&self) -> &Bytes {
        &self.body
    }
}

/// How a message body is written and read; prost messages, plus the two
/// bodies whose header matters ([`RunProposal`], [`CustomEntry`]).
trait Body: Sized {
    fn flags(&self) -> u16 {
        0
    }
    fn body_len(&self) -> usize;
    fn put_body(&self, buf: &mut BytesMut);
    fn decode_body(flags: u16, body: Bytes) -> Result<Self, prost::DecodeError>;
}

impl<M: prost::Message + Default> Body for M {
    fn body_len(&self) -> usize {
        self.encoded_len()
    }

    fn put_body(&self, buf: &mut BytesMut) {
        // A BytesMut grows as needed, so encoding cannot run out of space.
        self.encode(buf).expect("encoding into a growable buffer");
    }

    fn decode_body(_flags: u16, body: Bytes) -> Result<Self, prost::DecodeError> {
        M::decode(body)
    }
}

impl Body for RunProposal {
    fn flags(&self) -> u16 {
        if self.requested_ack {
            REQUESTED_ACK_FLAG
        } else {
            0
        }
    }

    fn body_len(&self) -> usize {
        self.message.body_len()
    }

    fn put_body(&self, buf: &mut BytesMut) {
        self.message.put_body(buf);
    }

    fn decode_body(flags: u16, body: Bytes) -> Result<Self, prost::DecodeError> {
        Ok(RunProposal {
            message: pb::ProposeRunCompletionMessage::decode_body(flags, body)?,
            requested_ack: flags & REQUESTED_ACK_FLAG != 0,
        })
    }
}

/// Declares [`MessageType`] and [`Message`] from one table of
/// `Variant = type id => body type`.
macro_rules! message_table {
    ($($(#[$doc:meta])* $variant:ident = $id:literal => $body:ty,)*) => {
        /// The type of a message, the first `u16` of its header.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum MessageType {
            $($(#[$doc])* $variant,)*
            /// A custom entry, `0xFC00..=0xFFFF`.
            Custom(u16),
        }

        impl MessageType {
            /// Every named type (custom entries aside), in table order.
            pub const ALL: &'static [MessageType] = &[$(MessageType::$variant,)*];

            /// The type id on the wire.
            pub const fn id(self) -> u16 {
                match self {
                    $(MessageType::$variant => $id,)*
                    MessageType::Custom(id) => id,
                }
            }

            /// The type with this id, `None` if the id is not one of v5 to v7.
            pub const fn from_id(id: u16) -> Option<Self> {
                match id {
                    $($id => Some(MessageType::$variant),)*
                    CUSTOM_ENTRY_FIRST_ID..=u16::MAX => Some(MessageType::Custom(id)),
                    _ => None,
                }
            }

            /// The type's name as in the protocol (without `Message`).
            pub const fn name(self) -> &'static str {
                match self {
                    $(MessageType::$variant => stringify!($variant),)*
                    MessageType::Custom(_) => "Custom",
                }
            }
        }

        /// A decoded message.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Message {
            $($(#[$doc])* $variant($body),)*
            /// A custom entry, `0xFC00..=0xFFFF`.
            Custom(CustomEntry),
        }

        impl Message {
            /// The message's type.
            pub fn message_type(&self) -> MessageType {
                match self {
                    $(Message::$variant(_) => MessageType::$variant,)*
                    Message::Custom(entry) => MessageType::Custom(entry.type_id),
                }
            }

            fn flags(&self) -> u16 {
                match self {
                    $(Message::$variant(body) => body.flags(),)*
                    Message::Custom(_) => 0,
                }
            }

            fn body_len(&self) -> usize {
                match self {
                    $(Message::$variant(body) => body.body_len(),)*
                    Message::Custom(entry) => entry.body.len(),
                }
            }

            fn put_body(&self, buf: &mut BytesMut) {
                match self {
                    $(Message::$variant(body) => body.put_body(buf),)*
                    Message::Custom(entry) => buf.put_slice(&entry.body),
                }
            }

            fn decode(ty: MessageType, flags: u16, body: Bytes) -> Result<Self, prost::DecodeError> {
                Ok(match ty {
                    $(MessageType::$variant => Message::$variant(<$body>::decode_body(flags, body)?),)*
                    MessageType::Custom(type_id) => Message::Custom(CustomEntry { type_id, body }),
                })
            }
        }
    };
}

message_table! {
    // --- Control messages (0x0000-0x01FF)
    /// Runtime -> SDK, first message of every stream.
    Start = 0x0000 => pb::StartMessage,
    /// SDK -> runtime, ends the stream waiting for notifications.
    Suspension = 0x0001 => pb::SuspensionMessage,
    /// SDK -> runtime, ends a failed attempt.
    Error = 0x0002 => pb::ErrorMessage,
    /// SDK -> runtime, ends the invocation.
    End = 0x0003 => pb::EndMessage,
    /// Runtime -> SDK; unknown to the Rust and Python SDKs, never send it to them.
    CommandAck = 0x0004 => pb::CommandAckMessage,
    /// SDK -> runtime, the result of a `ctx.run`.
    ProposeRunCompletion = 0x0005 => RunProposal,
    /// v7+. SDK -> runtime, what user code awaits (bidi mode only).
    AwaitingOn = 0x0006 => pb::AwaitingOnMessage,
    /// v7+. Runtime -> SDK, a run proposal is stored.
    ProposeRunCompletionAck = 0x0007 => pb::ProposeRunCompletionAckMessage,

    // --- Commands (0x0400-0x7FFF)
    InputCommand = 0x0400 => pb::InputCommandMessage,
    OutputCommand = 0x0401 => pb::OutputCommandMessage,
    GetLazyStateCommand = 0x0402 => pb::GetLazyStateCommandMessage,
    SetStateCommand = 0x0403 => pb::SetStateCommandMessage,
    ClearStateCommand = 0x0404 => pb::ClearStateCommandMessage,
    ClearAllStateCommand = 0x0405 => pb::ClearAllStateCommandMessage,
    GetLazyStateKeysCommand = 0x0406 => pb::GetLazyStateKeysCommandMessage,
    GetEagerStateCommand = 0x0407 => pb::GetEagerStateCommandMessage,
    GetEagerStateKeysCommand = 0x0408 => pb::GetEagerStateKeysCommandMessage,
    GetPromiseCommand = 0x0409 => pb::GetPromiseCommandMessage,
    PeekPromiseCommand = 0x040A => pb::PeekPromiseCommandMessage,
    CompletePromiseCommand = 0x040B => pb::CompletePromiseCommandMessage,
    SleepCommand = 0x040C => pb::SleepCommandMessage,
    CallCommand = 0x040D => pb::CallCommandMessage,
    OneWayCallCommand = 0x040E => pb::OneWayCallCommandMessage,
    SendSignalCommand = 0x0410 => pb::SendSignalCommandMessage,
    RunCommand = 0x0411 => pb::RunCommandMessage,
    AttachInvocationCommand = 0x0412 => pb::AttachInvocationCommandMessage,
    GetInvocationOutputCommand = 0x0413 => pb::GetInvocationOutputCommandMessage,
    CompleteAwakeableCommand = 0x0414 => pb::CompleteAwakeableCommandMessage,

    // --- Notifications (0x8000-0xFBFF); a completion's low bits match its command's
    GetLazyStateCompletionNotification = 0x8002 => pb::GetLazyStateCompletionNotificationMessage,
    GetLazyStateKeysCompletionNotification = 0x8006 => pb::GetLazyStateKeysCompletionNotificationMessage,
    GetPromiseCompletionNotification = 0x8009 => pb::GetPromiseCompletionNotificationMessage,
    PeekPromiseCompletionNotification = 0x800A => pb::PeekPromiseCompletionNotificationMessage,
    CompletePromiseCompletionNotification = 0x800B => pb::CompletePromiseCompletionNotificationMessage,
    SleepCompletionNotification = 0x800C => pb::SleepCompletionNotificationMessage,
    CallCompletionNotification = 0x800D => pb::CallCompletionNotificationMessage,
    /// For both `CallCommand` and `OneWayCallCommand`.
    CallInvocationIdCompletionNotification = 0x800E => pb::CallInvocationIdCompletionNotificationMessage,
    RunCompletionNotification = 0x8011 => pb::RunCompletionNotificationMessage,
    AttachInvocationCompletionNotification = 0x8012 => pb::AttachInvocationCompletionNotificationMessage,
    GetInvocationOutputCompletionNotification = 0x8013 => pb::GetInvocationOutputCompletionNotificationMessage,
    SignalNotification = 0xFBFF => pb::SignalNotificationMessage,
}

impl MessageType {
    /// A journal command (`0x0400..0x8000`); custom entries are journaled too
    /// but reported by [`MessageType::is_custom`].
    pub const fn is_command(self) -> bool {
        matches!(self.id(), 0x0400..=0x7FFF)
    }

    /// A notification (`0x8000..0xFC00`), all of the shape of [`pb::NotificationTemplate`].
    pub const fn is_notification(self) -> bool {
        matches!(self.id(), 0x8000..=0xFBFF)
    }

    pub const fn is_custom(self) -> bool {
        matches!(self, MessageType::Custom(_))
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:#06x})", self.name(), self.id())
    }
}

/// Why a byte stream is not a valid message stream.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("unknown service protocol message type {0:#06x}")]
    UnknownMessageType(u16),
    #[error("service protocol message {ty} of {len} bytes exceeds the limit of {max} bytes")]
    MessageTooLarge { ty: MessageType, len: u32, max: usize },
    #[error("cannot decode service protocol message {ty}: {source}")]
    Decode {
        ty: MessageType,
        #[source]
        source: prost::DecodeError,
    },
    #[error("service protocol stream ended inside a message: {buffered} of {expected} bytes")]
    Truncated { buffered: usize, expected: usize },
}

/// Appends `message`, header and body, to `buf`.
///
/// # Panics
///
/// If the body is 4 GiB or more, which the header cannot express (a decoder
/// would refuse it long before).
pub fn encode(message: &Message, buf: &mut BytesMut) {
    let len = message.body_len();
    let wire_len = u32::try_from(len).expect("a service protocol message body is below 4 GiB");
    buf.reserve(HEADER_LEN + len);
    buf.put_u16(message.message_type().id());
    buf.put_u16(message.flags());
    buf.put_u32(wire_len);
    let start = buf.len();
    message.put_body(buf);
    debug_assert_eq!(buf.len() - start, len, "encoded length of {}", message.message_type());
}

/// Appends a message given as its type id and already encoded body.
pub fn encode_raw(type_id: u16, body: &[u8], buf: &mut BytesMut) {
    let wire_len = u32::try_from(body.len()).expect("a service protocol message body is below 4 GiB");
    buf.reserve(HEADER_LEN + body.len());
    buf.put_u16(type_id);
    buf.put_u16(0);
    buf.put_u32(wire_len);
    buf.put_slice(body);
}

impl Message {
    /// The encoded body, without header or flags.
    pub fn encode_body(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.body_len());
        self.put_body(&mut buf);
        buf.freeze()
    }
}

/// Turns the pieces of a byte stream into messages.
///
/// [`push`](Decoder::push) every chunk as it arrives, then call
/// [`try_next`](Decoder::try_next) until it returns `Ok(None)`. At the end of
/// the stream, [`finish`](Decoder::finish) tells whether it stopped inside a
/// message. After an error the stream is broken and should be abandoned (an
/// unknown type or an oversized length is reported again on the next call).
#[derive(Debug)]
pub struct Decoder {
    buf: BytesMut,
    max_message_size: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

impl Decoder {
    /// A decoder accepting bodies up to [`DEFAULT_MAX_MESSAGE_SIZE`].
    pub fn new() -> Self {
        Decoder::with_max_message_size(DEFAULT_MAX_MESSAGE_SIZE)
    }

    /// A decoder refusing bodies longer than `max_message_size` bytes, as soon
    /// as their header arrives.
    pub fn with_max_message_size(max_message_size: usize) -> Self {
        Decoder { buf: BytesMut::new(), max_message_size }
    }

    /// Appends a chunk of the stream.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Bytes received but not yet returned as messages.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete message, `Ok(None)` if more bytes are needed.
    pub fn try_next(&mut self) -> Result<Option<Message>, CodecError> {
        let Some(header) = self.buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let type_id = u16::from_be_bytes([header[0], header[1]]);
        let flags = u16::from_be_bytes([header[2], header[3]]);
        let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);

        let ty = MessageType::from_id(type_id).ok_or(CodecError::UnknownMessageType(type_id))?;
        let body_len = usize::try_from(len).unwrap_or(usize::MAX);
        if body_len > self.max_message_size {
            return Err(CodecError::MessageTooLarge { ty, len, max: self.max_message_size });
        }
        let frame_len = HEADER_LEN + body_len;
        if self.buf.len() < frame_len {
            // Make room for the rest of the frame once, not chunk by chunk.
            self.buf.reserve(frame_len - self.buf.len());
            return Ok(None);
        }

        let mut frame = self.buf.split_to(frame_len);
        let body = frame.split_off(HEADER_LEN).freeze();
        Message::decode(ty, flags, body).map(Some).map_err(|source| CodecError::Decode { ty, source })
    }

    /// Checks that the stream ended between two messages.
    pub fn finish(&self) -> Result<(), CodecError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let expected = match self.buf.first_chunk::<HEADER_LEN>() {
            Some(header) => {
                let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
                HEADER_LEN.saturating_add(usize::try_from(len).unwrap_or(usize::MAX))
            }
            None => HEADER_LEN,
        };
        Err(CodecError::Truncated { buffered: self.buf.len(), expected })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::{Failure, FailureMetadata, Header, Value};

    fn value(content: &'static str) -> Value {
        Value { content: Bytes::from_static(content.as_bytes()) }
    }

    fn failure() -> Failure {
        Failure {
            code: 409,
            message: "conflict".into(),
            metadata: vec![FailureMetadata { key: "k".into(), value: "v".into() }],
        }
    }

    fn headers() -> Vec<Header> {
        vec![Header { key: "traceparent".into(), value: "00-ab-cd-01".into() }]
    }

    /// One message of every named type, each with non-default fields.
    fn samples() -> Vec<Message> {
        use pb::*;
        vec![
            Message::Start(StartMessage {
                id: Bytes::from_static(&[1, 2, 3, 4]),
                debug_id: "inv_1abc".into(),
                known_entries: 3,
                state_map: vec![
                    start_message::StateEntry { key: Bytes::from_static(b"count"), value: Bytes::from_static(b"41") },
                    start_message::StateEntry { key: Bytes::from_static(b"empty"), value: Bytes::new() },
                ],
                partial_state: true,
                key: "user-7".into(),
                retry_count_since_last_stored_entry: 2,
                duration_since_last_stored_entry: 1500,
                random_seed: 0xDEAD_BEEF_0000_0001,
                scope: Some("tenant-a".into()),
                limit_key: Some("lk".into()),
                idempotency_key: Some("idem".into()),
            }),
            Message::Suspension(SuspensionMessage {
                waiting_completions: vec![1, 2],
                waiting_signals: vec![17],
                waiting_named_signals: vec!["go".into()],
                awaiting_on: Some(Future {
                    waiting_completions: vec![3],
                    combinator_type: CombinatorType::AllSucceededOrFirstFailed as i32,
                    nested_futures: vec![Future {
                        waiting_signals: vec![18, 19],
                        combinator_type: CombinatorType::FirstCompleted as i32,
                        ..Future::default()
                    }],
                    ..Future::default()
                }),
            }),
            Message::Error(ErrorMessage {
                code: 500,
                message: "boom".into(),
                stacktrace: "at handler".into(),
                related_command_index: Some(2),
                related_command_name: Some("append".into()),
                related_command_type: Some(0x0411),
                next_retry_delay: Some(250),
                behavior: ErrorBehavior::Pause as i32,
            }),
            Message::End(EndMessage {}),
            Message::CommandAck(CommandAckMessage { command_index: 5 }),
            Message::ProposeRunCompletion(RunProposal {
                message: ProposeRunCompletionMessage {
                    result_completion_id: 1,
                    result: Some(propose_run_completion_message::Result::Value(Bytes::from_static(b"42"))),
                },
                requested_ack: true,
            }),
            Message::AwaitingOn(AwaitingOnMessage {
                awaiting_on: Some(Future { waiting_completions: vec![1], ..Future::default() }),
                executing_side_effects: true,
            }),
            Message::ProposeRunCompletionAck(ProposeRunCompletionAckMessage { completion_id: 1 }),
            Message::InputCommand(InputCommandMessage {
                headers: headers(),
                value: Some(value("{\"seq\":1}")),
                name: "input".into(),
            }),
            Message::OutputCommand(OutputCommandMessage {
                name: "output".into(),
                result: Some(output_command_message::Result::Failure(failure())),
            }),
            Message::GetLazyStateCommand(GetLazyStateCommandMessage {
                key: Bytes::from_static(b"count"),
                result_completion_id: 1,
                name: "get".into(),
            }),
            Message::SetStateCommand(SetStateCommandMessage {
                key: Bytes::from_static(b"count"),
                value: Some(value("42")),
                name: "set".into(),
            }),
            Message::ClearStateCommand(ClearStateCommandMessage {
                key: Bytes::from_static(b"count"),
                name: "clear".into(),
            }),
            Message::ClearAllStateCommand(ClearAllStateCommandMessage { name: "clear all".into() }),
            Message::GetLazyStateKeysCommand(GetLazyStateKeysCommandMessage {
                result_completion_id: 2,
                name: "keys".into(),
            }),
            Message::GetEagerStateCommand(GetEagerStateCommandMessage {
                key: Bytes::from_static(b"count"),
                name: "eager".into(),
                result: Some(get_eager_state_command_message::Result::Void(Void {})),
            }),
            Message::GetEagerStateKeysCommand(GetEagerStateKeysCommandMessage {
                name: "eager keys".into(),
                value: Some(StateKeys { keys: vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")] }),
            }),
            Message::GetPromiseCommand(GetPromiseCommandMessage {
                key: "p".into(),
                result_completion_id: 3,
                name: String::new(),
            }),
            Message::PeekPromiseCommand(PeekPromiseCommandMessage {
                key: "p".into(),
                result_completion_id: 4,
                name: "peek".into(),
            }),
            Message::CompletePromiseCommand(CompletePromiseCommandMessage {
                key: "p".into(),
                completion: Some(complete_promise_command_message::Completion::CompletionValue(value("done"))),
                result_completion_id: 5,
                name: String::new(),
            }),
            Message::SleepCommand(SleepCommandMessage {
                wake_up_time: 1_700_000_000_000,
                result_completion_id: 6,
                name: "nap".into(),
            }),
            Message::CallCommand(CallCommandMessage {
                service_name: "Counter".into(),
                handler_name: "add".into(),
                parameter: Bytes::from_static(b"{}"),
                headers: headers(),
                key: "k".into(),
                idempotency_key: Some("once".into()),
                scope: Some("s".into()),
                limit_key: Some("l".into()),
                invocation_id_notification_idx: 7,
                result_completion_id: 8,
                name: "call".into(),
            }),
            Message::OneWayCallCommand(OneWayCallCommandMessage {
                service_name: "Sink".into(),
                handler_name: "handle".into(),
                parameter: Bytes::from_static(b"x"),
                invoke_time: 1_700_000_000_500,
                headers: headers(),
                key: String::new(),
                idempotency_key: None,
                scope: None,
                limit_key: None,
                invocation_id_notification_idx: 9,
                name: "send".into(),
            }),
            Message::SendSignalCommand(SendSignalCommandMessage {
                target_invocation_id: "inv_1xyz".into(),
                signal_id: Some(send_signal_command_message::SignalId::Idx(BuiltInSignal::Cancel as u32)),
                result: Some(send_signal_command_message::Result::Void(Void {})),
                entry_name: "cancel".into(),
            }),
            Message::RunCommand(RunCommandMessage { result_completion_id: 10, name: "append".into() }),
            Message::AttachInvocationCommand(AttachInvocationCommandMessage {
                target: Some(attach_invocation_command_message::Target::IdempotentRequestTarget(
                    IdempotentRequestTarget {
                        service_name: "Sink".into(),
                        service_key: None,
                        handler_name: "handle".into(),
                        idempotency_key: "once".into(),
                        scope: Some("s".into()),
                    },
                )),
                result_completion_id: 11,
                name: String::new(),
            }),
            Message::GetInvocationOutputCommand(GetInvocationOutputCommandMessage {
                target: Some(get_invocation_output_command_message::Target::WorkflowTarget(WorkflowTarget {
                    workflow_name: "Flow".into(),
                    workflow_key: "k".into(),
                    scope: None,
                })),
                result_completion_id: 12,
                name: String::new(),
            }),
            Message::CompleteAwakeableCommand(CompleteAwakeableCommandMessage {
                awakeable_id: "prom_1abc".into(),
                result: Some(complete_awakeable_command_message::Result::Failure(failure())),
                name: String::new(),
            }),
            Message::GetLazyStateCompletionNotification(GetLazyStateCompletionNotificationMessage {
                completion_id: 1,
                result: Some(get_lazy_state_completion_notification_message::Result::Value(value("41"))),
            }),
            Message::GetLazyStateKeysCompletionNotification(GetLazyStateKeysCompletionNotificationMessage {
                completion_id: 2,
                state_keys: Some(StateKeys { keys: vec![Bytes::from_static(b"count")] }),
            }),
            Message::GetPromiseCompletionNotification(GetPromiseCompletionNotificationMessage {
                completion_id: 3,
                result: Some(get_promise_completion_notification_message::Result::Failure(failure())),
            }),
            Message::PeekPromiseCompletionNotification(PeekPromiseCompletionNotificationMessage {
                completion_id: 4,
                result: Some(peek_promise_completion_notification_message::Result::Void(Void {})),
            }),
            Message::CompletePromiseCompletionNotification(CompletePromiseCompletionNotificationMessage {
                completion_id: 5,
                result: Some(complete_promise_completion_notification_message::Result::Void(Void {})),
            }),
            Message::SleepCompletionNotification(SleepCompletionNotificationMessage {
                completion_id: 6,
                void: Some(Void {}),
            }),
            Message::CallCompletionNotification(CallCompletionNotificationMessage {
                completion_id: 8,
                result: Some(call_completion_notification_message::Result::Value(value("1"))),
            }),
            Message::CallInvocationIdCompletionNotification(CallInvocationIdCompletionNotificationMessage {
                completion_id: 7,
                invocation_id: "inv_1callee".into(),
            }),
            Message::RunCompletionNotification(RunCompletionNotificationMessage {
                completion_id: 10,
                result: Some(run_completion_notification_message::Result::Value(value("1700000000000"))),
            }),
            Message::AttachInvocationCompletionNotification(AttachInvocationCompletionNotificationMessage {
                completion_id: 11,
                result: Some(attach_invocation_completion_notification_message::Result::Value(value("out"))),
            }),
            Message::GetInvocationOutputCompletionNotification(GetInvocationOutputCompletionNotificationMessage {
                completion_id: 12,
                result: Some(get_invocation_output_completion_notification_message::Result::Void(Void {})),
            }),
            Message::SignalNotification(SignalNotificationMessage {
                signal_id: Some(signal_notification_message::SignalId::Name("approved".into())),
                result: Some(signal_notification_message::Result::Value(value("yes"))),
            }),
        ]
    }

    fn encode_all(messages: &[Message]) -> BytesMut {
        let mut buf = BytesMut::new();
        for message in messages {
            encode(message, &mut buf);
        }
        buf
    }

    fn decode_all(decoder: &mut Decoder) -> Vec<Message> {
        let mut out = Vec::new();
        while let Some(message) = decoder.try_next().expect("valid stream") {
            out.push(message);
        }
        out
    }

    fn frame(type_id: u16, flags: u16, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&type_id.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn type_ids_round_trip_and_samples_cover_every_type() {
        for &ty in MessageType::ALL {
            assert_eq!(MessageType::from_id(ty.id()), Some(ty), "{ty}");
        }
        let covered: Vec<MessageType> = samples().iter().map(Message::message_type).collect();
        for &ty in MessageType::ALL {
            assert!(covered.contains(&ty), "no sample of {ty}");
        }
        assert_eq!(covered.len(), MessageType::ALL.len());
    }

    #[test]
    fn type_ranges() {
        assert!(MessageType::RunCommand.is_command());
        assert!(!MessageType::RunCommand.is_notification());
        assert!(MessageType::RunCompletionNotification.is_notification());
        assert!(MessageType::SignalNotification.is_notification());
        assert!(!MessageType::ProposeRunCompletion.is_command());
        assert!(!MessageType::ProposeRunCompletion.is_notification());
        assert!(MessageType::Custom(0xFC00).is_custom());
        // Each completion notification's low bits name its command.
        assert_eq!(MessageType::SleepCompletionNotification.id() & 0x3FF, MessageType::SleepCommand.id() & 0x3FF);
        assert_eq!(MessageType::from_id(0xFC00), Some(MessageType::Custom(0xFC00)));
        assert_eq!(MessageType::from_id(0xFFFF), Some(MessageType::Custom(0xFFFF)));
        for unknown in [0x0008, 0x00FF, 0x0200, 0x0300, 0x040F, 0x0415, 0x7FFF, 0x8000, 0x8001, 0xFBFE] {
            assert_eq!(MessageType::from_id(unknown), None, "{unknown:#06x}");
        }
        assert_eq!(MessageType::InputCommand.to_string(), "InputCommand (0x0400)");
    }

    #[test]
    fn every_message_round_trips() {
        for message in samples() {
            let mut buf = BytesMut::new();
            encode(&message, &mut buf);
            let mut decoder = Decoder::new();
            decoder.push(&buf);
            let decoded = decoder.try_next().unwrap().unwrap_or_else(|| panic!("{}", message.message_type()));
            assert_eq!(decoded, message);
            assert_eq!(decoder.try_next().unwrap(), None);
            assert_eq!(decoder.buffered(), 0);
            decoder.finish().unwrap();
        }
    }

    #[test]
    fn default_messages_round_trip_with_empty_bodies() {
        for message in [
            Message::End(pb::EndMessage {}),
            Message::InputCommand(pb::InputCommandMessage::default()),
            Message::ProposeRunCompletion(RunProposal::default()),
        ] {
            let mut buf = BytesMut::new();
            encode(&message, &mut buf);
            assert_eq!(buf.len(), HEADER_LEN);
            let mut decoder = Decoder::new();
            decoder.push(&buf);
            assert_eq!(decoder.try_next().unwrap(), Some(message));
        }
    }

    #[test]
    fn header_is_big_endian_type_flags_length() {
        let mut buf = BytesMut::new();
        encode(&Message::End(pb::EndMessage {}), &mut buf);
        assert_eq!(&buf[..], &[0x00, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00]);

        // Input with value "hi": field 14 (Value) holding field 1 (content).
        let mut buf = BytesMut::new();
        let input = pb::InputCommandMessage { value: Some(value("hi")), ..Default::default() };
        encode(&Message::InputCommand(input), &mut buf);
        assert_eq!(&buf[..], &[0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x06, 0x72, 0x04, 0x0a, 0x02, b'h', b'i']);

        // A run proposal asking for an ack sets the top bit of the flags.
        let proposal = RunProposal {
            message: pb::ProposeRunCompletionMessage { result_completion_id: 1, result: None },
            requested_ack: true,
        };
        let mut buf = BytesMut::new();
        encode(&Message::ProposeRunCompletion(proposal), &mut buf);
        assert_eq!(&buf[..], &[0x00, 0x05, 0x80, 0x00, 0x00, 0x00, 0x00, 0x02, 0x08, 0x01]);
    }

    #[test]
    fn requested_ack_is_read_from_the_flags() {
        let body = [0x08, 0x03]; // result_completion_id = 3
        let mut decoder = Decoder::new();
        decoder.push(&frame(0x0005, 0x0000, &body));
        decoder.push(&frame(0x0005, 0x8000, &body));
        let Some(Message::ProposeRunCompletion(plain)) = decoder.try_next().unwrap() else { panic!() };
        let Some(Message::ProposeRunCompletion(acked)) = decoder.try_next().unwrap() else { panic!() };
        assert!(!plain.requested_ack);
        assert!(acked.requested_ack);
        assert_eq!(acked.message.result_completion_id, 3);
    }

    #[test]
    fn flags_on_other_types_are_ignored() {
        let mut decoder = Decoder::new();
        decoder.push(&frame(0x0411, 0x8000, &[0x58, 0x01])); // RunCommand, result_completion_id = 1
        let message = decoder.try_next().unwrap();
        assert_eq!(
            message,
            Some(Message::RunCommand(pb::RunCommandMessage { result_completion_id: 1, name: String::new() }))
        );
    }

    #[test]
    fn decodes_byte_by_byte() {
        let messages = samples();
        let stream = encode_all(&messages);
        let mut decoder = Decoder::new();
        let mut decoded = Vec::new();
        for byte in stream.iter() {
            decoder.push(std::slice::from_ref(byte));
            decoded.extend(decode_all(&mut decoder));
        }
        assert_eq!(decoded, messages);
        decoder.finish().unwrap();
    }

    #[test]
    fn decodes_uneven_chunks() {
        let messages = samples();
        let stream = encode_all(&messages);
        for chunk_len in [2, 3, 7, 8, 9, 13, 64, 1000] {
            let mut decoder = Decoder::new();
            let mut decoded = Vec::new();
            for chunk in stream.chunks(chunk_len) {
                decoder.push(chunk);
                decoded.extend(decode_all(&mut decoder));
            }
            assert_eq!(decoded, messages, "chunks of {chunk_len}");
            decoder.finish().unwrap();
        }
    }

    #[test]
    fn truncated_frame_waits_then_fails_at_the_end() {
        let mut buf = BytesMut::new();
        encode(
            &Message::SetStateCommand(pb::SetStateCommandMessage {
                key: Bytes::from_static(b"count"),
                value: Some(value("42")),
                name: String::new(),
            }),
            &mut buf,
        );
        let full = buf.len();

        // Cut inside the body.
        let mut decoder = Decoder::new();
        decoder.push(&buf[..full - 1]);
        assert_eq!(decoder.try_next().unwrap(), None);
        let err = decoder.finish().unwrap_err();
        assert!(
            matches!(err, CodecError::Truncated { buffered, expected } if buffered == full - 1 && expected == full),
            "{err}"
        );

        // Cut inside the header.
        let mut decoder = Decoder::new();
        decoder.push(&buf[..5]);
        assert_eq!(decoder.try_next().unwrap(), None);
        let err = decoder.finish().unwrap_err();
        assert!(matches!(err, CodecError::Truncated { buffered: 5, expected: HEADER_LEN }), "{err}");

        // The rest completes it.
        decoder.push(&buf[5..]);
        assert!(decoder.try_next().unwrap().is_some());
        decoder.finish().unwrap();
    }

    #[test]
    fn unknown_type_is_rejected() {
        for type_id in [0x0008, 0x0200, 0x0415, 0x8000] {
            let mut decoder = Decoder::new();
            decoder.push(&frame(type_id, 0, &[]));
            let err = decoder.try_next().unwrap_err();
            assert!(matches!(err, CodecError::UnknownMessageType(t) if t == type_id), "{err}");
            // The stream stays broken.
            assert!(matches!(decoder.try_next(), Err(CodecError::UnknownMessageType(_))));
        }
        let mut decoder = Decoder::new();
        decoder.push(&frame(0x0200, 0, &[]));
        assert_eq!(decoder.try_next().unwrap_err().to_string(), "unknown service protocol message type 0x0200");
    }

    #[test]
    fn oversized_length_is_rejected_from_the_header() {
        // A body of exactly the limit is fine.
        let input =
            Message::InputCommand(pb::InputCommandMessage { value: Some(value("twelve bytes")), ..Default::default() });
        let mut buf = BytesMut::new();
        encode(&input, &mut buf);
        assert_eq!(buf.len(), HEADER_LEN + 16);
        let mut decoder = Decoder::with_max_message_size(16);
        decoder.push(&buf);
        assert_eq!(decoder.try_next().unwrap(), Some(input));

        let mut decoder = Decoder::with_max_message_size(16);
        // Only the header of a 17-byte body: refused before the body arrives.
        decoder.push(&frame(0x0400, 0, &[0u8; 17])[..HEADER_LEN]);
        let err = decoder.try_next().unwrap_err();
        assert!(
            matches!(err, CodecError::MessageTooLarge { ty: MessageType::InputCommand, len: 17, max: 16 }),
            "{err}"
        );

        let mut decoder = Decoder::new();
        decoder.push(&[0x04, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF]);
        assert!(matches!(decoder.try_next(), Err(CodecError::MessageTooLarge { len: u32::MAX, .. })));
    }

    #[test]
    fn malformed_body_is_a_decode_error() {
        let mut decoder = Decoder::new();
        // Field 1 of Start as a length-delimited value claiming 10 bytes, holding 1.
        decoder.push(&frame(0x0000, 0, &[0x0a, 0x0a, 0x01]));
        let err = decoder.try_next().unwrap_err();
        assert!(matches!(err, CodecError::Decode { ty: MessageType::Start, .. }), "{err}");
    }

    #[test]
    fn custom_entries_pass_through() {
        assert!(CustomEntry::new(0x0400, Bytes::new()).is_none());
        let entry = CustomEntry::new(0xFC01, Bytes::from_static(b"opaque")).unwrap();
        let mut buf = BytesMut::new();
        encode(&Message::Custom(entry.clone()), &mut buf);
        assert_eq!(&buf[..HEADER_LEN], &[0xFC, 0x01, 0, 0, 0, 0, 0, 6]);
        let mut decoder = Decoder::new();
        decoder.push(&buf);
        let decoded = decoder.try_next().unwrap().unwrap();
        assert_eq!(decoded.message_type(), MessageType::Custom(0xFC01));
        assert_eq!(decoded, Message::Custom(entry));
    }

    #[test]
    fn both_suspension_shapes_decode() {
        // v5/v6: waiting_completions = [1] (packed field 1), waiting_named_signals = ["go"] (field 3).
        let mut decoder = Decoder::new();
        decoder.push(&frame(0x0001, 0, &[0x0a, 0x01, 0x01, 0x1a, 0x02, b'g', b'o']));
        let Some(Message::Suspension(v6)) = decoder.try_next().unwrap() else { panic!() };
        assert_eq!(v6.waiting_completions, vec![1]);
        assert_eq!(v6.waiting_named_signals, vec!["go".to_owned()]);
        assert_eq!(v6.awaiting_on, None);

        // v7: awaiting_on (field 4) = Future { waiting_completions: [1] }.
        decoder.push(&frame(0x0001, 0, &[0x22, 0x03, 0x0a, 0x01, 0x01]));
        let Some(Message::Suspension(v7)) = decoder.try_next().unwrap() else { panic!() };
        assert!(v7.waiting_completions.is_empty());
        assert_eq!(v7.awaiting_on.unwrap().waiting_completions, vec![1]);
    }

    #[test]
    fn notifications_share_the_template_shape() {
        use prost::Message as _;
        let notification =
            pb::CallInvocationIdCompletionNotificationMessage { completion_id: 7, invocation_id: "inv_1callee".into() };
        let generic = pb::NotificationTemplate::decode(notification.encode_to_vec().as_slice()).unwrap();
        assert_eq!(generic.id, Some(pb::notification_template::Id::CompletionId(7)));
        assert_eq!(generic.result, Some(pb::notification_template::Result::InvocationId("inv_1callee".into())));
    }

    #[test]
    fn versions_and_content_types() {
        assert_eq!(ProtocolVersion::V5.content_type(), "application/vnd.restate.invocation.v5");
        assert_eq!(ProtocolVersion::V7.content_type(), "application/vnd.restate.invocation.v7");
        for v in ProtocolVersion::ALL {
            assert_eq!(ProtocolVersion::from_content_type(v.content_type()), Some(v));
            assert_eq!(ProtocolVersion::from_number(v.number()), Some(v));
        }
        assert_eq!(
            ProtocolVersion::from_content_type("Application/vnd.restate.invocation.v6; charset=utf-8"),
            Some(ProtocolVersion::V6)
        );
        assert_eq!(ProtocolVersion::from_content_type("application/vnd.restate.invocation.v8"), None);
        assert_eq!(ProtocolVersion::from_content_type("text/plain"), None);
        assert_eq!(ProtocolVersion::negotiate(5, 7), Some(ProtocolVersion::V7));
        assert_eq!(ProtocolVersion::negotiate(1, 5), Some(ProtocolVersion::V5));
        assert_eq!(ProtocolVersion::negotiate(6, 9), Some(ProtocolVersion::V7));
        assert_eq!(ProtocolVersion::negotiate(1, 4), None);
        assert_eq!(ProtocolVersion::negotiate(8, 9), None);
        assert_eq!(ProtocolVersion::from_number(4), None);
    }

    /// Bytes exchanged with a real deployment: `ferry-test-handlers` (Rust
    /// `restate-sdk` 0.13) invoked over h2c with hand-built requests.
    mod sdk_transcripts {
        use super::*;

        fn unhex(hex: &str) -> Vec<u8> {
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
        }

        fn decode_stream(hex: &str) -> Vec<Message> {
            let mut decoder = Decoder::new();
            decoder.push(&unhex(hex));
            let messages = decode_all(&mut decoder);
            decoder.finish().unwrap();
            messages
        }

        fn state(key: &'static str, content: &'static str) -> pb::SetStateCommandMessage {
            pb::SetStateCommandMessage {
                key: Bytes::from_static(key.as_bytes()),
                value: Some(value(content)),
                name: String::new(),
            }
        }

        /// `Counter/add` (v7) with a complete eager state `count = 41`: our
        /// request, byte for byte, and the SDK's answer.
        #[test]
        fn counter_add_with_eager_state() {
            let request = [
                Message::Start(pb::StartMessage {
                    id: Bytes::from_static(&[1, 2, 3, 5]),
                    debug_id: "inv_1ctr".into(),
                    known_entries: 1,
                    state_map: vec![pb::start_message::StateEntry {
                        key: Bytes::from_static(b"count"),
                        value: Bytes::from_static(b"41"),
                    }],
                    key: "k1".into(),
                    random_seed: 7,
                    ..Default::default()
                }),
                Message::InputCommand(pb::InputCommandMessage {
                    value: Some(value("{\"seq\": 3}")),
                    ..Default::default()
                }),
            ];
            assert_eq!(
                &encode_all(&request)[..],
                &unhex(
                    "00000000000000250a04010203051208696e765f316374721801220b0a05636f756e741202343132026b3148070400\
                     00000000000e720c0a0a7b22736571223a20337d"
                )[..]
            );

            let eager = |key: &'static str, result| {
                Message::GetEagerStateCommand(pb::GetEagerStateCommandMessage {
                    key: Bytes::from_static(key.as_bytes()),
                    name: String::new(),
                    result: Some(result),
                })
            };
            use pb::get_eager_state_command_message::Result as Eager;
            assert_eq!(
                decode_stream(
                    "040700000000000d0a05636f756e7472040a023431040300000000000d0a05636f756e741a040a02343204070000\
                     0000000c0a086c6173745f7365716a00040300000000000f0a086c6173745f7365711a030a01330401000000000006\
                     72040a0234320003000000000000"
                ),
                vec![
                    eager("count", Eager::Value(value("41"))),
                    Message::SetStateCommand(state("count", "42")),
                    eager("last_seq", Eager::Void(pb::Void {})),
                    Message::SetStateCommand(state("last_seq", "3")),
                    Message::OutputCommand(pb::OutputCommandMessage {
                        name: String::new(),
                        result: Some(pb::output_command_message::Result::Value(value("42"))),
                    }),
                    Message::End(pb::EndMessage {}),
                ]
            );
        }

        /// `Counter/add` with a partial, empty state map and the request stream
        /// closed: a lazy read, then a suspension on its completion (and on
        /// signal 1, cancellation), in the v5 and the v7 shape.
        #[test]
        fn counter_add_suspends_on_lazy_state() {
            let get = Message::GetLazyStateCommand(pb::GetLazyStateCommandMessage {
                key: Bytes::from_static(b"count"),
                result_completion_id: 1,
                name: String::new(),
            });
            assert_eq!(
                decode_stream("04020000000000090a05636f756e74580100010000000000060a0101120101"),
                vec![
                    get.clone(),
                    Message::Suspension(pb::SuspensionMessage {
                        waiting_completions: vec![1],
                        waiting_signals: vec![1],
                        ..Default::default()
                    }),
                ]
            );

            let future = pb::Future {
                waiting_completions: vec![1],
                waiting_signals: vec![1],
                combinator_type: pb::CombinatorType::FirstCompleted as i32,
                ..Default::default()
            };
            assert_eq!(
                decode_stream(
                    "04020000000000090a05636f756e745801000600000000000a0a080a01011201012801000100000000000a22080a\
                     01011201012801"
                ),
                vec![
                    get,
                    Message::AwaitingOn(pb::AwaitingOnMessage {
                        awaiting_on: Some(future.clone()),
                        executing_side_effects: false,
                    }),
                    Message::Suspension(pb::SuspensionMessage { awaiting_on: Some(future), ..Default::default() }),
                ]
            );
        }

        /// `Flaky/run` (v7): the run command, then its proposal asking for an ack.
        #[test]
        fn flaky_run_proposes_with_requested_ack() {
            let messages = decode_stream(
                "041100000000000a58016206617070656e6400058000000000110801720d31373935343231353632313532000600\
                 000000000a0a080a01011201012801000100000000000a22080a01011201012801",
            );
            assert_eq!(
                messages[..2],
                [
                    Message::RunCommand(pb::RunCommandMessage { result_completion_id: 1, name: "append".into() }),
                    Message::ProposeRunCompletion(RunProposal {
                        message: pb::ProposeRunCompletionMessage {
                            result_completion_id: 1,
                            result: Some(pb::propose_run_completion_message::Result::Value(Bytes::from_static(
                                b"1795421562152"
                            ))),
                        },
                        requested_ack: true,
                    }),
                ]
            );
            let types: Vec<MessageType> = messages[2..].iter().map(Message::message_type).collect();
            assert_eq!(types, [MessageType::AwaitingOn, MessageType::Suspension]);
        }
    }
}
