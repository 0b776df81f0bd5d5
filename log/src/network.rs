//! Raft traffic between nodes over tonic. Every request names its group, and
//! one channel per peer address carries the RPCs of every group. Heartbeats
//! (AppendEntries without entries or news of a commit) bound for one peer are
//! gathered for a short window and sent as one `Heartbeats` RPC, so that a
//! node's idle groups cost one RPC per window between them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_proto::cluster::node_service_client::NodeServiceClient;
use ferry_proto::cluster::node_service_server::NodeService;
use ferry_proto::cluster::raft_result::Result as RaftOutcome;
use ferry_proto::cluster::{RaftBatch, RaftBatchResponse, RaftRequest, RaftResponse, RaftResult};
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{BasicNode, LogId, Vote};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;

use crate::machine::{Raft, StateMachine, TypeConfig};
use crate::{GroupId, NodeId, MESSAGE_BYTES_MAX};
use ferry_store::codec as wire;

/// How long a proposal forwarded to the leader may take before it fails (and
/// is retried by whoever proposed it).
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// The gRPC clients of a node, one per peer address, shared by every group.
/// A peer is reached at the address this node's configuration gives it, else
/// at the one its group membership records.
#[derive(Clone)]
pub struct Channels {
    peers: Arc<Mutex<HashMap<String, Peer>>>,
    configured: Arc<BTreeMap<NodeId, String>>,
    /// How long a heartbeat waits for others bound for the same peer.
    heartbeat_window: Duration,
}

/// The client of one peer address, and the queue of its heartbeats.
#[derive(Clone)]
struct Peer {
    client: NodeServiceClient<Channel>,
    heartbeats: mpsc::UnboundedSender<Heartbeat>,
}

/// A heartbeat waiting to be sent, and where its answer goes.
struct Heartbeat {
    request: RaftRequest,
    timeout: Duration,
    reply: oneshot::Sender<Result<Vec<u8>, tonic::Status>>,
}

impl Channels {
    /// Peers reached at `configured` addresses; heartbeats gathered for
    /// `heartbeat_window`.
    pub fn new(configured: BTreeMap<NodeId, String>, heartbeat_window: Duration) -> Channels {
        Channels { peers: Arc::default(), configured: Arc::new(configured), heartbeat_window }
    }

    /// Where to reach `node`, whose membership records `recorded`.
    pub fn address<'a>(&'a self, node: NodeId, recorded: &'a str) -> &'a str {
        self.configured.get(&node).map_or(recorded, String::as_str)
    }

    pub fn client(&self, addr: &str) -> Result<NodeServiceClient<Channel>, String> {
        self.peer(addr).map(|peer| peer.client)
    }

    /// The peer at `addr`, connected lazily on first use. Must be called
    /// within a Tokio runtime: it starts the peer's heartbeat sender.
    fn peer(&self, addr: &str) -> Result<Peer, String> {
        let mut peers = self.peers.lock().expect("channels lock poisoned");
        if let Some(peer) = peers.get(addr) {
            return Ok(peer.clone());
        }
        // Keepalive pings find a peer that went away without closing the
        // connection (a crash, a cut link) in seconds, not at TCP's pace.
        let channel = Channel::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("bad peer address {addr}: {e}"))?
            .tcp_nodelay(true)
            .http2_adaptive_window(true)
            .connect_timeout(Duration::from_secs(2))
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .connect_lazy();
        let client = NodeServiceClient::new(channel)
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX);
        let (heartbeats, queue) = mpsc::unbounded_channel();
        tokio::spawn(send_heartbeats(client.clone(), queue, self.heartbeat_window));
        let peer = Peer { client, heartbeats };
        peers.insert(addr.to_owned(), peer.clone());
        Ok(peer)
    }
}

