//! One real node, a real broker (tansu) and real Restate SDK handlers.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::{Context, Result};
use ferry_chaos_tests::{eventually, node_with_handlers, produce, Broker, Handlers, Node, Record};
use reqwest::Method;
use serde_json::{json, Value};

const SUBSCRIBE_COUNTER: &str = "service://Counter/add";

async fn subscribe(node: &Node, topic: &str, sink: &str) -> Result<String> {
    subscribe_to(node, "my-cluster", topic, sink, json!({ "auto.offset.reset": "earliest" })).await
}

/// Subscribes `sink` to `topic` of `cluster` with `options`; answers its id.
async fn subscribe_to(node: &Node, cluster: &str, topic: &str, sink: &str, options: Value) -> Result<String> {
    let source = format!("kafka://{cluster}/{topic}");
    let (status, body) =
        node.post("/subscriptions", json!({ "source": source, "sink": sink, "options": options })).await?;
    assert_eq!(status, 201, "{body}");
    Ok(body["id"].as_str().context("subscription id")?.to_owned())
}

/// Records `{"seq": i}` for each `i` of `seqs` (with `hold_ms` if given, for
/// `Sink/handle`), keyed `{prefix}{i % count}` by `keys` or not keyed.
fn seq_records(seqs: std::ops::Range<i64>, keys: Option<(&str, i64)>, hold_ms: Option<u64>) -> Vec<Record> {
    seqs.map(|i| {
        let mut payload = json!({ "seq": i });
        if let Some(hold_ms) = hold_ms {
            payload["hold_ms"] = json!(hold_ms);
        }
        Record {
            key: keys.map(|(prefix, count)| format!("{prefix}{}", i % count).into_bytes()),
            payload: payload.to_string().into_bytes(),
            headers: vec![],
        }
    })
    .collect()
}

/// Registers `broker` as Kafka cluster `name` (its address and the client
/// properties it needs) and subscribes `Counter/add` to `topic` there from the
/// earliest record. Answers the cluster's properties and the subscription's id.
async fn subscribe_through(
    node: &Node,
    broker: &Broker,
    name: &str,
    topic: &str,
) -> Result<(serde_json::Map<String, Value>, String)> {
    let mut properties: serde_json::Map<String, Value> =
        broker.client_properties().into_iter().map(|(k, v)| (k.to_owned(), json!(v))).collect();
    properties.insert("bootstrap.servers".to_owned(), json!(broker.bootstrap()));
    let (status, created) = node.post("/kafka-clusters", json!({ "name": name, "properties": properties })).await?;
    assert_eq!(status, 201, "{created}");
    let options = json!({ "ferry.start.position": "earliest" });
    let id = subscribe_to(node, name, topic, SUBSCRIBE_COUNTER, options).await?;
    Ok((properties, id))
}

/// Registers Kafka cluster `name` with `properties`, subscribes `Counter/add`
/// to `topic` there, and waits until its consumer reports errors: a cluster
/// the broker refuses. Answers the subscription's id.
async fn refused_subscription(
    node: &Node,
    name: &str,
    properties: &serde_json::Map<String, Value>,
    topic: &str,
) -> Result<String> {
    let (status, body) = node.post("/kafka-clusters", json!({ "name": name, "properties": properties })).await?;
    assert_eq!(status, 201, "{body}");
    let source = format!("kafka://{name}/{topic}");
    let (status, body) = node.post("/subscriptions", json!({ "source": source, "sink": SUBSCRIBE_COUNTER })).await?;
    assert_eq!(status, 201, "a cluster that does not answer the topic check is not asked: {body}");
    let id = body["id"].as_str().context("id")?.to_owned();
    eventually(Duration::from_secs(60), &format!("the errors of {name}'s consumer counted"), || async {
        let errors = ferry_chaos_tests::prometheus::scrape(node)
            .await?
            .sum("ferry_ingress_consumer_errors_total", &[("subscription", id.as_str())]);
        Ok((errors > 0.0).then_some(()))
    })
    .await?;
    Ok(id)
}

/// Everything the metadata group holds, as the admin API shows it.
async fn snapshot(node: &Node) -> Result<(Value, Value, Value)> {
    Ok((node.get("/deployments").await?, node.get("/services").await?, node.get("/subscriptions").await?))
}

fn header<'a>(invocation: &'a Value, name: &str) -> Option<&'a str> {
    invocation["headers"][name].as_str()
}

