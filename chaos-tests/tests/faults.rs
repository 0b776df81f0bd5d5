//! Faults injected into real nodes at exact points (the `FAILPOINTS` of the
//! test build of `ferry-server`): panics in long-lived tasks, a Raft
//! partition that takes no appends. Each test is named after the case of
//! the exactly-once work it guards.

use std::time::Duration;

use anyhow::{Context, Result};
use ferry_chaos_tests::{
    check_run_once, eventually, node_with_handlers, produce, Broker, Cluster, Handlers, Node, Record,
};
use ferry_partition::partitioner::{key_hash, partition_of};
use rdkafka::producer::FutureRecord;
use serde_json::{json, Value};

/// A broker, the test handlers and one node configured with `config`, the
/// handlers registered.
async fn count(node: &Node, key: &str) -> Result<u64> {
    let (status, counter) = node.ingress(&format!("/Counter/{key}/get"), Some(""), &[]).await?;
    anyhow::ensure!(status == 200, "get {key}: {status} {counter}");
    counter["count"].as_u64().context("count")
}

/// Case 12: an attempt that panics counts as a failed attempt and is
/// retried; it does not keep its slot with nothing running in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case12_a_panicking_attempt_is_retried() -> Result<()> {
    let config = [
        ("FAILPOINTS", "invoker-attempt=1*panic"),
        ("FERRY_INVOCATION__DEFAULT_RETRY_POLICY__INITIAL_INTERVAL", "100ms"),
    ];
    let (_broker, _handlers, _dir, node) = node_with_handlers(&config).await?;
    let call = node.ingress("/Counter/k/add", Some(r#"{"seq": 1}"#), &[]);
    let (status, body) =
        tokio::time::timeout(Duration::from_secs(30), call).await.context("the call never ended")??;
    assert_eq!((status, body), (200, json!(1)));
    assert_eq!(node.metric("ferry_invoker_attempt_panics_total").await?, 1.0);
    Ok(())
}

/// Case 12: a Kafka partition worker that panics takes its subscription down
/// and the subscription starts again: every record is still invoked once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case12_a_panicking_partition_worker_restarts_its_subscription() -> Result<()> {
    let (broker, _handlers, _dir, node) =
        node_with_handlers(&[("FAILPOINTS", "ingress-partition-worker=1*panic")]).await?;
    broker.create_topic("t", 1).await?;
    node.subscribe_from_start("t", "service://Counter/add").await?;
    let key = "k".to_owned();
    let records: Vec<Record> = (0..50)
        .map(|seq| Record {
            key: Some(key.clone().into_bytes()),
            payload: json!({ "seq": seq }).to_string().into_bytes(),
            headers: vec![],
        })
        .collect();
    produce(&broker.producer()?, "t", &records).await?;
    eventually(Duration::from_secs(60), "every record counted", || async {
        Ok((count(&node, &key).await? == 50).then_some(()))
    })
    .await?;
    assert_eq!(node.metric("ferry_ingress_subscription_restarts_total").await?, 1.0);
    // Counted once each, even though the restart read some of them again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(count(&node, &key).await?, 50);
    Ok(())
}

/// Case 12: if the Kafka ingress itself fails, the node goes down loudly
/// instead of serving on without consuming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case12_a_failed_ingress_takes_the_node_down() -> Result<()> {
    let broker = Broker::start().await?;
    let dir = tempfile::tempdir()?;
    let (base_dir, bootstrap) = (dir.path().join("node"), broker.bootstrap());
    let started = Node::start_configured(&base_dir, &bootstrap, &[("FAILPOINTS", "kafka-ingress=panic")]);
    let err = match started.await {
        Ok(mut node) => {
            // It may have answered its health check first: it must exit anyway.
            let status =
                tokio::time::timeout(Duration::from_secs(30), node.wait_exit()).await.context("still running")??;
            assert!(!status.success(), "{status:?}");
            node.log_tail()
        }
        Err(e) => e.to_string(),
    };
    assert!(err.contains("the Kafka ingress ended: it panicked"), "{err}");
    Ok(())
}

/// A key of `Counter` whose invocations live in Raft partition `partition` of `partitions`.
fn key_in(partition: u32, partitions: u32, prefix: &str) -> String {
    (0..)
        .map(|n| format!("{prefix}{n}"))
        .find(|k| partition_of(key_hash("Counter", k), partitions) == partition)
        .unwrap()
}

