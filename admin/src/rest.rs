//! The REST gateway: Restate's admin paths and JSON shapes over [`Admin`].
//! Errors are `{"message": ...}` with the status that fits.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use ferry_proto::admin as pb;
use serde_json::json;

use crate::service::{MAX_ADMIN_API_VERSION, MIN_ADMIN_API_VERSION};
use crate::{Action, Admin, Error};

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = match &self {
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, Json(json!({ "message": self.to_string() }))).into_response()
    }
}

/// A JSON body, or an error naming what is wrong with it.
fn body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, Error> {
    body.map(|Json(v)| v).map_err(|rejection| Error::BadRequest(rejection.body_text()))
}

/// A query string, or an error naming what is wrong with it.
fn params<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, Error> {
    query.map(|Query(v)| v).map_err(|rejection| Error::BadRequest(rejection.body_text()))
}

type Reply<T> = Result<Json<T>, Error>;

fn reply<T>(result: Result<T, Error>) -> Reply<T> {
    result.map(Json)
}

pub fn router(admin: Admin) -> Router {
    let routes = routes();
    let mut router = Router::new().merge(routes.clone());
    for version in MIN_ADMIN_API_VERSION..=MAX_ADMIN_API_VERSION {
        router = router.nest(&format!("/v{version}"), routes.clone());
    }
    router.fallback(|| async { Error::NotFound("no such path".to_owned()) }).with_state(admin)
}

/// The paths of every admin API version.
fn routes() -> Router<Admin> {
    Router::new()
        .route("/health", get(|| async { Json(json!({})) }))
        .route("/version", get(version))
        .route("/query", post(query))
        .route("/deployments", get(list_deployments).post(register_deployment))
        .route("/deployments/{id}", get(get_deployment).delete(remove_deployment))
        .route("/services", get(|State(a): State<Admin>| async move { Json(a.list_services()) }))
        .route(
            "/services/{name}",
            get(|State(a): State<Admin>, Path(n): Path<String>| async move { reply(a.get_service(&n)) })
                .patch(modify_service),
        )
        .route("/services/{name}/state", post(set_state))
        .route("/subscriptions", get(list_subscriptions).post(create_subscription))
        .route("/subscriptions/{id}", get(get_subscription).delete(delete_subscription))
        .route(
            "/subscriptions/{id}/pause",
            patch(|State(a): State<Admin>, Path(id): Path<String>| async move {
                reply(a.pause_subscription(&id, true).await)
            }),
        )
        .route(
            "/subscriptions/{id}/resume",
            patch(|State(a): State<Admin>, Path(id): Path<String>| async move {
                reply(a.pause_subscription(&id, false).await)
            }),
        )
        .route(
            "/kafka-clusters",
            get(|State(a): State<Admin>| async move { Json(a.list_kafka_clusters()) }).post(create_kafka_cluster),
        )
        .route(
            "/kafka-clusters/{name}",
            get(|State(a): State<Admin>, Path(n): Path<String>| async move { reply(a.get_kafka_cluster(&n)) })
                .patch(update_kafka_cluster)
                .delete(delete_kafka_cluster),
        )
        .route("/invocations", get(list_invocations))
        .route("/invocations/{id}/cancel", patch(|s, p| act(s, p, Action::Cancel)))
        .route("/invocations/{id}/kill", patch(|s, p| act(s, p, Action::Kill)))
        .route("/invocations/{id}/purge", patch(|s, p| act(s, p, Action::Purge)))
        .route("/invocations/{id}/purge-journal", patch(|s, p| act(s, p, Action::PurgeJournal)))
        .route("/invocations/{id}/resume", patch(|s, p| act(s, p, Action::Resume)))
        .route("/invocations/{id}/pause", patch(|s, p| act(s, p, Action::Pause)))
        .route("/invocations/{id}/restart-as-new", patch(restart_as_new))
        .route(
            "/invocations/{id}",
            get(|State(a): State<Admin>, Path(id): Path<String>| async move { reply(a.get_invocation(&id)) }),
        )
        .route("/cluster", get(cluster_status))
}

/// Restate's shape: the versions of the admin API served and where the
/// ingress is. `features` names capabilities of Restate's servers; Ferry
/// announces none of them.
async fn version(State(admin): State<Admin>) -> Json<serde_json::Value> {
    let version = admin.version();
    Json(json!({
        "version": version.version,
        "min_admin_api_version": version.min_admin_api_version,
        "max_admin_api_version": version.max_admin_api_version,
        "ingress_endpoint": admin.ingress_endpoint(),
        "features": {},
    }))
}

#[derive(Debug, serde::Deserialize)]
struct QueryRequest {
    query: String,
}

const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