/// (partition, offset) -> invocation, failing on any offset seen twice.
fn by_offset(invocations: &[Value]) -> BTreeMap<(i64, i64), Value> {
    let mut map = BTreeMap::new();
    for inv in invocations {
        let key = (inv["source"]["partition"].as_i64().unwrap(), inv["source"]["offset"].as_i64().unwrap());
        if let Some(previous) = map.insert(key, inv.clone()) {
            panic!("offset {key:?} has two invocations: {previous} and {inv}");
        }
    }
    map
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_a_rust_sdk_deployment_and_rejects_bad_requests() -> Result<()> {
    let (broker, handlers, _dir, mut node) = node_with_handlers(&[]).await?;

    let deployments = node.get("/deployments").await?;
    let deployment = &deployments["deployments"][0];
    assert!(deployment["id"].as_str().unwrap().starts_with("dp_"), "{deployment}");
    assert_eq!(deployment["uri"], handlers.uri.as_str());
    assert_eq!(deployment["http_version"], "HTTP/2.0", "the Rust SDK speaks h2c only");
    assert_eq!(deployment["min_protocol_version"], 5);

    let counter = node.get("/services/Counter").await?;
    assert_eq!(counter["ty"], "VirtualObject");
    let handler_types: BTreeMap<String, String> = counter["handlers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["name"].as_str().unwrap().to_owned(), h["ty"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(handler_types["add"], "Exclusive");
    assert_eq!(handler_types["get"], "Shared");
    let flow = node.get("/services/Flow").await?;
    assert_eq!(flow["ty"], "Workflow");
    assert_eq!(node.get("/services/Sink").await?["ty"], "Service");

    // Exactly the command from Restate's Kafka documentation.
    broker.create_topic("my-topic", 1).await?;
    let (status, sub) = node
        .post(
            "/subscriptions",
            json!({"source": "kafka://my-cluster/my-topic", "sink": "service://Counter/add",
                   "options": {"auto.offset.reset": "earliest"}}),
        )
        .await?;
    assert_eq!(status, 201, "{sub}");
    let sub_id = sub["id"].as_str().unwrap().to_owned();
    assert!(sub_id.starts_with("sub_"));
    assert_eq!(sub["options"]["group.id"], sub_id.as_str());
    assert_eq!(sub["options"]["auto.offset.reset"], "earliest");

    let clusters = node.get("/kafka-clusters").await?;
    assert_eq!(clusters["clusters"][0]["name"], "my-cluster");

    let before = snapshot(&node).await?;

    let unreachable = format!("http://127.0.0.1:{}", ferry_chaos_tests::free_port());
    let not_a_deployment = node.url("");
    let bad_posts: Vec<(&str, Value, u16, &str)> = vec![
        ("/subscriptions", json!({"source": "http://my-cluster/t", "sink": SUBSCRIBE_COUNTER}), 400, "kafka://"),
        ("/subscriptions", json!({"source": "kafka://nope/t", "sink": SUBSCRIBE_COUNTER}), 400, "my-cluster"),
        ("/subscriptions", json!({"source": "kafka://my-cluster/t", "sink": "http://Counter/add"}), 400, "service://"),
        ("/subscriptions", json!({"source": "kafka://my-cluster/t", "sink": "service://Nope/add"}), 400, "Nope"),
        ("/subscriptions", json!({"source": "kafka://my-cluster/t", "sink": "service://Counter/nope"}), 400, "nope"),
        (
            "/subscriptions",
            json!({"source": "kafka://my-cluster/t", "sink": SUBSCRIBE_COUNTER, "options": {"no.such.property": "1"}}),
            400,
            "no.such.property",
        ),
        ("/subscriptions", json!({"source": "kafka://my-cluster/t", "sink": SUBSCRIBE_COUNTER}), 400, "no topic t"),
        ("/deployments", json!({"uri": unreachable}), 400, "cannot reach"),
        ("/deployments", json!({"uri": "not a uri"}), 400, "invalid deployment uri"),
        ("/deployments", json!({"uri": not_a_deployment}), 400, "404"),
        ("/deployments", json!({}), 400, "uri"),
    ];
    for (path, body, expected, mentions) in bad_posts {
        let (status, answer) = node.post(path, body.clone()).await?;
        assert_eq!(status, expected, "POST {path} {body}: {answer}");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(message.contains(mentions), "POST {path} {body}: message {message:?} should mention {mentions:?}");
    }
    for path in ["/subscriptions", "/deployments"] {
        let response =
            node.http.post(node.url(path)).header("content-type", "application/json").body("{not json").send().await?;
        assert_eq!(response.status(), 400, "malformed JSON to {path}");
        let answer: Value = response.json().await?;
        assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()), "{answer}");
    }
    for (method, path) in [
        (Method::GET, "/subscriptions/sub_nope"),
        (Method::DELETE, "/subscriptions/sub_nope"),
        (Method::GET, "/deployments/dp_nope"),
        (Method::DELETE, "/deployments/dp_nope"),
        (Method::GET, "/services/Nope"),
        (Method::GET, "/kafka-clusters/nope"),
        (Method::GET, "/invocations/inv_nope"),
        (Method::GET, "/invocations/inv_00000000000000000000000000000000"),
    ] {
        let (status, answer) = node.admin(method.clone(), path, None).await?;
        assert_eq!(status, 404, "{method} {path}: {answer}");
        assert!(answer["message"].is_string(), "{answer}");
    }
    let (status, _) = node.admin(Method::GET, "/invocations?status=bogus", None).await?;
    assert_eq!(status, 400);
    assert_eq!(snapshot(&node).await?, before, "bad requests changed metadata");

    let filtered = node.get("/subscriptions?sink=service://Counter/add").await?;
    assert_eq!(filtered["subscriptions"].as_array().unwrap().len(), 1);
    let filtered = node.get("/subscriptions?source=kafka://my-cluster/other").await?;
    assert_eq!(filtered["subscriptions"].as_array().unwrap().len(), 0);

    // Metadata lives in the metadata group and survives a restart.
    let status = node.terminate().await?;
    assert!(status.success(), "SIGTERM exit: {status}");
    node.restart().await?;
    assert_eq!(snapshot(&node).await?, before);

    let (status, _) = node.admin(Method::DELETE, &format!("/subscriptions/{sub_id}"), None).await?;
    assert_eq!(status, 202);
    eventually(Duration::from_secs(30), "the drained subscription gone", || async {
        Ok((node.admin(Method::GET, &format!("/subscriptions/{sub_id}"), None).await?.0 == 404).then_some(()))
    })
    .await?;
    drop(broker);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_becomes_exactly_one_invocation() -> Result<()> {
    const N: usize = 10_000;
    const KEYS: usize = 500;
    let (broker, handlers, _dir, node) = node_with_handlers(&[]).await?;
    broker.create_topic("orders", 4).await?;
    let object_sub = subscribe(&node, "orders", SUBSCRIBE_COUNTER).await?;
    let service_sub = subscribe(&node, "orders", "service://Sink/handle").await?;

    let records: Vec<Record> = (0..N)
        .map(|i| Record {
            key: Some(format!("key-{}", i % KEYS).into_bytes()),
            payload: json!({ "seq": i }).to_string().into_bytes(),
            headers: vec![("record".to_owned(), i.to_string())],
        })
        .collect();
    let producer = broker.producer()?;
    let offsets = produce(&producer, "orders", &records).await?;
    let mut records_per_key = BTreeMap::new();
    let mut sink_headers = HashMap::new();
    let produced: HashMap<(i64, i64), usize> =
        offsets.iter().enumerate().map(|(i, &(p, o))| ((p as i64, o), i)).collect();
    assert_eq!(produced.len(), N);

    for (sub, keyed) in [(&object_sub, true), (&service_sub, false)] {
        let invocations = eventually(Duration::from_secs(300), "every record's invocation to complete", || async {
            let all = node.invocations(&format!("subscription={sub}")).await?;
            Ok((all.len() >= N && all.iter().all(|inv| inv["status"] == "completed")).then_some(all))
        })
        .await
        .with_context(|| node.log_tail())?;
        assert_eq!(invocations.len(), N, "subscription {sub}");
        let invocations = by_offset(&invocations);
        for (&(partition, offset), inv) in &invocations {
            let i =
                *produced.get(&(partition, offset)).unwrap_or_else(|| panic!("unknown offset {partition}/{offset}"));
            let key = format!("key-{}", i % KEYS);
            assert_eq!(header(inv, "record"), Some(i.to_string().as_str()), "{inv}");
            assert_eq!(header(inv, "kafka.offset"), Some(offset.to_string().as_str()));
            assert_eq!(header(inv, "kafka.partition"), Some(partition.to_string().as_str()));
            assert_eq!(header(inv, "kafka.topic"), Some("orders"));
            assert_eq!(header(inv, "kafka.key"), Some(key.as_str()));
            assert_eq!(header(inv, "restate.subscription.id"), Some(sub.as_str()));
            assert!(header(inv, "kafka.timestamp").is_some_and(|t| t.parse::<i64>().is_ok()), "{inv}");
            assert_eq!(inv["source"]["subscription_id"], sub.as_str());
            assert_eq!(inv["invoked_by"], "subscription");
            assert_eq!(inv["payload_size"], records[i].payload.len() as u64);
            assert_eq!(inv["completion_result"], "success", "{inv}");
            if keyed {
                assert_eq!(inv["target"], format!("Counter/{key}/add"));
                assert_eq!(inv["target_service_key"], key.as_str());
                *records_per_key.entry(key).or_insert(0u64) += 1;
            } else {
                assert_eq!(inv["target"], "Sink/handle");
                assert_eq!(inv["target_service_key"], "");
                sink_headers.insert(inv["id"].as_str().unwrap().to_owned(), inv["headers"].clone());
            }
            let id = inv["id"].as_str().unwrap();
            assert_eq!(&node.get(&format!("/invocations/{id}")).await?, inv);
        }
    }

    // Each key's state counts its records, and the handler saw them in offset order.
    assert_eq!(records_per_key.len(), KEYS);
    for (key, &records) in &records_per_key {
        let (status, counter) = node.ingress(&format!("/Counter/{key}/get"), Some(""), &[]).await?;
        assert_eq!(status, 200, "{counter}");
        assert_eq!(counter["count"], records, "{key}: {counter}");
        assert_eq!((counter["out_of_order"].as_u64(), counter["duplicates"].as_u64()), (Some(0), Some(0)), "{key}");
    }

    // Every call of the Service handler saw the record's Kafka metadata headers.
    let lines = std::fs::read_to_string(handlers.record_dir.path().join("sink.jsonl"))?;
    let mut called = HashMap::new();
    for line in lines.lines() {
        let call: Value = serde_json::from_str(line)?;
        let id = call["invocation_id"].as_str().unwrap().to_owned();
        let expected = sink_headers.get(&id).unwrap_or_else(|| panic!("the handler ran an unknown invocation {id}"));
        for name in ["kafka.offset", "kafka.partition", "kafka.topic", "kafka.key", "kafka.timestamp", "record"] {
            assert_eq!(call["headers"][name], expected[name], "{name} of {id}");
        }
        assert_eq!(call["headers"]["restate.subscription.id"], service_sub.as_str());
        *called.entry(id).or_insert(0) += 1;
    }
    assert_eq!(called.len(), N, "every Service invocation reached the handler");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeliverable_records_fail_without_blocking_their_partition() -> Result<()> {
    let (broker, _handlers, _dir, node) = node_with_handlers(&[]).await?;
    broker.create_topic("mixed", 1).await?;
    let sub = subscribe(&node, "mixed", SUBSCRIBE_COUNTER).await?;
    let record = |key: Option<&[u8]>| Record { key: key.map(<[u8]>::to_vec), payload: b"{}".to_vec(), headers: vec![] };
    let producer = broker.producer()?;
    produce(&producer, "mixed", &[record(Some(b"a")), record(Some(&[0xff, 0xfe])), record(None), record(Some(b"b"))])
        .await?;
    let invocations = eventually(Duration::from_secs(60), "4 completed invocations", || async {
        let all = node.invocations(&format!("subscription={sub}")).await?;
        Ok((all.len() >= 4 && all.iter().all(|inv| inv["status"] == "completed")).then_some(all))
    })
    .await?;
    let invocations = by_offset(&invocations);
    let status = |offset: i64| {
        let inv = &invocations[&(0, offset)];
        (inv["status"].as_str().unwrap().to_owned(), inv["completion_failure"].as_str().unwrap().to_owned())
    };
    assert_eq!(status(0), ("completed".to_owned(), String::new()));
    assert_eq!(status(1).0, "completed");
    assert!(status(1).1.contains("UTF-8"), "{:?}", status(1));
    assert_eq!(invocations[&(0, 1)]["completion_result"], "failure");
    assert_eq!(status(2).0, "completed");
    assert!(status(2).1.contains("no key"), "{:?}", status(2));
    assert_eq!(status(3), ("completed".to_owned(), String::new()), "records after undeliverable ones still flow");

    // A sink whose handler is gone: records fail at once, in order.
    let deployment = node.get("/deployments").await?["deployments"][0]["id"].as_str().unwrap().to_owned();
    let (status_code, _) = node.admin(Method::DELETE, &format!("/deployments/{deployment}"), None).await?;
    assert_eq!(status_code, 202);
    produce(&producer, "mixed", &[record(Some(b"c"))]).await?;
    let gone = eventually(Duration::from_secs(60), "the fifth invocation", || async {
        let all = node.invocations(&format!("subscription={sub}")).await?;
        Ok(all.into_iter().find(|inv| inv["source"]["offset"] == 4))
    })
    .await?;
    assert_eq!(gone["status"], "completed");
    assert!(gone["completion_failure"].as_str().unwrap().contains("not registered"), "{gone}");

    assert_eq!(node.metric("ferry_ingress_records_undeliverable_total").await?, 3.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumption_waits_out_a_broker_that_is_down() -> Result<()> {
    let handlers = Handlers::start().await?;
    let dir = tempfile::tempdir()?;
    let port = ferry_chaos_tests::free_port();
    // The node starts, registers and subscribes while no broker listens.
    let node = Node::start_for_broker(&dir.path().join("node"), &format!("127.0.0.1:{port}")).await?;
    let (status, body) = node.post("/deployments", json!({ "uri": handlers.uri })).await?;
    assert_eq!(status, 201, "{body}");
    // The topic does not exist before the broker does: look for it often.
    let sub =
        node.subscribe("late", "service://Sink/handle", json!({"topic.metadata.refresh.interval.ms": "1000"})).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(node.get("/health").await?, json!({}), "the node stays up");

    let broker = Broker::start_on(port).await?;
    broker.create_topic("late", 2).await?;
    let records: Vec<Record> =
        (0..50).map(|i| Record { key: None, payload: i.to_string().into_bytes(), headers: vec![] }).collect();
    produce(&broker.producer()?, "late", &records).await?;
    let invocations = eventually(Duration::from_secs(90), "50 invocations once the broker is up", || async {
        let all = node.invocations(&format!("subscription={sub}")).await?;
        Ok((all.len() >= 50).then_some(all))
    })
    .await
    .with_context(|| node.log_tail())?;
    assert_eq!(by_offset(&invocations).len(), 50);
    assert!(node.metric("ferry_ingress_consumer_errors_total").await? > 0.0, "broker errors are counted");
    Ok(())
}

/// Kafka clusters registered through the admin API, beside the config
/// file's: a subscription reads through one, its consumer restarts when the
/// cluster's properties change, waits while the cluster is gone, and
/// resumes when it is back, every record invoked once throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_clusters_registered_at_runtime_feed_subscriptions() -> Result<()> {
    let (broker, _handlers, _dir, node) = node_with_handlers(&[]).await?;
    broker.create_topic("runtime", 2).await?;
    let clusters = node.get("/kafka-clusters").await?;
    assert_eq!(clusters["clusters"].as_array().map(Vec::len), Some(1), "{clusters}");
    assert_eq!(
        (&clusters["clusters"][0]["name"], &clusters["clusters"][0]["configured"]),
        (&json!("my-cluster"), &json!(true))
    );

    let create =
        |name: &str, properties: Value| node.post("/kafka-clusters", json!({ "name": name, "properties": properties }));
    let servers = broker.bootstrap();
    for (name, properties, expected, says) in [
        ("bad/name", json!({ "bootstrap.servers": servers }), 400, "invalid Kafka cluster name"),
        ("rt", json!({ "client.id": "x" }), 400, "bootstrap.servers"),
        ("rt", json!({ "bootstrap.servers": servers, "no.such.property": "1" }), 400, "no.such.property"),
        ("my-cluster", json!({ "bootstrap.servers": servers }), 409, "config file"),
    ] {
        let (status, body) = create(name, properties).await?;
        assert_eq!(status, expected, "{name}: {body}");
        assert!(body["message"].as_str().is_some_and(|m| m.contains(says)), "{name}: {body}");
    }
    let (status, created) = create("rt", json!({ "bootstrap.servers": servers, "sasl.password": "hunter2" })).await?;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["properties"]["sasl.password"], "***", "secrets are redacted: {created}");
    assert_eq!(created["properties"]["bootstrap.servers"], servers.as_str());
    assert_eq!(create("rt", json!({ "bootstrap.servers": servers })).await?.0, 409, "the name is taken");
    let listed = node.get("/kafka-clusters").await?;
    let names: Vec<&str> =
        listed["clusters"].as_array().into_iter().flatten().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(names, ["my-cluster", "rt"]);

    let (status, body) = node
        .post(
            "/subscriptions",
            json!({ "source": "kafka://rt/runtime", "sink": SUBSCRIBE_COUNTER, "options": { "auto.offset.reset": "earliest" } }),
        )
        .await?;
    assert_eq!(status, 201, "{body}");
    let sub = body["id"].as_str().context("subscription id")?.to_owned();
    let described = node.get("/kafka-clusters/rt").await?;
    assert_eq!(described["subscriptions"][0]["id"], sub.as_str(), "{described}");

    let producer = broker.producer()?;
    let batch = |from: usize, n: usize| -> Vec<Record> {
        (from..from + n)
            .map(|i| Record {
                key: Some(format!("key-{}", i % 10).into_bytes()),
                payload: json!({ "seq": i }).to_string().into_bytes(),
                headers: vec![],
            })
            .collect()
    };
    let completed = |n: usize| {
        let (node, sub) = (&node, &sub);
        async move {
            eventually(Duration::from_secs(120), &format!("{n} completed invocations"), || async {
                let all = node.invocations(&format!("subscription={sub}")).await?;
                Ok((all.len() >= n && all.iter().all(|inv| inv["status"] == "completed")).then_some(all))
            })
            .await
            .with_context(|| node.log_tail())
        }
    };
    produce(&producer, "runtime", &batch(0, 100)).await?;
    completed(100).await?;

    // New properties: the consumer restarts with them and goes on where it was.
    let (status, patched) = node
        .admin(
            Method::PATCH,
            "/kafka-clusters/rt",
            Some(
                json!({ "properties": { "bootstrap.servers": servers, "sasl.password": "***", "client.rack": "r1" } }),
            ),
        )
        .await?;
    assert_eq!(status, 200, "{patched}");
    assert_eq!((&patched["properties"]["client.rack"], &patched["created_at"]), (&json!("r1"), &created["created_at"]));
    produce(&producer, "runtime", &batch(100, 100)).await?;
    completed(200).await?;

    // In use: deleted only with force; the subscription then waits for it.
    let (status, body) = node.admin(Method::DELETE, "/kafka-clusters/rt", None).await?;
    assert_eq!(status, 409, "{body}");
    assert!(body["message"].as_str().is_some_and(|m| m.contains(&sub)), "{body}");
    let (status, body) = node.admin(Method::DELETE, "/kafka-clusters/my-cluster", None).await?;
    assert_eq!(status, 409, "a cluster of the config file stays: {body}");
    assert_eq!(node.admin(Method::DELETE, "/kafka-clusters/rt?force=true", None).await?.0, 202);
    assert_eq!(node.admin(Method::GET, "/kafka-clusters/rt", None).await?.0, 404);
    eventually(Duration::from_secs(60), "the consumer to wait for its cluster", || async {
        let status = node.get("/cluster").await?;
        let consumer =
            status["consumers"].as_array().into_iter().flatten().find(|c| c["subscription_id"] == sub.as_str());
        Ok(consumer
            .filter(|c| c["detail"].as_str().is_some_and(|d| d.contains("unknown Kafka cluster rt")))
            .map(|_| ()))
    })
    .await
    .with_context(|| node.log_tail())?;
    produce(&producer, "runtime", &batch(200, 50)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(node.invocations(&format!("subscription={sub}")).await?.len(), 200, "nothing read without the cluster");

    let (status, body) = create("rt", json!({ "bootstrap.servers": servers })).await?;
    assert_eq!(status, 201, "{body}");
    let invocations = completed(250).await?;
    assert_eq!(by_offset(&invocations).len(), 250, "every offset once");
    let mut total = 0;
    for k in 0..10 {
        let (status, counter) = node.ingress(&format!("/Counter/key-{k}/get"), Some(""), &[]).await?;
        assert_eq!(status, 200, "{counter}");
        assert_eq!(counter["duplicates"], 0, "key-{k}: {counter}");
        total += counter["count"].as_u64().unwrap_or(0);
    }
    assert_eq!(total, 250);
    Ok(())
}

/// The (partition, offset) of each invocation of `subscription`, once
/// `count` of them completed.
async fn invoked_offsets(node: &Node, subscription: &str, count: usize) -> Result<Vec<(i64, i64)>> {
    let all = eventually(Duration::from_secs(120), &format!("{count} invocations of {subscription}"), || async {
        let all = node.invocations(&format!("subscription={subscription}")).await?;
        Ok((all.len() >= count && all.iter().all(|inv| inv["status"] == "completed")).then_some(all))
    })
    .await
    .with_context(|| node.log_tail())?;
    let mut offsets: Vec<(i64, i64)> = all
        .iter()
        .map(|inv| (inv["source"]["partition"].as_i64().unwrap_or(-1), inv["source"]["offset"].as_i64().unwrap_or(-1)))
        .collect();
    offsets.sort_unstable();
    Ok(offsets)
}

/// Start positions with StateFun's names: each subscription begins where its
/// position says, against records produced with known timestamps (on a broker
/// that keeps record timestamps, tansu on SQLite), and bad positions are 400s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_start_where_their_position_says() -> Result<()> {
    use rdkafka::producer::FutureRecord;

    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("broker"))?;
    let broker = Broker::start_persistent(&dir.path().join("broker")).await?;
    let handlers = Handlers::start().await?;
    let node = Node::start(&dir.path().join("node"), &broker).await?;
    let (status, body) = node.post("/deployments", json!({ "uri": handlers.uri })).await?;
    assert_eq!(status, 201, "{body}");
    broker.create_topic("positions", 2).await?;

    // 30 records in each partition, a second apart, an hour ago.
    let producer = broker.producer()?;
    let base_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64 - 3_600_000;
    for partition in 0..2 {
        for i in 0..30i64 {
            let (key, payload) = (format!("k{i}"), json!({ "seq": i }).to_string());
            let record = FutureRecord::to("positions").partition(partition).key(&key).payload(&payload);
            let sent = producer.send(record.timestamp(base_ms + i * 1_000), Duration::from_secs(30)).await;
            let delivery = sent.map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
            assert_eq!(delivery.offset, i);
        }
    }

    let create = |topic: &str, options: Value| {
        node.post(
            "/subscriptions",
            json!({ "source": format!("kafka://my-cluster/{topic}"), "sink": SUBSCRIBE_COUNTER, "options": options }),
        )
    };
    let at = |ms: i64| jiff::Timestamp::from_millisecond(ms).map(|t| t.to_string());
    for (topic, options, says) in [
        ("positions", json!({ "ferry.start.position": "newest" }), "unknown ferry.start.position"),
        ("positions", json!({ "ferry.start.position": "at-timestamp" }), "needs ferry.start.timestamp"),
        (
            "positions",
            json!({ "ferry.start.position": "at-timestamp", "ferry.start.timestamp": "an hour ago" }),
            "not an RFC 3339 time",
        ),
        (
            "positions",
            json!({ "ferry.start.position": "specific-offsets", "ferry.start.offsets": "0:1,5:1" }),
            "no partition 5",
        ),
        ("positions", json!({ "ferry.start.postion": "earliest" }), "unknown subscription option"),
        ("no-such-topic", json!({}), "no topic no-such-topic"),
    ] {
        let (status, body) = create(topic, options.clone()).await?;
        assert_eq!(status, 400, "{options}: {body}");
        assert!(body["message"].as_str().is_some_and(|m| m.contains(says)), "{options}: {body}");
    }

    let subscribe = |options: Value| async move {
        let (status, body) = create("positions", options).await?;
        anyhow::ensure!(status == 201, "{body}");
        Ok::<_, anyhow::Error>(body["id"].as_str().context("id")?.to_owned())
    };
    let specific =
        subscribe(json!({ "ferry.start.position": "specific-offsets", "ferry.start.offsets": "0:25,1:28" })).await?;
    let timed =
        subscribe(json!({ "ferry.start.position": "at-timestamp", "ferry.start.timestamp": at(base_ms + 19_500)? }))
            .await?;
    let earliest = subscribe(json!({ "ferry.start.position": "earliest" })).await?;
    let latest = subscribe(json!({ "ferry.start.position": "latest", "statistics.interval.ms": "500" })).await?;

    let range = |partition: i64, offsets: std::ops::Range<i64>| offsets.map(move |o| (partition, o));
    assert_eq!(
        invoked_offsets(&node, &specific, 7).await?,
        range(0, 25..30).chain(range(1, 28..30)).collect::<Vec<_>>()
    );
    assert_eq!(invoked_offsets(&node, &timed, 20).await?, range(0, 20..30).chain(range(1, 20..30)).collect::<Vec<_>>());
    assert_eq!(
        invoked_offsets(&node, &earliest, 60).await?,
        range(0, 0..30).chain(range(1, 0..30)).collect::<Vec<_>>()
    );

    // `latest` waits after the last record: once its consumer knows where
    // it is in both partitions, only what comes next reaches the handler.
    eventually(Duration::from_secs(60), "the latest subscription positioned", || async {
        let status = node.get("/cluster").await?;
        let lags = status["consumer_lag"].as_array().into_iter().flatten();
        Ok((lags.filter(|l| l["subscription_id"] == latest.as_str()).count() == 2).then_some(()))
    })
    .await?;
    assert!(node.invocations(&format!("subscription={latest}")).await?.is_empty());
    for i in 30..35 {
        let (key, payload) = (format!("k{i}"), json!({ "seq": i }).to_string());
        let record = FutureRecord::to("positions").partition(0).key(&key).payload(&payload);
        producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
    }
    assert_eq!(invoked_offsets(&node, &latest, 5).await?, range(0, 30..35).collect::<Vec<_>>());
    // The others go on from where they are, each record once.
    assert_eq!(invoked_offsets(&node, &specific, 12).await?.len(), 12);
    assert_eq!(invoked_offsets(&node, &earliest, 65).await?.len(), 65);
    let listed = node.get(&format!("/subscriptions/{timed}")).await?;
    assert_eq!(listed["options"]["ferry.start.position"], "at-timestamp", "{listed}");
    Ok(())
}

/// A paused subscription has no consumer on any node and reads nothing; once
/// resumed it goes on from its group's committed offsets, each record once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_subscription_reads_nothing_until_resumed() -> Result<()> {
    let (broker, _handlers, _dir, node) = node_with_handlers(&[]).await?;
    broker.create_topic("pausing", 1).await?;
    let sub = subscribe(&node, "pausing", SUBSCRIBE_COUNTER).await?;
    let producer = broker.producer()?;
    let records = |from: i64| seq_records(from..from + 20, Some(("k", 4)), None);
    produce(&producer, "pausing", &records(0)).await?;
    invoked_offsets(&node, &sub, 20).await?;

    let (status, paused) = node.admin(Method::PATCH, &format!("/subscriptions/{sub}/pause"), None).await?;
    assert_eq!((status, &paused["paused"]), (200, &json!(true)), "{paused}");
    assert_eq!(node.get("/subscriptions").await?["subscriptions"][0]["paused"], true);
    eventually(Duration::from_secs(60), "the paused subscription's consumer gone", || async {
        let status = node.get("/cluster").await?;
        let mut consumers = status["consumers"].as_array().into_iter().flatten();
        Ok(consumers.all(|c| c["subscription_id"] != sub.as_str()).then_some(()))
    })
    .await?;
    produce(&producer, "pausing", &records(20)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(node.invocations(&format!("subscription={sub}")).await?.len(), 20, "nothing read while paused");

    let (status, resumed) = node.admin(Method::PATCH, &format!("/subscriptions/{sub}/resume"), None).await?;
    assert_eq!((status, &resumed["paused"]), (200, &json!(false)), "{resumed}");
    let offsets = invoked_offsets(&node, &sub, 40).await?;
    assert_eq!(offsets, (0..40).map(|o| (0, o)).collect::<Vec<_>>(), "each record once");
    assert_eq!(node.admin(Method::PATCH, "/subscriptions/sub_unknown/pause", None).await?.0, 404);
    Ok(())
}

/// A cluster that requires SASL/SCRAM (tansu with authentication), reached
/// with librdkafka's own keys from the config file and from the admin API:
/// records reach the handler once each, and the password shows nowhere
/// (`--dump-config`, `/kafka-clusters`, the node's log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_scram_clusters_feed_subscriptions_and_keep_their_password() -> Result<()> {
    const PASSWORD: &str = "scram-secret-7f3a";
    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("broker"))?;
    let broker = Broker::start_authenticated(&dir.path().join("broker"), "ferry", PASSWORD).await?;
    broker.create_topic("secured", 2).await?;
    broker.create_topic("secured-too", 1).await?;
    let handlers = Handlers::start().await?;
    let clusters = format!(
        r#"[{{name="my-cluster",brokers=["SASL_PLAINTEXT://{}"],"security.protocol"="SASL_PLAINTEXT","sasl.mechanism"="SCRAM-SHA-256","sasl.username"="ferry","sasl.password"="{PASSWORD}"}}]"#,
        broker.bootstrap()
    );
    let env = BTreeMap::from([("FERRY_INGRESS__KAFKA_CLUSTERS".to_owned(), clusters)]);
    let node = Node::start_with(&dir.path().join("node"), env).await?;
    let (status, body) = node.post("/deployments", json!({ "uri": handlers.uri })).await?;
    assert_eq!(status, 201, "{body}");

    let dumped = node.dump_config().await?;
    assert!(dumped.contains("sasl.username") && !dumped.contains(PASSWORD), "{dumped}");

    // The config file's cluster.
    let sub = subscribe(&node, "secured", SUBSCRIBE_COUNTER).await?;
    let producer = broker.producer()?;
    let records = seq_records(0..40, Some(("k", 5)), None);
    produce(&producer, "secured", &records).await?;
    let offsets = invoked_offsets(&node, &sub, 40).await?;
    assert_eq!(offsets.len(), 40, "each record once: {offsets:?}");

    // A cluster registered at runtime with the same keys.
    let (mut properties, runtime_sub) = subscribe_through(&node, &broker, "rt", "secured-too").await?;
    produce(&producer, "secured-too", &records[..10]).await?;
    assert_eq!(invoked_offsets(&node, &runtime_sub, 10).await?, (0..10).map(|o| (0, o)).collect::<Vec<_>>());

    // A wrong password: the consumer reports the broker's refusal.
    properties.insert("sasl.password".to_owned(), json!("wrong"));
    let refused = refused_subscription(&node, "wrong", &properties, "secured-too").await?;
    assert!(node.invocations(&format!("subscription={refused}")).await?.is_empty());

    let listed = node.get("/kafka-clusters").await?.to_string();
    assert!(listed.contains("***") && !listed.contains(PASSWORD), "{listed}");
    let log = node.log();
    assert!(!log.contains(PASSWORD), "the password is in the node's log");
    Ok(())
}