/// Sends the heartbeats queued for one peer: after the first arrives, waits
/// `window` for more, then sends them all in one RPC and goes on gathering
/// while it is in flight. Ends when every sender is gone.
async fn send_heartbeats(
    client: NodeServiceClient<Channel>,
    mut queue: mpsc::UnboundedReceiver<Heartbeat>,
    window: Duration,
) {
    let mut batch = Vec::new();
    while queue.recv_many(&mut batch, 1024).await > 0 {
        let deadline = tokio::time::Instant::now() + window;
        while let Ok(more) = tokio::time::timeout_at(deadline, queue.recv_many(&mut batch, 1024)).await {
            if more == 0 {
                break;
            }
        }
        let batch = std::mem::take(&mut batch);
        metrics::counter!("ferry_raft_heartbeats_total").increment(batch.len() as u64);
        metrics::counter!("ferry_raft_heartbeat_rpcs_total").increment(1);
        let mut client = client.clone();
        tokio::spawn(async move {
            let timeout = batch.iter().map(|h| h.timeout).max().unwrap_or(window);
            let (requests, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|h| (h.request, h.reply)).unzip();
            let mut request = tonic::Request::new(RaftBatch { requests });
            request.set_timeout(timeout);
            match client.heartbeats(request).await {
                Ok(response) => {
                    let mut results = response.into_inner().results.into_iter();
                    for reply in replies {
                        let result = match results.next().and_then(|r| r.result) {
                            Some(RaftOutcome::Payload(payload)) => Ok(payload),
                            Some(RaftOutcome::Error(e)) => Err(tonic::Status::unavailable(e)),
                            None => Err(tonic::Status::internal("heartbeat left unanswered")),
                        };
                        let _ = reply.send(result);
                    }
                }
                Err(status) => {
                    for reply in replies {
                        let _ = reply.send(Err(status.clone()));
                    }
                }
            }
        });
    }
}

/// When each peer of one group last accepted this node's leadership: per
/// peer, the vote of the newest AppendEntries it answered without a higher
/// vote, and when that request was sent. The time is taken at sending, on
/// this node's monotonic clock, so a node that was frozen (stopped, starved)
/// never takes an old answer for a recent one; a follower that answered
/// elects no one for an election timeout after it got the request.
#[derive(Clone, Default)]
pub struct Acks(Arc<Mutex<HashMap<NodeId, Ack>>>);

/// The vote a peer accepted, and when the request it answered was sent.
type Ack = (Vote<NodeId>, Instant);

impl Acks {
    fn record(&self, peer: NodeId, vote: Vote<NodeId>, sent: Instant) {
        let mut acks = self.0.lock().expect("acks lock poisoned");
        let newer = acks.get(&peer).is_none_or(|(v, at)| *v != vote || *at < sent);
        if newer {
            acks.insert(peer, (vote, sent));
        }
    }

    /// Whether every one of `configs` (one, or two while membership
    /// changes) has a majority that accepted `vote` in requests sent less
    /// than `within` ago, `me` counting for itself.
    pub fn quorum_within(
        &self,
        me: NodeId,
        configs: &[BTreeSet<NodeId>],
        vote: &Vote<NodeId>,
        within: Duration,
    ) -> bool {
        let acks = self.0.lock().expect("acks lock poisoned");
        let recent =
            |id: &NodeId| *id == me || acks.get(id).is_some_and(|(v, sent)| v == vote && sent.elapsed() < within);
        !configs.is_empty()
            && configs.iter().all(|voters| voters.iter().filter(|id| recent(id)).count() * 2 > voters.len())
    }
}

/// Creates the per-target network of one group.
pub struct NetworkFactory<M> {
    pub group: GroupId,
    pub channels: Channels,
    pub acks: Acks,
    pub machine: PhantomData<fn() -> M>,
}

impl<M> NetworkFactory<M> {
    pub fn new(group: GroupId, channels: Channels, acks: Acks) -> Self {
        NetworkFactory { group, channels, acks, machine: PhantomData }
    }
}

