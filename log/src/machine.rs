//! What a group replicates. The log orders, stores and ships commands; a
//! [`StateMachine`] says what they are and what applying one does. Every
//! group of a node runs the same kind of machine, one value per group.

use std::fmt::Debug;
use std::marker::PhantomData;

use ferry_store::{Store, StoreError, StoreRead, TableSet};
use openraft::{BasicNode, Entry, RaftTypeConfig, TokioRuntime};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::storage::SnapshotData;
use crate::NodeId;

/// A deterministic state machine over ordered tables of rows. Its state is
/// the tables (on disk, read through views) and a small *resident* part that
/// is kept in memory as well as in one row, read without opening a view (the
/// cluster metadata, say).
///
/// `apply` must depend on nothing but the store, the resident part and the
/// command: no clock, no randomness, no I/O. Replicas that apply the same log
/// then hold the same state, and [`StateMachine::digest`] shows it.
pub trait StateMachine: Send + Sync + 'static {
    /// The format of what the machine writes (its commands in the log, its
    /// rows, its resident part). A node refuses a data directory of another
    /// format rather than misreading it: a change that older nodes cannot
    /// read takes a new number.
    const DATA_FORMAT: u32;

    /// What a group replicates.
    type Command: Clone + Debug + Serialize + DeserializeOwned + Send + Sync + 'static;
    /// What applying a command answers its proposer.
    type Response: Clone + Debug + Serialize + DeserializeOwned + Send + Sync + 'static;
    /// The part of the state kept in memory.
    type Resident: Clone + Debug + Default + Serialize + DeserializeOwned + Send + Sync + 'static;
    /// The tables the state lives in.
    type Tables: TableSet;

    /// Applies `command`. Only a failing store may fail it; the group then stops.
    fn apply<S: Store<Self::Tables> + ?Sized>(
        &self,
        store: &mut S,
        resident: &mut Self::Resident,
        command: Self::Command,
    ) -> Result<Self::Response, StoreError>;

    /// A batch applied before is visible to reads now.
    fn published(&self) {}

    /// The whole state was replaced by an installed snapshot.
    fn replaced(&self) {}

    /// Whether applying `command` may change the resident part, which is
    /// then written back with the batch.
    fn changes_resident(command: &Self::Command) -> bool;

    /// The response to an entry that carries no command: the blank entry of
    /// a new term, or a membership change.
    fn empty_response() -> Self::Response;

    /// A hash of the whole state, equal on replicas that applied the same log.
    fn digest<S: StoreRead<Self::Tables> + ?Sized>(
        &self,
        view: &S,
        resident: &Self::Resident,
    ) -> Result<u128, StoreError>;

    /// Whether the state shows work in flight that moving the group's
    /// leadership would cut short (an attempt that may be running on the
    /// leader). Leadership moves back to a preferred node only when not.
    fn busy<S: StoreRead<Self::Tables> + ?Sized>(&self, view: &S) -> Result<bool, StoreError>;
}

/// The openraft types of a group that runs `M`.
pub struct TypeConfig<M>(PhantomData<fn() -> M>);

impl<M> Debug for TypeConfig<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TypeConfig")
    }
}

impl<M> Clone for TypeConfig<M> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<M> Copy for TypeConfig<M> {}

impl<M> Default for TypeConfig<M> {
    fn default() -> Self {
        TypeConfig(PhantomData)
    }
}

impl<M> PartialEq for TypeConfig<M> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl<M> Eq for TypeConfig<M> {}

impl<M> PartialOrd for TypeConfig<M> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<M> Ord for TypeConfig<M> {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

impl<M: StateMachine> RaftTypeConfig for TypeConfig<M> {
    type D = M::Command;
    type R = M::Response;
    type NodeId = NodeId;
    type Node = BasicNode;
    type Entry = Entry<Self>;
    type SnapshotData = SnapshotData;
    type AsyncRuntime = TokioRuntime;
    type Responder = openraft::impls::OneshotResponder<Self>;
}

/// The openraft handle of a group that runs `M`.
pub type Raft<M> = openraft::Raft<TypeConfig<M>>;
