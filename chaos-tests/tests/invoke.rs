//! One invocation attempt against the real Rust SDK handlers, in every
//! protocol version both sides speak.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use ferry_chaos_tests::Handlers;
use ferry_invoker::client::{Client, Ending, Endpoint};
use ferry_invoker::codec::{Message, ProtocolVersion};
use ferry_invoker::{Discovered, Discovery};
use ferry_proto::service_protocol as pb;

fn value(content: &str) -> Option<pb::Value> {
    Some(pb::Value { content: Bytes::copy_from_slice(content.as_bytes()) })
}

fn start(key: &str, state: &[(&str, &str)]) -> Message {
    Message::Start(pb::StartMessage {
        id: Bytes::from_static(b"\x01\x02\x03\x04"),
        debug_id: "inv_test".into(),
        known_entries: 1,
        key: key.into(),
        state_map: state
            .iter()
            .map(|(k, v)| pb::start_message::StateEntry {
                key: Bytes::copy_from_slice(k.as_bytes()),
                value: Bytes::copy_from_slice(v.as_bytes()),
            })
            .collect(),
        ..Default::default()
    })
}

fn input(payload: &str, headers: &[(&str, &str)]) -> Message {
    Message::InputCommand(pb::InputCommandMessage {
        headers: headers.iter().map(|(k, v)| pb::Header { key: (*k).into(), value: (*v).into() }).collect(),
        value: value(payload),
        ..Default::default()
    })
}

fn output(messages: &[Message]) -> Option<String> {
    messages.iter().find_map(|m| match m {
        Message::OutputCommand(pb::OutputCommandMessage {
            result: Some(pb::output_command_message::Result::Value(v)),
            ..
        }) => Some(String::from_utf8_lossy(&v.content).into_owned()),
        _ => None,
    })
}

/// The endpoint of one handler of a discovered deployment.
fn endpoint<'a>(
    uri: &'a str,
    discovered: &Discovered,
    headers: &'a BTreeMap<String, String>,
    version: ProtocolVersion,
    service: &'a str,
    handler: &'a str,
) -> Endpoint<'a> {
    Endpoint { uri, http2: discovered.http2, headers, version, service, handler }
}

