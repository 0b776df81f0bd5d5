//! The introspection tables, with Restate's names and columns, and how each
//! reads a partition's state: a chunk of rows at a time, resuming after the
//! last row it read, so that a scan holds one chunk in memory whatever the
//! state's size.

use std::collections::BTreeSet;
use std::fmt;
use std::ops::ControlFlow;

use bytes::Bytes;
use ferry_invoker::codec::MessageType;
use ferry_partition::partitioner::key_hash;
use ferry_partition::state::{Completion, Invocation, MetadataState, PartitionRead, Status};
use ferry_partition::store::{key, Table};
use ferry_partition::wire::v1::{JournalEntry, ServiceType, Source, Target};
use ferry_proto::service_protocol as pb;
use ferry_store::{StoreError, StoreRead};
use prost::Message as _;

use crate::rows::{Rows, Ty};

pub type View<'a> = PartitionRead<'a, dyn StoreRead<Table> + 'a>;

/// What a filter of the query narrows a scan to: some invocation ids, or
/// one Virtual Object or Workflow key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    pub ids: Option<BTreeSet<String>>,
    pub object: Option<(String, String)>,
    pub partition_keys: Option<BTreeSet<u64>>,
}

impl Scope {
    /// The partition keys the scan's rows can have, if the scope bounds them.
    pub fn keys(&self) -> Option<BTreeSet<u64>> {
        let mut keys = self.partition_keys.clone();
        let mut narrow = |these: BTreeSet<u64>| {
            keys = Some(match keys.take() {
                Some(keys) => keys.intersection(&these).copied().collect(),
                None => these,
            })
        };
        // An id of another form than Ferry's own has no partition key in it.
        if let Some(keys) = self.ids.as_ref().and_then(|ids| ids.iter().map(|id| partition_key(id)).collect()) {
            narrow(keys);
        }
        if let Some((service, key)) = &self.object {
            narrow(BTreeSet::from([key_hash(service, key)]));
        }
        keys
    }
}

/// The columns a filter on which narrows a table's [`Scope`].
#[derive(Debug, Clone, Copy)]
pub struct ScopeColumns {
    pub id: Option<&'static str>,
    pub service: Option<&'static str>,
    pub key: Option<&'static str>,
}

/// A table read from every partition's state.
pub trait PartitionTable: fmt::Debug + Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn columns(&self) -> &'static [(&'static str, Ty)];
    fn scope_columns(&self) -> ScopeColumns;

    /// Appends the rows of one partition after `cursor` to `rows` until it
    /// holds at least `max` (or the partition has no more) and returns the
    /// cursor to resume from, `None` once the partition is read.
    fn read(
        &self,
        view: &View<'_>,
        scope: &Scope,
        cursor: Option<&[u8]>,
        max: usize,
        rows: &mut Rows,
    ) -> Result<Option<Vec<u8>>, StoreError>;
}

/// Every partition table.
pub fn partition_tables() -> Vec<Box<dyn PartitionTable>> {
    vec![
        Box::new(Invocations { shape: Shape::Invocation }),
        Box::new(Invocations { shape: Shape::Status }),
        Box::new(Invocations { shape: Shape::Journal }),
        Box::new(Invocations { shape: Shape::Idempotency }),
        Box::new(ObjectState),
        Box::new(Inboxes { holders: false }),
        Box::new(Inboxes { holders: true }),
        Box::new(Promises),
    ]
}