/// Case 9: one Raft partition that takes no appends holds up only the Kafka
/// partitions whose records go there; the subscription's other Kafka
/// partitions go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case9_a_stalled_raft_partition_does_not_stall_other_kafka_partitions() -> Result<()> {
    let config = [
        ("FERRY_PARTITIONS", "2"),
        ("FERRY_INGRESS__KAFKA__BATCH_RECORDS_MAX", "4"),
        ("FERRY_INGRESS__KAFKA__BUFFER_RECORDS_MAX", "8"),
        ("FAILPOINTS", "ingress-append-0=return"),
    ];
    let (broker, _handlers, _dir, node) = node_with_handlers(&config).await?;
    broker.create_topic("t", 2).await?;
    node.subscribe_from_start("t", "service://Counter/add").await?;
    let (stuck, free) = (key_in(0, 2, "stuck-"), key_in(1, 2, "free-"));
    let producer = broker.producer()?;
    let send = |partition: i32, key: String, n: usize| {
        let producer = producer.clone();
        async move {
            for seq in 0..n {
                let payload = json!({ "seq": seq }).to_string();
                let record = FutureRecord::to("t").partition(partition).key(key.as_bytes()).payload(payload.as_bytes());
                producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e)?;
            }
            anyhow::Ok(())
        }
    };
    // Far more than Kafka partition 0's worker can hold while its appends fail.
    send(0, stuck.clone(), 100).await?;
    eventually(Duration::from_secs(60), "the stuck partition's worker full", || async {
        Ok((node.metric("ferry_ingress_records_consumed_total").await? >= 13.0).then_some(()))
    })
    .await?;
    send(1, free.clone(), 10).await?;
    eventually(Duration::from_secs(60), "the free partition's records invoked", || async {
        Ok((count(&node, &free).await? == 10).then_some(()))
    })
    .await?;
    assert_eq!(count(&node, &stuck).await?, 0, "appends to Raft partition 0 fail");
    Ok(())
}

/// Case 9: a Kafka partition held back while its worker is full goes on
/// from the next record when released, losing and repeating nothing, also
/// when the broker stores its records in batches of thousands (where a
/// consumer that fetches again from inside a batch loses the rest of it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case9_a_partition_held_back_goes_on_from_the_next_record() -> Result<()> {
    const N: usize = 20_000;
    let config =
        [("FERRY_INGRESS__KAFKA__BATCH_RECORDS_MAX", "16"), ("FERRY_INGRESS__KAFKA__BUFFER_RECORDS_MAX", "32")];
    let (broker, _handlers, _dir, node) = node_with_handlers(&config).await?;
    broker.create_topic("backlog", 2).await?;
    broker.produce_backlog("backlog", N, 100).await?;
    let sub = node.subscribe_from_start("backlog", "service://Sink/handle").await?;
    let appended = eventually(Duration::from_secs(240), "every record appended", || async {
        let appended = node.metric("ferry_ingress_records_appended_total").await?;
        Ok((appended >= N as f64).then_some(appended))
    })
    .await;
    let consumed = node.metric("ferry_ingress_records_consumed_total").await?;
    let deduplicated = node.metric("ferry_ingress_records_deduplicated_total").await?;
    let appended =
        appended.with_context(|| format!("consumed {consumed}, deduplicated {deduplicated}\n{}", node.log_tail()))?;
    assert_eq!(appended, N as f64);
    let holds = node.metric("ferry_ingress_partition_holds_total").await?;
    assert!(holds > 0.0, "the workers were never full: the test shows nothing");
    assert_eq!((consumed, deduplicated), (N as f64, 0.0), "no record is read twice");
    let invocations = node.invocations(&format!("subscription={sub}")).await?;
    let offsets: std::collections::BTreeSet<(i64, i64)> = invocations
        .iter()
        .map(|inv| (inv["source"]["partition"].as_i64().unwrap(), inv["source"]["offset"].as_i64().unwrap()))
        .collect();
    assert_eq!((invocations.len(), offsets.len()), (N, N), "one invocation per offset");
    println!("{N} records, {holds} holds");
    Ok(())
}

/// The leader of `group` as node `node` sees it.
async fn leader_of(cluster: &Cluster, node: u64, group: u64) -> Result<Option<u64>> {
    let groups = cluster.node(node).get("/cluster").await?["groups"].as_array().cloned().context("groups")?;
    Ok(groups.iter().find(|g| g["group"] == group).and_then(|g| g["leader"].as_u64()))
}

