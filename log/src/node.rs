//! A node's log: opens the sled `Db`, starts one Raft per group, bootstraps a
//! new cluster, and offers a cheap cloneable handle to propose commands and
//! read applied state.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::{BasicNode, Config, SnapshotPolicy};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::network::{propose_local, Channels, NetworkFactory, NodeServer, ProposeError};
use crate::state::{MetadataState, PartitionState};
use crate::storage::{self, Flusher, StateMachineStore};
use crate::wire::{self, v1::Command, v1::Response};
use crate::{partition_group, Error, GroupId, NodeId, PartitionId, Raft, METADATA_GROUP};

/// How the log of a node is set up.
#[derive(Debug, Clone)]
pub struct Options {
    pub node_id: NodeId,
    /// The address peers reach this node's gRPC server at.
    pub advertised_address: String,
    pub data_dir: PathBuf,
    /// The number of partitions, fixed when the cluster is created.
    pub partitions: u32,
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many applied entries.
    pub snapshot_entries_since_last: u64,
    /// Entries kept after a snapshot, for followers that lag a little.
    pub entries_kept_after_snapshot: u64,
    /// Most append and vote requests waiting on one flush.
    pub flush_queue_max: usize,
    pub cache_bytes: u64,
}

impl Options {
    pub fn single_node(data_dir: PathBuf, partitions: u32) -> Options {
        Options {
            node_id: 1,
            advertised_address: "127.0.0.1:5122".to_owned(),
            data_dir,
            partitions,
            heartbeat_interval_ms: 250,
            election_timeout_min_ms: 1000,
            election_timeout_max_ms: 2000,
            snapshot_entries_since_last: 20_000,
            entries_kept_after_snapshot: 1_000,
            flush_queue_max: 4096,
            cache_bytes: 256 << 20,
        }
    }
}

struct Group {
    raft: Raft,
    state: StateMachineStore,
}

struct Inner {
    options: Options,
    groups: BTreeMap<GroupId, Group>,
    rafts: Arc<BTreeMap<GroupId, Raft>>,
    channels: Channels,
    db: sled::Db,
}

/// A handle to the node's groups.
#[derive(Clone)]
pub struct LogNode {
    inner: Arc<Inner>,
}

const KEY_PARTITIONS: &[u8] = b"partitions";

impl LogNode {
    /// Opens the node's storage and starts every group. A node whose storage is
    /// new bootstraps each group with itself as the only member.
    pub async fn open(options: Options, tracker: &TaskTracker, cancel: CancellationToken) -> Result<LogNode, Error> {
        std::fs::create_dir_all(&options.data_dir).map_err(|e| {
            Error::Storage(sled::Error::Io(std::io::Error::new(
                e.kind(),
                format!("{}: {e}", options.data_dir.display()),
            )))
        })?;
        let db = sled::Config::new()
            .path(options.data_dir.join("log"))
            .cache_capacity(options.cache_bytes)
            .flush_every_ms(None)
            .open()?;
        let cluster = db.open_tree("cluster")?;
        match cluster.get(KEY_PARTITIONS)? {
            Some(bytes) => {
                let stored: u32 = wire::decode(&bytes)?;
                if stored != options.partitions {
                    return Err(Error::PartitionCountChanged { stored, configured: options.partitions });
                }
            }
            None => {
                cluster.insert(KEY_PARTITIONS, wire::encode(&options.partitions))?;
                db.flush_async().await?;
            }
        }

        let flusher = Flusher::start(db.clone(), options.flush_queue_max, tracker, cancel);
        let config = Arc::new(
            Config {
                cluster_name: "ferry".to_owned(),
                heartbeat_interval: options.heartbeat_interval_ms,
                election_timeout_min: options.election_timeout_min_ms,
                election_timeout_max: options.election_timeout_max_ms,
                snapshot_policy: SnapshotPolicy::LogsSinceLast(options.snapshot_entries_since_last),
                max_in_snapshot_log_to_keep: options.entries_kept_after_snapshot,
                max_payload_entries: 256,
                ..Default::default()
            }
            .validate()
            .map_err(|e| Error::Write { group: METADATA_GROUP, message: e.to_string() })?,
        );

        let channels = Channels::default();
        let mut groups = BTreeMap::new();
        let group_ids = std::iter::once(METADATA_GROUP).chain((0..options.partitions).map(partition_group));
        for group in group_ids {
            let (log, state) = storage::open(&db, group, flusher.clone())?;
            let network = NetworkFactory { group, channels: channels.clone() };
            let raft = Raft::new(options.node_id, config.clone(), network, log, state.clone())
                .await
                .map_err(|e| Error::Write { group, message: e.to_string() })?;
            groups.insert(group, Group { raft, state });
        }

        let members: BTreeMap<NodeId, BasicNode> =
            [(options.node_id, BasicNode::new(options.advertised_address.clone()))].into();
        for (&group, g) in &groups {
            if !g.raft.is_initialized().await.map_err(|_| Error::Fatal { group })? {
                info!(group, "bootstrapping raft group");
                g.raft.initialize(members.clone()).await.map_err(|e| Error::Write { group, message: e.to_string() })?;
            }
        }
        let rafts = Arc::new(groups.iter().map(|(&id, g)| (id, g.raft.clone())).collect());
        Ok(LogNode { inner: Arc::new(Inner { options, groups, rafts, channels, db }) })
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.options.node_id
    }