/// Every protocol version both Ferry and the deployment speak.
fn shared_versions(discovered: &Discovered) -> Vec<ProtocolVersion> {
    let versions: Vec<ProtocolVersion> = ProtocolVersion::ALL
        .into_iter()
        .filter(|v| (discovered.min_protocol_version..=discovered.max_protocol_version).contains(&v.number()))
        .collect();
    assert!(!versions.is_empty(), "no shared protocol version: {discovered:?}");
    versions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_run_handlers_in_every_shared_version() -> Result<()> {
    let handlers = Handlers::start().await?;
    let no_headers = BTreeMap::new();
    let discovered = Discovery::default().discover(&handlers.uri, &no_headers, false).await?;
    let client = Client::new(Duration::from_secs(30), Duration::from_secs(1));
    for version in shared_versions(&discovered) {
        let endpoint = |service, handler| endpoint(&handlers.uri, &discovered, &no_headers, version, service, handler);

        // A Service: the handler sees the input's headers and ends.
        let attempt = client
            .attempt(&endpoint("Sink", "handle"), &[start("", &[]), input("hello", &[("kafka.offset", "7")])])
            .await?;
        assert_eq!(attempt.ending, Ending::End, "{version}: {:?}", attempt.messages);
        let recorded = std::fs::read_to_string(handlers.record_dir.path().join("sink.jsonl"))?;
        assert!(recorded.lines().last().unwrap_or_default().contains("\"kafka.offset\":\"7\""), "{recorded}");

        // A Virtual Object with eager state: the new state and the output come back.
        let attempt = client
            .attempt(&endpoint("Counter", "add"), &[start("k1", &[("count", "41")]), input("{\"seq\": 1}", &[])])
            .await?;
        assert_eq!(attempt.ending, Ending::End, "{version}: {:?}", attempt.messages);
        assert!(
            attempt.messages.iter().any(|m| matches!(m, Message::SetStateCommand(s)
                if &s.key[..] == b"count" && s.value.as_ref().is_some_and(|v| &v.content[..] == b"42"))),
            "{version}: {:?}",
            attempt.messages
        );
        assert_eq!(output(&attempt.messages).as_deref(), Some("42"), "{version}");
    }

    // An unknown handler is the deployment's error, not a protocol failure.
    let endpoint = Endpoint {
        uri: &handlers.uri,
        http2: discovered.http2,
        headers: &no_headers,
        version: ProtocolVersion::V5,
        service: "Nope",
        handler: "nope",
    };
    let err = client.attempt(&endpoint, &[start("", &[]), input("", &[])]).await.unwrap_err();
    assert!(matches!(err, ferry_invoker::Error::BadStatus { status: 404, .. }), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_deployments_register_and_run() -> Result<()> {
    use ferry_chaos_tests::{free_port, Node, PythonHandlers};
    use ferry_partition::wire::v1::ProtocolMode;

    let python = PythonHandlers::start().await?;
    let no_headers = BTreeMap::new();
    // hypercorn speaks both HTTP/2 with prior knowledge and HTTP/1.1; the SDK
    // streams over the first and answers request-response over the second.
    let over_h2 = Discovery::default().discover(&python.uri, &no_headers, false).await?;
    assert!(over_h2.http2);
    assert_eq!(over_h2.protocol_mode, ProtocolMode::BidiStream);
    let discovered = Discovery::default().discover(&python.uri, &no_headers, true).await?;
    assert!(!discovered.http2);
    assert_eq!(discovered.protocol_mode, ProtocolMode::RequestResponse);

    // Registered through the admin API like any deployment.
    let dir = tempfile::tempdir()?;
    let node = Node::start_for_broker(&dir.path().join("node"), &format!("127.0.0.1:{}", free_port())).await?;
    let (status, body) =
        node.post("/deployments", serde_json::json!({ "uri": python.uri, "use_http_11": true })).await?;
    assert_eq!(status, 201, "{body}");
    assert_eq!(node.get("/services/PyCounter").await?["ty"], "VirtualObject");
    let deployment = node.get(&format!("/deployments/{}", body["id"].as_str().unwrap())).await?;
    assert_eq!(deployment["protocol_type"], "RequestResponse");
    assert_eq!(deployment["http_version"], "HTTP/1.1");

    let client = Client::new(Duration::from_secs(30), Duration::from_secs(1));
    for version in shared_versions(&discovered) {
        let endpoint = |service, handler| endpoint(&python.uri, &discovered, &no_headers, version, service, handler);
        let attempt = client
            .attempt(&endpoint("PyEcho", "headers"), &[start("", &[]), input("{}", &[("kafka.offset", "7")])])
            .await?;
        assert_eq!(attempt.ending, Ending::End, "{version}: {:?}", attempt.messages);
        let seen: serde_json::Value = serde_json::from_str(&output(&attempt.messages).unwrap_or_default())?;
        assert_eq!(seen["kafka.offset"], "7", "{version}: {seen}");

        let attempt =
            client.attempt(&endpoint("PyCounter", "add"), &[start("k1", &[("count", "41")]), input("{}", &[])]).await?;
        assert_eq!(attempt.ending, Ending::End, "{version}: {:?}", attempt.messages);
        assert_eq!(output(&attempt.messages).as_deref(), Some("42"), "{version}");
    }

    // Calls made at once and awaited together; the two calls of key `a`
    // run in the order they were made.
    let json = [("content-type", "application/json")];
    let (status, body) = node.ingress("/PyCaller/call", Some(r#"{"keys": ["a", "b", "a"]}"#), &json).await?;
    assert_eq!((status, body), (200, serde_json::json!([1, 1, 2])));
    Ok(())
}
