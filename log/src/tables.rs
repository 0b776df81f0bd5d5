//! A group's state on disk: one redb database per group, holding the tables
//! its state machine names ([`TableSet`]) and the group's own table (what it
//! has applied, its membership, the machine's resident part). A write
//! transaction is one applied batch; a read transaction is a consistent view
//! that readers and snapshots take without stopping apply.
//!
//! A snapshot on the wire is a dump of such a view: a header, then every row
//! as (table, key, value), then an end mark.

use std::cell::OnceCell;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::marker::PhantomData;
use std::ops::{Bound, ControlFlow};
use std::path::Path;
use std::sync::Arc;

use ferry_store::{Store, StoreError, StoreRead, TableSet, Visit};
use redb::{
    Database, ReadOnlyTable, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};

type Rows = TableDefinition<'static, &'static [u8], &'static [u8]>;

/// The definition of a machine's table.
fn definition<T: TableSet>(table: T) -> Rows {
    TableDefinition::new(table.name())
}

/// The group's own rows: [`APPLIED`] and [`RESIDENT`].
const GROUP_TABLE: Rows = TableDefinition::new("group");

/// (last applied log id, membership) of the group.
pub const APPLIED: &[u8] = b"applied";
/// The state machine's resident part.
pub const RESIDENT: &[u8] = b"metadata";

const SNAPSHOT_MAGIC: &[u8; 8] = b"FERRYSNP";
const SNAPSHOT_VERSION: u8 = 1;
const SNAPSHOT_END: u8 = u8::MAX;
/// How many bytes of rows one write transaction takes while a snapshot is loaded.
const LOAD_BATCH_BYTES: usize = 16 << 20;

pub fn store_error(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

/// Opens the database at `path`, creating it and its tables if needed.
pub fn open_db<T: TableSet>(path: &Path, cache_bytes: usize) -> Result<Database, StoreError> {
    let db = Database::builder().set_cache_size(cache_bytes).create(path).map_err(store_error)?;
    let txn = db.begin_write().map_err(store_error)?;
    {
        for def in T::ALL.iter().map(|&table| definition(table)).chain([GROUP_TABLE]) {
            txn.open_table(def).map_err(store_error)?;
        }
    }
    txn.commit().map_err(store_error)?;
    Ok(db)
}

/// Makes every commit so far durable.
pub fn sync(db: &Database) -> Result<(), StoreError> {
    let mut txn = db.begin_write().map_err(store_error)?;
    txn.set_durability(redb::Durability::Immediate).map_err(store_error)?;
    txn.set_quick_repair(true);
    txn.commit().map_err(store_error)
}

/// The tables of one write transaction.
pub struct WriteTables<'txn, T> {
    machine: Vec<redb::Table<'txn, &'static [u8], &'static [u8]>>,
    group: redb::Table<'txn, &'static [u8], &'static [u8]>,
    tables: PhantomData<T>,
}

impl<'txn, T: TableSet> WriteTables<'txn, T> {
    pub fn open(txn: &'txn WriteTransaction) -> Result<Self, StoreError> {
        let machine = T::ALL
            .iter()
            .map(|&table| txn.open_table(definition(table)))
            .collect::<Result<_, _>>()
            .map_err(store_error)?;
        Ok(WriteTables { machine, group: txn.open_table(GROUP_TABLE).map_err(store_error)?, tables: PhantomData })
    }

    pub fn put_group(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.group.insert(key, value).map_err(store_error)?;
        Ok(())
    }

    /// Writes row `(table, key, value)` of a snapshot.
    fn put_row(&mut self, table: u8, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let table = match self.machine.get_mut(table as usize) {
            Some(table) => table,
            None if table as usize == T::ALL.len() => &mut self.group,
            None => return Err(StoreError(format!("snapshot names unknown table {table}"))),
        };
        table.insert(key, value).map_err(store_error)?;
        Ok(())
    }
}

fn get(table: &impl ReadableTable<&'static [u8], &'static [u8]>, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(table.get(key).map_err(store_error)?.map(|value| value.value().to_vec()))
}

fn scan(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    from: Bound<&[u8]>,
    to: Bound<&[u8]>,
    f: &mut Visit<'_>,
) -> Result<(), StoreError> {
    for row in table.range::<&[u8]>((from, to)).map_err(store_error)? {
        let (key, value) = row.map_err(store_error)?;
        if f(key.value(), value.value()).is_break() {
            break;
        }
    }
    Ok(())
}

impl<T: TableSet> StoreRead<T> for WriteTables<'_, T> {
    fn get(&self, table: T, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        get(&self.machine[table.index()], key)
    }

    fn scan(&self, table: T, from: Bound<&[u8]>, to: Bound<&[u8]>, f: &mut Visit<'_>) -> Result<(), StoreError> {
        scan(&self.machine[table.index()], from, to, f)
    }
}

impl<T: TableSet> Store<T> for WriteTables<'_, T> {
    fn put(&mut self, table: T, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.machine[table.index()].insert(key, value).map_err(store_error)?;
        Ok(())
    }

    fn remove(&mut self, table: T, key: &[u8]) -> Result<(), StoreError> {
        self.machine[table.index()].remove(key).map_err(store_error)?;
        Ok(())
    }
}

