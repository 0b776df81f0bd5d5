//! Handlers written with Restate's TypeScript SDK 1.17 on Node 22
//! (`chaos-tests/typescript/handlers.cjs`), registered with Ferry over
//! HTTP/2 as the SDK serves them: state, steps and their retries, sleeps,
//! terminal errors, calls across partitions, one-way and delayed sends,
//! awakeables, named signals, workflow promises, lazy state, attach, the
//! cancellation of a caller reaching its callee, and the timeouts a service
//! asks for.

use std::time::Duration;

use anyhow::{Context, Result};
use ferry_chaos_tests::{eventually, free_port, Node, TypeScriptHandlers};
use serde_json::{json, Value};

const JSON: [(&str, &str); 1] = [("content-type", "application/json")];

/// A node (its Kafka cluster unreachable: nothing here reads Kafka) with
/// the TypeScript handlers registered.
async fn node_with_typescript() -> Result<(TypeScriptHandlers, tempfile::TempDir, Node)> {
    let handlers = TypeScriptHandlers::start().await?;
    let dir = tempfile::tempdir()?;
    let node = Node::start_for_broker(&dir.path().join("node"), &format!("127.0.0.1:{}", free_port())).await?;
    let (status, body) = node.post("/deployments", json!({ "uri": handlers.uri })).await?;
    anyhow::ensure!(status == 201, "register: {status} {body}");
    Ok((handlers, dir, node))
}

/// `POST path` with a JSON body, answered (status, body).
async fn call(node: &Node, path: &str, body: Value) -> Result<(u16, Value)> {
    node.ingress(path, Some(&body.to_string()), &JSON).await
}

/// Starts `path` with `/send` and answers the invocation's id.
async fn start(node: &Node, path: &str, body: Value) -> Result<String> {
    let (status, sent) = call(node, &format!("{path}/send"), body).await?;
    anyhow::ensure!(status == 202, "{path}: {status} {sent}");
    Ok(sent["invocationId"].as_str().context("invocationId")?.to_owned())
}

/// The result of invocation `id`, once it has one.
async fn attach(node: &Node, id: &str) -> Result<(u16, Value)> {
    node.ingress(&format!("/restate/invocation/{id}/attach"), None, &[]).await
}