/// One handler subscribed to two topics and two handlers to one topic: each
/// subscription is its own consumer group, and each gets every record of its
/// topic once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_topics_and_handlers_each_get_every_record_once() -> Result<()> {
    let (broker, _handlers, _dir, node) = node_with_handlers(&[]).await?;
    broker.create_topic("fan-a", 2).await?;
    broker.create_topic("fan-b", 1).await?;
    let a_to_counter = subscribe(&node, "fan-a", SUBSCRIBE_COUNTER).await?;
    let a_to_sink = subscribe(&node, "fan-a", "service://Sink/handle").await?;
    let b_to_counter = subscribe(&node, "fan-b", SUBSCRIBE_COUNTER).await?;
    let records = |prefix: &str, count: i64, keys: i64| seq_records(0..count, Some((prefix, keys)), None);
    let producer = broker.producer()?;
    let mut produced_a = produce(&producer, "fan-a", &records("a", 30, 3)).await?;
    let produced_b = produce(&producer, "fan-b", &records("b", 20, 2)).await?;
    produced_a.sort_unstable();
    let as_pairs = |delivered: &[(i32, i64)]| delivered.iter().map(|&(p, o)| (p as i64, o)).collect::<Vec<_>>();
    assert_eq!(invoked_offsets(&node, &a_to_counter, 30).await?, as_pairs(&produced_a));
    assert_eq!(invoked_offsets(&node, &a_to_sink, 30).await?, as_pairs(&produced_a));
    assert_eq!(invoked_offsets(&node, &b_to_counter, 20).await?, as_pairs(&produced_b));
    for (key, count) in [("a0", 10), ("a1", 10), ("a2", 10), ("b0", 10), ("b1", 10)] {
        let (status, counter) = node.ingress(&format!("/Counter/{key}/get"), Some(""), &[]).await?;
        assert_eq!((status, &counter["count"]), (200, &json!(count)), "{key}: {counter}");
    }
    Ok(())
}