const INVOCATION: &[(&str, Ty)] = &[
    ("partition_key", Ty::U64),
    ("id", Ty::Str),
    ("target", Ty::Str),
    ("target_service_name", Ty::Str),
    ("target_service_key", Ty::Str),
    ("target_handler_name", Ty::Str),
    ("target_service_ty", Ty::Str),
    ("idempotency_key", Ty::Str),
    ("invoked_by", Ty::Str),
    ("invoked_by_service_name", Ty::Str),
    ("invoked_by_id", Ty::Str),
    ("invoked_by_subscription_id", Ty::Str),
    ("invoked_by_target", Ty::Str),
    ("pinned_deployment_id", Ty::Str),
    ("pinned_service_protocol_version", Ty::U32),
    ("trace_id", Ty::Str),
    ("journal_size", Ty::U32),
    ("journal_commands_size", Ty::U32),
    ("created_at", Ty::Time),
    ("modified_at", Ty::Time),
    ("inboxed_at", Ty::Time),
    ("scheduled_at", Ty::Time),
    ("scheduled_start_at", Ty::Time),
    ("running_at", Ty::Time),
    ("completed_at", Ty::Time),
    ("completion_retention", Ty::Duration),
    ("journal_retention", Ty::Duration),
    ("status", Ty::Str),
    ("completion_result", Ty::Str),
    ("completion_failure", Ty::Str),
    ("retry_count", Ty::U64),
    ("last_start_at", Ty::Time),
    ("next_retry_at", Ty::Time),
    ("last_attempt_deployment_id", Ty::Str),
    ("last_attempt_server", Ty::Str),
    ("last_failure", Ty::Str),
    ("last_failure_error_code", Ty::Str),
    ("last_failure_related_entry_index", Ty::U64),
    ("last_failure_related_entry_name", Ty::Str),
    ("last_failure_related_entry_type", Ty::Str),
    ("last_failure_related_command_index", Ty::U64),
    ("last_failure_related_command_name", Ty::Str),
    ("last_failure_related_command_type", Ty::Str),
    ("kafka_topic", Ty::Str),
    ("kafka_partition", Ty::U32),
    ("kafka_offset", Ty::U64),
];

const JOURNAL: &[(&str, Ty)] = &[
    ("partition_key", Ty::U64),
    ("id", Ty::Str),
    ("index", Ty::U32),
    ("entry_type", Ty::Str),
    ("name", Ty::Str),
    ("completed", Ty::Bool),
    ("invoked_id", Ty::Str),
    ("invoked_target", Ty::Str),
    ("sleep_wakeup_at", Ty::Time),
    ("promise_name", Ty::Str),
    ("raw", Ty::Bytes),
    ("raw_length", Ty::U64),
    // Restate's journal format version: 2, commands and notifications.
    ("version", Ty::U32),
    ("entry_json", Ty::Str),
    ("appended_at", Ty::Time),
];

const IDEMPOTENCY: &[(&str, Ty)] = &[
    ("partition_key", Ty::U64),
    ("service_name", Ty::Str),
    ("service_key", Ty::Str),
    ("service_handler", Ty::Str),
    ("idempotency_key", Ty::Str),
    ("invocation_id", Ty::Str),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// `sys_invocation`: an invocation and its attempts, statuses as `restate invocations list` shows them.
    Invocation,
    /// `sys_invocation_status`: the same rows with the stored statuses (`inboxed`, `invoked`, ...).
    Status,
    /// `sys_journal`: a row per journal entry.
    Journal,
    /// `sys_idempotency`: a row per retained invocation made with an idempotency key.
    Idempotency,
}

#[derive(Debug)]
struct Invocations {
    shape: Shape,
}

impl PartitionTable for Invocations {
    fn name(&self) -> &'static str {
        match self.shape {
            Shape::Invocation => "sys_invocation",
            Shape::Status => "sys_invocation_status",
            Shape::Journal => "sys_journal",
            Shape::Idempotency => "sys_idempotency",
        }
    }

    fn columns(&self) -> &'static [(&'static str, Ty)] {
        match self.shape {
            Shape::Journal => JOURNAL,
            Shape::Idempotency => IDEMPOTENCY,
            Shape::Invocation | Shape::Status => INVOCATION,
        }
    }

    fn scope_columns(&self) -> ScopeColumns {
        match self.shape {
            Shape::Journal => ScopeColumns { id: Some("id"), service: None, key: None },
            Shape::Idempotency => {
                ScopeColumns { id: Some("invocation_id"), service: Some("service_name"), key: Some("service_key") }
            }
            Shape::Invocation | Shape::Status => {
                ScopeColumns { id: Some("id"), service: Some("target_service_name"), key: Some("target_service_key") }
            }
        }
    }

    fn read(
        &self,
        view: &View<'_>,
        scope: &Scope,
        cursor: Option<&[u8]>,
        max: usize,
        rows: &mut Rows,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(ids) = &scope.ids {
            // A few ids named by the query: read them, not the partition.
            for id in ids {
                if let Some(inv) = view.invocation(id)? {
                    self.append(&inv, rows);
                }
            }
            return Ok(None);
        }
        let after = cursor.map(|c| String::from_utf8_lossy(c).into_owned());
        let mut last = None;
        let mut more = false;
        view.invocations_after(after.as_deref(), |inv| {
            if rows.len() >= max {
                more = true;
                return ControlFlow::Break(());
            }
            self.append(&inv, rows);
            last = Some(inv.id);
            ControlFlow::Continue(())
        })?;
        Ok(if more { last.map(String::into_bytes) } else { None })
    }
}

