//! The invoker and the HTTP ingress on one real node with real Restate SDK
//! handlers: retries, terminal failures, timeouts, durable sleeps, cancel,
//! kill and purge, per-key blocking, idempotency and workflows, and Python SDK
//! deployments over Kafka and HTTP.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ferry_chaos_tests::{eventually, free_port, produce, Broker, Handlers, Node, PythonHandlers, Record};
use reqwest::Method;
use serde_json::{json, Value};

/// Short retries and timeouts so that failures show within seconds.
const CONFIG: [(&str, &str); 5] = [
    ("FERRY_INVOKER__ATTEMPT_TIMEOUT", "2s"),
    ("FERRY_INVOCATION__DEFAULT_RETRY_POLICY__INITIAL_INTERVAL", "100ms"),
    ("FERRY_INVOCATION__DEFAULT_RETRY_POLICY__MAX_INTERVAL", "1s"),
    ("FERRY_INVOCATION__DEFAULT_RETRY_POLICY__MAX_ATTEMPTS", "6"),
    ("FERRY_INVOCATION__DEFAULT_RETRY_POLICY__ON_MAX_ATTEMPTS", "fail"),
];

async fn setup() -> Result<(Handlers, tempfile::TempDir, Node)> {
    let handlers = Handlers::start().await?;
    let dir = tempfile::tempdir()?;
    let bootstrap = format!("127.0.0.1:{}", free_port());
    let node = Node::start_configured(&dir.path().join("node"), &bootstrap, &CONFIG).await?;
    let (status, body) = node.post("/deployments", json!({ "uri": handlers.uri })).await?;
    assert_eq!(status, 201, "{body}");
    Ok((handlers, dir, node))
}

/// `POST path/send`: the new invocation's id.
async fn send(node: &Node, path: &str, body: &str) -> Result<String> {
    let (status, answer) = node.ingress(&format!("{path}/send"), Some(body), &[]).await?;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["status"], "Accepted");
    Ok(answer["invocationId"].as_str().context("invocationId")?.to_owned())
}

async fn invocation(node: &Node, id: &str) -> Result<Value> {
    node.get(&format!("/invocations/{id}")).await
}

async fn wait_for_status(node: &Node, id: &str, status: &str) -> Result<Value> {
    eventually(Duration::from_secs(30), &format!("{id} to be {status}"), || async {
        let inv = invocation(node, id).await?;
        Ok((inv["status"] == status).then_some(inv))
    })
    .await
}

async fn act(node: &Node, id: &str, action: &str) -> Result<u16> {
    Ok(node.admin(Method::PATCH, &format!("/invocations/{id}/{action}"), None).await?.0)
}

