//! Logs and traces of a Ferry node.
//!
//! [`init`] installs one `tracing` subscriber with two layers: log lines on
//! stderr (filtered by `log.filter`), and, when an OTLP endpoint is
//! configured, OpenTelemetry export of the spans of Ferry's own crates,
//! sampled and sent in batches over gRPC. Without an endpoint nothing is
//! exported and [`exporting`] is false, so the hot paths skip building the
//! per-record and per-attempt spans altogether.
//!
//! A trace outlives the request that started it: a record is consumed on one
//! node, appended, and invoked later by whichever node leads its partition.
//! The span context travels with the invocation in the log as a
//! [`TraceContext`], and to the handler as a W3C `traceparent` header.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use serde::{Deserialize, Serialize};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{filter_fn, EnvFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported. Code that builds spans per record or per
/// attempt asks first, so that a node without an exporter pays nothing.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Where and how much to export (`[tracing]` in the node configuration).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct TracingOptions {
    /// OTLP/gRPC endpoint, such as `http://jaeger:4317`. When unset,
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// is used; with neither, nothing is exported.
    pub endpoint: Option<String>,
    /// The share of new traces that are recorded, from 0 to 1. A request that
    /// arrives with a `traceparent` follows its caller's decision.
    pub sampling_ratio: f64,
}

impl Default for TracingOptions {
    fn default() -> Self {
        TracingOptions { endpoint: None, sampling_ratio: 1.0 }
    }
}

impl TracingOptions {
    /// The endpoint in effect: the configured one, else the standard
    /// OpenTelemetry environment variables.
    pub fn effective_endpoint(&self) -> Option<String> {
        self.endpoint
            .clone()
            .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").ok())
            .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
            .filter(|e| !e.trim().is_empty())
    }

    /// Checks the values; the error names what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(format!("sampling-ratio {} is not between 0 and 1", self.sampling_ratio));
        }
        if let Some(endpoint) = &self.endpoint {
            if endpoint.parse::<http::Uri>().ok().and_then(|u| u.scheme().map(|_| ())).is_none() {
                return Err(format!("endpoint {endpoint:?} is not an absolute URI like http://jaeger:4317"));
            }
        }
        Ok(())
    }
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("log.filter: {0}")]
    Filter(String),
    #[error("tracing: cannot build the OTLP exporter for {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
}

/// Keeps the exporter alive; [`Telemetry::shutdown`] flushes what is queued.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn is_exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still queued and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown() {
                tracing::warn!("stopping the trace exporter: {e}");
            }
        }
    }
}

/// Installs the global subscriber. Must run inside a Tokio runtime when an
/// endpoint is configured: the gRPC exporter's channel lives on it.
/// `service` and `instance` name this process in the exported resource; the
/// spans exported are those at debug level or above whose target starts with
/// one of `targets`.
pub fn init(
    options: &TracingOptions,
    log_filter: &str,
    format: LogFormat,
    service: &'static str,
    instance: &str,
    targets: &'static [&'static str],
) -> Result<Telemetry, Error> {
    let filter = EnvFilter::try_new(log_filter).map_err(|e| Error::Filter(e.to_string()))?;
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().with_filter(filter).boxed(),
    };
    let registry = tracing_subscriber::registry().with(logs);
    let Some(endpoint) = options.effective_endpoint() else {
        registry.init();
        return Ok(Telemetry { provider: None });
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| Error::Exporter { endpoint: endpoint.clone(), reason: e.to_string() })?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(options.sampling_ratio))))
        .with_resource(
            Resource::builder()
                .with_service_name(service)
                .with_attribute(KeyValue::new("service.instance.id", instance.to_owned()))
                .build(),
        )
        .build();
    let tracer = provider.tracer(service);
    let spans = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_location(false)
        .with_filter(filter_fn(move |meta| {
            *meta.level() <= tracing::Level::DEBUG && targets.iter().any(|t| meta.target().starts_with(t))
        }));
    registry.with(spans).init();
    EXPORTING.store(true, Ordering::Relaxed);
    tracing::info!(%endpoint, sampling_ratio = options.sampling_ratio, "exporting traces");
    Ok(Telemetry { provider: Some(provider) })
}

