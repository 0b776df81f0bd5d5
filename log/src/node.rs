//! A node's log: opens the sled `Db`, starts one Raft per group, bootstraps a
//! new cluster, and offers a cheap cloneable handle to propose commands and
//! read applied state. Every group runs a [`StateMachine`] `M`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::Fatal;
use openraft::{BasicNode, Config, RaftMetrics, ServerState, SnapshotPolicy};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::machine::{Raft, StateMachine};
use crate::network::{self, propose_local, Acks, Channels, NetworkFactory, NodeServer, ProposeError, FORWARD_TIMEOUT};
use crate::placement::{self, Nodes};
use crate::storage::{self, CommittedIndex, Flusher, StateMachineStore, StateOptions};
use crate::tables::ReadTables;
use crate::{partition_group, Error, GroupId, NodeId, METADATA_GROUP};
use ferry_store::codec as wire;
use ferry_store::StoreError;

/// How the log of a node is set up.
#[derive(Debug, Clone)]
pub struct Options {
    pub node_id: NodeId,
    /// The address peers reach this node's gRPC server at.
    pub advertised_address: String,
    /// Every node of the cluster with its address, this one included.
    pub nodes: Nodes,
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
    /// sled's page cache, for the log.
    pub cache_bytes: u64,
    /// The page cache of the state databases, shared out among the groups.
    pub state_cache_bytes: u64,
}

impl Options {
    pub fn single_node(data_dir: PathBuf, partitions: u32) -> Options {
        Options {
            node_id: 1,
            advertised_address: "127.0.0.1:5122".to_owned(),
            nodes: [(1, "127.0.0.1:5122".to_owned())].into(),
            data_dir,
            partitions,
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
            snapshot_entries_since_last: 2_000,
            entries_kept_after_snapshot: 1_000,
            flush_queue_max: 4096,
            cache_bytes: 32 << 20,
            state_cache_bytes: 96 << 20,
        }
    }
}

struct Group<M: StateMachine> {
    raft: Raft<M>,
    state: StateMachineStore<M>,
    committed: CommittedIndex,
    /// `ferry_log_propose_seconds` of this group.
    propose_seconds: metrics::Histogram,
    /// When its peers last accepted this node's leadership.
    acks: Acks,
    leadership: Leadership,
}

/// Where this node's leadership of a group began: (term, the end of its log
/// when this node first saw itself lead in that term). A leader restored at
/// start-up keeps its term and appends no entry of its own, so an applied
/// entry of its term does not show that its log is applied: entries
/// committed before the restart may still be on their way to the state.
#[derive(Default)]
struct Leadership(Mutex<Option<(u64, u64)>>);

impl Leadership {
    /// [`leads`], and everything in the log when the leadership began is
    /// applied.
    fn leads(&self, metrics: &RaftMetrics<NodeId, BasicNode>, me: NodeId) -> bool {
        if !leads(metrics, me) {
            return false;
        }
        let mut began = self.0.lock().expect("leadership lock poisoned");
        let floor = match *began {
            Some((term, floor)) if term == metrics.current_term => floor,
            _ => {
                let floor = metrics.last_log_index.unwrap_or(0);
                *began = Some((metrics.current_term, floor));
                floor
            }
        };
        metrics.last_applied.is_some_and(|applied| applied.index >= floor)
    }
}

/// What this node knows about one of its Raft groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStatus {
    pub group: GroupId,
    pub leader: Option<NodeId>,
    /// This node's role in the group.
    pub role: Role,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub committed_index: Option<u64>,
    pub last_applied_index: Option<u64>,
    /// The last entry of the group's latest snapshot on this node.
    pub snapshot_index: Option<u64>,
    /// The log is purged up to here on this node.
    pub purged_index: Option<u64>,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// The address of every member, voter or learner.
    pub nodes: BTreeMap<NodeId, String>,
}

/// A group's applied state on one node, as a digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateDigest {
    pub applied_index: Option<u64>,
    pub digest: u128,
}

/// A node's role in a Raft group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Follower,
    Candidate,
    Learner,
    Shutdown,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::Learner => "learner",
            Role::Shutdown => "shutdown",
        }
    }
}

impl From<ServerState> for Role {
    fn from(state: ServerState) -> Role {
        match state {
            ServerState::Leader => Role::Leader,
            ServerState::Follower => Role::Follower,
            ServerState::Candidate => Role::Candidate,
            ServerState::Learner => Role::Learner,
            ServerState::Shutdown => Role::Shutdown,
        }
    }
}

