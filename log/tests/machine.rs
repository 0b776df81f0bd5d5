//! The log is generic over what it replicates: a small register machine of
//! its own (one table of named values, a resident count of writes) runs on a
//! node's groups, answers its proposals, survives a restart, and digests the
//! same on every group that applied the same commands.

// Not every test uses every helper.
#[allow(dead_code)]
mod common;

use std::ops::{Bound, ControlFlow};

use common::when_unlocked;
use ferry_log::{partition_group, LogNode, Options, StateMachine, METADATA_GROUP};
use ferry_store::{Store, StoreError, StoreRead, TableSet};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Values;

impl TableSet for Values {
    const ALL: &'static [Values] = &[Values];

    fn index(self) -> usize {
        0
    }

    fn name(self) -> &'static str {
        "values"
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Command {
    Set {
        name: String,
        value: u64,
    },
    /// Adds to a value, answering the sum.
    Add {
        name: String,
        value: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Response {
    Empty,
    Value(u64),
}

/// How many writes the group has applied.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Writes(u64);

struct Registers;

fn value(store: &(impl StoreRead<Values> + ?Sized), name: &str) -> Result<u64, StoreError> {
    let bytes = store.get(Values, name.as_bytes())?;
    Ok(bytes.map_or(0, |b| u64::from_be_bytes(b.try_into().expect("8 bytes"))))
}

impl StateMachine for Registers {
    const DATA_FORMAT: u32 = 1;

    type Command = Command;
    type Response = Response;
    type Resident = Writes;
    type Tables = Values;

    fn apply<S: Store<Values> + ?Sized>(
        &self,
        store: &mut S,
        writes: &mut Writes,
        command: Command,
    ) -> Result<Response, StoreError> {
        writes.0 += 1;
        let (name, value) = match command {
            Command::Set { name, value } => (name, value),
            Command::Add { name, value: add } => {
                let sum = value(store, &name)? + add;
                (name, sum)
            }
        };
        store.put(Values, name.as_bytes(), &value.to_be_bytes())?;
        Ok(Response::Value(value))
    }

    fn changes_resident(_: &Command) -> bool {
        true
    }

    fn empty_response() -> Response {
        Response::Empty
    }

    fn digest<S: StoreRead<Values> + ?Sized>(&self, view: &S, writes: &Writes) -> Result<u128, StoreError> {
        let mut digest = u128::from(writes.0);
        view.scan(Values, Bound::Unbounded, Bound::Unbounded, &mut |key, value| {
            for byte in key.iter().chain(value) {
                digest = digest.wrapping_mul(31).wrapping_add(u128::from(*byte));
            }
            ControlFlow::Continue(())
        })?;
        Ok(digest)
    }

    fn busy<S: StoreRead<Values> + ?Sized>(&self, _: &S) -> Result<bool, StoreError> {
        Ok(false)
    }
}

async fn open(options: &Options) -> (LogNode<Registers>, TaskTracker, CancellationToken) {
    let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
    let node = when_unlocked(|| LogNode::open(options.clone(), |_| Registers, &tracker, cancel.clone())).await.unwrap();
    node.wait_for_leaders(std::time::Duration::from_secs(10)).await.unwrap();
    (node, tracker, cancel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_of_its_own_is_replicated_applied_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = Options::single_node(dir.path().to_owned(), 2);
    options.advertised_address = "127.0.0.1:1".to_owned();
    let (a, b) = (partition_group(0), partition_group(1));

    let (node, tracker, cancel) = open(&options).await;
    for (group, name) in [(a, "x"), (b, "x"), (METADATA_GROUP, "y")] {
        let set = node.propose(group, Command::Set { name: name.to_owned(), value: 40 }).await.unwrap();
        assert_eq!(set, Response::Value(40));
    }
    let sum = node.propose(a, Command::Add { name: "x".to_owned(), value: 2 }).await.unwrap();
    assert_eq!(sum, Response::Value(42));
    assert_eq!(node.read(a, |_, view| value(view, "x")).unwrap(), 42);
    assert_eq!(node.read_resident(a, |writes| writes.0).unwrap(), 2);
    let digests = node.state_digests();
    assert_ne!(digests[&a].digest, digests[&b].digest, "different commands, different states");
    node.shutdown().await;
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    drop(node);

    let (node, tracker, cancel) = open(&options).await;
    assert_eq!(node.read(a, |_, view| value(view, "x")).unwrap(), 42, "the state is read back from disk");
    assert_eq!(node.read_resident(a, |writes| writes.0).unwrap(), 2);
    assert_eq!(node.state_digests()[&a].digest, digests[&a].digest);
    // The same commands on group b make the same state as on group a.
    node.propose(b, Command::Add { name: "x".to_owned(), value: 2 }).await.unwrap();
    let after = node.state_digests();
    assert_eq!(after[&b].digest, after[&a].digest);
    node.shutdown().await;
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
}