impl<M: StateMachine> RaftNetworkFactory<TypeConfig<M>> for NetworkFactory<M> {
    type Network = Network<M>;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Network<M> {
        let addr = self.channels.address(target, &node.addr);
        Network {
            group: self.group,
            target,
            peer: self.channels.peer(addr),
            commit_sent: None,
            acks: self.acks.clone(),
            machine: PhantomData,
        }
    }
}

pub struct Network<M> {
    group: GroupId,
    target: NodeId,
    peer: Result<Peer, String>,
    acks: Acks,
    /// The leader commit of the last AppendEntries sent to the target: one
    /// that brings a newer commit goes at once, not with the heartbeats.
    commit_sent: Option<Option<LogId<NodeId>>>,
    machine: PhantomData<fn() -> M>,
}

type RpcResult<T, E = RaftError<NodeId>> = Result<T, RPCError<NodeId, BasicNode, E>>;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Message(String);

impl<M: StateMachine> Network<M> {
    async fn call<Resp, E, Fut>(
        &mut self,
        payload: Vec<u8>,
        option: &RPCOption,
        send: impl FnOnce(NodeServiceClient<Channel>, tonic::Request<RaftRequest>) -> Fut,
    ) -> RpcResult<Resp, E>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
        Fut: std::future::Future<Output = Result<tonic::Response<RaftResponse>, tonic::Status>>,
    {
        let client = match &self.peer {
            Ok(peer) => peer.client.clone(),
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&Message(e.clone())))),
        };
        let mut request = tonic::Request::new(RaftRequest { group: self.group, payload });
        request.set_timeout(option.hard_ttl());
        let response = send(client, request).await.map_err(rpc_error)?;
        self.decode(&response.into_inner().payload)
    }

    /// Queues a heartbeat with the others bound for the same peer.
    async fn heartbeat(
        &mut self,
        rpc: &AppendEntriesRequest<TypeConfig<M>>,
        option: &RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let peer = match &self.peer {
            Ok(peer) => peer,
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&Message(e.clone())))),
        };
        let (reply, answer) = oneshot::channel();
        let request = RaftRequest { group: self.group, payload: wire::encode(rpc) };
        let timeout = option.hard_ttl();
        let stopped = || RPCError::Unreachable(Unreachable::new(&Message("heartbeat sender stopped".to_owned())));
        peer.heartbeats.send(Heartbeat { request, timeout, reply }).map_err(|_| stopped())?;
        let payload = match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => result.map_err(rpc_error)?,
            Ok(Err(_)) => return Err(stopped()),
            Err(_) => return Err(rpc_error(tonic::Status::deadline_exceeded("heartbeat timed out"))),
        };
        self.decode(&payload)
    }

    fn decode<Resp: DeserializeOwned, E: std::error::Error + DeserializeOwned>(
        &self,
        payload: &[u8],
    ) -> RpcResult<Resp, E> {
        let result: Result<Resp, E> = wire::decode(payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

fn rpc_error<E: std::error::Error>(status: tonic::Status) -> RPCError<NodeId, BasicNode, E> {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Cancelled => {
            RPCError::Unreachable(Unreachable::new(&Message(status.to_string())))
        }
        _ => RPCError::Network(NetworkError::new(&Message(status.to_string()))),
    }
}

impl<M: StateMachine> RaftNetwork<TypeConfig<M>> for Network<M> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig<M>>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let (sent, vote) = (Instant::now(), rpc.vote);
        let news = self.commit_sent != Some(rpc.leader_commit);
        self.commit_sent = Some(rpc.leader_commit);
        let response = if rpc.entries.is_empty() && !news {
            self.heartbeat(&rpc, &option).await
        } else {
            let payload = wire::encode(&rpc);
            if let Some(fit) = entries_that_fit(rpc.entries.len(), payload.len()) {
                // openraft sends again with at most `fit` entries.
                return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(fit)));
            }
            self.call(payload, &option, |mut c, r| async move { c.append_entries(r).await }).await
        };
        if let Ok(answer) = &response {
            if !matches!(answer, AppendEntriesResponse::HigherVote(_)) {
                self.acks.record(self.target, vote, sent);
            }
        }
        response
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig<M>>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        self.call(wire::encode(&rpc), &option, |mut c, r| async move { c.install_snapshot(r).await }).await
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> RpcResult<VoteResponse<NodeId>> {
        self.call(wire::encode(&rpc), &option, |mut c, r| async move { c.vote(r).await }).await
    }
}