struct Inner<M: StateMachine> {
    options: Options,
    groups: BTreeMap<GroupId, Group<M>>,
    rafts: Arc<BTreeMap<GroupId, Raft<M>>>,
    channels: Channels,
    db: sled::Db,
    /// Set once a group stopped on a fatal error: what went wrong.
    failed: watch::Sender<Option<String>>,
}

/// A handle to the node's groups.
pub struct LogNode<M: StateMachine> {
    inner: Arc<Inner<M>>,
}

impl<M: StateMachine> Clone for LogNode<M> {
    fn clone(&self) -> Self {
        LogNode { inner: self.inner.clone() }
    }
}

const KEY_PARTITIONS: &[u8] = b"partitions";
const KEY_DATA_FORMAT: &[u8] = b"format";

impl<M: StateMachine> LogNode<M> {
    /// Opens the node's storage and starts every group, each applying what
    /// `machine` makes for it. A node whose storage is new bootstraps each
    /// group with itself as the only member.
    pub async fn open(
        options: Options,
        machine: impl Fn(GroupId) -> M,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Result<LogNode<M>, Error> {
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
                // Directories of the first format have no format key.
                let found = cluster.get(KEY_DATA_FORMAT)?.map(|f| wire::decode(&f)).transpose()?.unwrap_or(1);
                if found != M::DATA_FORMAT {
                    let dir = options.data_dir.display().to_string();
                    return Err(Error::DataFormat { dir, found, expected: M::DATA_FORMAT });
                }
                let stored: u32 = wire::decode(&bytes)?;
                if stored != options.partitions {
                    return Err(Error::PartitionCountChanged { stored, configured: options.partitions });
                }
            }
            None => {
                cluster.insert(KEY_DATA_FORMAT, wire::encode(&M::DATA_FORMAT))?;
                cluster.insert(KEY_PARTITIONS, wire::encode(&options.partitions))?;
                db.flush_async().await?;
            }
        }

        let flusher = Flusher::start(db.clone(), options.flush_queue_max, tracker, cancel.clone());
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

        // A quarter of the heartbeat interval: heartbeats arrive at most that
        // much later, far inside the election timeout.
        let window = Duration::from_millis(options.heartbeat_interval_ms / 4);
        let channels = Channels::new(options.nodes.clone(), window);
        let mut groups = BTreeMap::new();
        let group_ids = std::iter::once(METADATA_GROUP).chain((0..options.partitions).map(partition_group));
        let state_options = StateOptions {
            dir: options.data_dir.join("state"),
            cache_bytes: (options.state_cache_bytes / (u64::from(options.partitions) + 1)).max(1 << 20) as usize,
        };
        for group in group_ids {
            let (log, state) = storage::open(&db, group, machine(group), flusher.clone(), state_options.clone())?;
            let committed = log.committed_index();
            let acks = Acks::default();
            let network = NetworkFactory::new(group, channels.clone(), acks.clone());
            let raft = Raft::new(options.node_id, config.clone(), network, log, state.clone())
                .await
                .map_err(|e| Error::Write { group, message: e.to_string() })?;
            let propose_seconds = metrics::histogram!("ferry_log_propose_seconds", "group" => group.to_string());
            groups.insert(
                group,
                Group { raft, state, committed, propose_seconds, acks, leadership: Leadership::default() },
            );
        }

