//! Ferry storage-engine benchmark: sled 0.34 vs redb 2.x vs fjall 2.x.
//!
//! `ferry-engine-bench` (no args) runs every engine in its own child process (so memory
//! figures are per engine) and prints Markdown tables.
//! `ferry-engine-bench <engine>` runs one engine and prints `R key value` lines.

use rand::{rngs::StdRng, RngCore, SeedableRng};
use std::collections::BTreeMap;
use fjall::AbstractTree;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const COMMITS: usize = 200;
const INV_PER_COMMIT: usize = 1000;
const OBJ_PER_COMMIT: usize = 1000;
const INV_VALUE: usize = 300;
const OBJ_VALUE: usize = 64;
const OBJ_KEYS: u64 = 100_000;
const CHUNK: usize = 1 << 20; // snapshot stream chunk: 1 MiB
const SCAN_LIMIT: Duration = Duration::from_secs(60);
const WRITER_MAX_COMMITS: usize = 150;
const SLOW_CHUNK_SLEEP: Duration = Duration::from_millis(60); // throttled scan: ~16 MiB/s

const ENGINES: [&str; 5] = ["sled", "sled-1tree", "redb", "fjall", "fjall-fw16"];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum T {
    Inv = 0,
    Obj = 1,
    Meta = 2,
}
const TREES: [T; 3] = [T::Inv, T::Obj, T::Meta];
const TREE_NAMES: [&str; 3] = ["inv", "obj", "meta"];

enum Op {
    Put(T, Vec<u8>, Vec<u8>),
    Del(T, Vec<u8>),
}

// Two guard keys at the two ends of the whole key space (first key of the first
// tree, last key of the last tree) and the applied index; each commit writes the
// same sequence number into all three.
const GUARD_LO: &[u8] = b"\x00guard_lo";
const GUARD_HI: &[u8] = b"\xffguard_hi";
const APPLIED: &[u8] = b"applied_index";
const INV_COUNT: &[u8] = b"inv_count"; // live invocations, written by every commit

trait Store: Send + Sync {
    /// Atomic + durable (fsync) commit of all ops.
    fn commit(&self, ops: &[Op]);
    fn get(&self, t: T, k: &[u8]) -> Option<Vec<u8>>;
    /// Full scan from the engine's point-in-time view if it has one.
    fn scan(&self, f: &mut dyn FnMut(T, &[u8], &[u8]) -> bool);
    /// Explicit (non-automatic) compaction, if the engine offers one.
    fn explicit_compact(&mut self) -> &'static str;
}

// ---------------------------------------------------------------- sled (3 trees, multi-tree transaction)
struct SledStore {
    db: sled::Db,
    trees: [sled::Tree; 3],
}
impl SledStore {
    fn open(p: &Path) -> Self {
        let db = sled::Config::new().path(p).open().unwrap();
        let trees = TREE_NAMES.map(|n| db.open_tree(n).unwrap());
        SledStore { db, trees }
    }
}
impl Store for SledStore {
    fn commit(&self, ops: &[Op]) {
        use sled::transaction::ConflictableTransactionError as CE;
        use sled::Transactional;
        let (a, b, c) = (&self.trees[0], &self.trees[1], &self.trees[2]);
        (a, b, c)
            .transaction(|(a, b, c)| {
                let ts = [a, b, c];
                for op in ops {
                    match op {
                        Op::Put(t, k, v) => {
                            ts[*t as usize].insert(k.as_slice(), v.as_slice())?;
                        }
                        Op::Del(t, k) => {
                            ts[*t as usize].remove(k.as_slice())?;
                        }
                    }
                }
                Ok::<(), CE<()>>(())
            })
            .unwrap();
        self.db.flush().unwrap();
    }
    fn get(&self, t: T, k: &[u8]) -> Option<Vec<u8>> {
        self.trees[t as usize].get(k).unwrap().map(|v| v.to_vec())
    }
    fn scan(&self, f: &mut dyn FnMut(T, &[u8], &[u8]) -> bool) {
        for t in TREES {
            for r in self.trees[t as usize].iter() {
                let (k, v) = r.unwrap();
                if !f(t, &k, &v) {
                    return;
                }
            }
        }
    }
    fn explicit_compact(&mut self) -> &'static str {
        "none available"
    }
}

