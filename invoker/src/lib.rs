//! Talks to deployments: services written with a Restate SDK behind an HTTP
//! endpoint. [`discovery`] asks a deployment what it serves; [`codec`] frames
//! the messages of the service protocol spoken during an invocation, and
//! [`client`] runs one attempt of an invocation over HTTP/2 or HTTP/1.1.

pub mod client;
pub mod codec;
pub mod discovery;

pub use discovery::{Discovered, Discovery};

/// Errors of talking to a deployment.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach deployment {uri}: {reason}")]
    Unreachable { uri: String, reason: String },
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