/// `POST /query` with `{"query": "<SQL>"}`: the answer as JSON
/// (`{"rows": [...]}`) when the request accepts exactly
/// `application/json`, else as an Arrow IPC stream.
async fn query(
    State(admin): State<Admin>,
    headers: HeaderMap,
    request: Result<Json<QueryRequest>, JsonRejection>,
) -> Result<Response, Error> {
    let sql = body(request)?.query;
    let json = headers.get(header::ACCEPT).is_some_and(|accept| accept.as_bytes() == b"application/json");
    let answer = admin.query(&sql).await?;
    let (content_type, bytes) =
        if json { ("application/json", answer.to_json()) } else { (ARROW_STREAM, answer.to_arrow()) };
    let bytes = bytes.map_err(|e| Error::Internal(e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, content_type)], bytes).into_response())
}

/// Restate's body of `POST /deployments`, whose optional fields may be null.
#[derive(Debug, serde::Deserialize)]
struct RegisterDeployment {
    uri: String,
    #[serde(default)]
    additional_headers: Option<std::collections::HashMap<String, String>>,
    #[serde(default)]
    use_http_11: bool,
    #[serde(default)]
    force: Option<bool>,
    #[serde(default)]
    dry_run: bool,
}

/// `201` for a new deployment, `200` for one registered again (or what a
/// dry run would make of it), `409` for one whose services changed, without
/// `force`.
async fn register_deployment(
    State(admin): State<Admin>,
    request: Result<Json<RegisterDeployment>, JsonRejection>,
) -> Result<(StatusCode, [(header::HeaderName, String); 1], Json<pb::RegisterDeploymentResponse>), Error> {
    let request = body(request)?;
    let response = admin
        .register_deployment(pb::RegisterDeploymentRequest {
            uri: request.uri,
            additional_headers: request.additional_headers.unwrap_or_default(),
            use_http_11: request.use_http_11,
            force: request.force,
            dry_run: request.dry_run,
        })
        .await?;
    let status = if response.created { StatusCode::CREATED } else { StatusCode::OK };
    let location = format!("deployments/{}", response.id);
    Ok((status, [(header::LOCATION, location)], Json(response)))
}

async fn list_deployments(State(admin): State<Admin>) -> Json<pb::ListDeploymentsResponse> {
    Json(admin.list_deployments())
}

/// A deployment with its services whole, as Restate's detailed deployment.
async fn get_deployment(State(admin): State<Admin>, Path(id): Path<String>) -> Reply<serde_json::Value> {
    let mut deployment = json!(admin.get_deployment(&id)?);
    deployment["services"] = json!(admin.deployment_services(&id)?);
    Ok(Json(deployment))
}

async fn remove_deployment(State(admin): State<Admin>, Path(id): Path<String>) -> Result<StatusCode, Error> {
    admin.remove_deployment(&id).await.map(|()| StatusCode::ACCEPTED)
}

/// Restate's body of `PATCH /services/{name}`: each field optional or null.
async fn modify_service(
    State(admin): State<Admin>,
    Path(name): Path<String>,
    request: Result<Json<pb::ModifyServiceRequest>, JsonRejection>,
) -> Reply<pb::Service> {
    let request = pb::ModifyServiceRequest { name, ..body(request)? };
    reply(admin.modify_service(request).await)
}

/// Restate's body of `POST /services/{service}/state`: the whole new state,
/// each value as an array of bytes (or a string).
#[derive(Debug, serde::Deserialize)]
struct ModifyState {
    #[serde(default)]
    version: Option<String>,
    object_key: String,
    new_state: std::collections::HashMap<String, StateValue>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
enum StateValue {
    Bytes(Vec<u8>),
    Text(String),
}

/// `202` once the new state is applied; `409` while an invocation holds the
/// key or when the state changed since `version`.
async fn set_state(
    State(admin): State<Admin>,
    Path(service): Path<String>,
    request: Result<Json<ModifyState>, JsonRejection>,
) -> Result<StatusCode, Error> {
    let request = body(request)?;
    let state = request
        .new_state
        .into_iter()
        .map(|(k, v)| {
            let value = match v {
                StateValue::Bytes(bytes) => bytes,
                StateValue::Text(text) => text.into_bytes(),
            };
            (k, value)
        })
        .collect();
    let request = pb::SetStateRequest { service, key: request.object_key, version: request.version, state };
    admin.set_state(request).await.map(|()| StatusCode::ACCEPTED)
}

/// Restate's body of `POST /subscriptions`, whose `options` may be null.
#[derive(Debug, serde::Deserialize)]
struct CreateSubscription {
    source: String,
    sink: String,
    #[serde(default)]
    options: Option<std::collections::HashMap<String, String>>,
}

async fn create_subscription(
    State(admin): State<Admin>,
    request: Result<Json<CreateSubscription>, JsonRejection>,
) -> Result<(StatusCode, Json<pb::Subscription>), Error> {
    let request = body(request)?;
    let request = pb::CreateSubscriptionRequest {
        source: request.source,
        sink: request.sink,
        options: request.options.unwrap_or_default(),
    };
    Ok((StatusCode::CREATED, Json(admin.create_subscription(request).await?)))
}

async fn list_subscriptions(
    State(admin): State<Admin>,
    Query(request): Query<pb::ListSubscriptionsRequest>,
) -> Json<pb::ListSubscriptionsResponse> {
    Json(admin.list_subscriptions(&request))
}

async fn get_subscription(State(admin): State<Admin>, Path(id): Path<String>) -> Reply<pb::Subscription> {
    reply(admin.get_subscription(&id))
}

/// `?drain=false` deletes at once, killing what has not completed.
#[derive(serde::Deserialize)]
struct DeleteSubscription {
    drain: Option<bool>,
}

async fn delete_subscription(
    State(admin): State<Admin>,
    Path(id): Path<String>,
    query: Result<Query<DeleteSubscription>, QueryRejection>,
) -> Result<StatusCode, Error> {
    let skip_drain = params(query)?.drain == Some(false);
    admin.delete_subscription(&id, skip_drain).await.map(|()| StatusCode::ACCEPTED)
}

/// Restate's body of `POST /kafka-clusters`.
#[derive(Debug, serde::Deserialize)]
struct CreateKafkaCluster {
    name: String,
    properties: std::collections::HashMap<String, String>,
}

async fn create_kafka_cluster(
    State(admin): State<Admin>,
    request: Result<Json<CreateKafkaCluster>, JsonRejection>,
) -> Result<(StatusCode, [(header::HeaderName, String); 1], Json<pb::KafkaCluster>), Error> {
    let CreateKafkaCluster { name, properties } = body(request)?;
    let cluster = admin.create_kafka_cluster(pb::CreateKafkaClusterRequest { name, properties }).await?;
    let location = format!("kafka-clusters/{}", cluster.name);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(cluster)))
}

