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
use ferry_chaos_tests::{eventually, Broker, Handlers, Node, Record};
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

/// Records whose invocation ends failed (a terminal error from the handler,
/// a key a Virtual Object cannot take) go to the subscription's dead-letter
/// topic once each, with their value, key and headers and why and where
/// from; records that succeed do not. The node is SIGKILLed while dead
/// letters are being produced: none is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_produced_once_per_failed_record_across_a_sigkill() -> Result<()> {
    const RECORDS: i64 = 300;
    const UNKEYED: i64 = 20;
    // Until the kill, every batch of dead letters is produced and then its
    // truncation is lost, as if the node had failed in between: the node
    // reads the topic back before each next batch, and after the restart.
    let failpoints = [("FAILPOINTS", "egress-truncate=return")];
    let (broker, _handlers, _dir, mut node) = ferry_chaos_tests::node_with_handlers(&failpoints).await?;
    for (topic, partitions) in [("work", 2), ("unkeyed", 1), ("dead", 2)] {
        broker.create_topic(topic, partitions).await?;
    }
    let subscribe = |topic: &str, sink: &str, extra: Value| {
        let mut options = json!({"auto.offset.reset": "earliest", "ferry.dead-letter.topic": "dead",
                                 "session.timeout.ms": SESSION_TIMEOUT.as_millis().to_string()});
        for (key, value) in extra.as_object().into_iter().flatten() {
            options[key] = value.clone();
        }
        let body = json!({"source": format!("kafka://my-cluster/{topic}"), "sink": sink, "options": options});
        let node = &node;
        async move { node.post("/subscriptions", body).await }
    };
    // Refused: a topic or cluster that does not exist, a cluster without a topic.
    let (status, body) =
        subscribe("work", "service://Sink/handle", json!({"ferry.dead-letter.topic": "nowhere"})).await?;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("ferry.dead-letter.topic"), "{body}");
    let (status, body) =
        subscribe("work", "service://Sink/handle", json!({"ferry.dead-letter.cluster": "other"})).await?;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("unknown Kafka cluster \\\"other\\\""), "{body}");

    // Every fifth record fails; records run one at a time per partition, so
    // dead letters keep coming while the node is killed.
    let (status, body) = subscribe("work", "service://Sink/handle", json!({"ferry.ordering": "partition"})).await?;
    assert_eq!(status, 201, "{body}");
    let (status, body) = subscribe("unkeyed", "service://Counter/add", json!({})).await?;
    assert_eq!(status, 201, "{body}");
    let records: Vec<Record> = (0..RECORDS)
        .map(|i| {
            let mut payload = json!({"seq": i, "hold_ms": 10});
            if i % 5 == 0 {
                payload["fail"] = json!(format!("record {i} is bad"));
            }
            Record {
                key: Some(format!("k{i}").into_bytes()),
                payload: payload.to_string().into_bytes(),
                headers: vec![("origin".to_owned(), format!("test-{i}"))],
            }
        })
        .collect();
    let producer = broker.producer()?;
    let produced = ferry_chaos_tests::produce(&producer, "work", &records).await?;
    let unkeyed: Vec<Record> = (0..UNKEYED)
        .map(|i| Record { key: None, payload: json!({"seq": i}).to_string().into_bytes(), headers: vec![] })
        .collect();
    ferry_chaos_tests::produce(&producer, "unkeyed", &unkeyed).await?;

    eventually(Duration::from_secs(60), "dead letters, some found already produced", || async {
        let produced = node.metric("ferry_egress_records_total").await?;
        let skipped = node.metric("ferry_egress_records_skipped_total").await?;
        Ok((produced >= 5.0 && skipped > 0.0).then_some(()))
    })
    .await?;
    node.kill().await;
    tokio::time::sleep(SESSION_TIMEOUT + Duration::from_secs(1)).await;
    node.set_env("FAILPOINTS", "egress-truncate=off");
    node.restart().await?;

    let expected: HashSet<(String, i64)> = produced
        .iter()
        .zip(0..)
        .filter(|(_, i)| i % 5 == 0)
        .map(|((partition, offset), _)| (format!("work/{partition}"), *offset))
        .chain((0..UNKEYED).map(|offset| ("unkeyed/0".to_owned(), offset)))
        .collect();
    let dead = eventually(Duration::from_secs(120), "a dead letter for each failed record", || async {
        let dead = broker.read_topic("dead", 2).await?;
        Ok((dead.len() >= expected.len()).then_some(dead))
    })
    .await?;
    // Nothing more comes once the egress is empty.
    eventually(Duration::from_secs(60), "the egress to be empty", || async {
        Ok((node.metric("ferry_egress_pending").await? == 0.0).then_some(()))
    })
    .await?;
    let dead = if dead.len() == expected.len() { broker.read_topic("dead", 2).await? } else { dead };
    for line in node.log().lines().filter(|l| l.contains("egress")) {
        eprintln!("EGRESS {line}");
    }
    for r in &dead {
        eprintln!(
            "DEAD {} {} {:?} {:?}",
            r.partition,
            r.offset,
            r.header("ferry.dead-letter.offset"),
            r.header("ferry.egress.id")
        );
    }
    let mut seen = HashSet::new();
    for record in &dead {
        let header = |name: &str| record.header(name).with_context(|| format!("{name} in {:?}", record.headers));
        let source = (
            format!("{}/{}", header("ferry.dead-letter.topic")?, header("ferry.dead-letter.partition")?),
            header("ferry.dead-letter.offset")?.parse::<i64>()?,
        );
        assert!(seen.insert(source.clone()), "{source:?} twice in the dead-letter topic");
        assert!(expected.contains(&source), "{source:?} did not fail");
        assert!(header("ferry.dead-letter.subscription")?.starts_with("sub_"));
        header("ferry.dead-letter.invocation")?;
        if source.0.starts_with("work/") {
            let payload: Value = serde_json::from_slice(&record.payload)?;
            let seq = payload["seq"].as_i64().context("seq")?;
            assert_eq!(header("ferry.dead-letter.reason")?, format!("record {seq} is bad"));
            assert_eq!(header("ferry.dead-letter.code")?, "422");
            assert_eq!(header("origin")?, format!("test-{seq}"), "the record's own headers");
            assert_eq!(record.key.as_deref(), Some(format!("k{seq}").as_bytes()));
        } else {
            assert!(header("ferry.dead-letter.reason")?.contains("needs one"), "{:?}", record.headers);
            assert_eq!(record.key, None);
        }
    }
    assert_eq!(seen.len(), expected.len(), "{} dead letters for {} failed records", seen.len(), expected.len());
    let skipped = node.metric("ferry_egress_records_skipped_total").await?;
    assert!(skipped > 0.0, "the restarted node found what was produced before the kill");
    Ok(())
}