/// `ferry.ordering = "partition"`: a Service's records of one Kafka partition
/// run one at a time, in offset order, while the partitions go side by side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_subscriptions_run_each_kafka_partitions_records_one_at_a_time() -> Result<()> {
    let (broker, handlers, _dir, node) = node_with_handlers(&[]).await?;
    broker.create_topic("ordered", 2).await?;
    let create = |sink: &str| {
        node.post(
            "/subscriptions",
            json!({ "source": "kafka://my-cluster/ordered", "sink": sink,
                    "options": { "auto.offset.reset": "earliest", "ferry.ordering": "partition" } }),
        )
    };
    let (status, body) = create(SUBSCRIBE_COUNTER).await?;
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("applies to Services")), "{body}");
    let (status, body) = create("service://Sink/handle").await?;
    assert_eq!(status, 201, "{body}");
    let sub = body["id"].as_str().context("id")?.to_owned();

    const PER_PARTITION: i64 = 12;
    let records = seq_records(0..2 * PER_PARTITION, Some(("k", 4)), Some(30));
    produce(&broker.producer()?, "ordered", &records).await?;
    invoked_offsets(&node, &sub, records.len()).await?;

    let lines = std::fs::read_to_string(handlers.record_dir.path().join("sink.jsonl"))?;
    let mut calls: BTreeMap<i64, Vec<(u64, u64, i64)>> = BTreeMap::new();
    for line in lines.lines() {
        let call: Value = serde_json::from_str(line)?;
        let header = |name: &str| call["headers"][name].as_str().and_then(|v| v.parse::<i64>().ok());
        let (Some(partition), Some(offset)) = (header("kafka.partition"), header("kafka.offset")) else { continue };
        let (started, ended) = (call["started_ms"].as_u64().unwrap_or(0), call["ts_ms"].as_u64().unwrap_or(0));
        calls.entry(partition).or_default().push((started, ended, offset));
    }
    assert_eq!(calls.values().map(Vec::len).sum::<usize>(), records.len(), "each record once: {calls:?}");
    for (partition, mut runs) in calls {
        runs.sort_unstable();
        for pair in runs.windows(2) {
            let ((_, ended, offset), (started, _, next)) = (pair[0], pair[1]);
            assert!(next > offset, "partition {partition}: offset {next} ran after {offset}");
            assert!(started >= ended, "partition {partition}: offset {next} started before {offset} ended");
        }
    }
    Ok(())
}

