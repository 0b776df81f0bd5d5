//! Three `ferry-server` processes on loopback form one cluster: a Raft group
//! per partition replicated on all three, any node accepting admin calls,
//! HTTP requests and Kafka records. While records flow, one node is
//! SIGKILLed and comes back with its data, another is SIGSTOPped for longer
//! than the election timeout, the third is cut off from its peers and
//! reconnected, and the broker is SIGKILLed and restarted with its data.
//!
//! The checker reads the history: the records in the topic, the HTTP calls
//! (acknowledged or unknown), the invocations the handlers saw and the state
//! read back. Afterwards every offset has exactly one invocation, each key's
//! state counts its records in offset order, the handlers saw exactly the
//! invocations the log holds, no journaled step ran again once its result
//! was committed, every call a handler made ran once with its result
//! returned to its caller once, and every node applied the same state.
//!
//! A failing run prints its seed; `CHAOS_SEED=<seed>` replays the same
//! schedule, and `CHAOS_ROUNDS=<n>` repeats the faults n times (a soak run;
//! CI runs one round).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use ferry_chaos_tests::{check_call_results, check_run_once, eventually, fanout_counts, Broker, Cluster, Handlers};
use rand::Rng;
use serde_json::{json, Value};

const TOPIC: &str = "events";
/// Records for `Once/run`, at a tenth of the rate of `TOPIC`: enough steps
/// in flight at every fault, without doubling the load of two cores.
const STEPS_TOPIC: &str = "steps";
const STEPS_CHUNK: usize = 5;
const PARTITIONS: i32 = 4;
const CHUNK: usize = 50;
const CHUNKS_MIN: usize = 30;
const KEYS: usize = 61;
const SESSION_TIMEOUT: Duration = Duration::from_secs(6);

/// How long the drain after the faults may go without one more invocation
/// completing.
const DRAIN_STALL_MAX: Duration = Duration::from_secs(120);

