//! Where a state machine's state lives: ordered tables of byte keys and
//! values, behind [`Store`] and [`StoreRead`], so that `apply` runs the same
//! against memory ([`MemStore`], for unit tests and simulations) and against
//! the node's embedded store. A state machine names its tables with a
//! [`TableSet`].
//!
//! Keys sort as bytes: a store's user encodes integers big-endian and
//! length-prefixes strings that more follows, so that a prefix scan
//! ([`scan_prefix`]) finds exactly one owner's rows.

pub mod codec;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::marker::PhantomData;
use std::ops::{Bound, ControlFlow};

use serde::{Deserialize, Serialize};

/// The tables of a state machine.
pub trait TableSet: Copy + Eq + Debug + Send + Sync + 'static {
    /// Every table, in the order of [`TableSet::index`].
    const ALL: &'static [Self];

    /// The position of this table in [`TableSet::ALL`].
    fn index(self) -> usize;

    /// The table's name on disk.
    fn name(self) -> &'static str;
}

/// A store that failed to read or write: the group cannot go on.
#[derive(Debug, Clone, thiserror::Error)]
#[error("state store: {0}")]
pub struct StoreError(pub String);

impl From<codec::DecodeError> for StoreError {
    fn from(e: codec::DecodeError) -> Self {
        StoreError(e.to_string())
    }
}

/// What a scan calls with each (key, value) row; it breaks to stop the scan.
pub type Visit<'a> = dyn FnMut(&[u8], &[u8]) -> ControlFlow<()> + 'a;

/// A (key, value) row.
pub type Row = (Vec<u8>, Vec<u8>);

/// Reads of a consistent view of the tables.
pub trait StoreRead<T: TableSet> {
    fn get(&self, table: T, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Calls `f` with the rows of `table` in key order between the bounds,
    /// until it breaks.
    fn scan(&self, table: T, from: Bound<&[u8]>, to: Bound<&[u8]>, f: &mut Visit<'_>) -> Result<(), StoreError>;
}

/// Writes, seen by the same store's reads at once.
pub trait Store<T: TableSet>: StoreRead<T> {
    fn put(&mut self, table: T, key: &[u8], value: &[u8]) -> Result<(), StoreError>;
    fn remove(&mut self, table: T, key: &[u8]) -> Result<(), StoreError>;
}

/// Calls `f` with the rows of `table` whose key starts with `prefix`.
pub fn scan_prefix<T: TableSet>(
    store: &(impl StoreRead<T> + ?Sized),
    table: T,
    prefix: &[u8],
    f: &mut Visit<'_>,
) -> Result<(), StoreError> {
    match prefix_end(prefix) {
        Some(end) => store.scan(table, Bound::Included(prefix), Bound::Excluded(&end), f),
        None => store.scan(table, Bound::Included(prefix), Bound::Unbounded, f),
    }
}

/// The first key after every key that starts with `prefix`, if there is one.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// The tables in memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(bound = "")]
pub struct MemStore<T> {
    tables: Vec<BTreeMap<Vec<u8>, Vec<u8>>>,
    #[serde(skip)]
    set: PhantomData<fn() -> T>,
}

impl<T: TableSet> Default for MemStore<T> {
    fn default() -> Self {
        MemStore { tables: vec![BTreeMap::new(); T::ALL.len()], set: PhantomData }
    }
}

impl<T: TableSet> MemStore<T> {
    /// How many rows `table` has.
    pub fn len(&self, table: T) -> usize {
        self.tables[table.index()].len()
    }

    pub fn is_empty(&self) -> bool {
        self.tables.iter().all(BTreeMap::is_empty)
    }
}

impl<T: TableSet> StoreRead<T> for MemStore<T> {
    fn get(&self, table: T, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tables[table.index()].get(key).cloned())
    }

    fn scan(&self, table: T, from: Bound<&[u8]>, to: Bound<&[u8]>, f: &mut Visit<'_>) -> Result<(), StoreError> {
        for (key, value) in self.tables[table.index()].range::<[u8], _>((from, to)) {
            if f(key, value).is_break() {
                break;
            }
        }
        Ok(())
    }
}

impl<T: TableSet> Store<T> for MemStore<T> {
    fn put(&mut self, table: T, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.tables[table.index()].insert(key.to_vec(), value.to_vec());
        Ok(())
    }

    fn remove(&mut self, table: T, key: &[u8]) -> Result<(), StoreError> {
        self.tables[table.index()].remove(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Two {
        A,
        B,
    }

    impl TableSet for Two {
        const ALL: &'static [Two] = &[Two::A, Two::B];

        fn index(self) -> usize {
            self as usize
        }

        fn name(self) -> &'static str {
            match self {
                Two::A => "a",
                Two::B => "b",
            }
        }
    }

    fn keys(store: &MemStore<Two>, table: Two, prefix: &[u8]) -> Vec<Vec<u8>> {
        let mut found = Vec::new();
        scan_prefix(store, table, prefix, &mut |k, _| {
            found.push(k.to_vec());
            ControlFlow::Continue(())
        })
        .unwrap();
        found
    }

    #[test]
    fn a_prefix_scan_finds_exactly_the_rows_under_it_in_one_table() {
        let mut store = MemStore::default();
        for key in [&b"ab"[..], b"a\xff", b"a\xff\x01", b"b", b"a"] {
            store.put(Two::A, key, b"").unwrap();
        }
        store.put(Two::B, b"ab", b"").unwrap();
        assert_eq!(keys(&store, Two::A, b"a\xff"), vec![b"a\xff".to_vec(), b"a\xff\x01".to_vec()]);
        assert_eq!(keys(&store, Two::A, b"a").len(), 4);
        assert_eq!(keys(&store, Two::B, b"a"), vec![b"ab".to_vec()]);
        store.remove(Two::A, b"ab").unwrap();
        assert_eq!((store.len(Two::A), store.len(Two::B)), (4, 1));
        assert_eq!(prefix_end(&[1, 255, 255]), Some(vec![2]));
        assert_eq!(prefix_end(&[255]), None);
    }
}
