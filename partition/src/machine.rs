//! The state machine that a node's Raft groups run, and the reads the rest
//! of the node makes through the log: a partition's state, the cluster
//! metadata, the invocation gauges.

use std::ops::ControlFlow;

use ferry_log::node::Role;
use ferry_log::{partition_group, Error, LogNode, StateMachine, METADATA_GROUP};
use tokio::sync::watch;

use crate::state::{self, Local, MetadataState, PartitionRead, Status};
use crate::store::{Store, StoreError, StoreRead, Table};
use crate::watch::Watch;
use crate::{Command, PartitionId, Response};

/// What each group applies: a partition's group its invocations, dedup and
/// object state in the tables, the metadata group the cluster metadata as
/// its resident part.
#[derive(Debug, Default)]
pub struct Machine {
    local: Local,
}

impl Machine {
    /// Reads of a partition's state in `view`, a view of what this machine applied.
    pub fn partition<'a>(&'a self, view: &'a dyn StoreRead<Table>) -> PartitionRead<'a, dyn StoreRead<Table> + 'a> {
        PartitionRead::new(view, &self.local.removed)
    }

    /// Waits for changes of invocation `id` applied from now on.
    pub fn watch(&self, id: &str) -> Watch {
        self.local.watches.watch(id)
    }
}

impl StateMachine for Machine {
    /// 2: effects name their attempt (run and journal length), subscriptions
    /// record their sink's kind. 3: invocations carry their retention,
    /// services and handlers the retention they ask for. 4: partition state
    /// is kept as tables of rows ([`crate::store`]). 5: invocation rows are
    /// keyed by [`crate::store::key::invocation`], unique part first. 6:
    /// one-way calls: effects carry the invocations they start, partitions
    /// an outbox. 7: calls: invocations keep their callers and the results
    /// they await, outboxes carry results back. 8: handlers say whether they
    /// read state lazily. 9: workflow promises. 10: attach and output from
    /// handlers. 11: streaming attempts checkpoint their journal. 12: handlers
    /// carry their manifest's timeouts. 13: invocation, deployment and
    /// subscription ids in Restate's form ([`crate::store::key::id`]). 14:
    /// subscriptions can be paused, records of ordered subscriptions say so.
    /// 15: records name their dead-letter topic, partitions keep an egress.
    const DATA_FORMAT: u32 = 15;

    type Command = Command;
    type Response = Response;
    type Resident = MetadataState;
    type Tables = Table;

    fn apply<S: Store<Table> + ?Sized>(
        &self,
        store: &mut S,
        metadata: &mut MetadataState,
        command: Command,
    ) -> Result<Response, StoreError> {
        state::apply(store, &self.local, metadata, command)
    }

    fn published(&self) {
        self.local.watches.publish();
    }

    fn replaced(&self) {
        self.local.watches.publish_all();
    }

    fn changes_resident(command: &Command) -> bool {
        matches!(command, Command::Metadata(_))
    }

    fn empty_response() -> Response {
        Response::Empty
    }

    fn digest<S: StoreRead<Table> + ?Sized>(&self, view: &S, metadata: &MetadataState) -> Result<u128, StoreError> {
        state::digest(view, metadata)
    }

    /// An invocation allowed to run may be running on the leader.
    fn busy<S: StoreRead<Table> + ?Sized>(&self, view: &S) -> Result<bool, StoreError> {
        let mut busy = false;
        PartitionRead::new(view, &self.local.removed).runnable_ids(|_| {
            busy = true;
            ControlFlow::Break(())
        })?;
        Ok(busy)
    }
}

/// A node's log of partitions and cluster metadata.
pub type Log = LogNode<Machine>;

/// What the node reads through its [`Log`]. Failures are the log's own
/// errors, as large as openraft makes them.
#[allow(clippy::result_large_err)]
pub trait LogReads {
    /// Reads a consistent view of a partition's applied state.
    fn read_partition<R>(
        &self,
        partition: PartitionId,
        f: impl FnOnce(&PartitionRead<'_, dyn StoreRead<Table> + '_>) -> Result<R, StoreError>,
    ) -> Result<R, Error>;

    /// Reads the applied cluster metadata.
    fn read_metadata<R>(&self, f: impl FnOnce(&MetadataState) -> R) -> R;

    /// A receiver that sees a new value whenever metadata changes may have been applied.
    fn metadata_changes(&self) -> watch::Receiver<u64>;

    /// A receiver that sees a new value whenever entries of a partition have been applied.
    fn partition_changes(&self, partition: PartitionId) -> Result<watch::Receiver<u64>, Error>;

    /// Waits for changes of invocation `id` of `partition` that this node
    /// applies from now on: its completion, what arrives for it.
    fn watch_invocation(&self, partition: PartitionId, id: &str) -> Result<Watch, Error>;

    /// Sets `ferry_invocations` by status, summed over the partitions this
    /// node leads, each read from a view of its state. Meant to run when
    /// metrics are scraped.
    fn publish_invocation_gauges(&self);
}

#[allow(clippy::result_large_err)]
impl LogReads for Log {
    fn read_partition<R>(
        &self,
        partition: PartitionId,
        f: impl FnOnce(&PartitionRead<'_, dyn StoreRead<Table> + '_>) -> Result<R, StoreError>,
    ) -> Result<R, Error> {
        self.read(partition_group(partition), |machine, view| f(&machine.partition(view)))
    }

    fn read_metadata<R>(&self, f: impl FnOnce(&MetadataState) -> R) -> R {
        self.read_resident(METADATA_GROUP, f).expect("every node runs the metadata group")
    }

    fn metadata_changes(&self) -> watch::Receiver<u64> {
        self.changes(METADATA_GROUP).expect("every node runs the metadata group")
    }

    fn partition_changes(&self, partition: PartitionId) -> Result<watch::Receiver<u64>, Error> {
        self.changes(partition_group(partition))
    }

    fn watch_invocation(&self, partition: PartitionId, id: &str) -> Result<Watch, Error> {
        Ok(self.machine(partition_group(partition))?.watch(id))
    }

    fn publish_invocation_gauges(&self) {
        let mut invocations = [0u64; Status::ALL.len()];
        for status in self.group_statuses() {
            if status.role != Role::Leader || status.group == METADATA_GROUP {
                continue;
            }
            let Ok(counts) = self.read(status.group, |machine, view| machine.partition(view).status_counts()) else {
                continue;
            };
            for (total, count) in invocations.iter_mut().zip(counts) {
                *total += count;
            }
        }
        for (status, count) in Status::ALL.iter().zip(invocations) {
            metrics::gauge!("ferry_invocations", "status" => status.as_str()).set(count as f64);
        }
    }
}
