//! The sled store against openraft's storage contract, and a node's log
//! surviving a restart.

mod common;

use std::time::Duration;

use common::{invoke, when_unlocked};
use ferry_log::storage::{self, Flusher, LogStore, StateMachineStore, StateOptions};
use ferry_log::{partition_group, LogNode, NodeId, Options, TypeConfig};
use ferry_partition::wire::v1::{Command, Response};
use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for SledBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<NodeId>> {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path().join("log")).open().unwrap();
        let flusher = Flusher::start(db.clone(), 64, &TaskTracker::new(), CancellationToken::new());
        let state = StateOptions { dir: dir.path().join("state"), cache_bytes: 1 << 20 };
        let (log, sm) = storage::open(&db, 1, flusher, state).unwrap();
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
        let node = when_unlocked(|| LogNode::open(options.clone(), &tracker, cancel.clone())).await.unwrap();
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
        node.shutdown().await;
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
        drop(node);

        // Snapshots let the log be purged: the partition's log keeps about the
        // entries since the last snapshot plus the few kept behind it.
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
    let node = LogNode::open(options.clone(), &tracker, cancel.clone()).await.unwrap();
    node.wait_for_leaders(Duration::from_secs(10)).await.unwrap();
    node.shutdown().await;
    drop(node);
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    let reopen = Options { partitions: 3, ..options };
    let err = when_unlocked(|| LogNode::open(reopen.clone(), &tracker, cancel.clone())).await.err().unwrap();
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
        let err = LogNode::open(options, &tracker, cancel).await.err().unwrap().to_string();
        let found = format!("data format {}", format.unwrap_or(1));
        assert!(err.contains(&found) && err.contains("empty base-dir"), "{err}");
        assert!(!dir.path().join("state").exists(), "a refused directory is left as it was");
    }
}
