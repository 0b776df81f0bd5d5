//! SIGKILL a node at random points while records flow and handlers run:
//! afterwards every offset has exactly one invocation, each Virtual Object
//! key's state counts its records exactly once and in order, a journaled
//! `ctx.run` never ran again, and Kafka's committed offsets never ran ahead of
//! the log. A failing run prints its seed; `CHAOS_SEED=<seed>` replays the
//! same kill schedule.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use ferry_chaos_tests::{eventually, Broker, Handlers, Node};
use rand::Rng;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};

const TOPIC: &str = "events";
const PARTITIONS: i32 = 4;
/// Records are produced in chunks until the kills are over, and at least this many chunks.
const CHUNKS_MIN: usize = 40;
const CHUNK: usize = 50;
const KILLS: usize = 3;
const KEYS: usize = 97;
const SESSION_TIMEOUT: Duration = Duration::from_secs(6);

/// `Flaky/run` appends a line inside `ctx.run` and returns the time it wrote.
/// Runs cut short by a kill before their result was journaled may have
/// happened too, but the journaled one is the last: nothing ran after it.
async fn journaled_runs_never_ran_again(node: &Node, handlers: &Handlers, invocations: &[Value]) -> Result<()> {
    let lines = std::fs::read_to_string(handlers.record_dir.path().join("flaky.jsonl"))?;
    let mut runs: HashMap<String, Vec<u64>> = HashMap::new();
    for line in lines.lines() {
        let run: Value = serde_json::from_str(line)?;
        runs.entry(run["invocation_id"].as_str().unwrap().to_owned()).or_default().push(run["ts_ms"].as_u64().unwrap());
    }
    let mut reran = 0;
    for inv in invocations {
        let id = inv["id"].as_str().unwrap();
        let (status, output) = node.ingress(&format!("/restate/invocation/{id}/output"), None, &[]).await?;
        assert_eq!(status, 200, "{output}");
        let output = output.as_str().unwrap_or_default();
        let journaled: u64 = output.rsplit("at ").next().and_then(|t| t.trim_end_matches(')').parse().ok()).unwrap();
        let times = runs.get(id).unwrap_or_else(|| panic!("{id} never ran its side effect"));
        assert_eq!(times.iter().filter(|&&t| t == journaled).count(), 1, "{id}: {times:?} vs {journaled}");
        assert!(times.iter().all(|&t| t <= journaled), "{id} ran again after its run was journaled: {times:?}");
        reran += times.len() - 1;
    }
    println!("{reran} side effects ran again before their first result was journaled");
    Ok(())
}

