//! Ferry's wire contracts: the admin API (`ferry.admin.v1.AdminService`) and the
//! node-to-node RPCs (`ferry.cluster.v1.NodeService`) that carry Raft messages for
//! every group over one channel per peer. [`service_protocol`] holds the
//! messages of the Restate service protocol that Ferry speaks to handler
//! deployments (framing lives in `ferry-invoker`'s `codec`).

pub mod admin {
    tonic::include_proto!("ferry.admin.v1");
}

pub mod cluster {
    tonic::include_proto!("ferry.cluster.v1");
}

/// The Restate service protocol (versions 5 to 7), see `proto/service_protocol.proto`.
pub mod service_protocol {
    tonic::include_proto!("ferry.service_protocol");
}

/// Encoded descriptors of every service, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ferry_descriptor");