// ---------------------------------------------------------------- sled (1 tree, key prefix, apply_batch)
struct Sled1Store {
    db: sled::Db,
    tree: sled::Tree,
}
fn pfx(t: T, k: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(k.len() + 1);
    v.push(t as u8);
    v.extend_from_slice(k);
    v
}
impl Sled1Store {
    fn open(p: &Path) -> Self {
        let db = sled::Config::new().path(p).open().unwrap();
        let tree = db.open_tree("state").unwrap();
        Sled1Store { db, tree }
    }
}
impl Store for Sled1Store {
    fn commit(&self, ops: &[Op]) {
        let mut b = sled::Batch::default();
        for op in ops {
            match op {
                Op::Put(t, k, v) => b.insert(pfx(*t, k), v.as_slice()),
                Op::Del(t, k) => b.remove(pfx(*t, k)),
            }
        }
        self.tree.apply_batch(b).unwrap();
        self.db.flush().unwrap();
    }
    fn get(&self, t: T, k: &[u8]) -> Option<Vec<u8>> {
        self.tree.get(pfx(t, k)).unwrap().map(|v| v.to_vec())
    }
    fn scan(&self, f: &mut dyn FnMut(T, &[u8], &[u8]) -> bool) {
        for r in self.tree.iter() {
            let (k, v) = r.unwrap();
            if !f(TREES[k[0] as usize], &k[1..], &v) {
                    return;
                }
        }
    }
    fn explicit_compact(&mut self) -> &'static str {
        "none available"
    }
}

// ---------------------------------------------------------------- redb
const REDB_TABLES: [redb::TableDefinition<&[u8], &[u8]>; 3] = [
    redb::TableDefinition::new("inv"),
    redb::TableDefinition::new("obj"),
    redb::TableDefinition::new("meta"),
];
struct RedbStore {
    db: redb::Database,
}
impl RedbStore {
    fn open(p: &Path) -> Self {
        let db = redb::Database::create(p.join("state.redb")).unwrap();
        let tx = db.begin_write().unwrap();
        for t in REDB_TABLES {
            tx.open_table(t).unwrap();
        }
        tx.commit().unwrap();
        RedbStore { db }
    }
}
impl Store for RedbStore {
    fn commit(&self, ops: &[Op]) {
        let tx = self.db.begin_write().unwrap(); // default Durability::Immediate
        {
            let mut tabs = REDB_TABLES.map(|d| tx.open_table(d).unwrap());
            for op in ops {
                match op {
                    Op::Put(t, k, v) => {
                        tabs[*t as usize].insert(k.as_slice(), v.as_slice()).unwrap();
                    }
                    Op::Del(t, k) => {
                        tabs[*t as usize].remove(k.as_slice()).unwrap();
                    }
                }
            }
        }
        tx.commit().unwrap();
    }
    fn get(&self, t: T, k: &[u8]) -> Option<Vec<u8>> {
        let tx = self.db.begin_read().unwrap();
        let tab = tx.open_table(REDB_TABLES[t as usize]).unwrap();
        tab.get(k).unwrap().map(|v| v.value().to_vec())
    }
    fn scan(&self, f: &mut dyn FnMut(T, &[u8], &[u8]) -> bool) {
        use redb::ReadableTable;
        let tx = self.db.begin_read().unwrap(); // point-in-time view
        for t in TREES {
            let tab = tx.open_table(REDB_TABLES[t as usize]).unwrap();
            for r in tab.iter().unwrap() {
                let (k, v) = r.unwrap();
                if !f(t, k.value(), v.value()) {
                    return;
                }
            }
        }
    }
    fn explicit_compact(&mut self) -> &'static str {
        let mut n = 0;
        while self.db.compact().unwrap() {
            n += 1;
            if n > 10 {
                break;
            }
        }
        "Database::compact()"
    }
}