/// A consistent view of a group's tables: what was committed when it was
/// taken, whatever is committed after. Tables are opened as they are read.
pub struct ReadTables<T> {
    txn: ReadTransaction,
    /// Kept open while the view is read, even after an installed snapshot
    /// replaced it as the group's database.
    _db: Arc<Database>,
    machine: Vec<OnceCell<ReadOnlyTable<&'static [u8], &'static [u8]>>>,
    group: OnceCell<ReadOnlyTable<&'static [u8], &'static [u8]>>,
    tables: PhantomData<T>,
}

impl<T: TableSet> ReadTables<T> {
    pub fn open(db: Arc<Database>) -> Result<Self, StoreError> {
        let txn = db.begin_read().map_err(store_error)?;
        let machine = T::ALL.iter().map(|_| OnceCell::new()).collect();
        Ok(ReadTables { txn, _db: db, machine, group: OnceCell::new(), tables: PhantomData })
    }

    /// Table `number`: a machine's table by its index, or the group's.
    fn table(&self, number: usize) -> Result<&ReadOnlyTable<&'static [u8], &'static [u8]>, StoreError> {
        let (cell, def) = match self.machine.get(number) {
            Some(cell) => (cell, definition(T::ALL[number])),
            None => (&self.group, GROUP_TABLE),
        };
        if let Some(table) = cell.get() {
            return Ok(table);
        }
        let _ = cell.set(self.txn.open_table(def).map_err(store_error)?);
        Ok(cell.get().expect("just set"))
    }

    pub fn get_group(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        get(self.table(T::ALL.len())?, key)
    }

    /// Writes every row of the view to `out` in the snapshot format.
    pub fn dump(&self, out: impl Write) -> std::io::Result<()> {
        let mut out = BufWriter::with_capacity(1 << 20, out);
        out.write_all(SNAPSHOT_MAGIC)?;
        out.write_all(&[SNAPSHOT_VERSION])?;
        for number in 0..=T::ALL.len() {
            let table = self.table(number).map_err(std::io::Error::other)?;
            let mut written = Ok(());
            scan(table, Bound::Unbounded, Bound::Unbounded, &mut |key, value| {
                written = write_row(&mut out, number as u8, key, value);
                if written.is_ok() {
                    ControlFlow::Continue(())
                } else {
                    ControlFlow::Break(())
                }
            })
            .map_err(std::io::Error::other)?;
            written?;
        }
        out.write_all(&[SNAPSHOT_END])?;
        out.flush()
    }
}

fn write_row(out: &mut impl Write, table: u8, key: &[u8], value: &[u8]) -> std::io::Result<()> {
    out.write_all(&[table])?;
    out.write_all(&(key.len() as u32).to_be_bytes())?;
    out.write_all(key)?;
    out.write_all(&(value.len() as u32).to_be_bytes())?;
    out.write_all(value)
}

impl<T: TableSet> StoreRead<T> for ReadTables<T> {
    fn get(&self, table: T, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        get(self.table(table.index())?, key)
    }

    fn scan(&self, table: T, from: Bound<&[u8]>, to: Bound<&[u8]>, f: &mut Visit<'_>) -> Result<(), StoreError> {
        scan(self.table(table.index())?, from, to, f)
    }
}

/// Loads a snapshot written by [`ReadTables::dump`] into `db`, which is
/// empty, in transactions of bounded size; `last` writes the group's own
/// rows in the final one, which is durable.
pub fn load<T: TableSet>(
    db: &Database,
    input: File,
    last: impl FnOnce(&mut WriteTables<'_, T>) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut input = BufReader::with_capacity(1 << 20, input);
    let corrupt = |what: &str| StoreError(format!("snapshot: {what}"));
    let mut header = [0; 9];
    input.read_exact(&mut header).map_err(|_| corrupt("no header"))?;
    if &header[..8] != SNAPSHOT_MAGIC {
        return Err(corrupt("not a snapshot"));
    }
    if header[8] != SNAPSHOT_VERSION {
        return Err(corrupt(&format!("unknown version {}", header[8])));
    }
    let (mut key, mut value) = (Vec::new(), Vec::new());
    let read_field = |input: &mut BufReader<File>, buf: &mut Vec<u8>| -> Result<(), StoreError> {
        let mut len = [0; 4];
        input.read_exact(&mut len).map_err(|_| corrupt("truncated"))?;
        buf.resize(u32::from_be_bytes(len) as usize, 0);
        input.read_exact(buf).map_err(|_| corrupt("truncated"))
    };
    let mut last = Some(last);
    loop {
        let mut txn = db.begin_write().map_err(store_error)?;
        txn.set_durability(redb::Durability::None).map_err(store_error)?;
        let mut batch = 0;
        let mut ended = false;
        {
            let mut tables = WriteTables::<T>::open(&txn)?;
            while batch < LOAD_BATCH_BYTES {
                let mut table = [0];
                input.read_exact(&mut table).map_err(|_| corrupt("truncated"))?;
                if table[0] == SNAPSHOT_END {
                    ended = true;
                    break;
                }
                read_field(&mut input, &mut key)?;
                read_field(&mut input, &mut value)?;
                tables.put_row(table[0], &key, &value)?;
                batch += key.len() + value.len();
            }
            if let (true, Some(last)) = (ended, last.take()) {
                last(&mut tables)?;
            }
        }
        if ended {
            txn.set_durability(redb::Durability::Immediate).map_err(store_error)?;
            txn.set_quick_repair(true);
            txn.commit().map_err(store_error)?;
            return Ok(());
        }
        txn.commit().map_err(store_error)?;
    }
}