/// What `TsAwake` noted on the board under `key`, once it has.
async fn noted(node: &Node, key: &str) -> Result<String> {
    eventually(Duration::from_secs(30), "an id on the board", || async {
        let (status, body) = call(node, &format!("/TsBoard/{key}/get"), Value::Null).await?;
        anyhow::ensure!(status == 200, "TsBoard/{key}/get: {status} {body}");
        Ok(body.as_str().map(str::to_owned))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_handlers_keep_state_run_steps_and_fail_as_told() -> Result<()> {
    let (_handlers, _dir, node) = node_with_typescript().await?;
    let deployment = &node.get("/deployments").await?["deployments"][0];
    assert_eq!(deployment["protocol_type"], "BidiStream", "{deployment}");
    assert_eq!(node.get("/services/TsApproval").await?["ty"], "Workflow");

    // State: get, set, stateKeys, clear and clearAll.
    assert_eq!(call(&node, "/TsCounter/k/add", Value::Null).await?, (200, json!(1)));
    assert_eq!(call(&node, "/TsCounter/k/add", Value::Null).await?, (200, json!(2)));
    assert_eq!(call(&node, "/TsCounter/k/get", Value::Null).await?, (200, json!({"count": 2, "keys": ["count"]})));
    assert_eq!(call(&node, "/TsCounter/k/clear", json!({})).await?.0, 200);
    assert_eq!(call(&node, "/TsCounter/k/get", Value::Null).await?, (200, json!({"count": 0, "keys": ["note"]})));
    assert_eq!(call(&node, "/TsCounter/k/clear", json!({"all": true})).await?.0, 200);
    assert_eq!(call(&node, "/TsCounter/k/get", Value::Null).await?, (200, json!({"count": 0, "keys": []})));

    // Steps and a sleep, each journaled: the result is the same when the
    // invocation is read again.
    let id = start(&node, "/TsSteps/run", json!({"tag": "x"})).await?;
    let (status, first) = attach(&node, &id).await?;
    assert_eq!((status, &first["results"]), (200, &json!(["one:x", "two:x", "three:x"])), "{first}");
    assert_eq!(first["uuid"].as_str().map(str::len), Some(36), "{first}");
    assert_eq!(attach(&node, &id).await?, (200, first));

    // A step that fails twice succeeds on its third attempt.
    assert_eq!(call(&node, "/TsSteps/retry", json!({"failures": 2})).await?, (200, json!(3)));

    // A terminal error ends the invocation with its code and message.
    let (status, body) = call(&node, "/TsSteps/fail", json!({"code": 418, "message": "teapot"})).await?;
    assert_eq!((status, &body["message"]), (418, &json!("teapot")), "{body}");

    // Lazy state: read key by key, and the node answered the reads.
    assert_eq!(call(&node, "/TsLazy/z/add", json!({"name": "a"})).await?, (200, json!(["a"])));
    assert_eq!(call(&node, "/TsLazy/z/add", json!({"name": "b"})).await?, (200, json!(["a", "b"])));
    assert_eq!(call(&node, "/TsLazy/z/add", json!({"name": "a"})).await?, (200, json!(["a", "b"])));
    assert_eq!(call(&node, "/TsLazy/z/get", json!("a")).await?, (200, json!(2)));
    assert!(node.metric("ferry_invoker_lazy_state_reads_total").await? > 0.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_handlers_call_send_and_attach_across_partitions() -> Result<()> {
    let (_handlers, _dir, node) = node_with_typescript().await?;

    // A -> B -> C, each hop a call to another key, each run once.
    let (status, trail) = call(&node, "/TsHop/a/hop", json!({"path": ["b", "c"], "trail": []})).await?;
    assert_eq!((status, trail), (200, json!(["a", "b", "c"])));
    for key in ["a", "b", "c"] {
        assert_eq!(call(&node, &format!("/TsHop/{key}/hits"), Value::Null).await?, (200, json!(1)), "{key}");
    }

    // One-way sends keep their order per key; the delayed one comes last.
    assert_eq!(call(&node, "/TsSender/send", json!({"key": "l1", "n": 5, "delay": 300})).await?, (200, json!(6)));
    let items = eventually(Duration::from_secs(30), "every item", || async {
        let (_, items) = call(&node, "/TsList/l1/get", Value::Null).await?;
        Ok((items.as_array().map_or(0, Vec::len) == 6).then_some(items))
    })
    .await?;
    assert_eq!(items, json!([0, 1, 2, 3, 4, 5]));

    // Calls awaited together, two of them to one key in the order made.
    let (status, body) = call(&node, "/TsFanout/call", json!({"keys": ["x", "y", "x"]})).await?;
    assert_eq!((status, &body["results"]), (200, &json!([1, 1, 2])), "{body}");

    // A send, then attach to it from the handler.
    let (status, body) = call(&node, "/TsFanout/attach", json!({"key": "t1"})).await?;
    assert_eq!((status, &body["result"]), (200, &json!(1)), "{body}");
    let sent = node.get(&format!("/invocations/{}", body["id"].as_str().context("id")?)).await?;
    assert_eq!(sent["target"], "TsCounter/t1/add", "{sent}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_handlers_wait_on_awakeables_signals_and_promises() -> Result<()> {
    let (_handlers, _dir, node) = node_with_typescript().await?;
    let suspended = |id: String| {
        let node = &node;
        eventually(Duration::from_secs(30), "a suspended invocation", move || {
            let id = id.clone();
            async move { Ok((node.get(&format!("/invocations/{id}")).await?["status"] == "suspended").then_some(())) }
        })
    };

    // Awakeables: resolved over HTTP, by a handler, rejected over HTTP.
    let waiting = start(&node, "/TsAwake/a1/wait", Value::Null).await?;
    let awakeable = noted(&node, "a1").await?;
    suspended(waiting.clone()).await?;
    let resolve = format!("/restate/awakeables/{awakeable}/resolve");
    assert_eq!(node.ingress(&resolve, Some(r#""hello""#), &JSON).await?.0, 202);
    assert_eq!(attach(&node, &waiting).await?, (200, json!({"value": "hello"})));

    let waiting = start(&node, "/TsAwake/a2/wait", Value::Null).await?;
    let awakeable = noted(&node, "a2").await?;
    let (status, body) = call(&node, "/TsAwake/a2/complete", json!({"id": awakeable, "value": {"n": 1}})).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(attach(&node, &waiting).await?, (200, json!({"value": {"n": 1}})));

    let waiting = start(&node, "/TsAwake/a3/wait", Value::Null).await?;
    let awakeable = noted(&node, "a3").await?;
    assert_eq!(node.ingress(&format!("/restate/awakeables/{awakeable}/reject"), Some("no"), &[]).await?.0, 202);
    let (status, body) = attach(&node, &waiting).await?;
    assert_eq!((status, &body["message"]), (200, &json!("no")), "{body}");

    // A named signal sent by another handler.
    let waiting = start(&node, "/TsAwake/s1/signal", Value::Null).await?;
    assert_eq!(noted(&node, "s1").await?, waiting);
    let (status, body) = call(&node, "/TsAwake/s1/send", json!({"id": waiting, "value": "go!"})).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(attach(&node, &waiting).await?, (200, json!({"value": "go!"})));

    // A workflow's run waits on a promise that a shared handler resolves;
    // its output is also read by workflow key.
    let run = start(&node, "/TsApproval/w1/run", json!({"x": 1})).await?;
    suspended(run.clone()).await?;
    let (status, body) = call(&node, "/TsApproval/w1/peek", Value::Null).await?;
    assert_eq!((status, body), (200, json!({"decision": null, "stage": "waiting"})));
    assert_eq!(call(&node, "/TsApproval/w1/decide", json!("yes")).await?.0, 200);
    let decided = json!({"input": {"x": 1}, "decision": "yes"});
    assert_eq!(attach(&node, &run).await?, (200, decided.clone()));
    assert_eq!(node.ingress("/restate/workflow/TsApproval/w1/output", None, &[]).await?, (200, decided));
    let (status, body) = call(&node, "/TsApproval/w1/peek", Value::Null).await?;
    assert_eq!((status, body), (200, json!({"decision": "yes", "stage": "decided"})));

    // Cancelling a caller cancels the call it waits on: both end with 409.
    let caller = start(&node, "/TsParent/call", json!({"key": "c1"})).await?;
    noted(&node, "c1").await?;
    let callee = eventually(Duration::from_secs(30), "the callee", || async {
        let callees = node.invocations("target=TsAwake/wait").await?;
        Ok(callees.into_iter().find(|c| c["invoked_by_id"] == json!(caller)))
    })
    .await?;
    let callee = callee["id"].as_str().context("id")?.to_owned();
    suspended(callee.clone()).await?;
    let (status, body) = node.admin(reqwest::Method::PATCH, &format!("/invocations/{caller}/cancel"), None).await?;
    assert!(status == 200 || status == 202, "{status} {body}");
    let (status, body) = attach(&node, &caller).await?;
    assert_eq!((status, &body["code"]), (200, &json!(409)), "{body}");
    let (status, body) = attach(&node, &callee).await?;
    assert_eq!((status, &body["code"]), (200, &json!(409)), "{body}");
    Ok(())
}

/// The manifest's timeouts, and what arrives while an attempt runs. A
/// handler whose service asks for 10 s of inactivity keeps its attempt open
/// while it waits on an awakeable (the node's own limit is 250 ms), and gets
/// the awakeable's value in that same attempt. A step of 3 s in a service
/// whose attempts are aborted 1 s after their request closes fails with
/// that reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_handlers_keep_their_manifests_timeouts() -> Result<()> {
    let (_handlers, _dir, node) = node_with_typescript().await?;
    let handler = &node.get("/services/TsPatient").await?["handlers"][0];
    assert_eq!(handler["name"], "wait", "{handler}");

    let waiting = start(&node, "/TsPatient/p1/wait", Value::Null).await?;
    let awakeable = noted(&node, "p1").await?;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let status = node.get(&format!("/invocations/{waiting}")).await?;
    assert_eq!(status["status"], "ready", "still in its first attempt: {status}");
    let (attempts, streamed) = (
        node.metric("ferry_invoker_attempts_total").await?,
        node.metric("ferry_invoker_arrivals_streamed_total").await?,
    );
    let resolve = format!("/restate/awakeables/{awakeable}/resolve");
    assert_eq!(node.ingress(&resolve, Some(r#""late""#), &JSON).await?.0, 202);
    assert_eq!(attach(&node, &waiting).await?, (200, json!({"value": "late"})));
    assert_eq!(node.metric("ferry_invoker_arrivals_streamed_total").await?, streamed + 1.0);
    assert_eq!(node.metric("ferry_invoker_attempts_total").await?, attempts + 1.0, "one attempt ended: the first");

    let napping = start(&node, "/TsStuck/nap", Value::Null).await?;
    let failure = eventually(Duration::from_secs(30), "an aborted attempt", || async {
        let status = node.get(&format!("/invocations/{napping}")).await?;
        Ok(status["last_failure"].as_str().filter(|f| !f.is_empty()).map(str::to_owned))
    })
    .await?;
    assert!(failure.contains("sent nothing for 1s"), "{failure}");
    Ok(())
}
