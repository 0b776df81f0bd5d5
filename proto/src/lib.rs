//! Ferry's wire contracts: the admin API (`ferry.admin.v1.AdminService`) and the
//! node-to-node RPCs (`ferry.cluster.v1.NodeService`) that carry Raft messages for
//! every group over one channel per peer.

pub mod admin {
    tonic::include_proto!("ferry.admin.v1");
}

pub mod cluster {
    tonic::include_proto!("ferry.cluster.v1");
}

/// Encoded descriptors of every service, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ferry_descriptor");