/// The offsets committed to Kafka for `group`, per partition.
fn committed(broker: &Broker, group: &str) -> Result<BTreeMap<i32, i64>> {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", broker.bootstrap()).set("group.id", group).create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(TOPIC, p);
    }
    let offsets = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok(offsets
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_and_doubles_nothing() -> Result<()> {
    let mut rng = ferry_chaos_tests::seeded_rng()?;

    let broker = Broker::start().await?;
    let handlers = Handlers::start().await?;
    let dir = tempfile::tempdir()?;
    let mut node = Node::start(&dir.path().join("node"), &broker).await?;
    let (status, body) = node.post("/deployments", json!({ "uri": handlers.uri })).await?;
    assert_eq!(status, 201, "{body}");
    broker.create_topic(TOPIC, PARTITIONS).await?;
    let mut subscriptions = Vec::new();
    for sink in ["service://Counter/add", "service://Sink/handle", "service://Flaky/run"] {
        let (status, body) = node
            .post(
                "/subscriptions",
                json!({"source": format!("kafka://my-cluster/{TOPIC}"), "sink": sink,
                       "options": {"auto.offset.reset": "earliest", "session.timeout.ms": SESSION_TIMEOUT.as_millis().to_string(),
                                   "auto.commit.interval.ms": "200"}}),
            )
            .await?;
        assert_eq!(status, 201, "{body}");
        subscriptions.push(body["id"].as_str().unwrap().to_owned());
    }

    let kills_done = Arc::new(AtomicBool::new(false));
    let stop = kills_done.clone();
    let producing = broker.produce_until(TOPIC, CHUNK, KEYS, CHUNKS_MIN, stop)?;

    let mut snapshots: Vec<BTreeMap<String, BTreeMap<i32, i64>>> = Vec::new();
    for kill in 0..KILLS {
        // Kill while records flow: once this process has appended some, at a
        // random point after that.
        eventually(Duration::from_secs(60), "the node to append records", || async {
            Ok((node.metric("ferry_ingress_records_appended_total").await? > 0.0).then_some(()))
        })
        .await?;
        let delay = Duration::from_millis(rng.random_range(0..1500));
        tokio::time::sleep(delay).await;
        node.kill().await;
        let mut snapshot = BTreeMap::new();
        for sub in &subscriptions {
            snapshot.insert(sub.clone(), committed(&broker, sub)?);
        }
        println!("kill {kill} after {delay:?}: committed {snapshot:?}");
        snapshots.push(snapshot);
        // Stay down until the broker has expired the dead consumers: tansu 0.6
        // never hands a dead member's partitions to a member that joined
        // while it was still in the group.
        tokio::time::sleep(SESSION_TIMEOUT + Duration::from_millis(rng.random_range(500..1500))).await;
        node.restart().await?;
    }
    kills_done.store(true, Ordering::Relaxed);
    let produced = producing.await??;
    assert!(produced.len() >= CHUNKS_MIN * CHUNK);
    let produced: HashSet<(i64, i64)> = produced.into_iter().map(|(p, o)| (p as i64, o)).collect();

    for sub in &subscriptions {
        let invocations = eventually(Duration::from_secs(300), "every record's invocation to complete", || async {
            let all = node.invocations(&format!("subscription={sub}")).await?;
            Ok((all.len() >= produced.len() && all.iter().all(|inv| inv["status"] == "completed")).then_some(all))
        })
        .await
        .with_context(|| node.log_tail())?;
        let mut seen = HashSet::new();
        for inv in &invocations {
            let at = (inv["source"]["partition"].as_i64().unwrap(), inv["source"]["offset"].as_i64().unwrap());
            assert!(seen.insert(at), "offset {at:?} of {sub} was invoked twice");
            assert!(produced.contains(&at), "invocation of an offset never produced: {at:?}");
        }
        assert_eq!(seen, produced, "subscription {sub}: every produced offset exactly once");
        for inv in &invocations {
            assert_eq!(inv["completion_result"], "success", "{inv}");
        }
        if sub == &subscriptions[2] {
            journaled_runs_never_ran_again(&node, &handlers, &invocations).await?;
        }
    }

    // Each key's state counts its records once each, in offset order.
    let mut per_key = vec![0u64; KEYS];
    for n in 0..produced.len() {
        per_key[n % KEYS] += 1;
    }
    for (k, &records) in per_key.iter().enumerate() {
        let (status, counter) = node.ingress(&format!("/Counter/k{k}/get"), Some(""), &[]).await?;
        assert_eq!(status, 200, "{counter}");
        assert_eq!(counter["count"], records, "k{k}: {counter}");
        assert_eq!(counter["out_of_order"], 0, "k{k}: {counter}");
    }

    // Committed offsets only move forward, and everything below them was in
    // the log when the node died: none of it is read again after a restart,
    // so the complete set of invocations above proves it was durable.
    for sub in &subscriptions {
        let mut last: BTreeMap<i32, i64> = BTreeMap::new();
        for snapshot in &snapshots {
            for (&p, &o) in &snapshot[sub] {
                let previous = last.insert(p, o).unwrap_or(0);
                assert!(o >= previous, "{sub} partition {p}: committed offset went back from {previous} to {o}");
            }
        }
    }
    // With the log caught up, the committed offsets reach the end of the topic.
    let mut ends = BTreeMap::new();
    for &(p, o) in &produced {
        let end = ends.entry(p as i32).or_insert(0);
        *end = (*end).max(o + 1);
    }
    for sub in &subscriptions {
        eventually(Duration::from_secs(60), "offsets committed to the end", || async {
            Ok((committed(&broker, sub)? == ends).then_some(()))
        })
        .await?;
    }
    Ok(())
}