/// Restate's body of `PATCH /kafka-clusters/{name}`: the whole new set of
/// properties.
#[derive(Debug, serde::Deserialize)]
struct UpdateKafkaCluster {
    properties: std::collections::HashMap<String, String>,
}

async fn update_kafka_cluster(
    State(admin): State<Admin>,
    Path(name): Path<String>,
    request: Result<Json<UpdateKafkaCluster>, JsonRejection>,
) -> Reply<pb::KafkaCluster> {
    let properties = body(request)?.properties;
    reply(admin.update_kafka_cluster(pb::UpdateKafkaClusterRequest { name, properties }).await)
}

#[derive(Debug, Default, serde::Deserialize)]
struct DeleteKafkaCluster {
    #[serde(default)]
    force: Option<bool>,
}

/// `202` once deleted; `409` while subscriptions read from it, without `force=true`.
async fn delete_kafka_cluster(
    State(admin): State<Admin>,
    Path(name): Path<String>,
    query: Result<Query<DeleteKafkaCluster>, QueryRejection>,
) -> Result<StatusCode, Error> {
    let request = params(query)?;
    admin.delete_kafka_cluster(&name, request.force.unwrap_or(false)).await.map(|()| StatusCode::ACCEPTED)
}

/// `200` when done (or the invocation was paused already), `202` when a
/// cancellation is on its way to the handler or a running invocation is
/// pausing.
async fn act(State(admin): State<Admin>, Path(id): Path<String>, action: Action) -> Result<StatusCode, Error> {
    let response = admin.act_on_invocation(&id, action).await?;
    Ok(if response.accepted { StatusCode::ACCEPTED } else { StatusCode::OK })
}

/// Restate's query of `restart-as-new`: which journal entries the new
/// invocation starts with and which deployment runs it.
#[derive(Debug, Default, serde::Deserialize)]
struct RestartAsNew {
    #[serde(default)]
    from: Option<u32>,
    #[serde(default)]
    deployment: Option<String>,
}

/// Restate's answer: `{"new_invocation_id": ...}`. The new invocation starts
/// from the beginning (`from=0`), on the service's current deployment
/// (`deployment=latest`; `keep` is the same while its deployment serves it).
async fn restart_as_new(
    State(admin): State<Admin>,
    Path(id): Path<String>,
    query: Result<Query<RestartAsNew>, QueryRejection>,
) -> Reply<serde_json::Value> {
    let request = params(query)?;
    if request.from.unwrap_or(0) > 0 {
        return Err(Error::BadRequest(
            "from: a restarted invocation starts from the beginning of its journal (from=0)".to_owned(),
        ));
    }
    match request.deployment.as_deref() {
        None | Some("latest" | "keep") => {}
        Some(other) => {
            return Err(Error::BadRequest(format!(
                "deployment {other:?}: the new invocation runs on the service's current deployment (latest)"
            )))
        }
    }
    let restarted = admin.restart_as_new(&id).await?;
    Ok(Json(json!({ "new_invocation_id": restarted.new_invocation_id })))
}

async fn cluster_status(
    State(admin): State<Admin>,
    query: Result<Query<pb::GetClusterStatusRequest>, QueryRejection>,
) -> Reply<pb::ClusterStatus> {
    let request = params(query)?;
    Ok(Json(admin.cluster_status(&request)))
}

async fn list_invocations(
    State(admin): State<Admin>,
    query: Result<Query<pb::ListInvocationsRequest>, QueryRejection>,
) -> Reply<pb::ListInvocationsResponse> {
    let request = params(query)?;
    reply(admin.list_invocations(&request))
}
