//! Service discovery: `GET <deployment>/discover` returns the endpoint manifest
//! (services, handlers, protocol versions and mode).
//!
//! The Rust SDK answers HTTP/2 with prior knowledge only; Python behind
//! hypercorn answers HTTP/1.1. Discovery tries HTTP/2 first and falls back to
//! HTTP/1.1 when the connection fails, and remembers which one worked.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_partition::wire::v1::{
    HandlerDef, HandlerType, ProtocolMode, RetentionOverrides, ServiceDef, ServiceType, Timeouts,
};
use serde::Deserialize;

use crate::client::error_chain;
use crate::Error;

/// Endpoint-manifest versions this client reads, newest first.
const ACCEPT: &str = "application/vnd.restate.endpointmanifest.v4+json, \
                      application/vnd.restate.endpointmanifest.v3+json, \
                      application/vnd.restate.endpointmanifest.v2+json";

/// Service-protocol versions the invoker speaks.
pub const MIN_PROTOCOL_VERSION: u32 = 5;
pub const MAX_PROTOCOL_VERSION: u32 = 7;

/// What a deployment serves, and how to talk to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    pub protocol_mode: ProtocolMode,
    pub http2: bool,
    pub min_protocol_version: u32,
    pub max_protocol_version: u32,
    pub services: Vec<ServiceDef>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    protocol_mode: Option<String>,
    min_protocol_version: u32,
    max_protocol_version: u32,
    services: Vec<ManifestService>,
}

#[derive(Deserialize)]
struct ManifestService {
    name: String,
    ty: String,
    #[serde(default)]
    handlers: Vec<ManifestHandler>,
    #[serde(flatten)]
    retention: ManifestRetention,
    #[serde(flatten)]
    timeouts: ManifestTimeouts,
    #[serde(rename = "enableLazyState")]
    lazy_state: Option<bool>,
}

#[derive(Deserialize)]
struct ManifestHandler {
    name: String,
    ty: Option<String>,
    #[serde(flatten)]
    retention: ManifestRetention,
    #[serde(flatten)]
    timeouts: ManifestTimeouts,
    #[serde(rename = "enableLazyState")]
    lazy_state: Option<bool>,
}

/// Retention of a service or handler (manifest v3 and later), in milliseconds.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestRetention {
    journal_retention: Option<u64>,
    idempotency_retention: Option<u64>,
    workflow_completion_retention: Option<u64>,
}

/// Attempt timeouts of a service or handler, in milliseconds.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestTimeouts {
    inactivity_timeout: Option<u64>,
    abort_timeout: Option<u64>,
}

impl ManifestTimeouts {
    /// These, where set, else `outer`'s.
    fn or(&self, outer: &ManifestTimeouts) -> Timeouts {
        Timeouts {
            inactivity_ms: self.inactivity_timeout.or(outer.inactivity_timeout),
            abort_ms: self.abort_timeout.or(outer.abort_timeout),
        }
    }
}

impl From<ManifestRetention> for RetentionOverrides {
    fn from(r: ManifestRetention) -> RetentionOverrides {
        RetentionOverrides {
            journal_ms: r.journal_retention,
            idempotency_ms: r.idempotency_retention,
            workflow_completion_ms: r.workflow_completion_retention,
        }
    }
}

/// The discovery client; cheap to clone.
#[derive(Clone)]
pub struct Discovery {
    http1: reqwest::Client,
    http2: reqwest::Client,
}

impl Default for Discovery {
    fn default() -> Self {
        Self::new(Duration::from_secs(10))
    }
}

impl Discovery {
    pub fn new(timeout: Duration) -> Discovery {
        let builder = || reqwest::Client::builder().timeout(timeout).connect_timeout(timeout).no_proxy();
        Discovery {
            http1: builder().http1_only().build().expect("http client"),
            http2: builder().http2_prior_knowledge().build().expect("http client"),
        }
    }

