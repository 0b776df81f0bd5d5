//! One-way calls between handlers (`ctx.send`): each starts its invocation
//! exactly once, in the callee key's partition, whether the caller came from
//! HTTP or Kafka, through SIGKILLs of the node between the caller's
//! completion and the callee's creation, and when outbox rows are delivered
//! again.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use ferry_chaos_tests::{eventually, node_with_handlers, Node};
use serde_json::{json, Value};

const TOPIC: &str = "fanout";
const RECORDS: usize = 600;

/// The count of each `Counter` key in `keys`, by key.
async fn counts(node: &Node, keys: impl IntoIterator<Item = String>) -> Result<BTreeMap<String, u64>> {
    let mut counts = BTreeMap::new();
    for key in keys {
        let (status, body) = node.ingress(&format!("/Counter/{key}/get"), Some(""), &[]).await?;
        anyhow::ensure!(status == 200, "Counter/{key}/get: {status} {body}");
        counts.insert(key, body["count"].as_u64().unwrap_or(0));
    }
    Ok(counts)
}

fn fanout_keys() -> impl Iterator<Item = String> {
    (0..10).map(|n| format!("f{n}")).chain((0..7).map(|n| format!("g{n}")))
}

/// What `Fanout/send` of `{"seq": n}` for every n below `records` adds to each key.
fn expected(records: usize) -> BTreeMap<String, u64> {
    let mut expected: BTreeMap<String, u64> = fanout_keys().map(|k| (k, 0)).collect();
    for n in 0..records {
        *expected.get_mut(&format!("f{}", n % 10)).unwrap() += 1;
        *expected.get_mut(&format!("g{}", n % 7)).unwrap() += 1;
    }
    expected
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_calls_start_each_invocation_once_through_sigkills() -> Result<()> {
    // The first deliveries of each process are delivered again: the
    // receiving partitions must drop them.
    let (broker, _handlers, _dir, mut node) = node_with_handlers(&[("FAILPOINTS", "outbox-truncate=3*return")]).await?;

    // From HTTP: the caller answers once its sends are journaled; they run
    // in their own invocations, one of them a second later.
    let (status, body) = node
        .ingress("/Fanout/send", Some(r#"{"keys": ["h1", "h2", "h1"]}"#), &[("content-type", "application/json")])
        .await?;
    assert_eq!((status, &body), (200, &json!(3)));
    let (status, body) = node
        .ingress(
            "/Fanout/send",
            Some(r#"{"keys": ["later"], "delay_ms": 1000}"#),
            &[("content-type", "application/json")],
        )
        .await?;
    assert_eq!((status, &body), (200, &json!(1)));
    let sent_at = std::time::Instant::now();
    eventually(Duration::from_secs(30), "the sends to run", || async {
        let counts = counts(&node, ["h1", "h2"].map(str::to_owned)).await?;
        Ok((counts.values().copied().collect::<Vec<_>>() == [2, 1]).then_some(()))
    })
    .await?;
    eventually(Duration::from_secs(30), "the delayed send to run", || async {
        Ok((counts(&node, ["later".to_owned()]).await?["later"] == 1).then_some(()))
    })
    .await?;
    assert!(sent_at.elapsed() >= Duration::from_millis(900), "the delayed send ran after {:?}", sent_at.elapsed());
    let callees = node.invocations("target=Counter/add").await?;
    assert_eq!(callees.len(), 4);
    assert!(node.metric("ferry_outbox_duplicates_total").await? > 0.0, "rows were delivered again");
    for callee in &callees {
        assert_eq!(callee["invoked_by"], "service", "{callee}");
        assert!(callee["invoked_by_id"].as_str().is_some_and(|id| id.starts_with("inv_")), "{callee}");
    }

    // From Kafka, with the node killed twice while records flow through
    // Fanout into Counter: every record's two sends count once.
    broker.create_topic(TOPIC, 2).await?;
    node.subscribe_from_start(TOPIC, "service://Fanout/send").await?;
    broker.produce_backlog(TOPIC, RECORDS, 13).await?;
    for kill in 0..2 {
        eventually(Duration::from_secs(60), "sends to be delivered", || async {
            Ok((node.metric("ferry_outbox_delivered_total").await? > 0.0).then_some(()))
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(300 * kill)).await;
        node.kill().await;
        node.restart().await?;
    }
    let expected = expected(RECORDS);
    let counted = eventually(Duration::from_secs(120), "every send to be counted", || async {
        let counts = counts(&node, fanout_keys()).await?;
        let total: u64 = counts.values().sum();
        Ok((total >= 2 * RECORDS as u64).then_some(counts))
    })
    .await?;
    // Late duplicates would show up after the total is reached.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(counts(&node, fanout_keys()).await?, counted);
    assert_eq!(counted, expected);
    let callers = node.invocations("target=Fanout/send").await?;
    assert_eq!(callers.iter().filter(|c| c["invoked_by"] == "subscription").count(), RECORDS);
    let done: Vec<&Value> = callers.iter().filter(|c| c["completion_result"] == "success").collect();
    assert_eq!(done.len(), RECORDS + 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_with_an_idempotency_key_start_one_invocation_and_unknown_handlers_fail_the_callee() -> Result<()> {
    let (_broker, _handlers, _dir, node) = node_with_handlers(&[]).await?;
    let json = [("content-type", "application/json")];

    let once = r#"{"keys": ["i1", "i1"], "idempotency_key": "once"}"#;
    for _ in 0..2 {
        let (status, body) = node.ingress("/Fanout/send", Some(once), &json).await?;
        assert_eq!((status, &body), (200, &json!(2)));
    }
    eventually(Duration::from_secs(30), "the idempotent send to run", || async {
        Ok((node.invocations("target=Counter/add&status=completed").await?.len() == 1).then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(counts(&node, ["i1".to_owned()]).await?["i1"], 1, "four sends, one idempotency key");

    // The caller succeeds; the callee is created failed, with the reason.
    let (status, body) = node.ingress("/Fanout/send", Some(r#"{"keys": ["x"], "handler": "nope"}"#), &json).await?;
    assert_eq!((status, &body), (200, &json!(1)));
    let failed = eventually(Duration::from_secs(30), "the failed callee", || async {
        Ok(node.invocations("target=Counter/nope").await?.into_iter().next())
    })
    .await?;
    assert_eq!(failed["completion_result"], "failure", "{failed}");
    assert!(failed["completion_failure"].as_str().unwrap_or_default().contains("no handler nope"), "{failed}");
    Ok(())
}
