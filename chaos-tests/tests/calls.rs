//! Calls between handlers. A one-way call (`ctx.send`) starts its
//! invocation exactly once, in the callee key's partition, whether the caller
//! came from HTTP or Kafka, through SIGKILLs of the node between the caller's
//! completion and the callee's creation, and when outbox rows are delivered
//! again. A call (`ctx.call`) does too, and its result comes back to the
//! caller once, which waits suspended meanwhile. Awakeables complete from
//! HTTP and from handlers, once; killing a caller kills its calls, and
//! cancelling one cancels them. Workflow promises wake the run that waits
//! for them, keep their first value, and survive a restart. A handler
//! attached to another invocation gets its result. Calls made by handlers
//! written with the TypeScript SDK come back once through SIGKILLs too.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use ferry_chaos_tests::{
    check_call_results, eventually, fanout_counts, fanout_keys, node_with_handlers, Broker, Cluster, Handlers, Node,
    TypeScriptHandlers,
};
use serde_json::{json, Value};

const TOPIC: &str = "fanout";
const RECORDS: usize = 600;

/// The count of each `Counter` key in `keys`, by key.
async fn counts(node: &Node, keys: impl IntoIterator<Item = String>) -> Result<BTreeMap<String, u64>> {
    counts_of(node, "Counter", keys).await
}

/// The count of each key in `keys` of `counter` (`Counter`, or `TsCounter`
/// of the TypeScript handlers), by key.
async fn counts_of(
    node: &Node,
    counter: &str,
    keys: impl IntoIterator<Item = String>,
) -> Result<BTreeMap<String, u64>> {
    let mut counts = BTreeMap::new();
    for key in keys {
        let (status, body) = node.ingress(&format!("/{counter}/{key}/get"), Some(""), &[]).await?;
        anyhow::ensure!(status == 200, "{counter}/{key}/get: {status} {body}");
        counts.insert(key, body["count"].as_u64().unwrap_or(0));
    }
    Ok(counts)
}

/// What `{"seq": n}` for every n below `records` adds to each key through
/// `Fanout` (or `TsFanout`).
fn expected(records: usize) -> BTreeMap<String, u64> {
    fanout_counts(0..records as i64)
}