// ---------------------------------------------------------------- fjall
struct FjallStore {
    ks: fjall::Keyspace,
    parts: [fjall::PartitionHandle; 3],
}
impl FjallStore {
    fn open(p: &Path, flush_workers: Option<usize>) -> Self {
        let mut cfg = fjall::Config::new(p);
        if let Some(n) = flush_workers {
            // work-around: each flush-semaphore permit flushes up to n sealed memtables
            cfg = cfg.flush_workers(n);
        }
        let ks = cfg.open().unwrap();
        let parts = TREE_NAMES
            .map(|n| ks.open_partition(n, fjall::PartitionCreateOptions::default()).unwrap());
        static OPENS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        if std::env::var("FJALL_DEBUG").is_ok() && OPENS.fetch_add(1, Ordering::SeqCst) == 1 {
            let ks2 = ks.clone();
            let parts2 = parts.clone();
            std::thread::spawn(move || loop {
                std::thread::sleep(Duration::from_secs(1));
                eprintln!(
                    "fjall dbg: wb={} journals={} segs={:?} flushes={:?} disk={} sealed={:?} active={:?} persisted={:?}",
                    ks2.write_buffer_size(),
                    ks2.journal_count(),
                    parts2.iter().map(|p| p.segment_count()).collect::<Vec<_>>(),
                    parts2.iter().map(|p| p.flushes_completed()).collect::<Vec<_>>(),
                    ks2.disk_space(),
                    parts2.iter().map(|p| p.tree.sealed_memtable_count()).collect::<Vec<_>>(),
                    parts2.iter().map(|p| p.tree.active_memtable_size()).collect::<Vec<_>>(),
                    parts2.iter().map(|p| p.tree.get_highest_persisted_seqno()).collect::<Vec<_>>(),
                );
            });
        }
        FjallStore { ks, parts }
    }
}
impl Store for FjallStore {
    fn commit(&self, ops: &[Op]) {
        let mut b = self
            .ks
            .batch()
            .durability(Some(fjall::PersistMode::SyncAll));
        for op in ops {
            match op {
                Op::Put(t, k, v) => b.insert(&self.parts[*t as usize], k.as_slice(), v.as_slice()),
                Op::Del(t, k) => b.remove(&self.parts[*t as usize], k.as_slice()),
            }
        }
        b.commit().unwrap();
    }
    fn get(&self, t: T, k: &[u8]) -> Option<Vec<u8>> {
        self.parts[t as usize].get(k).unwrap().map(|v| v.to_vec())
    }
    fn scan(&self, f: &mut dyn FnMut(T, &[u8], &[u8]) -> bool) {
        let inst = self.ks.instant(); // point-in-time across partitions
        let snaps: Vec<_> = self.parts.iter().map(|p| p.snapshot_at(inst)).collect();
        for (t, s) in TREES.iter().zip(snaps.iter()) {
            for r in s.iter() {
                let (k, v) = r.unwrap();
                if !f(*t, &k, &v) {
                    return;
                }
            }
        }
    }
    fn explicit_compact(&mut self) -> &'static str {
        for p in &self.parts {
            p.major_compact().unwrap();
        }
        "major_compact() per partition"
    }
}

fn open_store(engine: &str, p: &Path) -> Box<dyn Store> {
    match engine {
        "sled" => Box::new(SledStore::open(p)),
        "sled-1tree" => Box::new(Sled1Store::open(p)),
        "redb" => Box::new(RedbStore::open(p)),
        "fjall" => Box::new(FjallStore::open(p, None)),
        "fjall-fw16" => Box::new(FjallStore::open(p, Some(16))),
        _ => panic!("unknown engine {engine}"),
    }
}

// ---------------------------------------------------------------- workload
struct Gen {
    inv_live: u64,
    rng: StdRng,
    obj_n: u64,
    seq: u64,
}
impl Gen {
    fn inv_id(&mut self) -> Vec<u8> {
        // 40 bytes: "inv_" + 36 hex chars
        let mut r = [0u8; 18];
        self.rng.fill_bytes(&mut r);
        let mut k = b"inv_".to_vec();
        k.extend_from_slice(hex::encode(r).as_bytes());
        k
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.rng.fill_bytes(&mut v);
        v
    }
    fn seq_ops(&mut self, ops: &mut Vec<Op>) {
        self.seq += 1;
        let s = self.seq.to_be_bytes().to_vec();
        ops.push(Op::Put(T::Inv, GUARD_LO.to_vec(), s.clone()));
        ops.push(Op::Put(T::Meta, APPLIED.to_vec(), s.clone()));
        ops.push(Op::Put(T::Meta, INV_COUNT.to_vec(), self.inv_live.to_be_bytes().to_vec()));
        ops.push(Op::Put(T::Meta, GUARD_HI.to_vec(), s));
    }
    /// One apply batch: 1000 invocations + 1000 object-state updates + applied index.
    fn apply_batch(&mut self, ids_out: Option<&mut Vec<Vec<u8>>>) -> Vec<Op> {
        let mut ops = Vec::with_capacity(INV_PER_COMMIT + OBJ_PER_COMMIT + 3);
        let mut ids = Vec::with_capacity(INV_PER_COMMIT);
        for _ in 0..INV_PER_COMMIT {
            let id = self.inv_id();
            ids.push(id.clone());
            let v = self.bytes(INV_VALUE);
            ops.push(Op::Put(T::Inv, id, v));
        }
        for _ in 0..OBJ_PER_COMMIT {
            let k = format!("obj/{}", self.obj_n % OBJ_KEYS).into_bytes();
            self.obj_n += 1;
            let v = self.bytes(OBJ_VALUE);
            ops.push(Op::Put(T::Obj, k, v));
        }
        self.inv_live += INV_PER_COMMIT as u64;
        self.seq_ops(&mut ops);
        if let Some(o) = ids_out {
            o.extend(ids);
        }
        ops
    }
}