/// Deleting a subscription stops its consumers at once; by default it goes
/// once what it appended has run (`draining` meanwhile), with `drain=false`
/// at once, the invocations it left unfinished killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_subscription_drains_what_it_appended_or_kills_it() -> Result<()> {
    let (broker, _handlers, _dir, node) = node_with_handlers(&[]).await?;
    // Records that run one at a time, 150 ms each.
    let slow = |count: i64| seq_records(0..count, None, Some(150));
    let mut subscriptions = Vec::new();
    for topic in ["drained", "dropped"] {
        broker.create_topic(topic, 1).await?;
        let (status, body) = node
            .post(
                "/subscriptions",
                json!({ "source": format!("kafka://my-cluster/{topic}"), "sink": "service://Sink/handle",
                        "options": { "auto.offset.reset": "earliest", "ferry.ordering": "partition" } }),
            )
            .await?;
        assert_eq!(status, 201, "{body}");
        subscriptions.push(body["id"].as_str().context("id")?.to_owned());
    }
    let (drained, dropped) = (&subscriptions[0], &subscriptions[1]);
    let producer = broker.producer()?;
    produce(&producer, "drained", &slow(12)).await?;
    produce(&producer, "dropped", &slow(12)).await?;
    let appended = |sub: &str, count: usize| {
        let (node, sub) = (&node, sub.to_owned());
        async move {
            eventually(Duration::from_secs(60), &format!("{count} invocations of {sub}"), || async {
                let all = node.invocations(&format!("subscription={sub}")).await?;
                Ok((all.len() >= count).then_some(all))
            })
            .await
        }
    };
    appended(drained, 12).await?;
    appended(dropped, 12).await?;

    // Dropped: gone at once; what had not run is killed.
    let (status, _) = node.admin(Method::DELETE, &format!("/subscriptions/{dropped}?drain=false"), None).await?;
    assert_eq!(status, 202);
    assert_eq!(node.admin(Method::GET, &format!("/subscriptions/{dropped}"), None).await?.0, 404);
    let all = eventually(Duration::from_secs(60), "every invocation of the dropped one completed", || async {
        let all = node.invocations(&format!("subscription={dropped}")).await?;
        Ok(all.iter().all(|inv| inv["status"] == "completed").then_some(all))
    })
    .await?;
    let killed = all.iter().filter(|inv| inv["completion_result"] == "failure").count();
    assert!(killed > 0, "some had not run and were killed: {all:?}");
    // Drained: it stays, draining, until its twelve have run, and reads no more.
    let (status, _) = node.admin(Method::DELETE, &format!("/subscriptions/{drained}"), None).await?;
    assert_eq!(status, 202);
    let described = node.get(&format!("/subscriptions/{drained}")).await?;
    assert_eq!(described["draining"], true, "{described}");
    let (status, body) = node.admin(Method::PATCH, &format!("/subscriptions/{drained}/resume"), None).await?;
    assert_eq!(status, 409, "{body}");
    produce(&producer, "drained", &slow(3)).await?;
    eventually(Duration::from_secs(60), "the drained subscription gone", || async {
        Ok((node.admin(Method::GET, &format!("/subscriptions/{drained}"), None).await?.0 == 404).then_some(()))
    })
    .await?;
    let all = node.invocations(&format!("subscription={drained}")).await?;
    assert_eq!(all.len(), 12, "nothing read after the delete");
    assert!(all.iter().all(|inv| inv["completion_result"] == "success"), "{all:?}");

    assert_eq!(node.admin(Method::DELETE, "/subscriptions/sub_unknown", None).await?.0, 404);
    Ok(())
}