impl Invocations {
    fn append(&self, inv: &Invocation, rows: &mut Rows) {
        match self.shape {
            Shape::Invocation | Shape::Status => self.append_invocation(inv, rows),
            Shape::Journal => append_journal(inv, rows),
            Shape::Idempotency => {
                if let Some(idempotency_key) = &inv.idempotency_key {
                    let target = &inv.target;
                    rows.u64(partition_key(&inv.id))
                        .str(Some(&target.service))
                        .str(target.key.as_deref())
                        .str(Some(&target.handler))
                        .str(Some(idempotency_key))
                        .str(Some(&inv.id))
                        .end();
                }
            }
        }
    }

    fn append_invocation(&self, inv: &Invocation, rows: &mut Rows) {
        let target = &inv.target;
        let status = match self.shape {
            Shape::Status => stored_status(inv.status),
            _ => inv.status.as_str(),
        };
        let (caller, subscription, kafka) = match &inv.source {
            Source::Service { caller } => (Some(caller.as_str()), None, None),
            Source::Kafka(k) => (None, Some(k.subscription.as_str()), Some(k)),
            Source::Ingress => (None, None, None),
        };
        let (result, failure) = match &inv.completion {
            Some(Completion::Success(_)) => (Some("success"), None),
            Some(Completion::Failure { code, message }) => (Some("failure"), Some(format!("[{code}] {message}"))),
            None => (None, None),
        };
        let trace = inv.trace.as_ref().map(|t| t.trace_id.iter().map(|b| format!("{b:02x}")).collect::<String>());
        let commands =
            inv.journal.iter().filter(|e| MessageType::from_id(e.ty).is_some_and(|t| t.is_command())).count();
        let wake = |status| (inv.status == status).then_some(inv.wake_at_ms).flatten();
        rows.u64(partition_key(&inv.id))
            .str(Some(&inv.id))
            .str(Some(&target_string(target)))
            .str(Some(&target.service))
            .str(target.key.as_deref())
            .str(Some(&target.handler))
            .str(Some(service_ty(target.service_ty)))
            .str(inv.idempotency_key.as_deref())
            .str(Some(match inv.source {
                Source::Ingress => "ingress",
                Source::Service { .. } => "service",
                Source::Kafka(_) => "subscription",
            }))
            .str(None)
            .str(caller)
            .str(subscription)
            .str(None)
            .str(None)
            .u32(None)
            .str(trace.as_deref())
            .u32(Some(1 + inv.journal.len() as u32))
            .u32(Some(1 + commands as u32))
            .time(Some(inv.created_at_ms))
            .time(Some(inv.modified_at_ms))
            .time(None)
            .time(None)
            .time(wake(Status::Scheduled))
            .time(None)
            .time(inv.completed_at_ms)
            .duration(Some(inv.retention.completion_ms))
            .duration(Some(inv.retention.journal_ms))
            .str(Some(status))
            .str(result)
            .str(failure.as_deref())
            .u64(Some(u64::from(inv.attempts)))
            .time(None)
            .time(wake(Status::BackingOff))
            .str(None)
            .str(None)
            .str(inv.last_failure.as_deref())
            .str(None)
            .u64(None)
            .str(None)
            .str(None)
            .u64(None)
            .str(None)
            .str(None)
            .str(kafka.map(|k| k.topic.as_str()))
            .u32(kafka.map(|k| k.partition as u32))
            .u64(kafka.map(|k| k.offset as u64))
            .end();
    }
}

/// The statuses `sys_invocation_status` has, as Restate stores them.
fn stored_status(status: Status) -> &'static str {
    match status {
        Status::Scheduled => "scheduled",
        Status::Pending => "inboxed",
        Status::Ready | Status::BackingOff => "invoked",
        Status::Suspended => "suspended",
        Status::Paused => "paused",
        Status::Completed => "completed",
    }
}