/// Every invocation of `subscription`, once there are `expected` and all are
/// completed, as `node` lists them. Listing them all is work for the node,
/// so it looks every few seconds; a backlog takes what time it needs, as long
/// as invocations keep completing.
async fn drained(cluster: &Cluster, node: u64, subscription: &str, expected: usize) -> Result<Vec<Value>> {
    let (mut most, mut since) = (0, tokio::time::Instant::now());
    loop {
        let all = cluster.node(node).invocations(&format!("subscription={subscription}")).await?;
        let completed = all.iter().filter(|inv| inv["status"] == "completed").count();
        if all.len() >= expected && completed == all.len() {
            return Ok(all);
        }
        if completed > most {
            (most, since) = (completed, tokio::time::Instant::now());
            println!("{subscription}: {completed} of {expected} invocations completed");
        } else if since.elapsed() > DRAIN_STALL_MAX {
            anyhow::bail!(
                "{subscription}: {completed} of {expected} invocations completed, none more for {DRAIN_STALL_MAX:?}"
            );
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_lose_and_double_nothing_under_faults() -> Result<()> {
    let mut rng = ferry_chaos_tests::seeded_rng()?;

    let dir = tempfile::tempdir()?;
    let broker_dir = dir.path().join("broker");
    std::fs::create_dir(&broker_dir)?;
    let mut broker = Broker::start_persistent(&broker_dir).await?;
    let handlers = Handlers::start().await?;
    let mut cluster = Cluster::start(dir.path(), 3, &broker.bootstrap(), &[]).await?;
    cluster.wait_balanced(Duration::from_secs(30)).await?;

    // Admin calls on any node, seen by every node.
    let (status, body) = cluster.node(2).post("/deployments", json!({ "uri": handlers.uri })).await?;
    assert_eq!(status, 201, "{body}");
    broker.create_topic(TOPIC, PARTITIONS).await?;
    let mut subscriptions = Vec::new();
    broker.create_topic(STEPS_TOPIC, PARTITIONS).await?;
    for (node, topic, sink) in [
        (3, TOPIC, "service://Counter/add"),
        (1, TOPIC, "service://Sink/handle"),
        (2, STEPS_TOPIC, "service://Once/run"),
        (3, STEPS_TOPIC, "service://Fanout/call"),
    ] {
        let (status, body) = cluster
            .node(node)
            .post(
                "/subscriptions",
                json!({"source": format!("kafka://my-cluster/{topic}"), "sink": sink,
                       "options": {"auto.offset.reset": "earliest", "session.timeout.ms": SESSION_TIMEOUT.as_millis().to_string(),
                                   "auto.commit.interval.ms": "200"}}),
            )
            .await?;
        assert_eq!(status, 201, "{body}");
        subscriptions.push(body["id"].as_str().context("id")?.to_owned());
    }
    for id in 1..=3 {
        eventually(Duration::from_secs(10), "the subscriptions on every node", || async {
            let listed = cluster.node(id).get("/subscriptions").await?;
            Ok((listed["subscriptions"].as_array().map_or(0, Vec::len) == 4).then_some(()))
        })
        .await?;
    }

    let faults_done = Arc::new(AtomicBool::new(false));
    let stop = faults_done.clone();
    let producing = broker.produce_until(TOPIC, CHUNK, KEYS, CHUNKS_MIN, stop.clone())?;
    let producing_steps = broker.produce_until(STEPS_TOPIC, STEPS_CHUNK, KEYS, CHUNKS_MIN, stop)?;

    // SIGKILL a node (the preferred leader of a third of the partitions) once
    // records flow, at a random point; it stays down past the consumer
    // session timeout, then restarts with its data.
    let rounds: usize = std::env::var("CHAOS_ROUNDS").map_or(Ok(1), |r| r.parse()).context("CHAOS_ROUNDS")?;
    let (mut survivor, mut killed) = (1, 1);
    // HTTP calls made during faults: (acknowledged, unknown).
    let mut http = (0u64, 0u64);
    for round in 0..rounds {
        let victim = rng.random_range(1..=3u64);
        eventually(Duration::from_secs(60), "records to be appended", || async {
            Ok((cluster.node(victim).metric("ferry_ingress_records_appended_total").await? > 0.0).then_some(()))
        })
        .await
        .with_context(|| format!("round {round}, node {victim}:\n{}", cluster.node(victim).log_tail()))?;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..1500))).await;
        cluster.node_mut(victim).kill().await;
        println!("round {round}: killed node {victim}");
        survivor = victim % 3 + 1;
        killed = victim;
        // HTTP on a survivor while the victim is down. An answer that never
        // came, or a 5xx, leaves the outcome unknown: the call may or may not
        // have been appended.
        match cluster.node(survivor).ingress("/Counter/http/add", Some(&format!(r#"{{"seq": {round}}}"#)), &[]).await {
            Ok((200, _)) => http.0 += 1,
            Ok((status, answer)) if status >= 500 => {
                println!("HTTP call unknown: {status} {answer}");
                http.1 += 1;
            }
            Ok((status, answer)) => panic!("HTTP call refused: {status} {answer}"),
            Err(e) => {
                println!("HTTP call unknown: {e}");
                http.1 += 1;
            }
        }
        tokio::time::sleep(SESSION_TIMEOUT + Duration::from_millis(rng.random_range(500..1500))).await;
        cluster.node_mut(victim).restart().await?;
        println!("restarted node {victim}");

        // SIGSTOP past the election timeout (but within the Kafka session).
        let paused = survivor;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..1000))).await;
        cluster.node(paused).pause().await?;
        println!("paused node {paused}");
        tokio::time::sleep(Duration::from_millis(rng.random_range(3000..4500))).await;
        cluster.node(paused).resume().await?;
        println!("resumed node {paused}");

        // Cut off from its peers, still reachable by Kafka and clients.
        let isolated = paused % 3 + 1;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..1000))).await;
        cluster.isolate(isolated);
        println!("cut node {isolated} off");
        tokio::time::sleep(Duration::from_millis(rng.random_range(3000..6000))).await;
        cluster.heal();
        println!("healed");

        // The broker dies and comes back with its data: consumers and the
        // producer reconnect, consumers resume from their committed offsets.
        // Records keep coming for a while after it, and the checker wants
        // every one of them invoked.
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..2000))).await;
        broker.restart().await?;
        println!("restarted the broker");
        tokio::time::sleep(Duration::from_millis(rng.random_range(2000..4000))).await;
    }
    faults_done.store(true, Ordering::Relaxed);
    let acknowledged = producing.await??;
    producing_steps.await??;
    // The history: what the topic holds. A send retried across the broker's
    // restart may have been written twice; each copy is its own offset.
    let records = broker.read_topic(TOPIC, PARTITIONS).await?;
    let produced: HashSet<(i64, i64)> = records.iter().map(|r| (i64::from(r.partition), r.offset)).collect();
    let missing: Vec<_> = acknowledged.iter().filter(|(p, o)| !produced.contains(&(i64::from(*p), *o))).collect();
    assert!(missing.is_empty(), "the broker lost acknowledged records: {missing:?}");
    println!("{} records acknowledged, {} in the topic", acknowledged.len(), records.len());

    let (subscriptions, steps_subscription, calls_subscription) =
        (&subscriptions[..2], &subscriptions[2], &subscriptions[3]);
    for sub in subscriptions {
        let invocations = drained(&cluster, survivor, sub, produced.len())
            .await
            .with_context(|| cluster.node(survivor).log_tail())?;
        let mut seen = HashSet::new();
        for inv in &invocations {
            let at = (inv["source"]["partition"].as_i64().unwrap(), inv["source"]["offset"].as_i64().unwrap());
            assert!(seen.insert(at), "offset {at:?} of {sub} was invoked twice");
        }
        assert_eq!(seen, produced, "subscription {sub}: every produced offset exactly once");
        assert!(invocations.iter().all(|inv| inv["completion_result"] == "success"));
        if sub == &subscriptions[1] {
            // The handler saw every invocation, and none that the log lacks.
            let recorded = std::fs::read_to_string(handlers.record_dir.path().join("sink.jsonl"))?;
            let seen: HashSet<String> = recorded
                .lines()
                .map(|line| Ok(serde_json::from_str::<serde_json::Value>(line)?["invocation_id"].to_string()))
                .collect::<Result<_>>()?;
            let logged: HashSet<String> = invocations.iter().map(|inv| inv["id"].to_string()).collect();
            assert_eq!(seen, logged, "Sink/handle saw other invocations than the log holds");
        }
    }

    // Every step record's invocation completes, and no journaled step ran
    // again once its result was committed.
    let step_records = broker.read_topic(STEPS_TOPIC, PARTITIONS).await?;
    let steps = step_records.len();
    drained(&cluster, survivor, steps_subscription, steps).await.with_context(|| cluster.node(survivor).log_tail())?;
    let once = std::fs::read_to_string(handlers.record_dir.path().join("once.jsonl"))?;
    let steps = check_run_once(&once)?;
    println!("{steps} journaled steps, none run again after its result was committed");

    // Every step record also made two calls, across partitions led by
    // different nodes: each callee ran once, and each result came back to
    // its caller alone.
    let callers = drained(&cluster, survivor, calls_subscription, step_records.len())
        .await
        .with_context(|| cluster.node(survivor).log_tail())?;
    let seqs = step_records
        .iter()
        .map(|r| serde_json::from_slice::<Value>(&r.payload)?["seq"].as_i64().context("seq"))
        .collect::<Result<Vec<_>>>()?;
    let expected = fanout_counts(seqs);
    for (key, calls) in &expected {
        let (status, counter) = cluster.node(killed).ingress(&format!("/Counter/{key}/get"), Some(""), &[]).await?;
        assert_eq!((status, &counter["count"]), (200, &json!(calls)), "{key}: {counter}");
    }
    check_call_results(cluster.node(survivor), &callers, &expected).await?;
    println!("{} calls, each made once with its result returned once", 2 * callers.len());

    // Acknowledged HTTP calls count; unknown ones may or may not.
    let (status, counter) = cluster.node(killed).ingress("/Counter/http/get", Some(""), &[]).await?;
    assert_eq!(status, 200, "{counter}");
    let count = counter["count"].as_u64().context("count")?;
    assert!((http.0..=http.0 + http.1).contains(&count), "http calls {http:?}, counted {count}");

    // Each key's state, read through the node that was killed, is what its
    // Counter holds if its records were handled once each in offset order:
    // the handler's own rule run over the topic.
    let mut expected: BTreeMap<String, (u64, u64, Option<i64>)> = BTreeMap::new();
    for record in &records {
        let key = String::from_utf8(record.key.clone().context("record without key")?)?;
        let seq = serde_json::from_slice::<Value>(&record.payload)?["seq"].as_i64().context("seq")?;
        let (count, out_of_order, last) = expected.entry(key).or_default();
        *count += 1;
        *out_of_order += u64::from(last.is_some_and(|last| seq <= last));
        *last = Some(seq);
    }
    assert_eq!(expected.len(), KEYS);
    for (key, (count, out_of_order, _)) in &expected {
        let (status, counter) = cluster.node(killed).ingress(&format!("/Counter/{key}/get"), Some(""), &[]).await?;
        assert_eq!(status, 200, "{counter}");
        assert_eq!(
            (&counter["count"], &counter["out_of_order"]),
            (&json!(count), &json!(out_of_order)),
            "{key}: {counter}"
        );
    }

    // Leaders were spread: more than one node ran attempts.
    let mut running = Vec::new();
    for id in 1..=3 {
        if cluster.node(id).metric("ferry_invoker_attempts_total").await? > 0.0 {
            running.push(id);
        }
    }
    assert!(running.len() >= 2, "only nodes {running:?} ran invocations");

    // Heartbeats of different groups to the same peer travelled together
    // (one per RPC would make the two counts equal).
    let node = cluster.node(survivor);
    let (heartbeats, rpcs) =
        (node.metric("ferry_raft_heartbeats_total").await?, node.metric("ferry_raft_heartbeat_rpcs_total").await?);
    println!("node {survivor}: {heartbeats} heartbeats in {rpcs} RPCs");
    assert!(rpcs > 0.0 && heartbeats > 1.2 * rpcs, "{heartbeats} heartbeats in {rpcs} RPCs");

    // Every node's replicas applied the same state: for each group, the
    // same digest at the same index on all three.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let groups = loop {
        let nodes = [
            cluster.node(1).state_digests().await?,
            cluster.node(2).state_digests().await?,
            cluster.node(3).state_digests().await?,
        ];
        if nodes[0] == nodes[1] && nodes[1] == nodes[2] {
            break nodes[0].clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "replica states differ: {nodes:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        groups.len() > 1 && groups.values().all(|(index, digest)| index.is_u64() && digest.is_string()),
        "{groups:?}"
    );
    Ok(())
}