static T_BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
static COMMIT_T0_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static STEP: std::sync::Mutex<&'static str> = std::sync::Mutex::new("");
const HANG_SECS: u64 = 20;

fn now_ms() -> u64 {
    T_BASE.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}
/// Commit with a watchdog mark: a commit blocked > HANG_SECS ends the process.
fn wcommit(store: &dyn Store, ops: &[Op]) {
    COMMIT_T0_MS.store(now_ms(), Ordering::SeqCst);
    store.commit(ops);
    COMMIT_T0_MS.store(0, Ordering::SeqCst);
}
fn set_step(s: &'static str) {
    *STEP.lock().unwrap() = s;
}
fn start_watchdog() {
    now_ms();
    std::thread::spawn(|| loop {
        std::thread::sleep(Duration::from_millis(500));
        let t0 = COMMIT_T0_MS.load(Ordering::SeqCst);
        if t0 != 0 && now_ms() - t0 > HANG_SECS * 1000 {
            println!("R status HUNG: a commit blocked > {HANG_SECS}s during {}", STEP.lock().unwrap());
            std::process::exit(3);
        }
    });
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

fn disk_usage(p: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let (mut alloc, mut apparent) = (0, 0);
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        if m.is_dir() {
            let (a, b) = disk_usage(&e.path());
            alloc += a;
            apparent += b;
        } else {
            alloc += m.blocks() * 512;
            apparent += m.len();
        }
    }
    (alloc, apparent)
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1024.0 * 1024.0))
}

fn proc_status(field: &str) -> String {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    for l in s.lines() {
        if let Some(r) = l.strip_prefix(field) {
            let kb: u64 = r.trim_start_matches(':').trim().trim_end_matches(" kB").trim().parse().unwrap();
            return format!("{:.0}", kb as f64 / 1024.0);
        }
    }
    "?".into()
}

macro_rules! out {
    ($k:expr, $($arg:tt)*) => { println!("R {} {}", $k, format!($($arg)*)) };
}

struct ScanResult {
    start: Instant,
    end: Instant,
    entries: u64,
    bytes: u64,
    lo: u64,
    hi: u64,
    applied: u64,
    inv: u64,
    inv_count: u64,
    aborted: bool,
}

fn be(v: &[u8]) -> u64 {
    u64::from_be_bytes(v.try_into().unwrap())
}

fn do_scan(store: &dyn Store, throttle: bool) -> ScanResult {
    let start = Instant::now();
    let mut chunk: Vec<u8> = Vec::with_capacity(CHUNK + 4096);
    let (mut entries, mut bytes, mut lo, mut hi, mut applied, mut inv, mut inv_count) = (0u64, 0u64, 0, 0, 0, 0u64, 0);
    let mut aborted = false;
    store.scan(&mut |t, k, v| {
        entries += 1;
        match (t, k) {
            (T::Inv, GUARD_LO) => lo = be(v),
            (T::Meta, GUARD_HI) => hi = be(v),
            (T::Meta, APPLIED) => applied = be(v),
            (T::Meta, INV_COUNT) => inv_count = be(v),
            (T::Inv, _) if k.starts_with(b"inv_") => inv += 1,
            _ => {}
        }
        // "stream" to a follower in 1 MiB chunks
        chunk.push(t as u8);
        chunk.extend_from_slice(&(k.len() as u32).to_le_bytes());
        chunk.extend_from_slice(k);
        chunk.extend_from_slice(&(v.len() as u32).to_le_bytes());
        chunk.extend_from_slice(v);
        if chunk.len() >= CHUNK {
            bytes += chunk.len() as u64;
            std::hint::black_box(&chunk);
            chunk.clear();
            if throttle {
                std::thread::sleep(SLOW_CHUNK_SLEEP);
            }
            if start.elapsed() > SCAN_LIMIT {
                aborted = true;
                return false;
            }
        }
        true
    });
    bytes += chunk.len() as u64;
    ScanResult { start, end: Instant::now(), entries, bytes, lo, hi, applied, inv, inv_count, aborted }
}

