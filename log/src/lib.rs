//! The replicated partition log.
//!
//! Every partition of the key space is one openraft group; cluster metadata
//! (deployments, services, subscriptions) is one more group. All groups of a
//! node share one sled `Db`, one flusher (group commit) and one gRPC channel per
//! peer. What the groups replicate and how it is applied is a
//! [`StateMachine`]'s: the log is generic over it.

// openraft's storage traits fix `StorageError` (a large type) as the error of
// every storage call; boxing it here would only add allocations.
#![allow(clippy::result_large_err)]

pub mod machine;
pub mod network;
pub mod node;
pub mod placement;
pub mod storage;
pub mod tables;

pub use machine::{Raft, StateMachine, TypeConfig};
pub use node::{LogNode, Options};

/// A partition of the key space.
pub type PartitionId = u32;

/// A node of the cluster.
pub type NodeId = u64;

/// A Raft group: [`METADATA_GROUP`] or a partition's group (`partition + 1`).
pub type GroupId = u32;

/// The group that holds cluster metadata.
pub const METADATA_GROUP: GroupId = 0;

/// The largest gRPC message between nodes, either way.
pub const MESSAGE_BYTES_MAX: usize = 64 << 20;

/// The largest command a group takes, encoded. Well under
/// [`MESSAGE_BYTES_MAX`], so that an AppendEntries carrying any one entry
/// always fits in a message; larger ones are refused with
/// [`Error::TooLarge`] rather than wedging replication.
pub const COMMAND_BYTES_MAX: usize = 16 << 20;

/// The Raft group that replicates a partition.
pub fn partition_group(partition: PartitionId) -> GroupId {
    partition + 1
}

/// Errors of the log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("storage: {0}")]
    Storage(#[from] sled::Error),
    #[error("raft storage: {0}")]
    RaftStorage(#[from] openraft::StorageError<NodeId>),
    /// The group stopped (a storage failure, or the node is shutting down):
    /// nothing written to it will succeed until the node restarts.
    #[error("raft group {group} is stopped: {message}")]
    Fatal { group: GroupId, message: String },
    #[error("raft group {group} has no leader on this node (leader: {leader:?})")]
    NotLeader { group: GroupId, leader: Option<NodeId> },
    #[error("raft group {group}: {message}")]
    Write { group: GroupId, message: String },
    #[error(
        "the data directory {dir} holds data format {found}, written by another version of Ferry; this one \
         reads format {expected}. Start this node on an empty base-dir (a cluster node then catches up from \
         its peers), or run the version that wrote it"
    )]
    DataFormat { dir: String, found: u32, expected: u32 },
    #[error("this node was created with {stored} partitions, the configuration says {configured}")]
    PartitionCountChanged { stored: u32, configured: u32 },
    #[error(transparent)]
    Decode(#[from] ferry_store::codec::DecodeError),
    #[error(transparent)]
    Store(#[from] ferry_store::StoreError),
    #[error("raft group {group}: a command of {bytes} bytes is over the limit of {max} bytes")]
    TooLarge { group: GroupId, bytes: u64, max: usize },
    #[error("unknown group {0}")]
    UnknownGroup(GroupId),
}

impl Error {
    /// Whether retrying the same call later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::NotLeader { .. } | Error::Write { .. })
    }
}
