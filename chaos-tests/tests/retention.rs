//! Retention on one real node with a real broker and Restate SDK handlers:
//! completed invocations go when their retention says, a Kafka record whose
//! invocation is gone is still invoked only once when it is read again, and
//! an idempotency key is free again once its result expired; a deleted
//! subscription's dedup entries go.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use ferry_chaos_tests::{eventually, produce, Broker, Handlers, Node, Record};
use reqwest::Method;
use serde_json::{json, Value};

const RECORDS: usize = 200;
const KEYS: usize = 5;

/// Journals and plain invocations go as they complete; idempotent results
/// after three seconds.
const CONFIG: [(&str, &str); 2] =
    [("FERRY_INVOCATION__DEFAULT_JOURNAL_RETENTION", "0s"), ("FERRY_INVOCATION__DEFAULT_IDEMPOTENCY_RETENTION", "3s")];

async fn counts(node: &Node) -> Result<BTreeMap<String, Value>> {
    let mut counts = BTreeMap::new();
    for key in 0..KEYS {
        let (status, counter) = node.ingress(&format!("/Counter/key-{key}/get"), Some(""), &[]).await?;
        anyhow::ensure!(status == 200, "{counter}");
        counts.insert(format!("key-{key}"), counter["count"].clone());
    }
    Ok(counts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_invocations_go_and_their_records_are_still_invoked_once() -> Result<()> {
    let broker = Broker::start().await?;
    let handlers = Handlers::start().await?;
    let dir = tempfile::tempdir()?;
    let mut node = Node::start_configured(&dir.path().join("node"), &broker.bootstrap(), &CONFIG).await?;
    let (status, body) = node.post("/deployments", json!({ "uri": handlers.uri })).await?;
    assert_eq!(status, 201, "{body}");

    // Offsets are committed only every ten minutes: after a SIGKILL the
    // consumer reads every record again.
    broker.create_topic("t", 2).await?;
    let subscription = node
        .subscribe(
            "t",
            "service://Counter/add",
            json!({ "auto.commit.interval.ms": "600000", "session.timeout.ms": "6000" }),
        )
        .await?;
    let records: Vec<Record> = (0..RECORDS)
        .map(|seq| Record {
            key: Some(format!("key-{}", seq % KEYS).into_bytes()),
            payload: json!({ "seq": seq }).to_string().into_bytes(),
            headers: vec![],
        })
        .collect();
    produce(&broker.producer()?, "t", &records).await?;
    let each = json!(RECORDS / KEYS);
    let expected: BTreeMap<String, Value> = (0..KEYS).map(|key| (format!("key-{key}"), each.clone())).collect();
    eventually(Duration::from_secs(60), "every record counted", || async {
        Ok((counts(&node).await? == expected).then_some(()))
    })
    .await?;
    // Every record's invocation completed, and none is kept: neither they
    // nor the calls that read the counts.
    let kept = node.invocations(&format!("subscription={subscription}")).await?;
    assert!(kept.is_empty(), "{} invocations kept: {:?}", kept.len(), kept.first());
    assert!(node.invocations("").await?.is_empty());

    // Read again from the start, each record is known and dropped.
    node.kill().await;
    node.restart().await?;
    eventually(Duration::from_secs(60), "every record read again", || async {
        Ok((node.metric("ferry_ingress_records_deduplicated_total").await? >= RECORDS as f64).then_some(()))
    })
    .await?;
    assert_eq!(counts(&node).await?, expected, "a record was invoked again");
    assert_eq!(node.metric("ferry_ingress_records_appended_total").await?, 0.0);

    // An idempotent call keeps its result for its retention, then the key
    // names a new invocation.
    let key = [("idempotency-key", "order-1")];
    assert_eq!(node.ingress("/Counter/http/add", Some("{}"), &key).await?, (200, json!(1)));
    assert_eq!(node.ingress("/Counter/http/add", Some("{}"), &key).await?, (200, json!(1)));
    let retained = node.invocations("").await?;
    assert_eq!(retained.len(), 1, "{retained:?}");
    let invocation = &retained[0];
    assert!(invocation["retained_until"].as_str().is_some_and(|t| !t.is_empty()), "{invocation}");
    assert_eq!(invocation["journal_length"], 0, "the journal goes at once: {invocation}");
    let id = invocation["id"].as_str().context("id")?;
    let (status, answer) = node.admin(Method::PATCH, &format!("/invocations/{id}/purge-journal"), None).await?;
    assert_eq!(status, 200, "{answer}");
    eventually(Duration::from_secs(15), "the idempotent result to expire", || async {
        Ok(node.invocations("").await?.is_empty().then_some(()))
    })
    .await?;
    assert!(node.metric("ferry_invocations_expired_total").await? >= 1.0);
    assert_eq!(node.ingress("/Counter/http/add", Some("{}"), &key).await?, (200, json!(2)));
    let unknown = "/invocations/inv_00000000000000000000000000000000/purge-journal";
    assert_eq!(node.admin(Method::PATCH, unknown, None).await?.0, 404);

    // Deleting the subscription drops its dedup entries: in each Ferry
    // partition, one per Kafka partition whose records went there (at least
    // one per Kafka partition), once.
    let (status, _) = node.admin(Method::DELETE, &format!("/subscriptions/{subscription}"), None).await?;
    assert_eq!(status, 202);
    let forgotten = || node.metric("ferry_dedup_producers_forgotten_total");
    eventually(Duration::from_secs(30), "the dedup entries to go", || async {
        Ok((forgotten().await? >= 2.0).then_some(()))
    })
    .await
    .with_context(|| node.log_tail())?;
    // Every partition has looked (they look every five seconds); none drops anything again.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let dropped = forgotten().await?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(forgotten().await?, dropped, "dedup entries dropped twice");
    Ok(())
}