/// Room left in a message for its framing and the request around the entries.
const MESSAGE_HEADROOM_BYTES: usize = 1 << 20;

/// For an AppendEntries of `entries` that encodes to `bytes`: `None` when it
/// fits in one message, else how many of its entries to send instead
/// (proportionally fewer, at least one; one entry always fits, since
/// commands are at most [`crate::COMMAND_BYTES_MAX`]).
pub fn entries_that_fit(entries: usize, bytes: usize) -> Option<u64> {
    let limit = MESSAGE_BYTES_MAX - MESSAGE_HEADROOM_BYTES;
    if bytes <= limit || entries <= 1 {
        return None;
    }
    Some(((entries as u128 * limit as u128 / bytes as u128) as u64).clamp(1, entries as u64 - 1))
}

/// Sends a proposal to the leader of `group` at `addr`; fails after `timeout`
/// however the leader behaves (it may accept the connection and never answer).
pub async fn forward<M: StateMachine>(
    channels: &Channels,
    group: GroupId,
    addr: &str,
    command: &M::Command,
    timeout: Duration,
) -> Result<(M::Response, u64), ProposeError> {
    let mut client = channels.client(addr).map_err(ProposeError::Failed)?;
    let mut request = tonic::Request::new(RaftRequest { group, payload: wire::encode(command) });
    request.set_timeout(timeout);
    let call = client.propose(request);
    let response = match tokio::time::timeout(timeout, call).await {
        Ok(response) => response.map_err(|s| ProposeError::Failed(s.to_string()))?,
        Err(_) => return Err(ProposeError::Failed(format!("the leader at {addr} did not answer in {timeout:?}"))),
    };
    wire::decode::<Result<(M::Response, u64), ProposeError>>(&response.into_inner().payload)
        .map_err(|e| ProposeError::Failed(e.to_string()))?
}

/// Why a forwarded proposal was not applied.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
pub enum ProposeError {
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<(NodeId, String)> },
    #[error("{0}")]
    Failed(String),
    /// The group stopped on a fatal error and takes no more writes.
    #[error("stopped: {0}")]
    Fatal(String),
}

/// Serves this node's groups to its peers.
pub struct NodeServer<M: StateMachine> {
    groups: Arc<BTreeMap<GroupId, Raft<M>>>,
}

impl<M: StateMachine> NodeServer<M> {
    pub fn new(groups: Arc<BTreeMap<GroupId, Raft<M>>>) -> Self {
        NodeServer { groups }
    }

    fn raft(&self, group: GroupId) -> Result<&Raft<M>, tonic::Status> {
        self.groups.get(&group).ok_or_else(|| tonic::Status::not_found(format!("no raft group {group} on this node")))
    }
}

fn decode_request<T: DeserializeOwned>(request: &RaftRequest) -> Result<T, tonic::Status> {
    wire::decode(&request.payload).map_err(|e| tonic::Status::invalid_argument(e.to_string()))
}

fn respond<T: Serialize>(value: &T) -> Result<tonic::Response<RaftResponse>, tonic::Status> {
    Ok(tonic::Response::new(RaftResponse { payload: wire::encode(value) }))
}

