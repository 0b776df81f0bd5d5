//! The HTTP ingress over a real single-node log, with no invoker: what a
//! caller sees while invocations change under it.

use std::time::Duration;

use bytes::Bytes;
use ferry_log::{partition_group, Options, METADATA_GROUP};
use ferry_partition::state::Completion;
use ferry_partition::wire::v1::{
    Command, Deployment, Effect, HandlerDef, HandlerType, MetadataCommand, ProtocolMode, RetentionPolicy, ServiceDef,
    ServiceType,
};
use ferry_partition::{Log, LogReads, Machine};
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
            handlers: vec![HandlerDef {
                name: "greet".to_owned(),
                ty: HandlerType::Shared,
                retention: Default::default(),
                lazy_state: false,
                timeouts: Default::default(),
            }],
            retention: Default::default(),
        }],
        created_at_ms: 1,
    }
}

/// A single-node log with `Greeter` registered and the HTTP ingress over it,
/// with `retention`; the url of `Greeter/greet`.
struct Served {
    log: Log,
    url: String,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    tracker: TaskTracker,
    cancel: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Served {
    async fn start(retention: RetentionPolicy) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let mut options = Options::single_node(dir.path().to_owned(), 1);
        options.advertised_address = "127.0.0.1:1".to_owned();
        let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
        let log = Log::open(options, |_| Machine::default(), &tracker, cancel.clone()).await.unwrap();
        log.wait_for_leaders(Duration::from_secs(10)).await.unwrap();
        log.propose(METADATA_GROUP, Command::Metadata(MetadataCommand::PutDeployment(deployment()))).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/Greeter/greet", listener.local_addr().unwrap());
        let server = tokio::spawn(ferry_ingress::http::serve(listener, log.clone(), retention, cancel.clone()));
        Served { log, url, server, tracker, cancel, _dir: dir }
    }

    /// The id of the first invocation a call created.
    async fn first_invocation(&self) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let first = self.log.read_partition(0, |p| {
                let mut first = None;
                p.invocations_after(None, |inv| {
                    first = Some(inv.id);
                    std::ops::ControlFlow::Break(())
                })?;
                Ok(first)
            });
            if let Some(id) = first.unwrap() {
                return id;
            }
            assert!(tokio::time::Instant::now() < deadline, "the call created no invocation");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.server.await.unwrap().unwrap();
        self.log.shutdown().await;
        self.tracker.close();
        self.tracker.wait().await;
    }
}

async fn call(url: String) -> (u16, String) {
    let client = reqwest::Client::new();
    let response = client.post(url).header("idempotency-key", "k1").body("{}").send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// Case 10: a caller waits for an invocation that is then killed and purged
/// in one entry, so it never sees it completed. It must get an answer, not
/// wait for ever; and the idempotency key then names a new invocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case10_a_caller_waiting_on_a_purged_invocation_is_answered() {
    let served = Served::start(RetentionPolicy::DEFAULT).await;
    let (log, url) = (&served.log, served.url.clone());
    let waiting = tokio::spawn(call(url.clone()));
    let id = served.first_invocation().await;
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
    while log.read_partition(0, |p| Ok(p.invocation(&id)?.is_none())).unwrap() {
        assert!(tokio::time::Instant::now() < deadline, "the key created nothing new");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    again.abort();
    served.stop().await;
}

/// With a retention of zero an invocation is removed in the apply that
/// completes it; a caller waiting for it still gets its result, and the
/// idempotency key is free again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_gets_the_result_of_an_invocation_removed_as_it_completes() {
    let served = Served::start(RetentionPolicy { journal_ms: 0, idempotency_ms: 0, workflow_completion_ms: 0 }).await;
    let log = &served.log;
    let waiting = tokio::spawn(call(served.url.clone()));
    let id = served.first_invocation().await;
    let attempt = log.read_partition(0, |p| Ok(p.invocation(&id)?.and_then(|inv| inv.attempt()))).unwrap().unwrap();
    let result = Completion::Success(Bytes::from_static(b"\"hello\""));
    let done = Effect::Complete { id: id.clone(), attempt, state: vec![], result, sends: vec![], promises: vec![] };
    log.propose(partition_group(0), Command::Effects { at_ms: 2, effects: vec![done] }).await.unwrap();

    let (status, body) = tokio::time::timeout(Duration::from_secs(10), waiting).await.unwrap().unwrap();
    assert_eq!((status, body.as_str()), (200, "\"hello\""));
    assert!(log.read_partition(0, |p| Ok(p.invocation(&id)?.is_none())).unwrap(), "the invocation was kept");
    served.stop().await;
}