/// SASL_SSL: a cluster reached over TLS (verified against its CA) with
/// SCRAM, through librdkafka's own keys; a node without the CA cannot
/// connect, and says so in its consumer errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_ssl_clusters_feed_subscriptions() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("broker"))?;
    let broker = Broker::start_tls(&dir.path().join("broker"), "ferry", "tls-secret-51").await?;
    broker.create_topic("encrypted", 2).await?;
    let (handlers, tempdir_node) = (Handlers::start().await?, dir.path().join("node"));
    let node = Node::start_configured(&tempdir_node, "127.0.0.1:9", &[]).await?;
    let (status, body) = node.post("/deployments", json!({ "uri": handlers.uri })).await?;
    assert_eq!(status, 201, "{body}");

    let (mut properties, sub) = subscribe_through(&node, &broker, "tls", "encrypted").await?;
    assert_eq!(properties["security.protocol"], "SASL_SSL");
    let records = seq_records(0..30, Some(("k", 3)), None);
    produce(&broker.producer()?, "encrypted", &records).await?;
    assert_eq!(invoked_offsets(&node, &sub, 30).await?.len(), 30);

    // Without the CA the broker's certificate is not trusted.
    properties.remove("ssl.ca.location");
    refused_subscription(&node, "untrusted", &properties, "encrypted").await?;
    assert!(node.log().contains("certificate verify failed"), "the log says why");
    Ok(())
}