/// [`cluster_with_a_partition_of_node_1`] for `Once`, with node 1 restarted
/// under `failpoints` and leading its partition again.
async fn once_on_node_1_with_failpoints(
    failpoints: &str,
) -> Result<(Broker, Handlers, tempfile::TempDir, Cluster, u64, String)> {
    let (broker, handlers, dir, mut cluster, group, key) = cluster_with_a_partition_of_node_1(&[], "Once").await?;
    cluster.node_mut(1).set_env("FAILPOINTS", failpoints);
    cluster.node_mut(1).restart().await?;
    eventually(Duration::from_secs(60), "node 1 to lead again", || async {
        Ok((leader_of(&cluster, 1, group).await? == Some(1)).then_some(()))
    })
    .await?;
    Ok((broker, handlers, dir, cluster, group, key))
}

/// A broker, the test handlers and a balanced three-node cluster configured
/// with `config`, the handlers registered; with a partition node 1 leads (as
/// its preferred leader), its group, and an idempotency key of `service`
/// whose invocations live there.
async fn cluster_with_a_partition_of_node_1(
    config: &[(&str, &str)],
    service: &str,
) -> Result<(Broker, Handlers, tempfile::TempDir, Cluster, u64, String)> {
    let (broker, handlers, dir) = (Broker::start().await?, Handlers::start().await?, tempfile::tempdir()?);
    let cluster = Cluster::start(dir.path(), 3, &broker.bootstrap(), config).await?;
    cluster.wait_balanced(Duration::from_secs(60)).await?;
    let (status, body) = cluster.node(2).post("/deployments", json!({ "uri": handlers.uri })).await?;
    anyhow::ensure!(status == 201, "register: {status} {body}");
    let groups = cluster.node(1).get("/cluster").await?["groups"].as_array().cloned().context("groups")?;
    let partitions = groups.iter().filter(|g| g["partition"].is_u64()).count() as u32;
    let partition = groups
        .iter()
        .find(|g| g["leader"] == 1 && g["partition"].is_u64())
        .and_then(|g| g["partition"].as_u64())
        .context("node 1 leads no partition")? as u32;
    let key = (0..)
        .map(|n| format!("key-{n}"))
        .find(|k| partition_of(key_hash(service, k), partitions) == partition)
        .unwrap();
    Ok((broker, handlers, dir, cluster, u64::from(partition) + 1, key))
}

/// Case 7: a preferred leader that comes back takes its partitions back only
/// while no attempt runs there. A handler may work for seconds without
/// writing to the log; moving leadership meanwhile would abort its attempt
/// and run it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case7_leadership_does_not_move_back_while_an_attempt_runs() -> Result<()> {
    let (_broker, handlers, _dir, mut cluster, group, key) = cluster_with_a_partition_of_node_1(&[], "Slow").await?;

    cluster.node_mut(1).kill().await;
    eventually(Duration::from_secs(30), "another leader", || async {
        Ok(leader_of(&cluster, 2, group).await?.filter(|&leader| leader != 1).map(|_| ()))
    })
    .await?;
    cluster.node_mut(1).restart().await?;

    // Eight seconds of work without a write: far past the two idle seconds
    // after which node 1 would take the partition back.
    let headers = [("idempotency-key", key.as_str())];
    let call = cluster.node(2).ingress("/Slow/run", Some("8000"), &headers);
    let (status, answer) = tokio::time::timeout(Duration::from_secs(60), call).await.context("no answer")??;
    assert_eq!((status, &answer), (200, &json!("done")));
    let attempts = std::fs::read_to_string(handlers.record_dir.path().join("slow.jsonl"))?;
    assert_eq!(attempts.lines().count(), 1, "the attempt was cut short and run again:\n{attempts}");
    // Once idle, the partition goes back to node 1.
    eventually(Duration::from_secs(30), "node 1 to lead again", || async {
        Ok((leader_of(&cluster, 1, group).await? == Some(1)).then_some(()))
    })
    .await?;
    Ok(())
}

/// `n` records for `Counter/add` under `key`.
fn counter_records(key: &str, n: usize) -> Vec<Record> {
    (0..n)
        .map(|seq| Record {
            key: Some(key.as_bytes().to_vec()),
            payload: json!({ "seq": seq }).to_string().into_bytes(),
            headers: vec![],
        })
        .collect()
}

