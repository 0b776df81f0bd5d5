//! The REST gateway: Restate's admin paths and JSON shapes over [`Admin`].
//! Errors are `{"message": ...}` with the status that fits.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch};
use axum::{Json, Router};
use ferry_proto::admin as pb;
use serde_json::json;

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

type Reply<T> = Result<Json<T>, Error>;

fn reply<T>(result: Result<T, Error>) -> Reply<T> {
    result.map(Json)
}

pub fn router(admin: Admin) -> Router {
    Router::new()
        .route("/health", get(|| async { Json(json!({})) }))
        .route("/version", get(|State(a): State<Admin>| async move { Json(a.version()) }))
        .route("/deployments", get(list_deployments).post(register_deployment))
        .route("/deployments/{id}", get(get_deployment).delete(remove_deployment))
        .route("/services", get(|State(a): State<Admin>| async move { Json(a.list_services()) }))
        .route(
            "/services/{name}",
            get(|State(a): State<Admin>, Path(n): Path<String>| async move { reply(a.get_service(&n)) }),
        )
        .route("/subscriptions", get(list_subscriptions).post(create_subscription))
        .route("/subscriptions/{id}", get(get_subscription).delete(delete_subscription))
        .route("/kafka-clusters", get(|State(a): State<Admin>| async move { Json(a.list_kafka_clusters()) }))
        .route(
            "/kafka-clusters/{name}",
            get(|State(a): State<Admin>, Path(n): Path<String>| async move { reply(a.get_kafka_cluster(&n)) }),
        )
        .route("/invocations", get(list_invocations))
        .route("/invocations/{id}/cancel", patch(|s, p| act(s, p, Action::Cancel)))
        .route("/invocations/{id}/kill", patch(|s, p| act(s, p, Action::Kill)))
        .route("/invocations/{id}/purge", patch(|s, p| act(s, p, Action::Purge)))
        .route("/invocations/{id}/purge-journal", patch(|s, p| act(s, p, Action::PurgeJournal)))
        .route("/invocations/{id}/resume", patch(|s, p| act(s, p, Action::Resume)))
        .route(
            "/invocations/{id}",
            get(|State(a): State<Admin>, Path(id): Path<String>| async move { reply(a.get_invocation(&id)) }),
        )
        .route("/cluster", get(cluster_status))
        .fallback(|| async { Error::NotFound("no such path".to_owned()) })
        .with_state(admin)
}

async fn register_deployment(
    State(admin): State<Admin>,
    request: Result<Json<pb::RegisterDeploymentRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<pb::RegisterDeploymentResponse>), Error> {
    let response = admin.register_deployment(body(request)?).await?;
    Ok((StatusCode::CREATED, Json(response)))
}

async fn list_deployments(State(admin): State<Admin>) -> Json<pb::ListDeploymentsResponse> {
    Json(admin.list_deployments())
}

async fn get_deployment(State(admin): State<Admin>, Path(id): Path<String>) -> Reply<pb::Deployment> {
    reply(admin.get_deployment(&id))
}

async fn remove_deployment(State(admin): State<Admin>, Path(id): Path<String>) -> Result<StatusCode, Error> {
    admin.remove_deployment(&id).await.map(|()| StatusCode::ACCEPTED)
}

async fn create_subscription(
    State(admin): State<Admin>,
    request: Result<Json<pb::CreateSubscriptionRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<pb::Subscription>), Error> {
    let response = admin.create_subscription(body(request)?).await?;
    Ok((StatusCode::CREATED, Json(response)))
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

async fn delete_subscription(State(admin): State<Admin>, Path(id): Path<String>) -> Result<StatusCode, Error> {
    admin.delete_subscription(&id).await.map(|()| StatusCode::ACCEPTED)
}

/// `200` when done, `202` when a cancellation is on its way to the handler.
async fn act(State(admin): State<Admin>, Path(id): Path<String>, action: Action) -> Result<StatusCode, Error> {
    let response = admin.act_on_invocation(&id, action).await?;
    Ok(if response.accepted { StatusCode::ACCEPTED } else { StatusCode::OK })
}

async fn cluster_status(
    State(admin): State<Admin>,
    query: Result<Query<pb::GetClusterStatusRequest>, axum::extract::rejection::QueryRejection>,
) -> Reply<pb::ClusterStatus> {
    let Query(request) = query.map_err(|r| Error::BadRequest(r.body_text()))?;
    Ok(Json(admin.cluster_status(&request)))
}

async fn list_invocations(
    State(admin): State<Admin>,
    query: Result<Query<pb::ListInvocationsRequest>, axum::extract::rejection::QueryRejection>,
) -> Reply<pb::ListInvocationsResponse> {
    let Query(request) = query.map_err(|r| Error::BadRequest(r.body_text()))?;
    reply(admin.list_invocations(&request))
}