fn run_engine(engine: &str) {
    let base = PathBuf::from(std::env::var("BENCH_DIR").unwrap_or_else(|_| std::env::temp_dir().join("ferry-engine-bench").display().to_string()));
    std::fs::create_dir_all(&base).unwrap();
    let dir = tempfile::Builder::new().prefix(engine).tempdir_in(&base).unwrap();
    let path = dir.path().to_path_buf();

    start_watchdog();
    set_step("step 1 (apply)");
    let mut store: Arc<dyn Store> = Arc::from(open_store(engine, &path));
    let mut g = Gen { inv_live: 0, rng: StdRng::seed_from_u64(42), obj_n: 0, seq: 0 };

    // ---- 1. apply workload
    let mut ids: Vec<Vec<u8>> = Vec::with_capacity(COMMITS * INV_PER_COMMIT);
    let mut lat = Vec::with_capacity(COMMITS);
    let mut gen_time = Duration::ZERO;
    let t0 = Instant::now();
    for _ in 0..COMMITS {
        let tg = Instant::now();
        let ops = g.apply_batch(Some(&mut ids));
        gen_time += tg.elapsed();
        let t = Instant::now();
        wcommit(&*store, &ops);
        lat.push(t.elapsed());
    }
    let total = t0.elapsed() - gen_time;
    lat.sort();
    out!("s1.commits_per_s", "{:.1}", COMMITS as f64 / total.as_secs_f64());
    out!("s1.p50_ms", "{:.1}", pct(&lat, 0.5));
    out!("s1.p99_ms", "{:.1}", pct(&lat, 0.99));
    out!("s1.max_ms", "{:.1}", pct(&lat, 1.0));
    out!("s1.write_mib_s", "{:.1}", (COMMITS * (INV_PER_COMMIT * (40 + INV_VALUE) + OBJ_PER_COMMIT * (10 + OBJ_VALUE))) as f64 / total.as_secs_f64() / 1048576.0);
    out!("mem.rss_after_s1_mib", "{}", proc_status("VmRSS"));

    // ---- 3a. size after step 1
    let (a, b) = disk_usage(&path);
    out!("s3.after_apply_alloc", "{}", mib(a));
    out!("s3.after_apply_apparent", "{}", mib(b));

    // ---- 4. reopen with ~200k invocations
    drop(store);
    let t = Instant::now();
    let s = open_store(engine, &path);
    let t_open = t.elapsed();
    let v = s.get(T::Meta, APPLIED).map(|v| be(&v));
    let t_first = t.elapsed();
    assert_eq!(v, Some(g.seq));
    out!("s4.open_ms", "{:.1}", t_open.as_secs_f64() * 1e3);
    out!("s4.first_read_ms", "{:.1}", t_first.as_secs_f64() * 1e3);
    let t = Instant::now();
    let _ = s.get(T::Inv, &ids[12345]).expect("inv present");
    out!("s4.random_get_after_open_us", "{:.0}", t.elapsed().as_secs_f64() * 1e6);
    store = Arc::from(s);

    // ---- 3b. deletes
    set_step("step 3 (deletes), right after the reopen of step 4");
    out!("s3.before_delete_inv", "{}", g.inv_live);
    let half = ids.len() / 2;
    let t = Instant::now();
    for c in ids[..half].chunks(1000) {
        let mut ops: Vec<Op> = c.iter().map(|k| Op::Del(T::Inv, k.clone())).collect();
        g.inv_live -= c.len() as u64;
        g.seq_ops(&mut ops);
        wcommit(&*store, &ops);
    }
    out!("s3.delete_commits_per_s", "{:.1}", (half / 1000) as f64 / t.elapsed().as_secs_f64());
    let (a, _) = disk_usage(&path);
    out!("s3.after_delete_alloc", "{}", mib(a));
    std::thread::sleep(Duration::from_secs(10));
    let (a, b) = disk_usage(&path);
    out!("s3.after_delete_10s_alloc", "{}", mib(a));
    out!("s3.after_delete_10s_apparent", "{}", mib(b));
    // refill: does freed space get reused? (+100 apply commits = 100k new invocations)
    for _ in 0..100 {
        let ops = g.apply_batch(None);
        wcommit(&*store, &ops);
    }
    let (a, _) = disk_usage(&path);
    out!("s3.after_refill_alloc", "{}", mib(a));
    // explicit compaction (not automatic): for reference
    let t = Instant::now();
    let how = Arc::get_mut(&mut store).unwrap().explicit_compact();
    let ct = t.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let (a, _) = disk_usage(&path);
    out!("s3.explicit_compact", "{} ({:.1}s)", how, ct.as_secs_f64());
    out!("s3.after_explicit_compact_alloc", "{}", mib(a));

    // ---- 2. consistent snapshot while applying
    set_step("step 2 (writer while snapshot scans)");
    out!("s2.inv_at_start", "{}", g.inv_live);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let store = store.clone();
        let stop = stop.clone();
        let mut wg = Gen { inv_live: g.inv_live, rng: StdRng::seed_from_u64(7), obj_n: g.obj_n, seq: g.seq };
        std::thread::spawn(move || {
            let mut lats: Vec<(Instant, Duration)> = Vec::new();
            while !stop.load(Ordering::Relaxed) && lats.len() < WRITER_MAX_COMMITS {
                let ops = wg.apply_batch(None);
                let t = Instant::now();
                wcommit(&*store, &ops);
                lats.push((t, t.elapsed()));
            }
            (lats, wg)
        })
    };
    std::thread::sleep(Duration::from_millis(300)); // writer is warmed up
    let mut scans = Vec::new();
    for throttle in [false, false, true] {
        scans.push((throttle, do_scan(&*store, throttle)));
    }
    stop.store(true, Ordering::Relaxed);
    let (wl, wg) = writer.join().unwrap();
    g.seq = wg.seq;
    g.obj_n = wg.obj_n;
    for (i, (throttle, s)) in scans.iter().enumerate() {
        let during: Vec<Duration> = wl
            .iter()
            .filter(|(st, d)| *st + *d > s.start && *st < s.end)
            .map(|x| x.1)
            .collect();
        let mut sd = during.clone();
        sd.sort();
        let consistent = s.lo == s.hi && s.lo == s.applied && s.inv == s.inv_count;
        let k = format!("s2.scan{}", i + 1);
        out!(format!("{k}.mode"), "{}", if *throttle { "throttled 60ms/MiB" } else { "full speed" });
        out!(format!("{k}.consistent"), "{}{}", if consistent { "yes" } else { "NO" }, if s.aborted { " (aborted at 60 s)" } else { "" });
        out!(format!("{k}.detail"), "lo={} hi={} applied={} inv seen={} inv_count={}", s.lo, s.hi, s.applied, s.inv, s.inv_count);
        out!(format!("{k}.secs"), "{:.2}", (s.end - s.start).as_secs_f64());
        out!(format!("{k}.entries"), "{}", s.entries);
        out!(format!("{k}.mib"), "{}", mib(s.bytes));
        out!(format!("{k}.w_commits"), "{}", sd.len());
        out!(format!("{k}.w_p50_ms"), "{:.1}", pct(&sd, 0.5));
        out!(format!("{k}.w_max_ms"), "{:.1}", pct(&sd, 1.0));
    }
    let mut all: Vec<Duration> = wl.iter().map(|x| x.1).collect();
    all.sort();
    out!("s2.w_total_commits", "{}", all.len());
    out!("s2.w_p99_ms", "{:.1}", pct(&all, 0.99));
    out!("s2.w_max_ms", "{:.1}", pct(&all, 1.0));
    out!("mem.rss_after_s2_mib", "{}", proc_status("VmRSS"));

    // ---- 4b. reopen again (after deletes/compaction)
    drop(store);
    let t = Instant::now();
    let s = open_store(engine, &path);
    let v = s.get(T::Meta, APPLIED).map(|v| be(&v));
    out!("s4.reopen_end_ms", "{:.1}", t.elapsed().as_secs_f64() * 1e3);
    assert_eq!(v, Some(g.seq));
    out!("mem.hwm_mib", "{}", proc_status("VmHWM"));
    out!("status", "ok");
    drop(s);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() > 1 {
        run_engine(&args[1]);
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let mut res: BTreeMap<(&str, String), String> = BTreeMap::new();
    for e in ENGINES {
        eprintln!("== {e}");
        let o = std::process::Command::new(&exe).arg(e).output().unwrap();
        let s = String::from_utf8_lossy(&o.stdout);
        eprint!("{s}");
        if !o.status.success() {
            eprintln!("{e} failed: {}", String::from_utf8_lossy(&o.stderr));
        }
        for l in s.lines() {
            if let Some(r) = l.strip_prefix("R ") {
                let (k, v) = r.split_once(' ').unwrap();
                res.insert((e, k.to_string()), v.to_string());
            }
        }
    }
    let get = |e: &str, k: &str| res.get(&(e, k.to_string())).cloned().unwrap_or("-".into());
    let table = |title: &str, rows: &[(&str, &str)]| {
        println!("\n### {title}\n");
        print!("| engine |");
        for (h, _) in rows {
            print!(" {h} |");
        }
        println!();
        print!("|---|");
        for _ in rows {
            print!("---|");
        }
        println!();
        for e in ENGINES {
            print!("| {e} |");
            for (_, k) in rows {
                print!(" {} |", get(e, k));
            }
            println!();
        }
    };
    table("Status", &[("status", "status")]);
    table("1. Apply (200 commits x (1000 inv + 1000 obj + applied), fsync per commit)", &[
        ("commits/s", "s1.commits_per_s"),
        ("MiB/s", "s1.write_mib_s"),
        ("p50 ms", "s1.p50_ms"),
        ("p99 ms", "s1.p99_ms"),
        ("max ms", "s1.max_ms"),
    ]);
    for i in 1..=3 {
        table(&format!("2. Snapshot scan {i} while writer commits"), &[
            ("mode", &format!("s2.scan{i}.mode")),
            ("consistent", &format!("s2.scan{i}.consistent")),
            ("seen", &format!("s2.scan{i}.detail")),
            ("scan s", &format!("s2.scan{i}.secs")),
            ("entries", &format!("s2.scan{i}.entries")),
            ("MiB", &format!("s2.scan{i}.mib")),
            ("writer commits during", &format!("s2.scan{i}.w_commits")),
            ("writer p50 ms", &format!("s2.scan{i}.w_p50_ms")),
            ("writer max ms", &format!("s2.scan{i}.w_max_ms")),
        ]);
    }
    table("2b. Writer over whole step 2", &[
        ("inv at start", "s2.inv_at_start"),
        ("commits", "s2.w_total_commits"),
        ("p99 ms", "s2.w_p99_ms"),
        ("max ms", "s2.w_max_ms"),
    ]);
    table("3. Disk (MiB allocated; run right after step 4 reopen, before step 2)", &[
        ("after step 1", "s3.after_apply_alloc"),
        ("apparent", "s3.after_apply_apparent"),
        ("inv before delete", "s3.before_delete_inv"),
        ("right after del 100k", "s3.after_delete_alloc"),
        ("+10 s idle (del 100k)", "s3.after_delete_10s_alloc"),
        ("+100k new inv", "s3.after_refill_alloc"),
        ("explicit compaction", "s3.explicit_compact"),
        ("after it", "s3.after_explicit_compact_alloc"),
        ("delete commits/s", "s3.delete_commits_per_s"),
    ]);
    table("4. Open (~200k inv, clean close, warm page cache)", &[
        ("open ms", "s4.open_ms"),
        ("open+first read ms", "s4.first_read_ms"),
        ("next random get us", "s4.random_get_after_open_us"),
        ("reopen at end (after steps 3 and 2) ms", "s4.reopen_end_ms"),
    ]);
    table("Memory (MiB)", &[
        ("RSS after step 1", "mem.rss_after_s1_mib"),
        ("RSS at end (after steps 3, 2)", "mem.rss_after_s2_mib"),
        ("peak RSS", "mem.hwm_mib"),
    ]);
}
