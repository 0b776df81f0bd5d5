//! The versioned encoding of what the log and the state machines write to
//! disk or send between nodes: log entries, state rows, Raft RPCs. Every
//! encoded value starts with one version byte; a node decodes every version
//! it has ever written.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The version this build writes.
pub const VERSION: u8 = 1;

/// Encodes `value` in the current format.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let size = bincode::serialized_size(value).unwrap_or(0) as usize;
    let mut buf = Vec::with_capacity(size + 1);
    buf.push(VERSION);
    bincode::serialize_into(&mut buf, value).expect("in-memory encoding cannot fail");
    buf
}

/// How many bytes [`encode`] makes of `value`, without encoding it.
pub fn encoded_len<T: Serialize>(value: &T) -> usize {
    1 + bincode::serialized_size(value).map_or(usize::MAX - 1, |n| n as usize)
}

/// A value that does not decode: corrupt, or written by a newer version.
#[derive(Debug, thiserror::Error)]
#[error("decode: {0}")]
pub struct DecodeError(pub String);

/// Decodes a value written by this or an earlier version.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    match bytes.split_first() {
        Some((&1, body)) => bincode::deserialize(body).map_err(|e| DecodeError(e.to_string())),
        Some((version, _)) => Err(DecodeError(format!("unknown format version {version}"))),
        None => Err(DecodeError("empty value".to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_version_check() {
        let bytes = encode(&("a".to_owned(), 7u64));
        assert_eq!(bytes[0], VERSION);
        let back: (String, u64) = decode(&bytes).unwrap();
        assert_eq!(back, ("a".to_owned(), 7));

        let mut future = bytes.clone();
        future[0] = 99;
        assert!(decode::<(String, u64)>(&future).is_err());
        assert!(decode::<(String, u64)>(&[]).is_err());
    }
}
