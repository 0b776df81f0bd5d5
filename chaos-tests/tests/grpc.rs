//! The admin API over gRPC: the same data as the REST gateway, status codes
//! for errors, health and reflection, all on the admin port.

use anyhow::Result;
use ferry_chaos_tests::{Broker, Handlers, Node};
use ferry_proto::admin as pb;
use ferry_proto::admin::admin_service_client::AdminServiceClient;
use serde_json::{json, Value};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_rest_serve_the_same_data() -> Result<()> {
    let broker = Broker::start().await?;
    let handlers = Handlers::start().await?;
    let dir = tempfile::tempdir()?;
    let node = Node::start(&dir.path().join("node"), &broker).await?;
    let address = format!("http://127.0.0.1:{}", node.admin_port);
    let mut client = AdminServiceClient::connect(address.clone()).await?;

    // Register over gRPC, read over REST, and the other way round.
    let registered = client
        .register_deployment(pb::RegisterDeploymentRequest { uri: handlers.uri.clone(), ..Default::default() })
        .await?
        .into_inner();
    assert!(registered.id.starts_with("dp_"));
    broker.create_topic("t", 1).await?;
    let (status, sub) =
        node.post("/subscriptions", json!({"source": "kafka://my-cluster/t", "sink": "service://Sink/handle"})).await?;
    assert_eq!(status, 201, "{sub}");

    let services = client.list_services(pb::ListServicesRequest {}).await?.into_inner();
    assert_eq!(serde_json::to_value(&services)?, node.get("/services").await?);
    let deployment = client.get_deployment(pb::GetDeploymentRequest { id: registered.id.clone() }).await?.into_inner();
    // REST answers with the deployment's services whole, as Restate does.
    let mut detailed = node.get(&format!("/deployments/{}", registered.id)).await?;
    let services = detailed["services"].take();
    let revisions: Vec<Value> = services
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| json!({"name": s["name"], "revision": s["revision"]}))
        .collect();
    detailed["services"] = Value::Array(revisions);
    assert_eq!(serde_json::to_value(&deployment)?, detailed);
    let subscriptions = client.list_subscriptions(pb::ListSubscriptionsRequest::default()).await?.into_inner();
    assert_eq!(serde_json::to_value(&subscriptions)?, node.get("/subscriptions").await?);
    let clusters = client.list_kafka_clusters(pb::ListKafkaClustersRequest {}).await?.into_inner();
    assert_eq!(serde_json::to_value(&clusters)?, node.get("/kafka-clusters").await?);
    let version = client.get_version(pb::GetVersionRequest {}).await?.into_inner();
    let rest = node.get("/version").await?;
    assert_eq!(json!(version.version), rest["version"]);
    assert_eq!(json!(version.min_admin_api_version), rest["min_admin_api_version"]);
    assert_eq!(json!(version.max_admin_api_version), rest["max_admin_api_version"]);

    // Errors carry the code that fits.
    let missing = client.get_deployment(pb::GetDeploymentRequest { id: "dp_nope".into() }).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let bad = client
        .create_subscription(pb::CreateSubscriptionRequest {
            source: "kafka://nope/t".into(),
            sink: "service://Sink/handle".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("my-cluster"), "{}", bad.message());

    // Health and reflection on the same port.
    let channel = tonic::transport::Channel::from_shared(address)?.connect().await?;
    let health = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest { service: "ferry.admin.v1.AdminService".into() })
        .await?
        .into_inner();
    assert_eq!(health.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(futures::stream::iter([request]))
        .await?
        .into_inner();
    let response = responses.message().await?.expect("a reflection response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"ferry.admin.v1.AdminService".to_owned()), "{names:?}");
    Ok(())
}
