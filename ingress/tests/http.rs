//! The HTTP ingress over a real single-node log, with no invoker: what a
//! caller sees while invocations change under it.

use std::time::Duration;

use ferry_log::wire::v1::{
    Command, Deployment, Effect, HandlerDef, HandlerType, MetadataCommand, ProtocolMode, ServiceDef, ServiceType,
};
use ferry_log::{partition_group, LogNode, Options, METADATA_GROUP};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

fn deployment() -> Deployment {
    Deployment {
        id: "dp_1".to_owned(),
        uri: "http://127.0.0.1:1".to_owned(),
        protocol_mode: ProtocolMode::RequestResponse,
        http2: false,
        min_protocol_version: 5,
        max_protocol_version: 5,
        additional_headers: Default::default(),
        services: vec![ServiceDef {
            name: "Greeter".to_owned(),
            ty: ServiceType::Service,
            handlers: vec![HandlerDef { name: "greet".to_owned(), ty: HandlerType::Shared }],
        }],
        created_at_ms: 1,
    }
}

/// Case 10: a caller waits for an invocation that is then killed and purged
/// in one entry, so it never sees it completed. It must get an answer, not
/// wait for ever; and the idempotency key then names a new invocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case10_a_caller_waiting_on_a_purged_invocation_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = Options::single_node(dir.path().to_owned(), 1);
    options.advertised_address = "127.0.0.1:1".to_owned();
    let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
    let log = LogNode::open(options, &tracker, cancel.clone()).await.unwrap();
    log.wait_for_leaders(Duration::from_secs(10)).await.unwrap();
    log.propose(METADATA_GROUP, Command::Metadata(MetadataCommand::PutDeployment(deployment()))).await.unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/Greeter/greet", listener.local_addr().unwrap());
    let server = tokio::spawn(ferry_ingress::http::serve(listener, log.clone(), cancel.clone()));
    let call = |url: String| async move {
        let client = reqwest::Client::new();
        let response = client.post(url).header("idempotency-key", "k1").body("{}").send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    };
    let waiting = tokio::spawn(call(url.clone()));

    let id = {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let id = log.read_partition(0, |p| p.invocations_after(None).next().map(|inv| inv.id.clone())).unwrap();
            if let Some(id) = id {
                break id;
            }
            assert!(tokio::time::Instant::now() < deadline, "the call created no invocation");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let gone = vec![Effect::Kill { id: id.clone() }, Effect::Purge { id: id.clone() }];
    log.propose(partition_group(0), Command::Effects { at_ms: 2, effects: gone }).await.unwrap();

    let (status, body) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("a caller whose invocation was purged is answered")
        .unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(body.contains(&id), "{body}");

    // The key is free again: the same request creates a new invocation.
    let again = tokio::spawn(call(url));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while log.read_partition(0, |p| p.invocation(&id).is_none()).unwrap() {
        assert!(tokio::time::Instant::now() < deadline, "the key created nothing new");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    again.abort();

    cancel.cancel();
    server.await.unwrap().unwrap();
    log.shutdown().await;
    tracker.close();
    tracker.wait().await;
}
