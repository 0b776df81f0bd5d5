//! Runs invocations against deployments: services written with a Restate SDK
//! behind an HTTP endpoint. [`discovery`] asks a deployment what it serves;
//! [`codec`] frames the messages of the service protocol; [`client`] runs one
//! attempt of an invocation over HTTP/2 or HTTP/1.1; [`journal`] turns an
//! invocation into an attempt's request and its answer into an effect on the
//! log; [`scheduler`] runs the invocations of the partitions this node leads,
//! retrying failed attempts as [`retry`] says.

pub mod client;
pub mod codec;
pub mod discovery;
pub mod journal;
pub mod retry;
pub mod scheduler;

pub use discovery::{Discovered, Discovery};
pub use retry::RetryPolicy;
pub use scheduler::{Invoker, Options};

/// Errors of talking to a deployment.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach deployment {uri}: {reason}")]
    Unreachable { uri: String, reason: String },
    #[error("the attempt, or what followed it, was not sent to deployment {uri}: this node may no longer run it")]
    NotSent { uri: String },
    #[error("this node stalled during the attempt to deployment {uri}, so its connection was closed")]
    Stalled { uri: String },
    #[error("deployment {uri} answered with status {status}: {body}")]
    BadStatus { uri: String, status: u16, body: String },
    #[error("deployment {uri} sent an invalid endpoint manifest: {reason}")]
    InvalidManifest { uri: String, reason: String },
    #[error("invalid deployment uri {uri}: {reason}")]
    InvalidUri { uri: String, reason: String },
    #[error("deployment {uri} broke the service protocol: {source}")]
    Protocol {
        uri: String,
        #[source]
        source: codec::CodecError,
    },
}