    pub fn partitions(&self) -> u32 {
        self.inner.options.partitions
    }

    /// The gRPC service peers call.
    pub fn node_server(&self) -> NodeServer {
        NodeServer::new(self.inner.rafts.clone())
    }

    fn group(&self, group: GroupId) -> Result<&Group, Error> {
        self.inner.groups.get(&group).ok_or(Error::UnknownGroup(group))
    }

    /// Appends `command` to `group` and waits until it is committed and applied,
    /// forwarding it to the group's leader when that is another node. A
    /// [`Error::NotLeader`] means leadership moved meanwhile: retry.
    pub async fn propose(&self, group: GroupId, command: Command) -> Result<Response, Error> {
        let started = Instant::now();
        let raft = &self.group(group)?.raft;
        let remote_leader = {
            let metrics = raft.metrics();
            let metrics = metrics.borrow();
            match metrics.current_leader {
                Some(leader) if leader != self.node_id() => {
                    metrics.membership_config.membership().get_node(&leader).map(|n| n.addr.clone())
                }
                _ => None,
            }
        };
        let result = match remote_leader {
            Some(addr) => self.forward(group, &addr, &command).await,
            None => propose_local(raft, command).await,
        };
        metrics::histogram!("ferry_log_propose_seconds").record(started.elapsed().as_secs_f64());
        result.map_err(|e| match e {
            ProposeError::NotLeader { leader } => Error::NotLeader { group, leader: leader.map(|l| l.0) },
            ProposeError::Failed(message) => Error::Write { group, message },
        })
    }

    async fn forward(&self, group: GroupId, addr: &str, command: &Command) -> Result<Response, ProposeError> {
        let mut client = self.inner.channels.client(addr).map_err(ProposeError::Failed)?;
        let request = ferry_proto::cluster::RaftRequest { group, payload: wire::encode(command) };
        let response = client.propose(request).await.map_err(|s| ProposeError::Failed(s.to_string()))?;
        wire::decode::<Result<Response, ProposeError>>(&response.into_inner().payload)
            .map_err(|e| ProposeError::Failed(e.to_string()))?
    }

    /// Reads the applied state of a partition.
    pub fn read_partition<R>(&self, partition: PartitionId, f: impl FnOnce(&PartitionState) -> R) -> Result<R, Error> {
        Ok(self.group(partition_group(partition))?.state.read(|a| f(&a.state.partition)))
    }

    /// Reads the applied cluster metadata.
    pub fn read_metadata<R>(&self, f: impl FnOnce(&MetadataState) -> R) -> R {
        self.inner.groups[&METADATA_GROUP].state.read(|a| f(&a.state.metadata))
    }

    /// A receiver that sees a new value whenever metadata changes may have been applied.
    pub fn metadata_changes(&self) -> watch::Receiver<u64> {
        self.inner.groups[&METADATA_GROUP].state.subscribe()
    }

    /// A receiver that sees a new value whenever entries of a partition have been applied.
    pub fn partition_changes(&self, partition: PartitionId) -> Result<watch::Receiver<u64>, Error> {
        Ok(self.group(partition_group(partition))?.state.subscribe())
    }

    /// Whether this node leads `group` now.
    pub fn is_leader(&self, group: GroupId) -> bool {
        self.group(group).is_ok_and(|g| g.raft.metrics().borrow().current_leader == Some(self.node_id()))
    }

    /// Waits until this node leads every group or `timeout` passes.
    pub async fn wait_for_leadership(&self, timeout: Duration) -> Result<(), Error> {
        for (&group, g) in &self.inner.groups {
            let node_id = self.node_id();
            g.raft
                .wait(Some(timeout))
                .metrics(|m| m.current_leader == Some(node_id), "leader")
                .await
                .map_err(|e| Error::Write { group, message: e.to_string() })?;
        }
        Ok(())
    }

    /// Stops every group and flushes storage.
    pub async fn shutdown(&self) {
        for (&group, g) in &self.inner.groups {
            if let Err(e) = g.raft.shutdown().await {
                warn!(group, "raft group did not stop cleanly: {e}");
            }
        }
        if let Err(e) = self.inner.db.flush_async().await {
            warn!("final flush failed: {e}");
        }
    }
}
