//! OpenTelemetry traces from a real node to an OTLP receiver on loopback: one
//! Kafka record is one trace (ingest -> append -> invoke -> commit), the
//! handler's own spans join it through `traceparent`, and an HTTP request's
//! `traceparent` becomes the parent of its invocation's spans.

use std::time::Duration;

use anyhow::{Context, Result};
use ferry_chaos_tests::otlp::{Receiver, Span};
use ferry_chaos_tests::{produce, Broker, Handlers, Node, Record};
use serde_json::json;

const CONSUMER: i32 = 5;
const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const ERROR: i32 = 2;

fn one<'a>(spans: &'a [Span], what: &str, pick: impl Fn(&Span) -> bool) -> Result<&'a Span> {
    let found: Vec<&Span> = spans.iter().filter(|s| pick(s)).collect();
    match found.as_slice() {
        [span] => Ok(span),
        _ => anyhow::bail!("expected one {what}, found {}: {found:#?}", found.len()),
    }
}

fn child<'a>(spans: &'a [Span], parent: &Span, name: &str) -> Result<&'a Span> {
    one(spans, &format!("{name} under {}", parent.name), |s| {
        s.parent_span_id == parent.span_id && s.trace_id == parent.trace_id && s.name == name
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_record_and_an_http_request_are_each_one_trace() -> Result<()> {
    let receiver = Receiver::start().await?;
    let endpoint = receiver.endpoint();
    let export = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")];
    let broker = Broker::start().await?;
    let handlers = Handlers::start_with_env(&export).await?;
    let dir = tempfile::tempdir()?;
    let node = Node::start_configured(
        &dir.path().join("node"),
        &broker.bootstrap(),
        &[("FERRY_TRACING__ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")],
    )
    .await?;
    let (status, body) = node.post("/deployments", json!({ "uri": handlers.uri })).await?;
    assert_eq!(status, 201, "{body}");

    // Kafka: one record to a Service.
    broker.create_topic("traced", 2).await?;
    let subscription = node.subscribe_from_start("traced", "service://Sink/handle").await?;
    let record = Record { key: Some(b"k1".to_vec()), payload: b"{}".to_vec(), headers: vec![] };
    let (kafka_partition, offset) = produce(&broker.producer()?, "traced", &[record]).await?[0];
    let invocation = ferry_chaos_tests::eventually(Duration::from_secs(30), "the record's invocation", || async {
        let all = node.invocations("").await?;
        Ok(all.into_iter().find(|i| i["status"] == "completed"))
    })
    .await?;
    let id = invocation["id"].as_str().context("id")?.to_owned();

    let spans = receiver
        .wait_for(Duration::from_secs(20), |spans| {
            spans.iter().filter(|s| s.attribute("restate.invocation.id") == Some(id.as_str())).count() >= 4
                && spans.iter().any(|s| s.name == "restate_sdk_endpoint_handle")
        })
        .await;
    let ingest = one(&spans, "ingest span", |s| s.name == "process traced")?;
    assert_eq!(ingest.service, "ferry");
    assert_eq!(ingest.parent_span_id, "", "ingest is the root: {ingest:#?}");
    assert_eq!(ingest.kind, CONSUMER);
    for (key, value) in [
        ("messaging.system", "kafka"),
        ("messaging.operation.type", "process"),
        ("messaging.destination.name", "traced"),
        ("messaging.destination.partition.id", &kafka_partition.to_string()),
        ("messaging.kafka.offset", &offset.to_string()),
        ("messaging.consumer.group.name", &subscription),
        ("ferry.subscription", &subscription),
        ("restate.invocation.id", &id),
    ] {
        assert_eq!(ingest.attribute(key), Some(value), "{key} of {ingest:#?}");
    }
    let append = child(&spans, ingest, "append")?;
    assert_eq!(append.attribute("restate.invocation.id"), Some(id.as_str()));
    let invoke = child(&spans, append, "invoke Sink/handle")?;
    assert_eq!(invoke.kind, CLIENT);
    for (key, value) in [
        ("restate.invocation.id", id.as_str()),
        ("rpc.system", "restate"),
        ("rpc.service", "Sink"),
        ("rpc.method", "handle"),
        ("restate.invocation.attempt", "1"),
        ("ferry.outcome", "completed"),
    ] {
        assert_eq!(invoke.attribute(key), Some(value), "{key} of {invoke:#?}");
    }
    let commit = child(&spans, invoke, "commit")?;
    assert_eq!(commit.attribute("restate.invocation.id"), Some(id.as_str()));

    // The handler's side, sent by its own process, joined to the attempt.
    let handle = child(&spans, invoke, "handle /invoke/Sink/handle")?;
    assert_eq!(handle.service, "ferry-test-handlers");
    assert_eq!(handle.kind, SERVER);
    let sdk = child(&spans, handle, "restate_sdk_endpoint_handle")?;
    assert_eq!(sdk.attribute("rpc.service"), Some("Sink"));

    // HTTP: the caller's traceparent is the parent of the ingress span; a
    // failing attempt is marked as an error.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{caller}-01");
    let (status, answer) =
        node.ingress("/Flaky/run", Some(r#"{"fail_attempts": 2}"#), &[("traceparent", &traceparent)]).await?;
    assert_eq!(status, 200, "{answer}");
    let spans = receiver
        .wait_for(Duration::from_secs(20), |spans| {
            spans.iter().any(|s| s.trace_id == trace_id && s.attribute("ferry.outcome") == Some("completed"))
        })
        .await;
    let ingress = one(&spans, "ingress span", |s| s.trace_id == trace_id && s.parent_span_id == caller)?;
    assert_eq!(ingress.name, "POST /Flaky/run");
    assert_eq!(ingress.kind, SERVER);
    assert_eq!(ingress.attribute("http.response.status_code"), Some("200"));
    let http_id = ingress.attribute("restate.invocation.id").context("invocation id")?;
    let append = child(&spans, ingress, "append")?;
    let attempts: Vec<&Span> =
        spans.iter().filter(|s| s.parent_span_id == append.span_id && s.name == "invoke Flaky/run").collect();
    let outcome = |s: &&&Span| s.attribute("ferry.outcome") == Some("failed");
    let failed = attempts.iter().find(outcome).with_context(|| format!("a failed attempt in {attempts:#?}"))?;
    assert_eq!(failed.status, ERROR, "{failed:#?}");
    let completed = attempts.iter().filter(|s| s.attribute("ferry.outcome") == Some("completed")).count();
    assert_eq!(completed, 1, "{attempts:#?}");
    assert!(attempts.iter().all(|s| s.attribute("restate.invocation.id") == Some(http_id)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_costs_nothing_but_log_lines() -> Result<()> {
    let broker = Broker::start().await?;
    let handlers = Handlers::start().await?;
    let dir = tempfile::tempdir()?;
    let closed = format!("http://127.0.0.1:{}", ferry_chaos_tests::free_port());
    let node = Node::start_configured(
        &dir.path().join("node"),
        &broker.bootstrap(),
        &[("FERRY_TRACING__ENDPOINT", closed.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")],
    )
    .await?;
    let (status, body) = node.post("/deployments", json!({ "uri": handlers.uri })).await?;
    assert_eq!(status, 201, "{body}");
    for seq in 1..=20 {
        let (status, answer) = node.ingress("/Counter/c/add", Some(&format!(r#"{{"seq": {seq}}}"#)), &[]).await?;
        assert_eq!(status, 200, "{answer}");
    }
    let (_, count) = node.ingress("/Counter/c/get", Some(""), &[]).await?;
    assert_eq!(count["count"], 20, "{count}");
    // The failed exports are reported in the node's log.
    ferry_chaos_tests::eventually(Duration::from_secs(10), "an export error in the log", || async {
        Ok(node.log_tail().contains("ExportError").then_some(()))
    })
    .await?;
    Ok(())
}
