//! Faults injected at exact points of the log (fail points compiled into test
//! builds only): a leader that has not caught up, a group whose storage
//! fails, a snapshot build held across a snapshot install.

mod common;

use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use common::{invoke, when_unlocked};
use ferry_log::node::{GroupStatus, Role};
use ferry_log::storage::{self, Flusher, StateOptions};
use ferry_log::{network, partition_group, NodeId, Options};
use ferry_partition::wire::v1::Command;
use ferry_partition::{Log, LogReads, Machine};
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A fail point that, when hit, reports it and blocks its thread until opened.
struct Gate {
    name: String,
    hit: mpsc::Receiver<()>,
    release: mpsc::Sender<()>,
}

impl Gate {
    fn install(name: &str) -> Gate {
        let (hit_tx, hit) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let (hit_tx, release_rx) = (Mutex::new(hit_tx), Mutex::new(release_rx));
        fail::cfg_callback(name, move || {
            let _ = hit_tx.lock().unwrap().send(());
            let _ = release_rx.lock().unwrap().recv();
        })
        .unwrap();
        Gate { name: name.to_owned(), hit, release }
    }

    async fn wait_hit(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            match self.hit.try_recv() {
                Ok(()) => return,
                Err(mpsc::TryRecvError::Empty) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Err(e) => panic!("fail point not reached: {e}"),
            }
        }
    }

    /// Lets the held call go on; later calls pass the point freely.
    fn open(self) {
        fail::remove(&self.name);
        drop(self.release);
    }
}

fn options(dir: &std::path::Path) -> Options {
    let mut options = Options::single_node(dir.to_owned(), 1);
    options.advertised_address = "127.0.0.1:1".to_owned();
    options
}

async fn open(options: &Options) -> (Log, TaskTracker, CancellationToken) {
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let node =
        when_unlocked(|| Log::open(options.clone(), |_| Machine::default(), &tracker, cancel.clone())).await.unwrap();
    (node, tracker, cancel)
}

async fn close(node: Log, tracker: TaskTracker, cancel: CancellationToken) {
    node.shutdown().await;
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
}

fn status(node: &Log, group: u32) -> GroupStatus {
    node.group_statuses().into_iter().find(|s| s.group == group).unwrap()
}

/// Case 1: after a restart, openraft names this node leader as soon as its
/// vote commits, before the entries the previous term committed are applied
/// again. Until an entry of its own term is applied, its state lacks effects
/// that are in the log, and it must not count as leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn case1_a_new_leader_leads_only_once_an_entry_of_its_term_is_applied() {
    let _serial = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let options = options(dir.path());
    let group = partition_group(0);
    let (node, tracker, cancel) = open(&options).await;
    node.wait_for_leaders(Duration::from_secs(10)).await.unwrap();
    for i in 0..20 {
        node.propose(group, Command::Invoke(vec![invoke(i)].into())).await.unwrap();
    }
    close(node, tracker, cancel).await;

    // As after a crash that lost the unflushed committed id and the state
    // applied since it was last made durable: the restart applies nothing
    // until the new term's first entry commits.
    std::fs::remove_dir_all(dir.path().join("state")).unwrap();
    {
        let db = when_unlocked(|| std::future::ready(sled::open(dir.path().join("log")))).await.unwrap();
        let meta = db.open_tree(format!("meta-{group}")).unwrap();
        meta.insert(b"committed", ferry_partition::wire::encode(&None::<LogId<NodeId>>)).unwrap();
        db.flush().unwrap();
    }

    let gate = Gate::install(&format!("apply-{group}"));
    let (node, tracker, cancel) = open(&options).await;
    gate.wait_hit().await;
    // Elected, its entries committed, none of them applied yet. The metrics
    // that say so may come a moment after apply started.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let held = loop {
        let held = status(&node, group);
        if (held.role, held.leader) == (Role::Leader, Some(1)) {
            break held;
        }
        assert!(tokio::time::Instant::now() < deadline, "never elected: {held:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(node.read_partition(0, |p| p.invocation_count()).unwrap(), 0);
    assert!(!node.is_leader(group), "leads before applying its term's first entry: {held:?}");

    gate.open();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !node.is_leader(group) {
        assert!(tokio::time::Instant::now() < deadline, "never led: {:?}", status(&node, group));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(node.read_partition(0, |p| p.invocation_count()).unwrap(), 20);
    close(node, tracker, cancel).await;
}

/// Case 2: a group whose storage fails stops for good. It must neither count
/// as leader (its frozen state would start attempts whose effects can never
/// be written) nor look retryable to proposers, and the node hears of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case2_a_group_that_hit_a_fatal_storage_error_does_not_lead() {
    let _serial = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let group = partition_group(0);
    let (node, tracker, cancel) = open(&options(dir.path())).await;
    node.wait_for_leaders(Duration::from_secs(10)).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !node.is_leader(group) {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    node.propose(group, Command::Invoke(vec![invoke(0)].into())).await.unwrap();

    fail::cfg(format!("log-append-{group}"), "return").unwrap();
    let err = node.propose(group, Command::Invoke(vec![invoke(1)].into())).await.unwrap_err();
    assert!(!err.is_retryable(), "a stopped group is not worth retrying: {err}");
    let reason = tokio::time::timeout(Duration::from_secs(10), node.failed()).await.expect("the node hears of it");
    assert!(reason.contains(&format!("group {group}")), "{reason}");
    assert!(!node.is_leader(group), "a stopped group leads nothing");
    // The other groups go on.
    assert!(node.is_leader(0));
    fail::remove(format!("log-append-{group}"));
    close(node, tracker, cancel).await;
}

fn log_id(term: u64, index: u64) -> LogId<NodeId> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

/// Case 5: a snapshot build takes its view of the state, then makes it
/// durable. A newer snapshot installed in between replaces the state; the
/// build still answers for its own view, and the group serves, and restarts
/// from, the installed state.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn case5_a_snapshot_build_held_across_an_install_leaves_the_installed_state() {
    let _serial = fail::FailScenario::setup();
    let tracker = TaskTracker::new();
    let open = |dir: &std::path::Path| {
        let db = sled::Config::new().path(dir.join("log")).open().unwrap();
        let flusher = Flusher::start(db.clone(), 64, &tracker, CancellationToken::new());
        let state = StateOptions { dir: dir.join("state"), cache_bytes: 1 << 20 };
        (db, flusher, state)
    };
    let dir = tempfile::tempdir().unwrap();
    let (db, flusher, state) = open(dir.path());
    let (_log, mut sm) = storage::open(&db, 1, Machine::default(), flusher.clone(), state.clone()).unwrap();
    let blank = |index| Entry { log_id: log_id(1, index), payload: EntryPayload::Blank };
    sm.apply((1..=3).map(blank).collect::<Vec<_>>()).await.unwrap();

    // The newer state, as its leader's snapshot of it.
    let leader_dir = tempfile::tempdir().unwrap();
    let (leader_db, leader_flusher, leader_state) = open(leader_dir.path());
    let (_leader_log, mut leader) =
        storage::open(&leader_db, 1, Machine::default(), leader_flusher, leader_state).unwrap();
    let invoke_entry =
        Entry { log_id: log_id(2, 10), payload: EntryPayload::Normal(Command::Invoke(vec![invoke(0)].into())) };
    leader.apply(vec![invoke_entry]).await.unwrap();
    let mut newer = leader.get_current_snapshot().await.unwrap().unwrap();

    let gate = Gate::install("snapshot-build-before-sync");
    let mut builder = sm.get_snapshot_builder().await;
    let build = tokio::spawn(async move { builder.build_snapshot().await });
    gate.wait_hit().await;

    let mut received = sm.begin_receiving_snapshot().await.unwrap();
    tokio::io::copy(&mut *newer.snapshot, &mut *received).await.unwrap();
    sm.install_snapshot(&newer.meta, received).await.unwrap();

    gate.open();
    let built = build.await.unwrap().unwrap();
    assert_eq!(built.meta.last_log_id, Some(log_id(1, 3)), "a build answers for its own view");
    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, newer.meta);
    assert_eq!(sm.read(|m, view| m.partition(view).invocation_count()).unwrap(), 1);
    drop((built, current, sm, _log));

    // And after a restart, the state is the installed one.
    let (_log, mut reopened) = storage::open(&db, 1, Machine::default(), flusher, state).unwrap();
    let (applied, _) = reopened.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(2, 10)));
    assert_eq!(reopened.read(|m, view| m.partition(view).invocation_count()).unwrap(), 1);
}