    /// Asks the deployment at `uri` for its manifest and validates it.
    pub async fn discover(
        &self,
        uri: &str,
        headers: &BTreeMap<String, String>,
        use_http_11: bool,
    ) -> Result<Discovered, Error> {
        let parsed =
            reqwest::Url::parse(uri).map_err(|e| Error::InvalidUri { uri: uri.to_owned(), reason: e.to_string() })?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(Error::InvalidUri {
                uri: uri.to_owned(),
                reason: "expected http://host[:port][/path]".to_owned(),
            });
        }
        let url = format!("{}/discover", uri.trim_end_matches('/'));
        let (response, http2) = if use_http_11 {
            (self.get(&self.http1, &url, headers).await, false)
        } else {
            match self.get(&self.http2, &url, headers).await {
                Err(e) if e.is_connect() || e.is_request() || e.is_timeout() => {
                    tracing::debug!(uri, "HTTP/2 discovery failed ({e}), trying HTTP/1.1");
                    (self.get(&self.http1, &url, headers).await, false)
                }
                other => (other, true),
            }
        };
        let response = response.map_err(|e| Error::Unreachable { uri: uri.to_owned(), reason: error_chain(&e) })?;
        let status = response.status();
        let body =
            response.bytes().await.map_err(|e| Error::Unreachable { uri: uri.to_owned(), reason: error_chain(&e) })?;
        if !status.is_success() {
            return Err(Error::BadStatus {
                uri: uri.to_owned(),
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
            });
        }
        parse_manifest(&body, http2).map_err(|reason| Error::InvalidManifest { uri: uri.to_owned(), reason })
    }

    async fn get(
        &self,
        client: &reqwest::Client,
        url: &str,
        headers: &BTreeMap<String, String>,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let mut request = client.get(url).header("accept", ACCEPT);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        request.send().await
    }
}

