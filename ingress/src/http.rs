//! HTTP ingress (port 8080) with Restate's paths:
//!
//! - `POST /{Service}/{handler}` and `POST /{Object}/{key}/{handler}` run the
//!   handler and answer with its output;
//! - the same paths ending in `/send` answer at once with
//!   `{"invocationId", "status"}`; `?delay=10s` starts the invocation later;
//! - an `idempotency-key` header makes requests with the same key, target and
//!   handler one invocation: later requests get the first one's result;
//! - a Workflow's `run` handler runs once per key: later requests get the
//!   first one's result;
//! - `GET /restate/invocation/{id}/attach` waits for an invocation's result,
//!   `GET /restate/invocation/{id}/output` answers it only if it is there;
//!   `/restate/workflow/{Workflow}/{key}/attach` and `/output` do the same for
//!   a workflow's run;
//! - `POST /restate/awakeables/{id}/resolve` and `/reject` (or
//!   `/restate/a/...`) complete an awakeable with the body as its value (or
//!   failure message), answering `202` once that is appended.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ferry_invoker::journal::{awakeable_target, signal, SignalId, SignalResult};
use ferry_log::{partition_group, PartitionId};
use ferry_partition::partitioner::partition_of;
use ferry_partition::state::{Completion, Resolved};
use ferry_partition::store::key;
use ferry_partition::wire::v1::{
    Command, HandlerType, Invoke, Notice, Notification, Response as LogResponse, RetentionPolicy, ServiceType, Source,
    Target,
};
use ferry_partition::{Log, LogReads};
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::field::Empty;
use tracing::{debug_span, Instrument, Span};

/// Headers that describe the HTTP exchange rather than the request, never
/// passed to the handler.
const HOP_HEADERS: [&str; 7] =
    ["host", "content-length", "connection", "transfer-encoding", "keep-alive", "upgrade", "idempotency-key"];

/// How long a request keeps retrying its append through leader changes.
const APPEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// A status Restate answers `/output` with while the invocation still runs.
const NOT_READY: u16 = 470;

/// An error answer: `{"code", "message"}` with the status `code`.
#[derive(Debug)]
pub struct Error {
    status: StatusCode,
    message: String,
}

impl Error {
    fn new(status: u16, message: impl Into<String>) -> Error {
        Error {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            message: message.into(),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "code": self.status.as_u16(), "message": self.message }))).into_response()
    }
}

impl From<ferry_log::Error> for Error {
    fn from(e: ferry_log::Error) -> Error {
        let status = match e {
            ferry_log::Error::TooLarge { .. } => 413,
            _ => 503,
        };
        Error::new(status, e.to_string())
    }
}

#[derive(Clone)]
struct Ingress {
    log: Log,
    retention: RetentionPolicy,
    shutdown: CancellationToken,
}

