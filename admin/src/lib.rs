//! The admin API. [`Admin`] holds the one implementation; [`grpc`] serves it as
//! `ferry.admin.v1.AdminService` and [`rest`] as JSON under Restate's paths, on
//! the same port ([`server`]). Metadata changes are proposed to the metadata
//! Raft group; reads come from its applied state.

pub mod grpc;
pub mod rest;
pub mod server;
mod service;

pub use service::{Action, Admin, Settings};

/// Errors of admin calls; each maps to one HTTP status and one gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<ferry_log::Error> for Error {
    fn from(e: ferry_log::Error) -> Self {
        if e.is_retryable() {
            Error::Unavailable(e.to_string())
        } else {
            Error::Internal(e.to_string())
        }
    }
}