/// Proposes `command` to a local group, describing a missing leadership in a
/// form a remote caller can act on.
/// Appends `command` on this node, which must lead the group: its response
/// and the index of its entry.
pub async fn propose_local<M: StateMachine>(
    raft: &Raft<M>,
    command: M::Command,
) -> Result<(M::Response, u64), ProposeError> {
    use openraft::error::ClientWriteError;
    match raft.client_write(command).await {
        Ok(response) => Ok((response.data, response.log_id.index)),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
            Err(ProposeError::NotLeader { leader: forward.leader_id.zip(forward.leader_node.map(|n| n.addr)) })
        }
        Err(RaftError::Fatal(fatal)) => Err(ProposeError::Fatal(fatal.to_string())),
        Err(e) => Err(ProposeError::Failed(e.to_string())),
    }
}

#[tonic::async_trait]
impl<M: StateMachine> NodeService for NodeServer<M> {
    async fn append_entries(
        &self,
        request: tonic::Request<RaftRequest>,
    ) -> Result<tonic::Response<RaftResponse>, tonic::Status> {
        let request = request.into_inner();
        let raft = self.raft(request.group)?;
        respond(&raft.append_entries(decode_request(&request)?).await)
    }

    async fn vote(&self, request: tonic::Request<RaftRequest>) -> Result<tonic::Response<RaftResponse>, tonic::Status> {
        let request = request.into_inner();
        let raft = self.raft(request.group)?;
        respond(&raft.vote(decode_request(&request)?).await)
    }

    async fn install_snapshot(
        &self,
        request: tonic::Request<RaftRequest>,
    ) -> Result<tonic::Response<RaftResponse>, tonic::Status> {
        let request = request.into_inner();
        let raft = self.raft(request.group)?;
        respond(&raft.install_snapshot(decode_request(&request)?).await)
    }

    async fn propose(
        &self,
        request: tonic::Request<RaftRequest>,
    ) -> Result<tonic::Response<RaftResponse>, tonic::Status> {
        let request = request.into_inner();
        let raft = self.raft(request.group)?;
        respond(&propose_local(raft, decode_request(&request)?).await)
    }

    async fn heartbeats(
        &self,
        request: tonic::Request<RaftBatch>,
    ) -> Result<tonic::Response<RaftBatchResponse>, tonic::Status> {
        let answers = request.into_inner().requests.into_iter().map(|request| async move {
            let result = match self.raft(request.group).and_then(|raft| Ok((raft, decode_request(&request)?))) {
                Ok((raft, rpc)) => RaftOutcome::Payload(wire::encode(&raft.append_entries(rpc).await)),
                Err(status) => RaftOutcome::Error(status.message().to_owned()),
            };
            RaftResult { result: Some(result) }
        });
        Ok(tonic::Response::new(RaftBatchResponse { results: futures::future::join_all(answers).await }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_needs_a_majority_that_answered_this_vote_recently() {
        let vote = Vote::new_committed(3, 1);
        let voters = [BTreeSet::from([1, 2, 3])];
        let acks = Acks::default();
        assert!(!acks.quorum_within(1, &voters, &vote, Duration::from_secs(1)), "no answers yet");
        acks.record(2, Vote::new_committed(2, 2), Instant::now());
        assert!(!acks.quorum_within(1, &voters, &vote, Duration::from_secs(1)), "an answer to another leader");
        acks.record(2, vote, Instant::now() - Duration::from_secs(2));
        assert!(!acks.quorum_within(1, &voters, &vote, Duration::from_secs(1)), "an answer to an old request");
        acks.record(3, vote, Instant::now());
        assert!(acks.quorum_within(1, &voters, &vote, Duration::from_secs(1)));
        // While membership changes, both configurations need a majority.
        let joint = [BTreeSet::from([1, 2, 3]), BTreeSet::from([3, 4, 5])];
        assert!(!acks.quorum_within(1, &joint, &vote, Duration::from_secs(1)));
        assert!(acks.quorum_within(1, &[BTreeSet::from([1])], &vote, Duration::ZERO), "a single node");
    }
}