        for (&group, g) in &groups {
            let initialized =
                g.raft.is_initialized().await.map_err(|e| Error::Fatal { group, message: e.to_string() })?;
            if !initialized && placement::bootstrapper(group, &options.nodes) == Some(options.node_id) {
                let voters: BTreeMap<NodeId, BasicNode> = placement::voters(group, &options.nodes)
                    .into_iter()
                    .map(|id| (id, BasicNode::new(options.nodes[&id].clone())))
                    .collect();
                info!(group, voters = ?voters.keys().collect::<Vec<_>>(), "bootstrapping raft group");
                g.raft.initialize(voters).await.map_err(|e| Error::Write { group, message: e.to_string() })?;
            }
        }
        let rafts = Arc::new(groups.iter().map(|(&id, g)| (id, g.raft.clone())).collect());
        let failed = watch::channel(None).0;
        for (&group, g) in &groups {
            tracker.spawn(watch_fatal(group, g.raft.clone(), failed.clone(), cancel.clone()));
        }
        let node = LogNode { inner: Arc::new(Inner { options, groups, rafts, channels, db, failed }) };
        if node.inner.options.nodes.len() > 1 {
            tracker.spawn(node.clone().keep_placement(cancel.clone()));
        }
        Ok(node)
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.options.node_id
    }

    pub fn partitions(&self) -> u32 {
        self.inner.options.partitions
    }

    /// The gRPC service peers call.
    pub fn node_server(&self) -> NodeServer<M> {
        NodeServer::new(self.inner.rafts.clone())
    }

    fn group(&self, group: GroupId) -> Result<&Group<M>, Error> {
        self.inner.groups.get(&group).ok_or(Error::UnknownGroup(group))
    }

    /// Appends `command` to `group` and waits until it is committed and applied,
    /// forwarding it to the group's leader when that is another node. A
    /// [`Error::NotLeader`] means leadership moved meanwhile: retry.
    pub async fn propose(&self, group: GroupId, command: M::Command) -> Result<M::Response, Error> {
        self.propose_routed(group, command, true).await.map(|(response, _)| response)
    }

    /// [`LogNode::propose`], answered once this node has applied the entry
    /// too, so that what the caller reads here next includes what it wrote
    /// (read your writes), wherever the group's leader is.
    pub async fn propose_and_read(&self, group: GroupId, command: M::Command) -> Result<M::Response, Error> {
        let (response, index) = self.propose_routed(group, command, true).await?;
        self.wait_applied(group, index, Instant::now() + FORWARD_TIMEOUT).await?;
        Ok(response)
    }

    /// Appends `command` to `group` only if this node leads it, never
    /// forwarding: for what only the leader may write, such as the effects of
    /// the attempts it ran. Fails with [`Error::NotLeader`] otherwise.
    pub async fn propose_as_leader(&self, group: GroupId, command: M::Command) -> Result<M::Response, Error> {
        self.propose_routed(group, command, false).await.map(|(response, _)| response)
    }

    /// Proposes with `forward`, answering the response and the index of the entry.
    async fn propose_routed(
        &self,
        group: GroupId,
        command: M::Command,
        forward: bool,
    ) -> Result<(M::Response, u64), Error> {
        let started = Instant::now();
        let g = self.group(group)?;
        let bytes = wire::encoded_len(&command) as u64;
        if bytes > crate::COMMAND_BYTES_MAX as u64 {
            return Err(Error::TooLarge { group, bytes, max: crate::COMMAND_BYTES_MAX });
        }
        let raft = &g.raft;
        let remote_leader = if !forward {
            None
        } else {
            let metrics = raft.metrics();
            let metrics = metrics.borrow();
            match metrics.current_leader {
                Some(leader) if leader != self.node_id() => {
                    let recorded = metrics.membership_config.membership().get_node(&leader).map(|n| n.addr.clone());
                    recorded.map(|addr| self.inner.channels.address(leader, &addr).to_owned())
                }
                _ => None,
            }
        };
        let result = match remote_leader {
            Some(addr) => network::forward::<M>(&self.inner.channels, group, &addr, &command, FORWARD_TIMEOUT).await,
            None => propose_local(raft, command).await,
        };
        g.propose_seconds.record(started.elapsed().as_secs_f64());
        result.map_err(|e| match e {
            ProposeError::NotLeader { leader } => Error::NotLeader { group, leader: leader.map(|l| l.0) },
            ProposeError::Failed(message) => Error::Write { group, message },
            ProposeError::Fatal(message) => Error::Fatal { group, message },
        })
    }

    /// [`LogNode::propose`], retried through leader changes and unreachable
    /// leaders for up to `timeout`, and answered once this node has applied
    /// the entry too, so that reads here see what it wrote. Only for commands
    /// that are safe to apply twice, such as invokes, which the state machine
    /// deduplicates by id.
    pub async fn propose_until(
        &self,
        group: GroupId,
        command: M::Command,
        timeout: Duration,
    ) -> Result<M::Response, Error> {
        let deadline = Instant::now() + timeout;
        let mut delay = Duration::from_millis(50);
        loop {
            match self.propose_routed(group, command.clone(), true).await {
                Err(e) if e.is_retryable() && Instant::now() + delay < deadline => {
                    tracing::debug!(group, "append failed, retrying in {delay:?}: {e}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Ok((response, index)) => {
                    self.wait_applied(group, index, deadline).await?;
                    return Ok(response);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until this node has applied `group` up to `index`, so that what
    /// a proposal forwarded to another node wrote is visible in reads here.
    async fn wait_applied(&self, group: GroupId, index: u64, deadline: Instant) -> Result<(), Error> {
        let g = self.group(group)?;
        let mut changes = g.state.subscribe();
        loop {
            changes.borrow_and_update();
            if g.state.last_applied().is_some_and(|id| id.index >= index) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    let message = format!("entry {index} is committed, but this node has not applied it yet");
                    return Err(Error::Write { group, message });
                }
            }
        }
    }

    /// Reads a consistent view of what `group` has applied, with its machine.
    pub fn read<R>(
        &self,
        group: GroupId,
        f: impl FnOnce(&M, &ReadTables<M::Tables>) -> Result<R, StoreError>,
    ) -> Result<R, Error> {
        Ok(self.group(group)?.state.read(f)?)
    }

    /// Reads the resident part of what `group` has applied.
    pub fn read_resident<R>(&self, group: GroupId, f: impl FnOnce(&M::Resident) -> R) -> Result<R, Error> {
        Ok(self.group(group)?.state.read_resident(f))
    }

    /// The machine that applies `group`'s commands on this node.
    pub fn machine(&self, group: GroupId) -> Result<Arc<M>, Error> {
        Ok(self.group(group)?.state.machine())
    }

    /// A receiver that sees a new value whenever entries of `group` have been applied.
    pub fn changes(&self, group: GroupId) -> Result<watch::Receiver<u64>, Error> {
        Ok(self.group(group)?.state.subscribe())
    }

    /// Whether this node leads `group` now and its applied state is complete:
    /// what an effect may be based on. See [`leads`].
    pub fn is_leader(&self, group: GroupId) -> bool {
        self.group(group).is_ok_and(|g| g.leadership.leads(&g.raft.metrics().borrow(), self.node_id()))
    }

    /// Whether this node may start new work on `group`'s behalf (attempts
    /// whose side effects cannot be taken back): it leads ([`is_leader`]) and
    /// heard from a quorum recently enough that no other node can have been
    /// elected meanwhile: a majority answered requests it sent less than the
    /// election timeout, less a heartbeat of slack, ago ([`Acks`], timed on
    /// this node's clock when sent, so a node that was frozen holds no lease
    /// when it wakes, whatever its last metrics say). A leader cut off from
    /// its peers goes on believing it leads until it hears of a newer term;
    /// this keeps it from running steps that a newer leader may already have
    /// committed.
    ///
    /// [`is_leader`]: LogNode::is_leader
    pub fn holds_lease(&self, group: GroupId) -> bool {
        let options = &self.inner.options;
        let lease_ms = options.election_timeout_min_ms.saturating_sub(options.heartbeat_interval_ms);
        self.group(group).is_ok_and(|g| {
            let metrics = g.raft.metrics();
            let metrics = metrics.borrow();
            let configs = metrics.membership_config.membership().get_joint_config().clone();
            g.leadership.leads(&metrics, self.node_id())
                && g.acks.quorum_within(self.node_id(), &configs, &metrics.vote, Duration::from_millis(lease_ms))
        })
    }

    /// How long after a [`holds_lease`] that said yes no other node can have
    /// been elected yet: the slack between the lease and the election
    /// timeout. Whatever this node does on the strength of that answer must
    /// reach the world within it.
    ///
    /// [`holds_lease`]: LogNode::holds_lease
    pub fn lease_margin(&self) -> Duration {
        Duration::from_millis(self.inner.options.heartbeat_interval_ms)
    }

    /// Resolves once a group has stopped on a fatal error (a storage
    /// failure, a panic in its core), with what went wrong. Such a group can
    /// neither lead nor follow until the node restarts, so the node should stop.
    pub async fn failed(&self) -> String {
        let mut failed = self.inner.failed.subscribe();
        let reason = failed.wait_for(Option::is_some).await.map(|reason| reason.clone());
        match reason {
            Ok(reason) => reason.unwrap_or_default(),
            // The sender lives as long as `self`.
            Err(_) => std::future::pending().await,
        }
    }

    /// Waits until every group has a leader, on any node, or `timeout` passes.
    pub async fn wait_for_leaders(&self, timeout: Duration) -> Result<(), Error> {
        for (&group, g) in &self.inner.groups {
            g.raft
                .wait(Some(timeout))
                .metrics(|m| m.current_leader.is_some(), "leader")
                .await
                .map_err(|e| Error::Write { group, message: e.to_string() })?;
        }
        Ok(())
    }

    /// Keeps each group's membership and leadership where placement wants
    /// them: a leader adds the cluster's other nodes as learners, and a
    /// preferred leader that follows takes leadership back while its group is
    /// idle: its log has not grown for two seconds (so it is as long as the
    /// leader's and the election is won without a gap) and no invocation is
    /// ready to run (so no attempt is cut short).
    async fn keep_placement(self, cancel: CancellationToken) {
        let nodes = &self.inner.options.nodes;
        let me = self.node_id();
        let mut idle_since: BTreeMap<GroupId, (Option<u64>, Instant)> = BTreeMap::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            for (&group, g) in &self.inner.groups {
                let metrics = g.raft.metrics().borrow().clone();
                let membership = metrics.membership_config.membership();
                if metrics.current_leader == Some(me) {
                    for (&id, addr) in nodes {
                        if membership.get_node(&id).is_none() {
                            info!(group, node = id, "adding node as learner");
                            if let Err(e) = g.raft.add_learner(id, BasicNode::new(addr.clone()), false).await {
                                warn!(group, node = id, "adding learner: {e}");
                            }
                        }
                    }
                    continue;
                }
                let preferred = placement::voters(group, nodes).first() == Some(&me);
                let last = metrics.last_log_index;
                let since = match idle_since.get(&group) {
                    Some(&(index, since)) if index == last => since,
                    _ => {
                        idle_since.insert(group, (last, Instant::now()));
                        continue;
                    }
                };
                let caught_up = metrics.last_applied.map(|l| l.index) == last;
                // Work may run for minutes without writing to the log (a
                // handler's attempt): moving leadership meanwhile would cut
                // it short.
                let no_attempts = || g.state.read(|machine, view| machine.busy(view)).is_ok_and(|busy| !busy);
                if preferred
                    && metrics.current_leader.is_some()
                    && membership.voter_ids().any(|v| v == me)
                    && caught_up
                    && since.elapsed() >= Duration::from_secs(2)
                    && no_attempts()
                {
                    info!(group, "taking back leadership of a preferred group");
                    idle_since.remove(&group);
                    if let Err(e) = g.raft.trigger().elect().await {
                        warn!(group, "election: {e}");
                    }
                }
            }
        }
    }

    /// The status of every group on this node, metadata group first.
    pub fn group_statuses(&self) -> Vec<GroupStatus> {
        self.inner
            .groups
            .iter()
            .map(|(&group, g)| {
                let metrics = g.raft.metrics();
                let m = metrics.borrow();
                let membership = m.membership_config.membership();
                GroupStatus {
                    group,
                    leader: m.current_leader,
                    role: m.state.into(),
                    term: m.current_term,
                    last_log_index: m.last_log_index,
                    committed_index: g.committed.get(),
                    last_applied_index: m.last_applied.map(|id| id.index),
                    snapshot_index: m.snapshot.map(|id| id.index),
                    purged_index: m.purged.map(|id| id.index),
                    voters: membership.voter_ids().collect(),
                    learners: membership.learner_ids().collect(),
                    nodes: membership.nodes().map(|(&id, node)| (id, node.addr.clone())).collect(),
                }
            })
            .collect()
    }

    /// Per group, the index this node has applied and the digest of the state
    /// at that index ([`StateMachine::digest`]), read together. Replicas agree
    /// when they show the same digest at the same index. Hashes every group's
    /// whole state: meant for checks, not for every scrape.
    pub fn state_digests(&self) -> BTreeMap<GroupId, StateDigest> {
        self.inner
            .groups
            .iter()
            .filter_map(|(&group, g)| match g.state.digest() {
                Ok((applied_index, digest)) => Some((group, StateDigest { applied_index, digest })),
                Err(e) => {
                    warn!(group, "cannot read the state to digest it: {e}");
                    None
                }
            })
            .collect()
    }

    /// Sets the gauges that describe the groups: per group `ferry_raft_term`,
    /// `ferry_raft_leader` (1 when this node leads) and
    /// `ferry_raft_last_applied`. Meant to run when metrics are scraped.
    pub fn publish_metrics(&self) {
        for status in self.group_statuses() {
            let group = status.group.to_string();
            let leads = status.role == Role::Leader;
            metrics::gauge!("ferry_raft_term", "group" => group.clone()).set(status.term as f64);
            metrics::gauge!("ferry_raft_leader", "group" => group.clone()).set(if leads { 1.0 } else { 0.0 });
            if let Some(index) = status.last_applied_index {
                metrics::gauge!("ferry_raft_last_applied", "group" => group).set(index as f64);
            }
        }
    }

    /// Stops every group and flushes storage.
    pub async fn shutdown(&self) {
        for (&group, g) in &self.inner.groups {
            if let Err(e) = g.raft.shutdown().await {
                warn!(group, "raft group did not stop cleanly: {e}");
            }
            // What was applied need not be replayed at the next start.
            if let Err(e) = g.state.sync().await {
                warn!(group, "the state was not made durable: {e}");
            }
        }
        if let Err(e) = self.inner.db.flush_async().await {
            warn!("final flush failed: {e}");
        }
    }
}

/// Whether `metrics` show that `me` leads the group *and* has applied an
/// entry of its own term. openraft names a leader as soon as its vote is
/// committed, before the blank entry that opens its term is applied; until
/// then the applied state may lack effects that the previous leader
/// committed, and acting on it would run a journaled step again. A group
/// that stopped on a fatal error leads nothing, whatever its last metrics say.
pub fn leads(metrics: &RaftMetrics<NodeId, BasicNode>, me: NodeId) -> bool {
    metrics.running_state.is_ok()
        && metrics.state == ServerState::Leader
        && metrics.current_leader == Some(me)
        && metrics.last_applied.is_some_and(|applied| applied.leader_id.term == metrics.current_term)
}

/// Reports into `failed` when `group` stops on a fatal error (not when it is
/// shut down).
async fn watch_fatal<M: StateMachine>(
    group: GroupId,
    raft: Raft<M>,
    failed: watch::Sender<Option<String>>,
    cancel: CancellationToken,
) {
    let mut metrics = raft.metrics();
    loop {
        let fatal = match &metrics.borrow_and_update().running_state {
            Ok(()) | Err(Fatal::Stopped) => None,
            Err(fatal) => Some(fatal.to_string()),
        };
        if let Some(fatal) = fatal {
            error!(group, "raft group stopped: {fatal}");
            failed.send_if_modified(|reason| {
                let first = reason.is_none();
                if first {
                    *reason = Some(format!("raft group {group} stopped: {fatal}"));
                }
                first
            });
            return;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = metrics.changed() => if changed.is_err() {
                // The core is gone; its last metrics say why.
                if metrics.borrow().running_state.as_ref().is_err_and(|f| !matches!(f, Fatal::Stopped)) {
                    continue;
                }
                return;
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, LogId, Vote};

    fn leader(term: u64, applied_term: u64) -> RaftMetrics<NodeId, BasicNode> {
        let mut metrics = RaftMetrics::new_initial(1);
        metrics.state = ServerState::Leader;
        metrics.current_leader = Some(1);
        metrics.current_term = term;
        metrics.vote = Vote::new_committed(term, 1);
        metrics.last_applied = Some(LogId::new(CommittedLeaderId::new(applied_term, 1), 7));
        metrics.millis_since_quorum_ack = Some(10);
        metrics
    }

    #[test]
    fn case1_a_leader_leads_once_its_terms_first_entry_is_applied() {
        assert!(leads(&leader(3, 3), 1));
        assert!(!leads(&leader(3, 2), 1), "elected, but the entries of earlier terms are not all applied");
        assert!(!leads(&leader(3, 3), 2), "another node's leadership");
    }

    #[test]
    fn a_leader_restored_in_its_term_leads_once_its_log_is_applied() {
        let leadership = Leadership::default();
        // Restarted: leader of term 3 again, entries 8 and 9 not applied yet.
        let mut metrics = leader(3, 3);
        metrics.last_log_index = Some(9);
        assert!(!leadership.leads(&metrics, 1), "leads before its log is applied");
        metrics.last_applied = Some(LogId::new(CommittedLeaderId::new(3, 1), 9));
        assert!(leadership.leads(&metrics, 1));
        // New entries arrive faster than they apply: it still leads.
        metrics.last_log_index = Some(20);
        metrics.last_applied = Some(LogId::new(CommittedLeaderId::new(3, 1), 12));
        assert!(leadership.leads(&metrics, 1));
        // A new term starts over from the end of the log then.
        let mut next = leader(4, 4);
        next.last_log_index = Some(25);
        next.last_applied = Some(LogId::new(CommittedLeaderId::new(4, 1), 21));
        assert!(!leadership.leads(&next, 1));
    }

    #[test]
    fn case2_a_stopped_group_leads_nothing() {
        let mut metrics = leader(3, 3);
        metrics.running_state = Err(Fatal::Panicked);
        assert!(!leads(&metrics, 1));
    }
}
