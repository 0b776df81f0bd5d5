//! Raft traffic between nodes over tonic. Every request names its group, and
//! one channel per peer address carries the RPCs of every group.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use ferry_proto::cluster::node_service_client::NodeServiceClient;
use ferry_proto::cluster::node_service_server::NodeService;
use ferry_proto::cluster::{RaftRequest, RaftResponse};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

use crate::wire::{self, v1::Command, v1::Response};
use crate::{GroupId, NodeId, Raft, TypeConfig};

/// The gRPC clients of a node, one per peer address, shared by every group.
/// A peer is reached at the address this node's configuration gives it, else
/// at the one its group membership records.
#[derive(Clone, Default)]
pub struct Channels {
    clients: Arc<Mutex<HashMap<String, NodeServiceClient<Channel>>>>,
    configured: Arc<BTreeMap<NodeId, String>>,
}

impl Channels {
    pub fn new(configured: BTreeMap<NodeId, String>) -> Channels {
        Channels { clients: Arc::default(), configured: Arc::new(configured) }
    }

    /// Where to reach `node`, whose membership records `recorded`.
    pub fn address<'a>(&'a self, node: NodeId, recorded: &'a str) -> &'a str {
        self.configured.get(&node).map_or(recorded, String::as_str)
    }

    pub fn client(&self, addr: &str) -> Result<NodeServiceClient<Channel>, String> {
        let mut clients = self.clients.lock().expect("channels lock poisoned");
        if let Some(client) = clients.get(addr) {
            return Ok(client.clone());
        }
        let channel = Channel::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("bad peer address {addr}: {e}"))?
            .tcp_nodelay(true)
            .http2_adaptive_window(true)
            .connect_lazy();
        let client = NodeServiceClient::new(channel).max_decoding_message_size(64 << 20);
        clients.insert(addr.to_owned(), client.clone());
        Ok(client)
    }
}

/// Creates the per-target network of one group.
#[derive(Clone)]
pub struct NetworkFactory {
    pub group: GroupId,
    pub channels: Channels,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Network;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Network {
        let addr = self.channels.address(target, &node.addr);
        Network { group: self.group, target, client: self.channels.client(addr) }
    }
}

pub struct Network {
    group: GroupId,
    target: NodeId,
    client: Result<NodeServiceClient<Channel>, String>,
}

type RpcResult<T, E = RaftError<NodeId>> = Result<T, RPCError<NodeId, BasicNode, E>>;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Message(String);

impl Network {
    async fn call<Req, Resp, E, Fut>(
        &mut self,
        rpc: &Req,
        option: &RPCOption,
        send: impl FnOnce(NodeServiceClient<Channel>, tonic::Request<RaftRequest>) -> Fut,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
        Fut: std::future::Future<Output = Result<tonic::Response<RaftResponse>, tonic::Status>>,
    {
        let client = match &self.client {
            Ok(client) => client.clone(),
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&Message(e.clone())))),
        };
        let mut request = tonic::Request::new(RaftRequest { group: self.group, payload: wire::encode(rpc) });
        request.set_timeout(option.hard_ttl());
        let response = send(client, request).await.map_err(|status| match status.code() {
            tonic::Code::Unavailable | tonic::Code::Cancelled => {
                RPCError::Unreachable(Unreachable::new(&Message(status.to_string())))
            }
            _ => RPCError::Network(NetworkError::new(&Message(status.to_string()))),
        })?;
        let result: Result<Resp, E> =
            wire::decode(&response.into_inner().payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Network {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        self.call(&rpc, &option, |mut c, r| async move { c.append_entries(r).await }).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        self.call(&rpc, &option, |mut c, r| async move { c.install_snapshot(r).await }).await
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> RpcResult<VoteResponse<NodeId>> {
        self.call(&rpc, &option, |mut c, r| async move { c.vote(r).await }).await
    }
}

/// Why a forwarded proposal was not applied.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
pub enum ProposeError {
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<(NodeId, String)> },
    #[error("{0}")]
    Failed(String),
}

/// Serves this node's groups to its peers.
pub struct NodeServer {
    groups: Arc<BTreeMap<GroupId, Raft>>,
}

impl NodeServer {
    pub fn new(groups: Arc<BTreeMap<GroupId, Raft>>) -> Self {
        NodeServer { groups }
    }

    fn raft(&self, group: GroupId) -> Result<&Raft, tonic::Status> {
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
pub async fn propose_local(raft: &Raft, command: Command) -> Result<Response, ProposeError> {
    use openraft::error::ClientWriteError;
    match raft.client_write(command).await {
        Ok(response) => Ok(response.data),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
            Err(ProposeError::NotLeader { leader: forward.leader_id.zip(forward.leader_node.map(|n| n.addr)) })
        }
        Err(e) => Err(ProposeError::Failed(e.to_string())),
    }
}

#[tonic::async_trait]
impl NodeService for NodeServer {
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
}
