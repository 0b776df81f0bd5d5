//! The sled store against openraft's storage contract, and a node's log
//! surviving a restart.

mod common;

use std::time::Duration;

use common::{invoke, when_unlocked};
use ferry_log::storage::{self, Flusher, LogStore, StateMachineStore, StateOptions};
use ferry_log::{partition_group, NodeId, Options, TypeConfig};
use ferry_partition::wire::v1::{Command, Response};
use ferry_partition::{Log, LogReads, Machine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

struct SledBuilder;

impl StoreBuilder<TypeConfig<Machine>, LogStore<Machine>, StateMachineStore<Machine>, tempfile::TempDir>
    for SledBuilder
{
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore<Machine>, StateMachineStore<Machine>), StorageError<NodeId>> {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path().join("log")).open().unwrap();
        let flusher = Flusher::start(db.clone(), 64, &TaskTracker::new(), CancellationToken::new());
        let state = StateOptions { dir: dir.path().join("state"), cache_bytes: 1 << 20 };
        let (log, sm) = storage::open(&db, 1, Machine::default(), flusher, state).unwrap();
        Ok((dir, log, sm))
    }
}

#[test]
fn sled_store_passes_openraft_suite() {
    if let Err(e) = Suite::test_all(SledBuilder) {
        panic!("storage suite failed: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_invocations_survive_a_restart_and_stay_deduplicated() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = Options::single_node(dir.path().to_owned(), 2);
    options.advertised_address = "127.0.0.1:1".to_owned();
    // Snapshot often, so that the restart covers snapshot + log replay.
    options.snapshot_entries_since_last = 10;
    options.entries_kept_after_snapshot = 2;

    for round in 0..2u64 {
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let node = when_unlocked(|| Log::open(options.clone(), |_| Machine::default(), &tracker, cancel.clone()))
            .await
            .unwrap();
        node.wait_for_leaders(Duration::from_secs(10)).await.unwrap();
        // The second round re-sends everything: all of it is dropped as duplicates.
        for i in 0..50u64 {
            let r = node.propose(partition_group(0), Command::Invoke(vec![invoke(i)].into())).await.unwrap();
            let expected = if round == 0 {
                Response::Invoked { created: 1, deduplicated: 0 }
            } else {
                Response::Invoked { created: 0, deduplicated: 1 }
            };
            assert_eq!(r, expected, "round {round}, record {i}");
        }
        let count = node.read_partition(0, |p| p.invocation_count()).unwrap();
        assert_eq!(count, 50);
        assert_eq!(node.read_partition(0, |p| p.last_seq(42)).unwrap(), Some(49));
        // Snapshots let the log be purged while entries are applied: the
        // partition's log comes to keep about the entries since the last
        // snapshot plus the few kept behind it. Duplicates keep it applying.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let kept = || {
            let status = node.group_statuses().into_iter().find(|s| s.group == partition_group(0)).unwrap();
            status.last_log_index.unwrap_or(0) - status.purged_index.unwrap_or(0)
        };
        while kept() > 20 && tokio::time::Instant::now() < deadline {
            node.propose(partition_group(0), Command::Invoke(vec![invoke(49)].into())).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        node.shutdown().await;
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
        drop(node);

        let db = when_unlocked(|| std::future::ready(sled::open(dir.path().join("log")))).await.unwrap();
        let entries = db.open_tree("log-1").unwrap().len();
        assert!(entries <= 20, "round {round}: {entries} entries left in the log");
        assert!(dir.path().join("state/1.redb").exists(), "the partition's state is on disk");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_count_is_fixed_at_creation() {
    let dir = tempfile::tempdir().unwrap();
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let options = Options::single_node(dir.path().to_owned(), 2);
    let node = Log::open(options.clone(), |_| Machine::default(), &tracker, cancel.clone()).await.unwrap();
    node.wait_for_leaders(Duration::from_secs(10)).await.unwrap();
    node.shutdown().await;
    drop(node);
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    let reopen = Options { partitions: 3, ..options };
    let err = when_unlocked(|| Log::open(reopen.clone(), |_| Machine::default(), &tracker, cancel.clone()))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("created with 2 partitions"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_of_another_format_is_refused_with_what_to_do() {
    // What a node of the first format leaves: a partition count, no format;
    // of the third: partition state kept only in snapshots in sled.
    for format in [None, Some(3u32)] {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path().join("log")).unwrap();
            let cluster = db.open_tree("cluster").unwrap();
            cluster.insert(b"partitions", ferry_partition::wire::encode(&2u32)).unwrap();
            if let Some(format) = format {
                cluster.insert(b"format", ferry_partition::wire::encode(&format)).unwrap();
            }
            db.flush().unwrap();
        }
        let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
        let options = Options::single_node(dir.path().to_owned(), 2);
        // sled lets go of the directory's lock shortly after the last handle is dropped.
        let open = || Log::open(options.clone(), |_| Machine::default(), &tracker, cancel.clone());
        let err = when_unlocked(open).await.err().unwrap().to_string();
        let found = format!("data format {}", format.unwrap_or(1));
        assert!(err.contains(&found) && err.contains("empty base-dir"), "{err}");
        assert!(!dir.path().join("state").exists(), "a refused directory is left as it was");
    }
}