/// Serves the HTTP ingress on `listener` until `shutdown` fires; the
/// invocations it creates are kept as `retention` says, unless their service
/// or handler says otherwise.
pub async fn serve(
    listener: TcpListener,
    log: Log,
    retention: RetentionPolicy,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = router(Ingress { log, retention, shutdown: shutdown.clone() });
    axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

fn router(ingress: Ingress) -> Router {
    Router::new()
        .route("/restate/invocation/{id}/attach", get(attach))
        .route("/restate/invocation/{id}/output", get(output))
        .route("/restate/workflow/{name}/{key}/attach", get(attach_workflow))
        .route("/restate/workflow/{name}/{key}/output", get(workflow_output))
        .route("/restate/awakeables/{id}/{action}", post(awakeable))
        .route("/restate/a/{id}/{action}", post(awakeable))
        .route("/{a}/{b}", post(two))
        .route("/{a}/{b}/{c}", post(three))
        .route("/{a}/{b}/{c}/{d}", post(four))
        .with_state(ingress)
        .layer(axum::middleware::from_fn(count_requests))
}

/// Counts every answer, unknown paths included, by status code:
/// `ferry_ingress_http_requests_total{code}`.
async fn count_requests(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let response = next.run(request).await;
    let code = response.status().as_u16().to_string();
    metrics::counter!("ferry_ingress_http_requests_total", "code" => code).increment(1);
    response
}

#[derive(Debug, Default, Deserialize)]
struct Params {
    delay: Option<String>,
}

/// What a request asks for.
struct Call {
    service: String,
    key: Option<String>,
    handler: String,
    send: bool,
}

async fn two(
    State(ingress): State<Ingress>,
    Path((service, handler)): Path<(String, String)>,
    Query(params): Query<Params>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Error> {
    ingress.call(Call { service, key: None, handler, send: false }, params, headers, body).await
}

/// `/{Service}/{handler}/send` or `/{Object}/{key}/{handler}`, told apart by the service's type.
async fn three(
    State(ingress): State<Ingress>,
    Path((a, b, c)): Path<(String, String, String)>,
    Query(params): Query<Params>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Error> {
    let keyed = ingress.log.read_metadata(|m| m.services.get(&a).map(|s| s.def.ty.is_keyed()));
    let call = match keyed {
        Some(true) => Call { service: a, key: Some(b), handler: c, send: false },
        Some(false) if c == "send" => Call { service: a, key: None, handler: b, send: true },
        Some(false) => return Err(Error::new(404, format!("service {a} has no keys; no route for /{a}/{b}/{c}"))),
        None => return Err(Error::new(404, format!("service {a} not found"))),
    };
    ingress.call(call, params, headers, body).await
}

async fn four(
    State(ingress): State<Ingress>,
    Path((service, key, handler, send)): Path<(String, String, String, String)>,
    Query(params): Query<Params>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Error> {
    if send != "send" {
        return Err(Error::new(404, format!("no route for /{service}/{key}/{handler}/{send}")));
    }
    ingress.call(Call { service, key: Some(key), handler, send: true }, params, headers, body).await
}

async fn attach(State(ingress): State<Ingress>, Path(id): Path<String>) -> Result<Response, Error> {
    let partition = ingress.partition_of_id(&id)?;
    Ok(result_response(&id, ingress.wait(partition, &id).await?))
}

async fn attach_workflow(
    State(ingress): State<Ingress>,
    Path((name, key)): Path<(String, String)>,
) -> Result<Response, Error> {
    attach(State(ingress.clone()), Path(ingress.workflow_run_id(name, key)?)).await
}

async fn workflow_output(
    State(ingress): State<Ingress>,
    Path((name, key)): Path<(String, String)>,
) -> Result<Response, Error> {
    output(State(ingress.clone()), Path(ingress.workflow_run_id(name, key)?)).await
}

async fn output(State(ingress): State<Ingress>, Path(id): Path<String>) -> Result<Response, Error> {
    let partition = ingress.partition_of_id(&id)?;
    match ingress.completion(partition, &id)? {
        Some(completion) => Ok(result_response(&id, completion)),
        None => Err(Error::new(NOT_READY, format!("invocation {id} is not completed yet"))),
    }
}

/// Completes an awakeable: resolved with the body as its value, or rejected
/// with the body as the failure's message. Answers `202` once the signal is
/// appended to its invocation's partition (whether the invocation still
/// waits or not, as Restate does); a second completion is dropped there.
async fn awakeable(
    State(ingress): State<Ingress>,
    Path((id, action)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, Error> {
    let result = match action.as_str() {
        "resolve" => SignalResult::Value(body),
        "reject" => SignalResult::Failure(ferry_proto::service_protocol::Failure {
            code: 500,
            message: String::from_utf8_lossy(&body).into_owned(),
            ..Default::default()
        }),
        _ => return Err(Error::new(404, format!("no route for /restate/awakeables/{id}/{action}"))),
    };
    let Some((target, index)) = awakeable_target(&id) else {
        return Err(Error::new(400, format!("{id} is not an awakeable id")));
    };
    let partition = ingress.partition_of_id(&target)?;
    let entry = signal(SignalId::Index(index), result);
    let notification = Notification { id: target, notice: Notice::Signal(Some(index)), entry, dedup: None };
    let command = Command::Notify { at_ms: now_ms(), notifications: vec![notification] };
    ingress.log.propose_until(partition_group(partition), command, APPEND_TIMEOUT).await?;
    Ok(StatusCode::ACCEPTED.into_response())
}

impl Ingress {
    /// Runs `call`, in a span joined to the request's `traceparent` when
    /// traces are exported.
    async fn call(&self, call: Call, params: Params, headers: HeaderMap, body: Bytes) -> Result<Response, Error> {
        if !ferry_telemetry::exporting() {
            return self.invoke(call, params, headers, body, Span::none()).await;
        }
        let span = debug_span!(
            "ingress",
            otel.name = format!("POST /{}/{}", call.service, call.handler),
            otel.kind = "server",
            otel.status_code = Empty,
            http.request.method = "POST",
            rpc.system = "restate",
            rpc.service = %call.service,
            rpc.method = %call.handler,
            restate.invocation.id = Empty,
            http.response.status_code = Empty,
        );
        ferry_telemetry::adopt_from_headers(&span, &headers);
        let result = self.invoke(call, params, headers, body, span.clone()).instrument(span.clone()).await;
        let status = match &result {
            Ok(response) => response.status(),
            Err(e) => e.status,
        };
        span.record("http.response.status_code", status.as_u16());
        if status.is_server_error() {
            span.record("otel.status_code", "ERROR");
        }
        result
    }

    async fn invoke(
        &self,
        call: Call,
        params: Params,
        headers: HeaderMap,
        body: Bytes,
        span: Span,
    ) -> Result<Response, Error> {
        let idempotency_key = match headers.get("idempotency-key").map(HeaderValue::to_str) {
            Some(Ok(key)) => Some(key.to_owned()),
            Some(Err(_)) => return Err(Error::new(400, "the idempotency-key header is not visible ASCII")),
            None => None,
        };
        let Resolved { service_ty, handler_ty, retention, public } = self
            .log
            .read_metadata(|m| m.resolve(&call.service, &call.handler, self.retention, idempotency_key.is_some()))
            .map_err(|(status, message)| Error::new(status, message))?;
        if !public {
            return Err(Error::new(400, format!("service {} is private: only other services call it", call.service)));
        }
        if service_ty.is_keyed() != call.key.is_some() {
            let what = if service_ty.is_keyed() { "needs a key" } else { "takes no key" };
            return Err(Error::new(400, format!("{} {what}", call.service)));
        }
        let delay = match &params.delay {
            Some(_) if !call.send => return Err(Error::new(400, "delay is only allowed with /send")),
            Some(text) => Some(
                humantime::parse_duration(text).map_err(|e| Error::new(400, format!("invalid delay {text:?}: {e}")))?,
            ),
            None => None,
        };
        let target = Target { service: call.service, handler: call.handler, key: call.key, service_ty, handler_ty };
        let (partition_key, unique) = crate::ids(&target, idempotency_key.as_deref());
        let id = key::id(partition_key, unique);
        let partition = partition_of(partition_key, self.log.partitions());
        let now = now_ms();
        span.record("restate.invocation.id", id.as_str());
        let append = crate::append_span(&span, partition, &id);
        let invoke = Invoke {
            id: id.clone(),
            payload: body,
            headers: headers
                .iter()
                .filter(|(name, _)| !HOP_HEADERS.contains(&name.as_str()))
                .filter_map(|(name, value)| Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned())))
                .collect(),
            target,
            source: Source::Ingress,
            dedup: None,
            created_at_ms: now,
            failure: None,
            not_before_ms: delay.map(|d| now + d.as_millis() as u64),
            trace: ferry_telemetry::TraceContext::of(&append),
            retention,
            reply: None,
            idempotency_key,
        };
        let command = Command::Invoke(vec![invoke].into());
        let proposal = self.log.propose_until(partition_group(partition), command, APPEND_TIMEOUT);
        let response = proposal.instrument(append).await?;
        let created = matches!(response, LogResponse::Invoked { created: 1, .. });
        if call.send {
            let status = if created { "Accepted" } else { "PreviouslyAccepted" };
            let body = Json(json!({ "invocationId": id, "status": status }));
            return Ok((StatusCode::ACCEPTED, [("x-restate-id", id)], body).into_response());
        }
        Ok(result_response(&id, self.wait(partition, &id).await?))
    }

    /// The id of the run of workflow `name` with `key`.
    fn workflow_run_id(&self, name: String, key: String) -> Result<String, Error> {
        let run = self.log.read_metadata(|m| {
            let service = m.services.get(&name).filter(|s| s.def.ty == ServiceType::Workflow)?;
            let handler = service.def.handlers.iter().find(|h| h.ty == HandlerType::Workflow)?;
            Some(Target {
                service: name.clone(),
                handler: handler.name.clone(),
                key: Some(key),
                service_ty: ServiceType::Workflow,
                handler_ty: HandlerType::Workflow,
            })
        });
        let target = run.ok_or_else(|| Error::new(404, format!("workflow {name} not found")))?;
        let (partition_key, unique) = crate::ids(&target, None);
        Ok(key::id(partition_key, unique))
    }

    fn partition_of_id(&self, id: &str) -> Result<PartitionId, Error> {
        let not_found = || Error::new(404, format!("invocation {id} not found"));
        let (partition_key, _) = key::id_parts(id).ok_or_else(not_found)?;
        Ok(partition_of(partition_key, self.log.partitions()))
    }

    /// The result of an invocation, `None` while it runs.
    fn completion(&self, partition: PartitionId, id: &str) -> Result<Option<Completion>, Error> {
        self.log
            .read_partition(partition, |p| p.result_of(id))?
            .ok_or_else(|| Error::new(404, format!("invocation {id} not found")))
    }

    /// Waits for the result of an invocation. An invocation that is not
    /// there, or no longer (killed and purged meanwhile), answers 404: after
    /// a proposal returns, this node has applied it (see
    /// [`Log::propose_until`]), so a missing invocation is not one that is
    /// still on its way. The state is read again when the invocation
    /// completes here, and at least every [`RESULT_RECHECK`].
    async fn wait(&self, partition: PartitionId, id: &str) -> Result<Completion, Error> {
        let watch = self.log.watch_invocation(partition, id)?;
        loop {
            if let Some(completion) = self.completion(partition, id)? {
                return Ok(completion);
            }
            tokio::select! {
                _ = watch.changed() => {}
                _ = tokio::time::sleep(RESULT_RECHECK) => {}
                _ = self.shutdown.cancelled() => return Err(Error::new(503, "the node is shutting down")),
            }
        }
    }
}

/// How often a caller waiting for a result reads the state again without
/// news of its invocation (a snapshot replaced what it watched, say).
const RESULT_RECHECK: Duration = Duration::from_secs(1);

fn result_response(id: &str, completion: Completion) -> Response {
    let id = HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static(""));
    match completion {
        Completion::Success(body) => {
            let content_type = if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_ok() {
                "application/json"
            } else {
                "application/octet-stream"
            };
            (StatusCode::OK, [("x-restate-id", id), ("content-type", HeaderValue::from_static(content_type))], body)
                .into_response()
        }
        Completion::Failure { code, message } => {
            let mut response = Error::new(code, message).into_response();
            response.headers_mut().insert("x-restate-id", id);
            response
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
