//! Partition state on disk, with real processes: object state larger than
//! the state cache survives a SIGKILL and is served right after the restart;
//! a follower that was down while its leaders purged their logs catches up
//! from snapshots streamed to it while calls go on, and ends with the same
//! state as its peers. Handlers that read state lazily, and objects whose
//! state is too large to send at each start, read it key by key.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use ferry_chaos_tests::{eventually, node_with_handlers, Broker, Cluster, Handlers, Node};
use serde_json::{json, Value};

const BLOBS: usize = 24;
const BLOB_BYTES: usize = 256 << 10;

/// The value kept under Blob key `key`: distinct per key.
fn blob(key: usize) -> String {
    format!("{key:04}-").repeat(BLOB_BYTES / 5 + 1)[..BLOB_BYTES].to_owned()
}

const JSON: [(&str, &str); 1] = [("content-type", "application/json")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_state_larger_than_the_cache_survives_a_sigkill() -> Result<()> {
    let broker = Broker::start().await?;
    let handlers = Handlers::start().await?;
    let dir = tempfile::tempdir()?;
    // 2 MiB of state cache for the whole node; six times that in object state.
    let config = [("FERRY_RAFT__STATE_CACHE_BYTES", "2097152")];
    let mut node = Node::start_configured(&dir.path().join("node"), &broker.bootstrap(), &config).await?;
    let (status, body) = node.post("/deployments", json!({ "uri": handlers.uri })).await?;
    assert_eq!(status, 201, "{body}");

    for key in 0..BLOBS {
        let value = Value::String(blob(key)).to_string();
        let (status, len) = node.ingress(&format!("/Blob/b{key}/put"), Some(&value), &JSON).await?;
        assert_eq!((status, len), (200, json!(BLOB_BYTES)), "put b{key}");
    }
    let state_dir = dir.path().join("node/state");
    let on_disk: u64 = std::fs::read_dir(&state_dir)?.map(|f| Ok(f?.metadata()?.len())).sum::<Result<u64>>()?;
    assert!(on_disk >= (BLOBS * BLOB_BYTES) as u64, "{on_disk} bytes of state on disk");

    node.kill().await;
    let killed = Instant::now();
    node.restart().await?;
    let (status, first) = node.ingress("/Blob/b0/get", Some(""), &[]).await?;
    println!("SIGKILL to the first call answered after the restart: {:?}", killed.elapsed());
    assert_eq!((status, first), (200, Value::String(blob(0))));
    for key in 1..BLOBS {
        let (status, value) = node.ingress(&format!("/Blob/b{key}/get"), Some(""), &[]).await?;
        assert_eq!(status, 200, "{value}");
        assert!(value == Value::String(blob(key)), "b{key} came back changed");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_handlers_and_large_objects_read_state_when_they_ask() -> Result<()> {
    let (_broker, _handlers, _dir, node) = node_with_handlers(&[]).await?;
    // `enableLazyState`: attempts start without the state.
    for n in 1..=3 {
        assert_eq!(node.ingress("/Lazy/k/add", Some(""), &[]).await?, (200, json!(n)));
    }
    assert_eq!(node.ingress("/Lazy/k/keys", Some(""), &[]).await?, (200, json!(["count"])));
    assert_eq!(node.ingress("/Lazy/other/keys", Some(""), &[]).await?, (200, json!([])));
    let lazy_reads = node.metric("ferry_invoker_lazy_state_reads_total").await?;
    assert!(lazy_reads >= 5.0, "{lazy_reads} lazy reads");

    // Over the eager limit (1 MiB): the start carries none of it.
    let big = "x".repeat(1_200_000);
    let value = Value::String(big.clone()).to_string();
    let (status, len) = node.ingress("/Blob/big/put", Some(&value), &JSON).await?;
    assert_eq!((status, len), (200, json!(big.len())));
    let (status, read) = node.ingress("/Blob/big/get", Some(""), &[]).await?;
    assert_eq!(status, 200);
    assert!(read == Value::String(big), "the large value came back changed");
    assert!(node.metric("ferry_invoker_lazy_state_reads_total").await? > lazy_reads, "the get read it lazily");
    Ok(())
}

const KEYS: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_the_purged_log_catches_up_from_a_snapshot_while_calls_go_on() -> Result<()> {
    let broker = Broker::start().await?;
    let handlers = Handlers::start().await?;
    let dir = tempfile::tempdir()?;
    // Snapshots every few entries, and few entries kept behind them: a node
    // that was down for a while can only catch up from a snapshot.
    let config = [("FERRY_RAFT__SNAPSHOT_ENTRIES_SINCE_LAST", "20"), ("FERRY_RAFT__ENTRIES_KEPT_AFTER_SNAPSHOT", "5")];
    let mut cluster = Cluster::start(dir.path(), 3, &broker.bootstrap(), &config).await?;
    cluster.wait_balanced(Duration::from_secs(60)).await?;
    let (status, body) = cluster.node(1).post("/deployments", json!({ "uri": handlers.uri })).await?;
    assert_eq!(status, 201, "{body}");

    // Calls to node 1 go on through everything below: (answered, failed).
    let (answered, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = Arc::new(AtomicBool::new(false));
    let calls = {
        let (answered, failed, stop) = (answered.clone(), failed.clone(), stop.clone());
        let url = format!("http://127.0.0.1:{}", cluster.node(1).ingress_port);
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
        tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let request = http.post(format!("{url}/Counter/k{}/add", n % KEYS)).body("{}").send();
                match request.await {
                    Ok(response) if response.status() == 200 => answered.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                n += 1;
            }
        })
    };
    let calls_past = |n: u64| {
        let answered = answered.clone();
        async move {
            eventually(Duration::from_secs(120), "calls to be answered", || async {
                Ok((answered.load(Ordering::Relaxed) >= n).then_some(()))
            })
            .await
        }
    };
    calls_past(100).await?;

    cluster.node_mut(3).kill().await;
    // Its peers go on, snapshot and purge their logs.
    let before = answered.load(Ordering::Relaxed);
    calls_past(before + 300).await?;
    cluster.node_mut(3).restart().await?;
    eventually(Duration::from_secs(120), "node 3 to install snapshots", || async {
        Ok((cluster.node(3).metric("ferry_log_snapshots_installed_total").await? > 0.0).then_some(()))
    })
    .await?;
    let before = answered.load(Ordering::Relaxed);
    calls_past(before + 100).await?;
    stop.store(true, Ordering::Relaxed);
    calls.await?;

    // Every group ends with the same state at the same index on all three.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let nodes = [
            cluster.node(1).state_digests().await?,
            cluster.node(2).state_digests().await?,
            cluster.node(3).state_digests().await?,
        ];
        if nodes[0].len() > 1 && nodes[0] == nodes[1] && nodes[1] == nodes[2] {
            break;
        }
        if Instant::now() >= deadline {
            let mut groups = Vec::new();
            for id in 1..=3 {
                groups.push(cluster.node(id).get("/cluster").await?["groups"].clone());
            }
            panic!("replica states differ: {nodes:?}\ngroups: {:#}", Value::Array(groups));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Every answered call counted once; a failed one at most once.
    let mut counted = 0;
    for key in 0..KEYS {
        let (status, counter) = cluster.node(3).ingress(&format!("/Counter/k{key}/get"), Some(""), &[]).await?;
        assert_eq!(status, 200, "{counter}");
        counted += counter["count"].as_u64().unwrap_or_default();
    }
    let (answered, failed) = (answered.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("{answered} calls answered, {failed} failed, {counted} counted");
    assert!(
        answered <= counted && counted <= answered + failed,
        "{answered} answered, {failed} failed, {counted} counted"
    );
    Ok(())
}