/// How the node's consumer of `subscription` does, as the admin API says.
async fn consumer_state(node: &Node, subscription: &str) -> Result<Option<String>> {
    let status = node.get("/cluster").await?;
    let consumers = status["consumers"].as_array().context("consumers")?;
    Ok(consumers
        .iter()
        .find(|c| c["subscription_id"] == subscription)
        .and_then(|c| c["state"].as_str())
        .map(str::to_owned))
}

/// Case 11: deleting a subscribed topic (which crashes librdkafka 2.12 inside
/// its consumer) leaves the node up; the subscription reports the missing
/// topic and consumes again once the topic is back. Case 3: the topic created
/// again under the same name is a new producer, so its offsets, which start
/// again at 0, are not taken for duplicates of the old topic's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case3_case11_a_topic_deleted_and_created_again_under_a_subscription() -> Result<()> {
    let (broker, _handlers, _dir, mut node) = node_with_handlers(&[]).await?;
    broker.create_topic("t", 1).await?;
    let subscription = node.subscribe("t", "service://Counter/add", json!({"session.timeout.ms": "6000"})).await?;
    // One key throughout: its invocations live in one Raft partition, where
    // the old topic's producer left its last offset.
    produce(&broker.producer()?, "t", &counter_records("k", 5)).await?;
    eventually(Duration::from_secs(60), "the records before the deletion counted", || async {
        Ok((count(&node, "k").await? == 5).then_some(()))
    })
    .await?;

    broker.delete_topic("t").await?;
    eventually(Duration::from_secs(60), "the subscription reporting its topic missing", || async {
        Ok((consumer_state(&node, &subscription).await?.as_deref() == Some("topic-missing")).then_some(()))
    })
    .await?;
    assert_eq!(node.metric("ferry_ingress_subscription_topic_missing").await?, 1.0);
    node.wait_healthy(Duration::from_secs(1)).await.context("the node after the topic was deleted")?;

    broker.create_topic("t", 1).await?;
    produce(&broker.producer()?, "t", &counter_records("k", 5)).await?;
    eventually(Duration::from_secs(120), "the records after the topic came back counted", || async {
        Ok((count(&node, "k").await? == 10).then_some(()))
    })
    .await?;
    assert_eq!(consumer_state(&node, &subscription).await?.as_deref(), Some("consuming"));
    assert_eq!(node.metric("ferry_ingress_subscription_topic_missing").await?, 0.0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(count(&node, "k").await?, 10);
    Ok(())
}