/// Case 6: a proposal forwarded to a leader that accepts the connection and
/// never answers fails at its deadline, so that whoever proposed it retries
/// (elsewhere, once leadership moves) instead of hanging for minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case6_a_proposal_forwarded_to_a_silent_leader_fails_at_its_deadline() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let held: Vec<_> = silent.incoming().collect();
        drop(held);
    });
    let channels = network::Channels::new(Default::default(), Duration::from_millis(25));
    let started = std::time::Instant::now();
    let command = Command::Invoke(vec![invoke(0)].into());
    let result = network::forward::<Machine>(&channels, 1, &addr, &command, Duration::from_millis(500)).await;
    assert!(result.is_err(), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
}

/// Case 6: an AppendEntries over the message limit asks openraft to send
/// fewer entries; one entry always goes (commands are bounded below it).
#[test]
fn case6_an_append_over_the_message_limit_is_split() {
    let max = ferry_log::MESSAGE_BYTES_MAX;
    assert_eq!(network::entries_that_fit(100, max / 2), None);
    assert_eq!(network::entries_that_fit(1, 2 * max), None, "a single entry is never split further");
    let fit = network::entries_that_fit(100, 2 * max).unwrap();
    assert!((1..50).contains(&fit), "{fit}");
    assert_eq!(network::entries_that_fit(2, 100 * max), Some(1));
    assert!(ferry_log::COMMAND_BYTES_MAX < max / 2);
}

/// Case 6: a command over the limit is refused with a clear error that is
/// not worth retrying, and the group goes on taking the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case6_a_command_over_the_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let group = partition_group(0);
    let (node, tracker, cancel) = open(&options(dir.path())).await;
    node.wait_for_leaders(Duration::from_secs(10)).await.unwrap();
    let mut big = invoke(0);
    big.payload = Bytes::from(vec![0u8; ferry_log::COMMAND_BYTES_MAX + 1]);
    let err = node.propose(group, Command::Invoke(vec![big].into())).await.unwrap_err();
    assert!(matches!(err, ferry_log::Error::TooLarge { .. }), "{err}");
    assert!(!err.is_retryable());
    node.propose(group, Command::Invoke(vec![invoke(1)].into())).await.unwrap();
    close(node, tracker, cancel).await;
}