fn service_ty(ty: ServiceType) -> &'static str {
    match ty {
        ServiceType::Service => "service",
        ServiceType::VirtualObject => "virtual_object",
        ServiceType::Workflow => "workflow",
    }
}

/// `Service/key/handler`, or `Service/handler` for a Service.
fn target_string(target: &Target) -> String {
    match &target.key {
        Some(key) => format!("{}/{key}/{}", target.service, target.handler),
        None => format!("{}/{}", target.service, target.handler),
    }
}

fn partition_key(id: &str) -> Option<u64> {
    key::id_parts(id).map(|(partition_key, _)| partition_key)
}

/// The `name` every command has (field 12 of each command message).
#[derive(Clone, PartialEq, prost::Message)]
struct Named {
    #[prost(string, tag = "12")]
    name: String,
}

/// A journal entry as `sys_journal` shows it.
#[derive(Default)]
struct EntryRow {
    ty: String,
    name: Option<String>,
    completed: Option<bool>,
    invoked_id: Option<String>,
    invoked_target: Option<String>,
    sleep_wakeup_at: Option<u64>,
    promise_name: Option<String>,
}

fn describe(entry: &JournalEntry) -> EntryRow {
    let Some(ty) = MessageType::from_id(entry.ty) else {
        return EntryRow { ty: format!("Unknown: {:#06x}", entry.ty), ..EntryRow::default() };
    };
    let body = entry.body.clone();
    let mut row = EntryRow::default();
    if ty.is_command() {
        row.ty = format!("Command: {}", ty.name().trim_end_matches("Command"));
        row.name = Named::decode(body.clone()).ok().map(|n| n.name).filter(|n| !n.is_empty());
    } else if ty.is_notification() {
        row.ty = format!("Notification: {}", ty.name().trim_end_matches("Notification"));
        row.completed = Some(true);
    } else {
        row.ty = ty.name().to_owned();
    }
    let target = |service: String, key: String, handler: String| {
        if key.is_empty() {
            format!("{service}/{handler}")
        } else {
            format!("{service}/{key}/{handler}")
        }
    };
    match ty {
        MessageType::CallCommand => {
            if let Ok(call) = pb::CallCommandMessage::decode(body) {
                row.invoked_target = Some(target(call.service_name, call.key, call.handler_name));
            }
        }
        MessageType::OneWayCallCommand => {
            if let Ok(call) = pb::OneWayCallCommandMessage::decode(body) {
                row.invoked_target = Some(target(call.service_name, call.key, call.handler_name));
            }
        }
        MessageType::CallInvocationIdCompletionNotification => {
            row.invoked_id =
                pb::CallInvocationIdCompletionNotificationMessage::decode(body).ok().map(|n| n.invocation_id);
        }
        MessageType::SleepCommand => {
            row.sleep_wakeup_at = pb::SleepCommandMessage::decode(body).ok().map(|s| s.wake_up_time);
        }
        MessageType::GetPromiseCommand => {
            row.promise_name = pb::GetPromiseCommandMessage::decode(body).ok().map(|p| p.key);
        }
        MessageType::PeekPromiseCommand => {
            row.promise_name = pb::PeekPromiseCommandMessage::decode(body).ok().map(|p| p.key);
        }
        MessageType::CompletePromiseCommand => {
            row.promise_name = pb::CompletePromiseCommandMessage::decode(body).ok().map(|p| p.key);
        }
        _ => {}
    }
    row
}

fn append_journal(inv: &Invocation, rows: &mut Rows) {
    let partition_key = partition_key(&inv.id);
    // Entry 0 is the input: what the invocation was started with.
    rows.u64(partition_key)
        .str(Some(&inv.id))
        .u32(Some(0))
        .str(Some("Command: Input"))
        .str(None)
        .bool(None)
        .str(None)
        .str(None)
        .time(None)
        .str(None)
        .bytes(Some(&inv.payload))
        .u64(Some(inv.payload.len() as u64))
        .u32(Some(2))
        .str(None)
        .time(Some(inv.created_at_ms))
        .end();
    for (index, entry) in inv.journal.iter().enumerate() {
        let row = describe(entry);
        rows.u64(partition_key)
            .str(Some(&inv.id))
            .u32(Some(index as u32 + 1))
            .str(Some(&row.ty))
            .str(row.name.as_deref())
            .bool(row.completed)
            .str(row.invoked_id.as_deref())
            .str(row.invoked_target.as_deref())
            .time(row.sleep_wakeup_at)
            .str(row.promise_name.as_deref())
            .bytes(Some(&entry.body))
            .u64(Some(entry.body.len() as u64))
            .u32(Some(2))
            .str(None)
            .time(None)
            .end();
    }
}

