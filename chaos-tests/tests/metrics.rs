//! `/metrics` of a real node, scraped and parsed after Kafka records and HTTP
//! requests: every counter and gauge agrees with what the test did.

use std::time::Duration;

use anyhow::{Context, Result};
use ferry_chaos_tests::prometheus::{scrape, Metrics};
use ferry_chaos_tests::{eventually, node_with_handlers, produce, Node, Record};
use serde_json::{json, Value};

/// Records produced for the Virtual Object `Counter` and for the Service `Sink`.
const COUNTER_RECORDS: usize = 40;
const SINK_RECORDS: usize = 30;
const TOPIC_PARTITIONS: i32 = 4;
/// The node's default partition count, plus the metadata group.
const GROUPS: u32 = 9;

/// Subscribes `sink` to `topic` from its start, with statistics (and so lag)
/// every half second.
async fn subscribe(node: &Node, topic: &str, sink: &str) -> Result<String> {
    let (status, body) = node
        .post(
            "/subscriptions",
            json!({"source": format!("kafka://my-cluster/{topic}"), "sink": sink,
                   "options": {"auto.offset.reset": "earliest", "fetch.wait.max.ms": "10",
                               "statistics.interval.ms": "500"}}),
        )
        .await?;
    anyhow::ensure!(status == 201, "subscribe: {status} {body}");
    Ok(body["id"].as_str().context("subscription id")?.to_owned())
}

fn records(prefix: &str, count: usize) -> Vec<Record> {
    (0..count)
        .map(|n| Record {
            key: Some(format!("{prefix}-{}", n % 8).into_bytes()),
            payload: format!("{{\"seq\":{n}}}").into_bytes(),
            headers: Vec::new(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_the_node_did() -> Result<()> {
    let (broker, _handlers, _dir, node) = node_with_handlers(&[]).await?;

    broker.create_topic("counted", TOPIC_PARTITIONS).await?;
    broker.create_topic("sunk", TOPIC_PARTITIONS).await?;
    let counter_sub = subscribe(&node, "counted", "service://Counter/add").await?;
    let sink_sub = subscribe(&node, "sunk", "service://Sink/handle").await?;
    let producer = broker.producer()?;
    produce(&producer, "counted", &records("c", COUNTER_RECORDS)).await?;
    produce(&producer, "sunk", &records("s", SINK_RECORDS)).await?;

    // HTTP ingress: two answers of 200, two of 404 (an unknown service, and a
    // path no route takes).
    for seq in 0..2 {
        let (status, body) = node.ingress("/Counter/http/add", Some(&format!("{{\"seq\":{seq}}}")), &[]).await?;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(node.ingress("/Nope/handle", Some("{}"), &[]).await?.0, 404);
    assert_eq!(node.ingress("/no-such-path", Some("{}"), &[]).await?.0, 404);

    let total = COUNTER_RECORDS + SINK_RECORDS + 2;
    eventually(Duration::from_secs(120), "every invocation completed", || async {
        let completed = node.invocations("status=completed").await?.len();
        Ok((completed == total).then_some(()))
    })
    .await?;

    // Lag reaches 0 on every partition of both topics once the consumers have
    // stored their last offsets and sent fresh statistics.
    let metrics = eventually(Duration::from_secs(60), "zero lag on every Kafka partition", || async {
        let metrics = scrape(&node).await?;
        for (sub, topic) in [(&counter_sub, "counted"), (&sink_sub, "sunk")] {
            for partition in 0..TOPIC_PARTITIONS {
                let partition = partition.to_string();
                let labels = [("subscription", sub.as_str()), ("topic", topic), ("partition", partition.as_str())];
                if metrics.get("ferry_ingress_consumer_lag", &labels)? != Some(0.0) {
                    return Ok(None);
                }
            }
        }
        Ok(Some(metrics))
    })
    .await?;

    check_ingress(&metrics, &counter_sub, COUNTER_RECORDS)?;
    check_ingress(&metrics, &sink_sub, SINK_RECORDS)?;
    assert_eq!(metrics.sum("ferry_ingress_consumer_lag", &[]), 0.0);
    assert_eq!(metrics.select("ferry_ingress_consumer_lag", &[]).count(), 2 * TOPIC_PARTITIONS as usize);

    assert_eq!(metrics.get("ferry_invoker_invocations_completed_total", &[])?, Some(total as f64));
    assert_eq!(metrics.get("ferry_invocations", &[("status", "completed")])?, Some(total as f64));
    for status in ["scheduled", "pending", "ready", "backing-off", "suspended", "paused"] {
        assert_eq!(metrics.get("ferry_invocations", &[("status", status)])?, Some(0.0), "{status}");
    }

    assert_eq!(metrics.get("ferry_ingress_http_requests_total", &[("code", "200")])?, Some(2.0));
    assert_eq!(metrics.get("ferry_ingress_http_requests_total", &[("code", "404")])?, Some(2.0));

    for group in 0..GROUPS {
        let group = group.to_string();
        let by_group = [("group", group.as_str())];
        assert!(metrics.get("ferry_raft_term", &by_group)?.is_some_and(|t| t >= 1.0), "term of group {group}");
        assert_eq!(metrics.get("ferry_raft_leader", &by_group)?, Some(1.0), "one node leads group {group}");
        assert!(metrics.get("ferry_raft_last_applied", &by_group)?.is_some(), "group {group}");
        assert!(metrics.get("ferry_log_append_seconds_count", &by_group)?.is_some_and(|n| n >= 1.0), "{group}");
        assert!(metrics.get("ferry_log_apply_wait_seconds_count", &by_group)?.is_some_and(|n| n >= 1.0), "{group}");
    }
    let proposed = metrics.sum("ferry_log_propose_seconds_count", &[]);
    let proposed_per_partition: f64 =
        (1..GROUPS).map(|g| metrics.sum("ferry_log_propose_seconds_count", &[("group", &g.to_string())])).sum();
    assert!(proposed_per_partition > 0.0 && proposed_per_partition <= proposed, "{proposed_per_partition}");

    // The admin API reports the same lag.
    let cluster = node.get("/cluster").await?;
    let lag: Vec<&Value> = cluster["consumer_lag"].as_array().context("consumer_lag")?.iter().collect();
    assert_eq!(lag.len(), 2 * TOPIC_PARTITIONS as usize, "{cluster}");
    assert!(lag.iter().all(|entry| entry["lag"] == 0), "{cluster}");
    Ok(())
}

/// Every record of `subscription` was consumed and appended once.
fn check_ingress(metrics: &Metrics, subscription: &str, produced: usize) -> Result<()> {
    let by_sub = [("subscription", subscription)];
    assert_eq!(metrics.get("ferry_ingress_records_consumed_total", &by_sub)?, Some(produced as f64));
    assert_eq!(metrics.get("ferry_ingress_records_appended_total", &by_sub)?, Some(produced as f64));
    assert_eq!(metrics.get("ferry_ingress_records_deduplicated_total", &by_sub)?.unwrap_or(0.0), 0.0);
    Ok(())
}