/// Subscribes `sink` to a backlog of `records` records `{"seq": n}` in
/// `TOPIC`, and SIGKILLs and restarts the node twice once the counter
/// `delivered` shows the outbox at work.
async fn through_two_sigkills(
    broker: &Broker,
    node: &mut Node,
    sink: &str,
    records: usize,
    delivered: &str,
) -> Result<()> {
    broker.create_topic(TOPIC, 2).await?;
    node.subscribe_from_start(TOPIC, sink).await?;
    broker.produce_backlog(TOPIC, records, 13).await?;
    for kill in 0..2 {
        eventually(Duration::from_secs(60), "the outbox to deliver", || async {
            Ok((node.metric(delivered).await? > 0.0).then_some(()))
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(300 * kill)).await;
        node.kill().await;
        node.restart().await?;
    }
    Ok(())
}

/// Checks that every caller from the subscription (`{"seq": n}` for n
/// below `records`) got the counts of its two keys, each once.
async fn check_results(node: &Node, callers: &[Value], records: usize) -> Result<()> {
    check_call_results(node, callers, &expected(records)).await
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
    through_two_sigkills(&broker, &mut node, "service://Fanout/send", RECORDS, "ferry_outbox_delivered_total").await?;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_bring_each_result_back_once_through_sigkills() -> Result<()> {
    const CALLERS: usize = 300;
    let (broker, _handlers, _dir, mut node) = node_with_handlers(&[("FAILPOINTS", "outbox-truncate=3*return")]).await?;
    let json = [("content-type", "application/json")];

    // From HTTP: each call's result, in order; a call to a handler that does
    // not exist fails that call with 404, and the caller goes on.
    let (status, body) = node.ingress("/Fanout/call", Some(r#"{"keys": ["c1", "c2", "c1"]}"#), &json).await?;
    assert_eq!((status, &body["results"]), (200, &json!([1, 1, 2])));
    let (status, body) = node.ingress("/Fanout/call", Some(r#"{"keys": ["c1"], "handler": "nope"}"#), &json).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["code"], 404, "{body}");
    assert!(body["results"][0]["message"].as_str().unwrap_or_default().contains("no handler nope"), "{body}");
    // Two calls with one idempotency key: one invocation, both get its result.
    let once = r#"{"keys": ["c3", "c3"], "idempotency_key": "once"}"#;
    let (status, body) = node.ingress("/Fanout/call", Some(once), &json).await?;
    assert_eq!((status, &body["results"]), (200, &json!([1, 1])));

    // From Kafka, with the node killed twice while callers wait: every call
    // counts once, and each count comes back to exactly one caller.
    let results = "ferry_outbox_results_delivered_total";
    through_two_sigkills(&broker, &mut node, "service://Fanout/call", CALLERS, results).await?;
    let callers = eventually(Duration::from_secs(180), "every caller to complete", || async {
        let callers = node.invocations("target=Fanout/call&status=completed").await?;
        Ok((callers.len() >= CALLERS + 3).then_some(callers))
    })
    .await?;
    assert_eq!(counts(&node, fanout_keys()).await?, expected(CALLERS));
    check_results(&node, &callers, CALLERS).await?;
    Ok(())
}

/// The same with handlers written with the TypeScript SDK, whose attempts
/// stream: `TsFanout/call` calls `TsCounter/add` of the record's two keys at
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_calls_bring_each_result_back_once_through_sigkills() -> Result<()> {
    const CALLERS: usize = 200;
    let (broker, typescript, dir) = (Broker::start().await?, TypeScriptHandlers::start().await?, tempfile::tempdir()?);
    let mut node = Node::start(&dir.path().join("node"), &broker).await?;
    let (status, body) = node.post("/deployments", json!({ "uri": typescript.uri })).await?;
    assert_eq!(status, 201, "{body}");
    let results = "ferry_outbox_results_delivered_total";
    through_two_sigkills(&broker, &mut node, "service://TsFanout/call", CALLERS, results).await?;
    let callers = eventually(Duration::from_secs(180), "every caller to complete", || async {
        let callers = node.invocations("target=TsFanout/call&status=completed").await?;
        Ok((callers.len() >= CALLERS).then_some(callers))
    })
    .await?;
    assert_eq!(counts_of(&node, "TsCounter", fanout_keys()).await?, expected(CALLERS));
    check_results(&node, &callers, CALLERS).await?;
    Ok(())
}

/// Calls between partitions led by different nodes: the callee's creation
/// and the result's return each cross Raft groups, while a node is SIGKILLed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_across_a_cluster_bring_each_result_back_once_through_a_sigkill() -> Result<()> {
    const CALLERS: usize = 200;
    let dir = tempfile::tempdir()?;
    let broker = Broker::start().await?;
    let handlers = Handlers::start().await?;
    let mut cluster = Cluster::start(dir.path(), 3, &broker.bootstrap(), &[]).await?;
    cluster.wait_balanced(Duration::from_secs(30)).await?;
    let (status, body) = cluster.node(1).post("/deployments", json!({ "uri": handlers.uri })).await?;
    assert_eq!(status, 201, "{body}");
    broker.create_topic(TOPIC, 2).await?;
    cluster.node(2).subscribe_from_start(TOPIC, "service://Fanout/call").await?;
    broker.produce_backlog(TOPIC, CALLERS, 13).await?;

    let victim = 3;
    eventually(Duration::from_secs(60), "results to come back", || async {
        let mut delivered = 0.0;
        for id in 1..=3 {
            delivered += cluster.node(id).metric("ferry_outbox_results_delivered_total").await?;
        }
        Ok((delivered > 0.0).then_some(()))
    })
    .await?;
    cluster.node_mut(victim).kill().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.node_mut(victim).restart().await?;

    let callers = eventually(Duration::from_secs(180), "every caller to complete", || async {
        let callers = cluster.node(1).invocations("target=Fanout/call&status=completed").await?;
        Ok((callers.len() >= CALLERS).then_some(callers))
    })
    .await?;
    assert_eq!(counts(cluster.node(2), fanout_keys()).await?, expected(CALLERS));
    check_results(cluster.node(1), &callers, CALLERS).await
}

/// The invocation and awakeable ids `Awake/wait` recorded, once there are
/// more than `seen`.
async fn awakeables(handlers: &Handlers, seen: usize) -> Result<Vec<(String, String)>> {
    let file = handlers.record_dir.path().join("awake.jsonl");
    eventually(Duration::from_secs(30), "an awakeable", || async {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let mut ids = Vec::new();
        for line in text.lines() {
            let record: Value = serde_json::from_str(line)?;
            let id = |field: &str| record[field].as_str().map(str::to_owned).context("awake.jsonl");
            let ids_of = (id("invocation_id")?, id("awakeable_id")?);
            if !ids.contains(&ids_of) {
                ids.push(ids_of);
            }
        }
        Ok((ids.len() > seen).then_some(ids))
    })
    .await
}

/// Starts `path` with `/send` and answers the invocation's id.
async fn start(node: &Node, path: &str, body: &str) -> Result<String> {
    let (status, sent) =
        node.ingress(&format!("{path}/send"), Some(body), &[("content-type", "application/json")]).await?;
    anyhow::ensure!(status == 202, "{path}: {status} {sent}");
    Ok(sent["invocationId"].as_str().context("invocationId")?.to_owned())
}

/// The invocation `id` once `done` holds for it.
async fn invocation_when(node: &Node, id: &str, done: impl Fn(&Value) -> bool) -> Result<Value> {
    eventually(Duration::from_secs(30), "the invocation", || async {
        let invocation = node.get(&format!("/invocations/{id}")).await?;
        Ok(done(&invocation).then_some(invocation))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awakeables_complete_once_from_http_and_from_handlers() -> Result<()> {
    let (_broker, handlers, _dir, node) = node_with_handlers(&[]).await?;
    let attach = |id: String| {
        let node = &node;
        async move { node.ingress(&format!("/restate/invocation/{id}/attach"), None, &[]).await }
    };

    // Resolved over HTTP while it waits suspended; a second resolve is
    // accepted and changes nothing.
    let first = start(&node, "/Awake/a1/wait", "").await?;
    let (id, awakeable) = awakeables(&handlers, 0).await?.remove(0);
    assert_eq!(id, first);
    invocation_when(&node, &first, |inv| inv["status"] == "suspended").await?;
    let resolve = format!("/restate/awakeables/{awakeable}/resolve");
    assert_eq!(node.ingress(&resolve, Some(r#""hello""#), &[]).await?.0, 202);
    assert_eq!(attach(first.clone()).await?, (200, json!("hello")));
    assert_eq!(node.ingress(&resolve, Some(r#""again""#), &[]).await?.0, 202);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(attach(first).await?, (200, json!("hello")));

    // Resolved by another handler.
    let second = start(&node, "/Awake/a2/wait", "").await?;
    let (_, awakeable) = awakeables(&handlers, 1).await?.remove(1);
    let complete = json!({ "id": awakeable, "value": {"n": 1} }).to_string();
    let (status, body) =
        node.ingress("/Awake/a2/complete", Some(&complete), &[("content-type", "application/json")]).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(attach(second).await?, (200, json!({"n": 1})));

    // Rejected over HTTP (the short path), and by a handler.
    let third = start(&node, "/Awake/a3/wait", "").await?;
    let (_, awakeable) = awakeables(&handlers, 2).await?.remove(2);
    assert_eq!(node.ingress(&format!("/restate/a/{awakeable}/reject"), Some("no"), &[]).await?.0, 202);
    assert_eq!(attach(third).await?, (200, json!({"code": 500, "message": "no"})));
    let fourth = start(&node, "/Awake/a4/wait", "").await?;
    let (_, awakeable) = awakeables(&handlers, 3).await?.remove(3);
    let reject = json!({ "id": awakeable, "reject": "not today" }).to_string();
    node.ingress("/Awake/a4/complete", Some(&reject), &[("content-type", "application/json")]).await?;
    let (status, body) = attach(fourth).await?;
    assert_eq!((status, &body["message"]), (200, &json!("not today")), "{body}");

    assert_eq!(node.ingress("/restate/awakeables/sign_1nope/resolve", Some(""), &[]).await?.0, 400);
    assert_eq!(node.ingress(&format!("/restate/awakeables/{awakeable}/poke"), Some(""), &[]).await?.0, 404);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_caller_kills_its_calls_and_cancelling_one_cancels_them() -> Result<()> {
    let (_broker, handlers, _dir, node) = node_with_handlers(&[]).await?;
    let call = |key: &str| json!({ "keys": [key], "service": "Awake", "handler": "wait" }).to_string();

    // The caller awaits Awake/k1/wait, which awaits an awakeable; killing the
    // caller kills the callee.
    let caller = start(&node, "/Fanout/call", &call("k1")).await?;
    let (callee, _) = awakeables(&handlers, 0).await?.remove(0);
    invocation_when(&node, &callee, |inv| inv["status"] == "suspended").await?;
    let (status, body) = node.admin(reqwest::Method::PATCH, &format!("/invocations/{caller}/kill"), None).await?;
    assert_eq!(status, 200, "{body}");
    let killed = invocation_when(&node, &callee, |inv| inv["status"] == "completed").await?;
    assert!(killed["completion_failure"].as_str().unwrap_or_default().contains("killed"), "{killed}");

    // Cancelling the caller: the SDK cancels its call, whose handler sees
    // its awakeable fail with 409, and so does the caller's call.
    let caller = start(&node, "/Fanout/call", &call("c1")).await?;
    let (callee, _) = awakeables(&handlers, 1).await?.remove(1);
    invocation_when(&node, &callee, |inv| inv["status"] == "suspended").await?;
    let (status, body) = node.admin(reqwest::Method::PATCH, &format!("/invocations/{caller}/cancel"), None).await?;
    assert!(status == 200 || status == 202, "{status} {body}");
    let cancelled = invocation_when(&node, &callee, |inv| inv["status"] == "completed").await?;
    let (_, output) = node.ingress(&format!("/restate/invocation/{callee}/output"), None, &[]).await?;
    assert_eq!(output["code"], 409, "{cancelled} {output}");
    invocation_when(&node, &caller, |inv| inv["status"] == "completed").await?;
    let (_, output) = node.ingress(&format!("/restate/invocation/{caller}/output"), None, &[]).await?;
    assert_eq!(output["results"][0]["code"], 409, "the call ended cancelled: {output}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_promises_wake_their_run_and_keep_their_first_value() -> Result<()> {
    let (_broker, _handlers, _dir, mut node) = node_with_handlers(&[]).await?;
    let json = [("content-type", "application/json")];
    let attach = |id: &str| format!("/restate/invocation/{id}/attach");

    // The run waits suspended for its promise, which a peek finds empty.
    let run = start(&node, "/Approval/w1/run", "").await?;
    invocation_when(&node, &run, |inv| inv["status"] == "suspended").await?;
    assert_eq!(node.ingress("/Approval/w1/peek", Some(""), &[]).await?, (200, json!("pending")));
    // Resolved by a shared handler: the run wakes with the value.
    let (status, body) = node.ingress("/Approval/w1/approve", Some(r#"{"ok": true}"#), &json).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(node.ingress(&attach(&run), None, &[]).await?, (200, json!({"ok": true})));
    // Resolving it again changes nothing.
    node.ingress("/Approval/w1/approve", Some(r#"{"ok": false}"#), &json).await?;
    assert_eq!(node.ingress("/Approval/w1/peek", Some(""), &[]).await?, (200, json!({"ok": true})));

    // Resolved before the run starts, across a restart: the run finds it.
    let (status, body) = node.ingress("/Approval/w2/approve", Some(r#""early""#), &json).await?;
    assert_eq!(status, 200, "{body}");
    node.kill().await;
    node.restart().await?;
    let run = start(&node, "/Approval/w2/run", "").await?;
    assert_eq!(node.ingress(&attach(&run), None, &[]).await?, (200, json!("early")));

    // Rejected: the run gets the failure.
    let run = start(&node, "/Approval/w3/run", "").await?;
    invocation_when(&node, &run, |inv| inv["status"] == "suspended").await?;
    node.ingress("/Approval/w3/approve", Some(r#"{"reject": "no"}"#), &json).await?;
    let (status, body) = node.ingress(&attach(&run), None, &[]).await?;
    assert_eq!((status, &body["message"]), (200, &json!("no")), "{body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_attached_to_an_invocation_gets_its_result() -> Result<()> {
    let (_broker, handlers, _dir, node) = node_with_handlers(&[]).await?;
    let attach = |id: &str| json!({ "id": id }).to_string();

    // Attached while the invocation waits; it gets the result when it ends.
    let awaited = start(&node, "/Awake/t1/wait", "").await?;
    let (_, awakeable) = awakeables(&handlers, 0).await?.remove(0);
    let attacher = start(&node, "/Fanout/attach", &attach(&awaited)).await?;
    invocation_when(&node, &attacher, |inv| inv["status"] == "suspended").await?;
    let resolve = format!("/restate/awakeables/{awakeable}/resolve");
    assert_eq!(node.ingress(&resolve, Some(r#""done""#), &[]).await?.0, 202);
    let (status, output) = node.ingress(&format!("/restate/invocation/{attacher}/attach"), None, &[]).await?;
    assert_eq!((status, output), (200, json!("done")));

    // Attached once it is completed: at once. To no invocation: 404.
    let json = [("content-type", "application/json")];
    assert_eq!(node.ingress("/Fanout/attach", Some(&attach(&awaited)), &json).await?, (200, json!("done")));
    let nobody = ferry_partition::store::key::id(1, 1);
    let (status, output) = node.ingress("/Fanout/attach", Some(&attach(&nobody)), &json).await?;
    assert_eq!((status, &output["code"]), (200, &json!(404)), "{output}");
    Ok(())
}