/// Validates a manifest body.
pub fn parse_manifest(body: &[u8], http2: bool) -> Result<Discovered, String> {
    let manifest: Manifest = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let protocol_mode = match manifest.protocol_mode.as_deref() {
        Some("REQUEST_RESPONSE") => ProtocolMode::RequestResponse,
        Some("BIDI_STREAM") | None => ProtocolMode::BidiStream,
        Some(other) => return Err(format!("unknown protocolMode {other}")),
    };
    if manifest.min_protocol_version > manifest.max_protocol_version {
        return Err(format!(
            "minProtocolVersion {} is above maxProtocolVersion {}",
            manifest.min_protocol_version, manifest.max_protocol_version
        ));
    }
    if manifest.max_protocol_version < MIN_PROTOCOL_VERSION || manifest.min_protocol_version > MAX_PROTOCOL_VERSION {
        return Err(format!(
            "service protocol versions {}..={} do not overlap the supported {MIN_PROTOCOL_VERSION}..={MAX_PROTOCOL_VERSION}",
            manifest.min_protocol_version, manifest.max_protocol_version
        ));
    }
    if manifest.services.is_empty() {
        return Err("the manifest lists no services".to_owned());
    }
    let mut services = Vec::with_capacity(manifest.services.len());
    for service in manifest.services {
        if service.name.is_empty() {
            return Err("a service has an empty name".to_owned());
        }
        let ty = match service.ty.as_str() {
            "SERVICE" => ServiceType::Service,
            "VIRTUAL_OBJECT" => ServiceType::VirtualObject,
            "WORKFLOW" => ServiceType::Workflow,
            other => return Err(format!("service {} has unknown type {other}", service.name)),
        };
        let mut handlers = Vec::with_capacity(service.handlers.len());
        for handler in service.handlers {
            if handler.name.is_empty() {
                return Err(format!("service {} has a handler with an empty name", service.name));
            }
            let handler_ty = match (ty, handler.ty.as_deref()) {
                (ServiceType::Service, _) => HandlerType::Shared,
                (_, Some("SHARED")) => HandlerType::Shared,
                (_, Some("WORKFLOW")) => HandlerType::Workflow,
                (_, Some("EXCLUSIVE")) | (ServiceType::VirtualObject, None) => HandlerType::Exclusive,
                (ServiceType::Workflow, None) => HandlerType::Shared,
                (_, Some(other)) => {
                    return Err(format!("handler {}/{} has unknown type {other}", service.name, handler.name))
                }
            };
            let lazy_state = handler.lazy_state.or(service.lazy_state).unwrap_or(false);
            handlers.push(HandlerDef {
                name: handler.name,
                ty: handler_ty,
                retention: handler.retention.into(),
                lazy_state,
                timeouts: handler.timeouts.or(&service.timeouts),
            });
        }
        services.push(ServiceDef { name: service.name, ty, handlers, retention: service.retention.into() });
    }
    Ok(Discovered {
        protocol_mode,
        http2,
        min_protocol_version: manifest.min_protocol_version,
        max_protocol_version: manifest.max_protocol_version,
        services,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_service_kind() {
        let body = br#"{"protocolMode":"BIDI_STREAM","minProtocolVersion":5,"maxProtocolVersion":6,
            "services":[
              {"name":"Sink","ty":"SERVICE","handlers":[{"name":"handle"}]},
              {"name":"Counter","ty":"VIRTUAL_OBJECT","handlers":[{"name":"add","ty":"EXCLUSIVE"},{"name":"get","ty":"SHARED"}]},
              {"name":"Flow","ty":"WORKFLOW","handlers":[{"name":"run","ty":"WORKFLOW"},{"name":"status","ty":"SHARED"}]}]}"#;
        let d = parse_manifest(body, true).unwrap();
        assert_eq!(d.protocol_mode, ProtocolMode::BidiStream);
        assert_eq!((d.min_protocol_version, d.max_protocol_version), (5, 6));
        let ty = |s: usize, h: usize| d.services[s].handlers[h].ty;
        assert_eq!(d.services[1].ty, ServiceType::VirtualObject);
        assert_eq!(ty(0, 0), HandlerType::Shared);
        assert_eq!(ty(1, 0), HandlerType::Exclusive);
        assert_eq!(ty(1, 1), HandlerType::Shared);
        assert_eq!(ty(2, 0), HandlerType::Workflow);
    }

    #[test]
    fn retention_of_services_and_handlers() {
        let body = br#"{"minProtocolVersion":5,"maxProtocolVersion":6,
            "services":[{"name":"Flow","ty":"WORKFLOW","journalRetention":60000,"idempotencyRetention":5000,
              "handlers":[{"name":"run","ty":"WORKFLOW","workflowCompletionRetention":172800000,"journalRetention":0},
                          {"name":"status","ty":"SHARED","enableLazyState":true}]}]}"#;
        let d = parse_manifest(body, true).unwrap();
        let flow = &d.services[0];
        let overrides =
            RetentionOverrides { journal_ms: Some(60_000), idempotency_ms: Some(5_000), workflow_completion_ms: None };
        assert_eq!(flow.retention, overrides);
        let run =
            RetentionOverrides { journal_ms: Some(0), idempotency_ms: None, workflow_completion_ms: Some(172_800_000) };
        assert_eq!(flow.handlers[0].retention, run);
        assert_eq!(flow.handlers[1].retention, RetentionOverrides::default());
        assert_eq!((flow.handlers[0].lazy_state, flow.handlers[1].lazy_state), (false, true));
    }

    #[test]
    fn timeouts_of_handlers_fall_back_to_their_service() {
        let body = br#"{"minProtocolVersion":5,"maxProtocolVersion":7,
            "services":[{"name":"Slow","ty":"SERVICE","inactivityTimeout":120000,"abortTimeout":30000,
              "handlers":[{"name":"a","abortTimeout":5000},{"name":"b"}]},
              {"name":"Plain","ty":"SERVICE","handlers":[{"name":"c","inactivityTimeout":1000}]}]}"#;
        let d = parse_manifest(body, true).unwrap();
        let timeouts = |s: usize, h: usize| d.services[s].handlers[h].timeouts;
        assert_eq!(timeouts(0, 0), Timeouts { inactivity_ms: Some(120_000), abort_ms: Some(5_000) });
        assert_eq!(timeouts(0, 1), Timeouts { inactivity_ms: Some(120_000), abort_ms: Some(30_000) });
        assert_eq!(timeouts(1, 0), Timeouts { inactivity_ms: Some(1_000), abort_ms: None });
    }

    #[test]
    fn rejects_invalid_manifests() {
        for (body, expect) in [
            (&b"not json"[..], "expected"),
            (br#"{"minProtocolVersion":1,"maxProtocolVersion":2,"services":[{"name":"A","ty":"SERVICE"}]}"#, "overlap"),
            (br#"{"minProtocolVersion":5,"maxProtocolVersion":5,"services":[]}"#, "no services"),
            (
                br#"{"minProtocolVersion":5,"maxProtocolVersion":5,"services":[{"name":"A","ty":"ACTOR"}]}"#,
                "unknown type",
            ),
            (br#"{"minProtocolVersion":6,"maxProtocolVersion":5,"services":[{"name":"A","ty":"SERVICE"}]}"#, "above"),
        ] {
            let err = parse_manifest(body, false).unwrap_err();
            assert!(err.contains(expect), "{err}");
        }
    }

    #[tokio::test]
    async fn unreachable_and_bad_status_are_errors() {
        let discovery = Discovery::new(Duration::from_secs(2));
        // A port nobody listens on.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = discovery.discover(&format!("http://{addr}"), &BTreeMap::new(), false).await.unwrap_err();
        assert!(matches!(err, Error::Unreachable { .. }), "{err}");

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .route("/discover", axum::routing::get(|| async { (axum::http::StatusCode::NOT_FOUND, "nope") }));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let err = discovery.discover(&format!("http://{addr}/"), &BTreeMap::new(), false).await.unwrap_err();
        assert!(matches!(err, Error::BadStatus { status: 404, .. }), "{err}");

        let err = discovery.discover("ftp://x", &BTreeMap::new(), false).await.unwrap_err();
        assert!(matches!(err, Error::InvalidUri { .. }), "{err}");
    }
}