/// `state`: the state of every Virtual Object and Workflow key.
#[derive(Debug)]
struct ObjectState;

const STATE: &[(&str, Ty)] = &[
    ("partition_key", Ty::U64),
    ("service_name", Ty::Str),
    ("service_key", Ty::Str),
    ("key", Ty::Str),
    ("value_utf8", Ty::Str),
    ("value", Ty::Bytes),
    ("value_length", Ty::U64),
];

impl PartitionTable for ObjectState {
    fn name(&self) -> &'static str {
        "state"
    }

    fn columns(&self) -> &'static [(&'static str, Ty)] {
        STATE
    }

    fn scope_columns(&self) -> ScopeColumns {
        ScopeColumns { id: None, service: Some("service_name"), key: Some("service_key") }
    }

    fn read(
        &self,
        view: &View<'_>,
        scope: &Scope,
        cursor: Option<&[u8]>,
        max: usize,
        rows: &mut Rows,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let append = |rows: &mut Rows, service: &str, key: &str, name: &[u8], value: &[u8]| {
            rows.u64(Some(key_hash(service, key)))
                .str(Some(service))
                .str(Some(key))
                .str(Some(&String::from_utf8_lossy(name)))
                .str(std::str::from_utf8(value).ok())
                .bytes(Some(value))
                .u64(Some(value.len() as u64))
                .end();
        };
        if let Some((service, key)) = &scope.object {
            for (name, value) in view.object_state(service, key)? {
                append(rows, service, key, &name, &value);
            }
            return Ok(None);
        }
        let mut last = None;
        view.state_after(cursor, |row, entry| {
            if rows.len() >= max {
                return ControlFlow::Break(());
            }
            append(rows, entry.service, entry.key, entry.name, entry.value);
            last = Some(row.to_vec());
            ControlFlow::Continue(())
        })?;
        Ok(if rows.len() >= max { last } else { None })
    }
}

/// `sys_inbox` (the invocations waiting for their key) or, with `holders`,
/// `sys_keyed_service_status` (the invocation holding each key).
#[derive(Debug)]
struct Inboxes {
    holders: bool,
}

const INBOX: &[(&str, Ty)] = &[
    ("partition_key", Ty::U64),
    ("service_name", Ty::Str),
    ("service_key", Ty::Str),
    ("id", Ty::Str),
    ("sequence_number", Ty::U64),
    ("created_at", Ty::Time),
];

const KEYED_STATUS: &[(&str, Ty)] =
    &[("partition_key", Ty::U64), ("service_name", Ty::Str), ("service_key", Ty::Str), ("invocation_id", Ty::Str)];

impl PartitionTable for Inboxes {
    fn name(&self) -> &'static str {
        if self.holders {
            "sys_keyed_service_status"
        } else {
            "sys_inbox"
        }
    }

    fn columns(&self) -> &'static [(&'static str, Ty)] {
        if self.holders {
            KEYED_STATUS
        } else {
            INBOX
        }
    }

    fn scope_columns(&self) -> ScopeColumns {
        let id = if self.holders { "invocation_id" } else { "id" };
        ScopeColumns { id: Some(id), service: Some("service_name"), key: Some("service_key") }
    }

    fn read(
        &self,
        view: &View<'_>,
        _scope: &Scope,
        cursor: Option<&[u8]>,
        max: usize,
        rows: &mut Rows,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let mut queued = Vec::new();
        let mut last = None;
        view.inboxes_after(cursor, |row, entry| {
            if queued.len() >= max {
                return ControlFlow::Break(());
            }
            if entry.head == self.holders {
                queued.push((entry.service.to_owned(), entry.key.to_owned(), entry.id.to_owned(), entry.seq));
            }
            last = Some(row.to_vec());
            ControlFlow::Continue(())
        })?;
        let more = queued.len() >= max;
        for (service, key, id, seq) in queued {
            let partition_key = Some(key_hash(&service, &key));
            if self.holders {
                rows.u64(partition_key).str(Some(&service)).str(Some(&key)).str(Some(&id)).end();
            } else {
                let created_at = view.invocation(&id)?.map(|inv| inv.created_at_ms);
                rows.u64(partition_key)
                    .str(Some(&service))
                    .str(Some(&key))
                    .str(Some(&id))
                    .u64(Some(seq))
                    .time(created_at)
                    .end();
            }
        }
        Ok(if more { last } else { None })
    }
}