/// Case 1: a leader frozen (SIGSTOP) past its lease starts nothing when it
/// wakes. Its last view of the group still says it leads and heard from a
/// quorum a moment ago, and its state still shows an invocation waiting for
/// a retry that the new leader has since run; acting on that view would run
/// the invocation again. The lease is timed from when this node sent the
/// requests that a quorum answered, so on waking it holds none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case1_a_leader_frozen_past_its_lease_starts_nothing_when_it_wakes() -> Result<()> {
    let config = [("FERRY_INVOCATION__DEFAULT_RETRY_POLICY__INITIAL_INTERVAL", "3s")];
    let (_broker, handlers, _dir, cluster, group, key) = cluster_with_a_partition_of_node_1(&config, "Flaky").await?;

    // The first attempt runs the handler's journaled step and ends to have
    // it acknowledged; the second fails, and its retry is due three seconds
    // later. Node 1 freezes in between; another node leads, runs the retry
    // and answers.
    let headers = [("idempotency-key", key.as_str())];
    let attempts_file = handlers.record_dir.path().join("flaky-attempts.jsonl");
    let attempts = || std::fs::read_to_string(&attempts_file).map(|text| text.lines().count()).unwrap_or(0);
    let call = cluster.node(2).ingress("/Flaky/run", Some(r#"{"fail_attempts": 2}"#), &headers);
    let freeze = async {
        eventually(Duration::from_secs(30), "the failing attempt", || async { Ok((attempts() == 2).then_some(())) })
            .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.node(1).pause().await?;
        eventually(Duration::from_secs(30), "another leader", || async {
            Ok(leader_of(&cluster, 2, group).await?.filter(|&leader| leader != 1).map(|_| ()))
        })
        .await
    };
    let (answer, frozen) = tokio::join!(tokio::time::timeout(Duration::from_secs(60), call), freeze);
    frozen?;
    let (status, answer) = answer.context("no answer")??;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(attempts(), 3);

    // Node 1 wakes with the retry long due in its view of the partition.
    cluster.node(1).resume().await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let text = std::fs::read_to_string(&attempts_file)?;
    assert_eq!(text.lines().count(), 3, "an attempt ran after the invocation completed:\n{text}");
    Ok(())
}

/// Case 1, inside the node: node 1 is stopped (SIGSTOP) the moment an
/// attempt's journal has passed the lease check, before its connection has
/// written it, and wakes after another node has run the step and answered.
/// The journal is still in node 1's buffers, but the connection saw the
/// stop and writes nothing more: the step runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case1_a_journal_held_in_a_stopped_node_never_reaches_the_handler() -> Result<()> {
    const STOP: Duration = Duration::from_secs(6);
    let stop = format!("invoker-send-stop=1*return({})", STOP.as_millis());
    let (_broker, handlers, _dir, cluster, _, key) = once_on_node_1_with_failpoints(&stop).await?;

    let headers = [("idempotency-key", key.as_str())];
    let started = tokio::time::Instant::now();
    let answer =
        tokio::time::timeout(Duration::from_secs(60), cluster.node(2).ingress("/Once/run", Some(""), &headers));
    let (status, token) = answer.await.context("no answer")??;
    assert_eq!(status, 200, "{token}");
    assert!(started.elapsed() < STOP, "answered after node 1 woke");

    // Node 1 wakes with the journal it had let through. (A step may run
    // twice before its result is committed: node 1 may have run it and lost
    // the result in the stop.)
    tokio::time::sleep_until(started + STOP + Duration::from_secs(2)).await;
    let records = std::fs::read_to_string(handlers.record_dir.path().join("once.jsonl"))?;
    check_run_once(&records).with_context(|| format!("{records}\n{}", cluster.node(1).log_tail()))?;
    let token = token.as_str().context("the step's token")?;
    assert!(records.contains(token), "{token} is not among\n{records}");
    // Node 1 saw its stall and fenced its connections. Its attempt ends as
    // `stalled` unless its scheduler drops it first, seeing another leader
    // or the invocation completed by it: either way the connection writes
    // nothing more, which the run-once check above shows.
    assert!(cluster.node(1).metric("ferry_invoker_stalls_total").await? >= 1.0);
    Ok(())
}

/// Case 1, at the handler's door: an attempt the scheduler started while
/// node 1 held its lease, whose request went out only later (held by a fail
/// point, as a stopped process or a starved runtime holds it), is not sent
/// once node 1 has lost the lease. The journaled step runs once: on the node
/// that leads the partition now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case1_an_attempt_held_past_the_lease_is_never_sent() -> Result<()> {
    const HOLD: Duration = Duration::from_secs(8);
    let hold = format!("invoker-attempt-hold=1*return({})", HOLD.as_millis());
    let (_broker, handlers, _dir, cluster, _, key) = once_on_node_1_with_failpoints(&hold).await?;

    // Node 1 starts the attempt and holds it; cut off from its peers, it
    // loses the lease and another node takes the partition and answers.
    let headers = [("idempotency-key", key.as_str())];
    let call = cluster.node(2).ingress("/Once/run", Some(""), &headers);
    let started = tokio::time::Instant::now();
    let cut = async {
        eventually(Duration::from_secs(30), "the attempt on node 1", || async {
            Ok((cluster.node(1).metric("ferry_invoker_running").await? > 0.0).then_some(()))
        })
        .await?;
        cluster.isolate(1);
        anyhow::Ok(())
    };
    let (answer, cut) = tokio::join!(tokio::time::timeout(Duration::from_secs(60), call), cut);
    cut?;
    let (status, token) = answer.context("no answer")??;
    assert_eq!(status, 200, "{token}");

    // The held attempt's time comes; it is not sent.
    tokio::time::sleep_until(started + HOLD + Duration::from_secs(2)).await;
    let records = std::fs::read_to_string(handlers.record_dir.path().join("once.jsonl"))?;
    let executed: Vec<Value> = records
        .lines()
        .map(serde_json::from_str::<Value>)
        .filter(|r| r.as_ref().map_or(true, |r| r["event"] == "executed"))
        .collect::<Result<_, _>>()?;
    assert_eq!(executed.len(), 1, "the step ran again:\n{records}");
    assert_eq!(executed[0]["token"], token);
    assert!(cluster.node(1).metric("ferry_invoker_attempts_total{outcome=\"not-sent\"}").await? >= 1.0);
    cluster.heal();
    Ok(())
}