/// A sampled span's identity, small enough to keep with every invocation in
/// the log.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

impl TraceContext {
    /// The context of `span`, if it is recorded and sampled.
    pub fn of(span: &tracing::Span) -> Option<TraceContext> {
        if span.is_disabled() {
            return None;
        }
        let context = span.context();
        let span_ref = context.span();
        let span_context = span_ref.span_context();
        (span_context.is_valid() && span_context.is_sampled()).then(|| TraceContext {
            trace_id: span_context.trace_id().to_bytes(),
            span_id: span_context.span_id().to_bytes(),
            flags: span_context.trace_flags().to_u8(),
        })
    }

    /// Parses a W3C `traceparent` header value (version 00).
    pub fn from_traceparent(value: &str) -> Option<TraceContext> {
        let mut parts = value.trim().split('-');
        let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version != "00" || parts.next().is_some() || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
            return None;
        }
        let trace_id = TraceId::from_hex(trace).ok()?;
        let span_id = SpanId::from_hex(span).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        (trace_id != TraceId::INVALID && span_id != SpanId::INVALID).then(|| TraceContext {
            trace_id: trace_id.to_bytes(),
            span_id: span_id.to_bytes(),
            flags,
        })
    }

    /// The W3C `traceparent` header value naming this span as the parent.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{:02x}", TraceId::from_bytes(self.trace_id), SpanId::from_bytes(self.span_id), self.flags)
    }

    /// Makes this context the parent of `span`, which must not have been
    /// entered yet.
    pub fn adopt(&self, span: &tracing::Span) {
        if span.is_disabled() {
            return;
        }
        let remote = SpanContext::new(
            TraceId::from_bytes(self.trace_id),
            SpanId::from_bytes(self.span_id),
            TraceFlags::new(self.flags),
            true,
            TraceState::default(),
        );
        let _ = span.set_parent(Context::new().with_remote_span_context(remote));
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.traceparent())
    }
}

/// Makes the `traceparent` of an incoming request, if it has a valid one,
/// the parent of `span`.
pub fn adopt_from_headers(span: &tracing::Span, headers: &http::HeaderMap) {
    if let Some(parent) =
        headers.get("traceparent").and_then(|v| v.to_str().ok()).and_then(TraceContext::from_traceparent)
    {
        parent.adopt(span);
    }
}

/// The text a panic was raised with, for the log line that reports it.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    match panic.downcast_ref::<&'static str>() {
        Some(text) => text,
        None => panic.downcast_ref::<String>().map_or("(no message)", String::as_str),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_rejects_malformed_values() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = TraceContext::from_traceparent(text).unwrap();
        assert_eq!(parsed.flags, 1);
        assert_eq!(parsed.traceparent(), text);
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-xyz92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::from_traceparent(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn options_validate_ratio_and_endpoint() {
        assert!(TracingOptions::default().validate().is_ok());
        let bad_ratio = TracingOptions { sampling_ratio: 1.5, ..Default::default() };
        assert!(bad_ratio.validate().unwrap_err().contains("sampling-ratio"));
        let bad_endpoint = TracingOptions { endpoint: Some("jaeger".into()), ..Default::default() };
        assert!(bad_endpoint.validate().unwrap_err().contains("absolute URI"));
        let good = TracingOptions { endpoint: Some("http://jaeger:4317".into()), sampling_ratio: 0.01 };
        assert!(good.validate().is_ok());
    }

    #[test]
    fn disabled_spans_have_no_context() {
        assert_eq!(TraceContext::of(&tracing::Span::none()), None);
    }
}