/// `sys_promise`: the durable promises of workflows.
#[derive(Debug)]
struct Promises;

const PROMISE: &[(&str, Ty)] = &[
    ("partition_key", Ty::U64),
    ("service_name", Ty::Str),
    ("service_key", Ty::Str),
    ("key", Ty::Str),
    ("completed", Ty::Bool),
    ("completion_success_value", Ty::Bytes),
    ("completion_success_value_utf8", Ty::Str),
    ("completion_failure", Ty::Str),
];

impl PartitionTable for Promises {
    fn name(&self) -> &'static str {
        "sys_promise"
    }

    fn columns(&self) -> &'static [(&'static str, Ty)] {
        PROMISE
    }

    fn scope_columns(&self) -> ScopeColumns {
        ScopeColumns { id: None, service: Some("service_name"), key: Some("service_key") }
    }

    fn read(
        &self,
        view: &View<'_>,
        _scope: &Scope,
        cursor: Option<&[u8]>,
        max: usize,
        rows: &mut Rows,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let mut last = None;
        view.promises_after(cursor, |row, promise| {
            if rows.len() >= max {
                return ControlFlow::Break(());
            }
            let (value, failure): (Option<&Bytes>, _) = match &promise.result {
                Some(Completion::Success(value)) => (Some(value), None),
                Some(Completion::Failure { code, message }) => (None, Some(format!("[{code}] {message}"))),
                None => (None, None),
            };
            rows.u64(Some(key_hash(promise.service, promise.key)))
                .str(Some(promise.service))
                .str(Some(promise.key))
                .str(Some(promise.name))
                .bool(Some(promise.result.is_some()))
                .bytes(value.map(|v| &v[..]))
                .str(value.and_then(|v| std::str::from_utf8(v).ok()))
                .str(failure.as_deref())
                .end();
            last = Some(row.to_vec());
            ControlFlow::Continue(())
        })?;
        Ok(if rows.len() >= max { last } else { None })
    }
}

pub const SERVICE: &[(&str, Ty)] =
    &[("name", Ty::Str), ("revision", Ty::U64), ("public", Ty::Bool), ("ty", Ty::Str), ("deployment_id", Ty::Str)];

/// `sys_service`, from the cluster's metadata.
pub fn services(metadata: &MetadataState) -> Rows {
    let mut rows = Rows::new(SERVICE);
    for service in metadata.services.values() {
        rows.str(Some(&service.def.name))
            .u64(Some(u64::from(service.revision)))
            .bool(Some(true))
            .str(Some(service_ty(service.def.ty)))
            .str(Some(&service.deployment_id))
            .end();
    }
    rows
}

pub const DEPLOYMENT: &[(&str, Ty)] = &[
    ("id", Ty::Str),
    ("ty", Ty::Str),
    ("endpoint", Ty::Str),
    ("created_at", Ty::Time),
    ("min_service_protocol_version", Ty::U32),
    ("max_service_protocol_version", Ty::U32),
    ("services", Ty::StrList),
];

/// `sys_deployment`, from the cluster's metadata.
pub fn deployments(metadata: &MetadataState) -> Rows {
    let mut rows = Rows::new(DEPLOYMENT);
    for d in metadata.deployments.values() {
        rows.str(Some(&d.id))
            .str(Some("http"))
            .str(Some(&d.uri))
            .time(Some(d.created_at_ms))
            .u32(Some(d.min_protocol_version))
            .u32(Some(d.max_protocol_version))
            .str_list(d.services.iter().map(|s| s.name.as_str()))
            .end();
    }
    rows
}
