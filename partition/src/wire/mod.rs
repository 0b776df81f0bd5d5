//! The encoding of the partition's commands and state rows: `ferry_store`'s
//! versioned codec, and the types of each version.

pub mod v1;

pub use ferry_store::codec::{decode, encode, encoded_len, DecodeError, VERSION};
