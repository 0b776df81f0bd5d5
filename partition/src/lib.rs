//! A partition's state machine and the cluster metadata's: the commands a
//! Raft group replicates, their versioned encoding, and `apply`. Applying a
//! command is deterministic: no clocks, randomness or I/O happen inside
//! [`state`]; the proposer stamps times and ids into the command.

pub mod machine;
pub mod notifications;
pub mod partitioner;
pub mod state;
pub mod store;
pub mod watch;
pub mod wire;

pub use ferry_log::PartitionId;
pub use machine::{Log, LogReads, Machine};
pub use wire::v1::{Command, Response};