/// Lines of a handler's record file, grouped by invocation id.
fn recorded(handlers: &Handlers, file: &str) -> Result<HashMap<String, Vec<Value>>> {
    let text = std::fs::read_to_string(handlers.record_dir.path().join(file)).unwrap_or_default();
    let mut by_id: HashMap<String, Vec<Value>> = HashMap::new();
    for line in text.lines() {
        let value: Value = serde_json::from_str(line)?;
        by_id.entry(value["invocation_id"].as_str().unwrap_or_default().to_owned()).or_default().push(value);
    }
    Ok(by_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_attempts_are_retried_and_failures_reported() -> Result<()> {
    let (handlers, _dir, node) = setup().await?;

    // Fails twice, then succeeds; the journaled side effect happened once.
    let (status, output) = node.ingress("/Flaky/run", Some(r#"{"fail_attempts": 2}"#), &[]).await?;
    assert_eq!(status, 200, "{output}");
    assert!(output.as_str().unwrap().starts_with("ok after 3 attempts"), "{output}");
    let (runs, attempts) = (recorded(&handlers, "flaky.jsonl")?, recorded(&handlers, "flaky-attempts.jsonl")?);
    let (id, lines) = runs.iter().next().context("one run")?;
    assert_eq!((runs.len(), lines.len()), (1, 1), "{runs:?}");
    assert!(attempts[id].len() >= 3, "{attempts:?}");

    // Out of attempts: backing off in between, then failed with the last error.
    let id = send(&node, "/Flaky/run", r#"{"fail_attempts": 100}"#).await?;
    let backing_off = wait_for_status(&node, &id, "backing-off").await?;
    assert!(backing_off["attempts"].as_u64() >= Some(1), "{backing_off}");
    assert!(backing_off["last_failure"].as_str().unwrap().contains("fails on purpose"), "{backing_off}");
    assert!(!backing_off["next_retry_at"].as_str().unwrap().is_empty(), "{backing_off}");
    let failed = wait_for_status(&node, &id, "completed").await?;
    assert_eq!(failed["completion_result"], "failure");
    assert!(failed["completion_failure"].as_str().unwrap().contains("fails on purpose"), "{failed}");
    assert_eq!(failed["attempts"], 6, "{failed}");
    let (status, answer) = node.ingress(&format!("/restate/invocation/{id}/output"), None, &[]).await?;
    assert_eq!(status, 500, "{answer}");

    // A terminal error completes the invocation at once, with the handler's code.
    let started = Instant::now();
    let (status, answer) = node.ingress("/Flaky/terminal", Some(""), &[]).await?;
    assert_eq!((status, answer["message"].as_str()), (422, Some("Flaky/terminal fails on purpose")), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(2));

    // A handler that never answers runs into the attempt timeout, then is killed.
    let id = send(&node, "/Flaky/hang", "").await?;
    let hanging = wait_for_status(&node, &id, "backing-off").await?;
    assert!(hanging["last_failure"].as_str().unwrap().contains("timed out"), "{hanging}");
    assert_eq!(act(&node, &id, "purge").await?, 409, "only completed invocations are purged");
    assert_eq!(act(&node, &id, "kill").await?, 200);
    let killed = invocation(&node, &id).await?;
    assert_eq!(
        (killed["status"].as_str(), killed["completion_failure"].as_str()),
        (Some("completed"), Some("[409] killed"))
    );
    assert_eq!(act(&node, &id, "kill").await?, 409);
    assert_eq!(act(&node, &id, "cancel").await?, 409);
    assert_eq!(act(&node, &id, "purge").await?, 200);
    assert_eq!(node.admin(Method::GET, &format!("/invocations/{id}"), None).await?.0, 404);
    assert_eq!(act(&node, &id, "kill").await?, 404);
    assert!(node.metric("ferry_invoker_attempts_total").await? >= 10.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_key_blocks_only_itself() -> Result<()> {
    let (_handlers, _dir, node) = setup().await?;
    let poisoned = send(&node, "/Counter/bad/add", r#"{"poison": true}"#).await?;
    let behind = send(&node, "/Counter/bad/add", r#"{"seq": 1}"#).await?;
    wait_for_status(&node, &poisoned, "backing-off").await?;
    // Other keys flow while the poisoned one holds its key.
    for seq in 1..=3 {
        let (status, count) = node.ingress("/Counter/good/add", Some(&json!({ "seq": seq }).to_string()), &[]).await?;
        assert_eq!((status, count), (200, json!(seq)));
    }
    assert_eq!(invocation(&node, &behind).await?["status"], "pending");

    // Cancelling a backing-off invocation tells the handler through its journal.
    let journal = invocation(&node, &poisoned).await?["journal_length"].as_u64().unwrap();
    assert_eq!(act(&node, &poisoned, "cancel").await?, 202);
    let cancelled = invocation(&node, &poisoned).await?;
    assert_eq!(cancelled["journal_length"].as_u64(), Some(journal + 1), "{cancelled}");
    // Killing it releases the key: the next invocation of the key runs.
    assert_eq!(act(&node, &poisoned, "kill").await?, 200);
    let (status, answer) = node.ingress(&format!("/restate/invocation/{behind}/attach"), None, &[]).await?;
    assert_eq!((status, answer), (200, json!(1)));
    let (_, counter) = node.ingress("/Counter/bad/get", Some(""), &[]).await?;
    assert_eq!(counter["count"], 1);

    // A queued invocation that has not started is cancelled at once.
    let first = send(&node, "/Counter/slow/add", r#"{"poison": true}"#).await?;
    let queued = send(&node, "/Counter/slow/add", "{}").await?;
    wait_for_status(&node, &first, "backing-off").await?;
    assert_eq!(act(&node, &queued, "cancel").await?, 200);
    let queued = invocation(&node, &queued).await?;
    assert_eq!(queued["completion_failure"], "[409] canceled");
    assert_eq!(act(&node, &first, "kill").await?, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sleeps_are_durable_and_cancellable() -> Result<()> {
    let (_handlers, _dir, mut node) = setup().await?;
    let started = Instant::now();
    let (status, answer) = node.ingress("/Flaky/nap", Some("1000"), &[]).await?;
    assert_eq!((status, answer), (200, json!("rested")));
    assert!(started.elapsed() >= Duration::from_millis(1000));

    // A sleep outlives a SIGKILL of the node.
    let started = Instant::now();
    let id = send(&node, "/Flaky/nap", "3000").await?;
    let suspended = wait_for_status(&node, &id, "suspended").await?;
    assert!(!suspended["next_retry_at"].as_str().unwrap().is_empty());
    node.kill().await;
    node.restart().await?;
    let (status, answer) = node.ingress(&format!("/restate/invocation/{id}/attach"), None, &[]).await?;
    assert_eq!((status, answer), (200, json!("rested")));
    assert!(started.elapsed() >= Duration::from_millis(3000));

    // Cancelling a sleeping invocation ends its sleep with an error.
    let id = send(&node, "/Flaky/nap", "3600000").await?;
    wait_for_status(&node, &id, "suspended").await?;
    assert_eq!(act(&node, &id, "cancel").await?, 202);
    let (status, answer) = node.ingress(&format!("/restate/invocation/{id}/attach"), None, &[]).await?;
    assert_eq!(status, 409, "{answer}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_ingress_calls_sends_and_deduplicates() -> Result<()> {
    let (_handlers, _dir, mut node) = setup().await?;
    assert_eq!(node.ingress("/Counter/a/add", Some("{}"), &[]).await?, (200, json!(1)));
    let id = send(&node, "/Counter/a/add", "{}").await?;
    let (status, answer) = node.ingress(&format!("/restate/invocation/{id}/attach"), None, &[]).await?;
    assert_eq!((status, answer), (200, json!(2)));
    assert_eq!(node.ingress(&format!("/restate/invocation/{id}/output"), None, &[]).await?, (200, json!(2)));
    let invoked = invocation(&node, &id).await?;
    assert_eq!(invoked["invoked_by"], "ingress");

    // A delayed send waits before it starts.
    let sent = Instant::now();
    let (status, answer) = node.ingress("/Counter/a/add/send?delay=1500ms", Some("{}"), &[]).await?;
    assert_eq!(status, 202, "{answer}");
    let delayed = answer["invocationId"].as_str().unwrap().to_owned();
    assert_eq!(invocation(&node, &delayed).await?["status"], "scheduled");
    assert_eq!(node.ingress(&format!("/restate/invocation/{delayed}/output"), None, &[]).await?.0, 470);
    let (status, answer) = node.ingress(&format!("/restate/invocation/{delayed}/attach"), None, &[]).await?;
    assert_eq!((status, answer), (200, json!(3)));
    assert!(sent.elapsed() >= Duration::from_millis(1500));

    // An idempotency key makes one invocation of many requests, across a restart.
    let key = [("idempotency-key", "order-17")];
    let (status, first) = node.ingress("/Counter/b/add/send", Some("{}"), &key).await?;
    assert_eq!((status, first["status"].as_str()), (202, Some("Accepted")));
    let (status, again) = node.ingress("/Counter/b/add/send", Some("{}"), &key).await?;
    assert_eq!((status, again["status"].as_str()), (202, Some("PreviouslyAccepted")));
    assert_eq!(first["invocationId"], again["invocationId"]);
    assert_eq!(node.ingress("/Counter/b/add", Some("{}"), &key).await?, (200, json!(1)));
    node.kill().await;
    node.restart().await?;
    assert_eq!(node.ingress("/Counter/b/add", Some("{}"), &key).await?, (200, json!(1)));
    assert_eq!(node.ingress("/Counter/b/get", Some(""), &[]).await?.1["count"], 1);
    // The same key for another target is another invocation.
    assert_eq!(node.ingress("/Counter/c/add", Some("{}"), &key).await?, (200, json!(1)));

    // A workflow runs once per key; later requests get the first result.
    let (status, output) = node.ingress("/Flow/w1/run", Some("abc"), &[]).await?;
    assert_eq!((status, output.as_str()), (200, Some("flow w1 done (3 input bytes)")));
    let (_, again) = node.ingress("/Flow/w1/run", Some("abcdef"), &[]).await?;
    assert_eq!(again, output);
    assert_eq!(node.ingress("/restate/workflow/Flow/w1/output", None, &[]).await?, (200, output));

    // Errors.
    for (path, status) in [("/Nope/run", 404), ("/Counter/a/nope", 404), ("/Counter/add", 400), ("/Sink/handle/x", 404)]
    {
        let (got, answer) = node.ingress(path, Some("{}"), &[]).await?;
        assert_eq!(got, status, "{path}: {answer}");
        assert!(answer["message"].is_string(), "{path}: {answer}");
    }
    let (status, answer) = node.ingress("/Counter/a/reset", Some("not json"), &[]).await?;
    assert!((400..500).contains(&status), "the handler rejects the payload: {status} {answer}");
    assert_eq!(node.ingress("/Counter/a/reset", Some("7"), &[]).await?, (200, json!(7)));
    assert_eq!(node.ingress("/restate/invocation/inv_nope/output", None, &[]).await?.0, 404);
    let (status, _) = node.ingress("/Sink/handle/send?delay=soon", Some(""), &[]).await?;
    assert_eq!(status, 400);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_handlers_run_from_kafka_and_http() -> Result<()> {
    let python = PythonHandlers::start().await?;
    let broker = Broker::start().await?;
    let dir = tempfile::tempdir()?;
    let node = Node::start(&dir.path().join("node"), &broker).await?;
    let (status, body) = node.post("/deployments", json!({ "uri": python.uri, "use_http_11": true })).await?;
    assert_eq!(status, 201, "{body}");
    broker.create_topic("py", 2).await?;
    let mut subscriptions = Vec::new();
    for sink in ["service://PyCounter/add", "service://PyEcho/headers"] {
        let (status, body) = node
            .post(
                "/subscriptions",
                json!({"source": "kafka://my-cluster/py", "sink": sink, "options": {"auto.offset.reset": "earliest"}}),
            )
            .await?;
        assert_eq!(status, 201, "{body}");
        subscriptions.push(body["id"].as_str().unwrap().to_owned());
    }
    const N: usize = 60;
    let records: Vec<Record> = (0..N)
        .map(|i| Record { key: Some(format!("p{}", i % 3).into_bytes()), payload: b"{}".to_vec(), headers: vec![] })
        .collect();
    produce(&broker.producer()?, "py", &records).await?;
    for sub in &subscriptions {
        eventually(Duration::from_secs(120), "the Python handlers to complete every record", || async {
            let all = node.invocations(&format!("subscription={sub}")).await?;
            Ok((all.len() == N && all.iter().all(|inv| inv["completion_result"] == "success")).then_some(()))
        })
        .await
        .with_context(|| node.log_tail())?;
    }
    // The object's state counted every record; HTTP calls see the same state.
    for key in ["p0", "p1", "p2"] {
        assert_eq!(node.ingress(&format!("/PyCounter/{key}/add"), Some("{}"), &[]).await?, (200, json!(N / 3 + 1)));
    }
    // The Service handler saw each record's Kafka metadata.
    let echoes = node.invocations(&format!("subscription={}", subscriptions[1])).await?;
    for inv in echoes.iter().take(10) {
        let id = inv["id"].as_str().unwrap();
        let (status, seen) = node.ingress(&format!("/restate/invocation/{id}/output"), None, &[]).await?;
        assert_eq!(status, 200, "{seen}");
        assert_eq!(seen["kafka.offset"], inv["headers"]["kafka.offset"], "{seen}");
        assert_eq!(seen["restate.subscription.id"], subscriptions[1].as_str());
    }
    // A service that asks for no journal retention has its invocations
    // removed as they complete; the node's default (a day) keeps the others.
    assert_eq!(node.ingress("/PyEphemeral/run", Some("{}"), &[]).await?, (200, json!("done")));
    let kept = node.invocations("").await?;
    assert!(kept.iter().all(|inv| inv["target_service_name"] != "PyEphemeral"), "kept: {kept:?}");
    assert!(kept.iter().any(|inv| inv["target_service_name"] == "PyCounter"));
    Ok(())
}
