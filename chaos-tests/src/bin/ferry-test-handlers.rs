//! Test deployment for Ferry's end-to-end tests.
//!
//! A small Restate service deployment, built with the Rust `restate-sdk`, that
//! Ferry registers as a deployment during its end-to-end and chaos tests. It
//! exposes:
//!
//! * `Sink/handle` (service): accepts any payload (any content type, or none),
//!   and records the invocation id plus the request headers it sees (e.g. the
//!   Kafka metadata headers) to `$FERRY_TEST_RECORD_DIR/sink.jsonl`, after
//!   holding the call `hold_ms` if a JSON payload says so; a payload with a
//!   `fail` message then fails with a terminal error (code 422).
//! * `Counter` (virtual object): exclusive `add` counts calls and checks the
//!   per-key ordering of `{"seq": N}` payloads (and fails, retryably, for
//!   `{"poison": true}`); exclusive `reset` takes a JSON number as the new
//!   count; shared `get` returns the counters as JSON.
//! * `Blob` (virtual object): exclusive `put` keeps its payload (a JSON
//!   string) as the key's state and returns its length; shared `get` returns it.
//! * `Flow` (workflow): `run` returns a string, shared `status` reports progress.
//! * `Flaky/run` (service): appends a line to
//!   `$FERRY_TEST_RECORD_DIR/flaky.jsonl` inside `ctx.run` (a journaled side
//!   effect), then fails with a retryable error for the first few attempts so
//!   retries and journal replay can be verified. `Flaky/nap` sleeps durably for
//!   the number of milliseconds in its payload, `Flaky/terminal` fails with a
//!   terminal error (code 422), `Flaky/hang` never answers.
//! * `Once/run` (service): one journaled step, `ctx.run` named `step`. Every
//!   execution of the step and every time the handler goes on past it are
//!   recorded to `once.jsonl` with a sequence number that orders all of this
//!   process's records, so a checker can tell whether a step ran again after
//!   its result was committed.
//! * `Fanout/send` (service): one-way calls (`ctx.send`) of a Virtual Object
//!   handler (`Counter/add` unless `service` and `handler` say otherwise)
//!   with an empty JSON object. For a payload `{"seq": N}` it sends to keys
//!   `f{N % 10}` and `g{N % 7}`; for `{"keys": [..]}` to each key, with
//!   `delay_ms` later and with `idempotency_key` if given. Returns how many
//!   it sent. `Fanout/call` calls the same handlers (without a delay) one
//!   after the other and awaits each result; it returns
//!   `{"keys": [...], "results": [...]}`, each result the callee's JSON
//!   output or `{"code": .., "message": ..}` for a call that failed.
//!   `Fanout/attach` attaches to the invocation `{"id": ..}` names and
//!   returns its result the same way.
//! * `Pipeline/run` (service): three `ctx.run` steps, then a call to
//!   `Sink/handle` with their results; returns them (a Kafka pipeline's stage,
//!   for `ferry-compare`).
//! * `Approval` (workflow): `run` waits for the promise `approval` and
//!   returns its value (or `{"code", "message"}` if rejected); shared
//!   `approve` resolves it with its payload (rejects it for
//!   `{"reject": reason}`); shared `peek` returns its value or `"pending"`.
//! * `Lazy` (virtual object, state read lazily): exclusive `add` adds one to
//!   `count` and returns it, shared `keys` returns the state's keys.
//! * `Awake` (virtual object): exclusive `wait` creates an awakeable, records
//!   `{"invocation_id", "awakeable_id"}` to `awake.jsonl`, and returns what
//!   completes it (its JSON value, or `{"code", "message"}` if rejected);
//!   shared `complete` completes the awakeable `id` of its payload with
//!   `value`, or rejects it with the message `reject`.
//! * `Slow/run` (service): records each attempt to `slow.jsonl`, then works
//!   for the milliseconds in its payload without writing to its journal (as
//!   a long computation or a slow external call would), and returns.
//!
//! Every attempt of `Sink/handle` and `Flaky/run` is also recorded (outside of
//! any journaled action) to `sink.jsonl` / `flaky-attempts.jsonl`, so tests can
//! tell attempts apart from journaled side effects. Each record is one JSON
//! object per line.
//!
//! Usage: `ferry-test-handlers [--port PORT] [--host ADDR]` (or env `PORT`,
//! default 9080; host default 127.0.0.1). Speaks HTTP/2 prior knowledge only. Once the
//! listener is bound, prints `ferry-test-handlers listening on 127.0.0.1:PORT`
//! to stdout (useful with `--port 0`).
//!
//! With `OTEL_EXPORTER_OTLP_ENDPOINT` set, every request is served in a span
//! whose parent is the request's `traceparent` (the invoker's attempt), and
//! that span and the SDK's own spans are exported there: the handler's side
//! of a trace joined to Ferry's.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use restate_sdk::context::RequestTarget;
use restate_sdk::hyper::HyperEndpoint;
use restate_sdk::prelude::*;
use restate_sdk::serde::{InputMetadata, OutputMetadata, PayloadMetadata};
use serde_json::{json, Value};

/// Environment variable naming the directory where handlers record calls.
const RECORD_DIR_ENV: &str = "FERRY_TEST_RECORD_DIR";
/// Environment variable with the default number of failing `Flaky/run` attempts.
const FLAKY_FAILURES_ENV: &str = "FERRY_TEST_FLAKY_FAILURES";
/// Default number of attempts `Flaky/run` fails before succeeding.
const DEFAULT_FLAKY_FAILURES: u64 = 1;

const SINK_FILE: &str = "sink.jsonl";
const FLAKY_FILE: &str = "flaky.jsonl";
const FLAKY_ATTEMPTS_FILE: &str = "flaky-attempts.jsonl";
const ONCE_FILE: &str = "once.jsonl";
const SLOW_FILE: &str = "slow.jsonl";
const AWAKE_FILE: &str = "awake.jsonl";

const STATE_COUNT: &str = "count";
const STATE_LAST_SEQ: &str = "last_seq";
const STATE_OUT_OF_ORDER: &str = "out_of_order";
const STATE_DUPLICATES: &str = "duplicates";
const STATE_FLOW_STATUS: &str = "status";
const STATE_BLOB: &str = "blob";

#[derive(Debug, Parser)]
#[command(name = "ferry-test-handlers", about = "Restate test handlers for Ferry")]
struct Args {
    /// TCP port to listen on. Use 0 for an ephemeral port.
    #[arg(long, env = "PORT", default_value_t = 9080)]
    port: u16,
    /// Address to listen on (`0.0.0.0` in a container).
    #[arg(long, default_value_t = Ipv4Addr::LOCALHOST)]
    host: Ipv4Addr,
}

// ---------------------------------------------------------------------------
// Payload type accepting arbitrary bytes
// ---------------------------------------------------------------------------

/// Raw handler input: any bytes, any content type, and the body may be absent.
///
/// Unlike `Vec<u8>` / `Bytes` (which the SDK declares as `*/*` but *required*),
/// this advertises `required: false`, so Kafka records with an empty value and
/// requests without a content-type are accepted as well.
#[derive(Debug, Clone, Default)]
struct AnyPayload(Bytes);

impl AnyPayload {
    fn as_json(&self) -> Option<Value> {
        serde_json::from_slice(&self.0).ok()
    }

    fn lossy_text(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

impl restate_sdk::serde::Deserialize for AnyPayload {
    type Error = std::convert::Infallible;

    fn deserialize(bytes: &mut Bytes) -> Result<Self, Self::Error> {
        Ok(Self(bytes.clone()))
    }
}

impl restate_sdk::serde::Serialize for AnyPayload {
    type Error = std::convert::Infallible;

    fn serialize(&self) -> Result<Bytes, Self::Error> {
        Ok(self.0.clone())
    }
}

impl PayloadMetadata for AnyPayload {
    fn json_schema() -> Option<Value> {
        None
    }

    fn input_metadata() -> InputMetadata {
        InputMetadata { accept_content_type: "*/*", is_required: false }
    }

    fn output_metadata() -> OutputMetadata {
        OutputMetadata { content_type: "application/octet-stream", set_content_type_if_empty: false }
    }
}

// ---------------------------------------------------------------------------
// Recording helpers
// ---------------------------------------------------------------------------

fn record_dir() -> Option<PathBuf> {
    std::env::var_os(RECORD_DIR_ENV).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// Appends `record` as one JSON line to `file` in the record directory, if set.
///
/// The line is written with a single `write_all` on an `O_APPEND` file so that
/// concurrent invocations don't interleave their lines.
fn append_record(file: &str, record: &Value) -> anyhow::Result<()> {
    let Some(dir) = record_dir() else {
        return Ok(());
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating record dir {}", dir.display()))?;
    let path = dir.join(file);
    let mut line = serde_json::to_vec(record)?;
    line.push(b'\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.write_all(&line).with_context(|| format!("appending to {}", path.display()))?;
    Ok(())
}

/// Request headers as a sorted JSON object (`name -> value`). Names are
/// lower-cased by the SDK; repeated names are joined as an array.
fn headers_json(headers: &HeaderMap) -> Value {
    let mut out: BTreeMap<String, Value> = BTreeMap::new();
    for name in headers.keys() {
        let values: Vec<Value> = headers.get_all(name).iter().map(|v| Value::String(v.clone())).collect();
        let value =
            if values.len() == 1 { values.into_iter().next().unwrap_or(Value::Null) } else { Value::Array(values) };
        out.insert(name.as_str().to_owned(), value);
    }
    json!(out)
}

fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Sink
// ---------------------------------------------------------------------------

struct Sink;

#[restate_sdk::service]
impl Sink {
    /// Records the invocation id, headers and payload of every attempt,
    /// after holding it `hold_ms` if the payload says so; then fails with a
    /// terminal error if it has a `fail` message.
    #[handler]
    async fn handle(&self, ctx: Context<'_>, payload: AnyPayload) -> Result<(), HandlerError> {
        let started_ms = unix_millis();
        let json = payload.as_json();
        if let Some(hold_ms) = json.as_ref().and_then(|p| p.get("hold_ms").and_then(Value::as_u64)) {
            tokio::time::sleep(std::time::Duration::from_millis(hold_ms)).await;
        }
        let fail = json.as_ref().and_then(|p| p.get("fail").and_then(Value::as_str).map(str::to_owned));
        let record = json!({
            "started_ms": started_ms,
            "invocation_id": ctx.invocation_id(),
            "headers": headers_json(ctx.headers()),
            "payload_len": payload.0.len(),
            "payload": payload.lossy_text(),
            "ts_ms": unix_millis(),
        });
        tracing::debug!(invocation_id = ctx.invocation_id(), "Sink/handle");
        append_record(SINK_FILE, &record)?;
        match fail {
            Some(message) => Err(TerminalError::new_with_code(422, message).into()),
            None => Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------
// Fanout
// ---------------------------------------------------------------------------

struct Fanout;

/// The keys a `Fanout` payload names: `f{N % 10}` and `g{N % 7}` for
/// `{"seq": N}`, else its `keys`.
fn fanout_keys(input: &Value) -> Vec<String> {
    match input.get("seq").and_then(Value::as_u64) {
        Some(seq) => vec![format!("f{}", seq % 10), format!("g{}", seq % 7)],
        None => input
            .get("keys")
            .and_then(Value::as_array)
            .map(|keys| keys.iter().filter_map(|k| k.as_str().map(str::to_owned)).collect())
            .unwrap_or_default(),
    }
}

#[restate_sdk::service]
impl Fanout {
    /// Sends an empty JSON object to the keys its payload names.
    #[handler]
    async fn send(&self, ctx: Context<'_>, payload: AnyPayload) -> Result<u64, HandlerError> {
        let input = payload.as_json().unwrap_or_default();
        let text = |field: &str| input.get(field).and_then(Value::as_str).map(str::to_owned);
        let keys = fanout_keys(&input);
        let service = text("service").unwrap_or_else(|| "Counter".to_owned());
        let handler = text("handler").unwrap_or_else(|| "add".to_owned());
        let delay = input.get("delay_ms").and_then(Value::as_u64).map(std::time::Duration::from_millis);
        for key in &keys {
            let target = RequestTarget::object(service.as_str(), key.as_str(), handler.as_str());
            let mut request = ctx.request::<AnyPayload, AnyPayload>(target, AnyPayload(Bytes::from_static(b"{}")));
            if let Some(idempotency_key) = text("idempotency_key") {
                request = request.idempotency_key(idempotency_key);
            }
            match delay {
                Some(delay) => request.send_after(delay),
                None => request.send(),
            };
        }
        Ok(keys.len() as u64)
    }

    /// Calls the handler for each key its payload names, and collects the
    /// results.
    #[handler]
    async fn call(&self, ctx: Context<'_>, payload: AnyPayload) -> Result<Json<Value>, HandlerError> {
        let input = payload.as_json().unwrap_or_default();
        let text = |field: &str| input.get(field).and_then(Value::as_str).map(str::to_owned);
        let keys = fanout_keys(&input);
        let service = text("service").unwrap_or_else(|| "Counter".to_owned());
        let handler = text("handler").unwrap_or_else(|| "add".to_owned());
        let mut results = Vec::new();
        for key in &keys {
            let target = RequestTarget::object(service.as_str(), key.as_str(), handler.as_str());
            let mut request = ctx.request::<AnyPayload, AnyPayload>(target, AnyPayload(Bytes::from_static(b"{}")));
            if let Some(idempotency_key) = text("idempotency_key") {
                request = request.idempotency_key(idempotency_key);
            }
            results.push(match request.call().await {
                Ok(output) => output.as_json().unwrap_or(Value::Null),
                Err(e) => json!({ "code": e.code(), "message": e.message() }),
            });
        }
        Ok(Json(json!({ "keys": keys, "results": results })))
    }

    /// Attaches to the invocation `{"id": ..}` names and returns its result,
    /// or `{"code", "message"}` if it failed.
    #[handler]
    async fn attach(&self, ctx: Context<'_>, payload: AnyPayload) -> Result<Json<Value>, HandlerError> {
        let input = payload.as_json().unwrap_or_default();
        let id = input.get("id").and_then(Value::as_str).unwrap_or_default().to_owned();
        Ok(Json(match ctx.invocation_handle(id).attach::<AnyPayload>().await {
            Ok(output) => output.as_json().unwrap_or(Value::Null),
            Err(e) => json!({ "code": e.code(), "message": e.message() }),
        }))
    }
}

// ---------------------------------------------------------------------------
// Pipeline
// ---------------------------------------------------------------------------

struct Pipeline;

#[restate_sdk::service]
impl Pipeline {
    /// A stage of a Kafka pipeline: three steps, then a call to
    /// `Sink/handle` with what they made. Returns the steps' results.
    #[handler]
    async fn run(&self, ctx: Context<'_>, payload: AnyPayload) -> Result<Json<Value>, HandlerError> {
        let seq = payload_seq(&payload).unwrap_or(0);
        let mut steps = Vec::new();
        for (n, name) in ["parse", "enrich", "score"].into_iter().enumerate() {
            let step: i64 = ctx.run(|| async move { Ok(seq * 10 + n as i64) }).name(name).await?;
            steps.push(step);
        }
        let target = RequestTarget::service("Sink", "handle");
        let steps = json!(steps);
        ctx.request::<AnyPayload, AnyPayload>(target, AnyPayload(Bytes::from(steps.to_string()))).call().await?;
        Ok(Json(steps))
    }
}

// ---------------------------------------------------------------------------
// Blob
// ---------------------------------------------------------------------------

struct Blob;

#[restate_sdk::object]
impl Blob {
    /// Keeps `value` as the key's state; returns its length.
    #[handler]
    async fn put(&self, ctx: ObjectContext<'_>, value: String) -> Result<u64, HandlerError> {
        let len = value.len() as u64;
        ctx.set(STATE_BLOB, value);
        Ok(len)
    }

    /// The value kept, or an empty string.
    #[handler]
    async fn get(&self, ctx: SharedObjectContext<'_>) -> Result<String, HandlerError> {
        Ok(ctx.get::<String>(STATE_BLOB).await?.unwrap_or_default())
    }
}

// ---------------------------------------------------------------------------
// Counter
// ---------------------------------------------------------------------------

struct Counter;

/// Extracts `seq` from a `{"seq": N}` JSON payload.
fn payload_seq(payload: &AnyPayload) -> Option<i64> {
    payload.as_json()?.get("seq")?.as_i64()
}

#[restate_sdk::object]
impl Counter {
    /// Increments `count`. If the payload is `{"seq": N}`, stores `last_seq`
    /// and increments `out_of_order` when `N <= last_seq` (of which
    /// `duplicates` counts the `N == last_seq` cases). Returns the new count.
    #[handler]
    async fn add(&self, ctx: ObjectContext<'_>, payload: AnyPayload) -> Result<u64, HandlerError> {
        if payload.as_json().is_some_and(|v| v.get("poison") == Some(&Value::Bool(true))) {
            return Err(HandlerError::from(format!("Counter/add: {} is poisoned", ctx.key())));
        }
        let count = ctx.get::<u64>(STATE_COUNT).await?.unwrap_or(0) + 1;
        ctx.set(STATE_COUNT, count);

        if let Some(seq) = payload_seq(&payload) {
            if let Some(last) = ctx.get::<i64>(STATE_LAST_SEQ).await? {
                if seq <= last {
                    let ooo = ctx.get::<u64>(STATE_OUT_OF_ORDER).await?.unwrap_or(0) + 1;
                    ctx.set(STATE_OUT_OF_ORDER, ooo);
                    tracing::warn!(key = ctx.key(), seq, last, "Counter/add: out-of-order seq");
                }
                if seq == last {
                    let dups = ctx.get::<u64>(STATE_DUPLICATES).await?.unwrap_or(0) + 1;
                    ctx.set(STATE_DUPLICATES, dups);
                }
            }
            ctx.set(STATE_LAST_SEQ, seq);
        }
        Ok(count)
    }

    /// Sets `count`; the payload must be a JSON number.
    #[handler]
    async fn reset(&self, ctx: ObjectContext<'_>, count: Json<u64>) -> Result<u64, HandlerError> {
        let count = count.into_inner();
        ctx.set(STATE_COUNT, count);
        Ok(count)
    }

    /// Returns `{"count": u64, "last_seq": i64|null, "out_of_order": u64, "duplicates": u64}`.
    #[handler]
    async fn get(&self, ctx: SharedObjectContext<'_>) -> Result<Json<Value>, HandlerError> {
        let count = ctx.get::<u64>(STATE_COUNT).await?.unwrap_or(0);
        let last_seq = ctx.get::<i64>(STATE_LAST_SEQ).await?;
        let out_of_order = ctx.get::<u64>(STATE_OUT_OF_ORDER).await?.unwrap_or(0);
        let duplicates = ctx.get::<u64>(STATE_DUPLICATES).await?.unwrap_or(0);
        Ok(Json(json!({
            "count": count,
            "last_seq": last_seq,
            "out_of_order": out_of_order,
            "duplicates": duplicates,
        })))
    }
}

// ---------------------------------------------------------------------------
// Flow
// ---------------------------------------------------------------------------

struct Flow;

#[restate_sdk::workflow]
impl Flow {
    /// Runs the workflow: records progress in state `status` and returns
    /// `"flow <key> done (<n> input bytes)"`.
    #[handler]
    async fn run(&self, ctx: WorkflowContext<'_>, input: AnyPayload) -> Result<String, HandlerError> {
        ctx.set(STATE_FLOW_STATUS, "running".to_owned());
        let input_len = input.0.len() as u64;
        let step: u64 = ctx.run(|| async move { Ok(input_len) }).name("step").await?;
        ctx.set(STATE_FLOW_STATUS, "done".to_owned());
        Ok(format!("flow {} done ({step} input bytes)", ctx.key()))
    }

    /// Returns the workflow status: `"pending"`, `"running"` or `"done"`.
    #[handler]
    async fn status(&self, ctx: SharedWorkflowContext<'_>) -> Result<String, HandlerError> {
        Ok(ctx.get::<String>(STATE_FLOW_STATUS).await?.unwrap_or_else(|| "pending".to_owned()))
    }
}

// ---------------------------------------------------------------------------
// Flaky
// ---------------------------------------------------------------------------

/// Attempts seen per invocation id, in this process.
#[derive(Default)]
struct Flaky {
    attempts: Mutex<HashMap<String, u64>>,
}

impl Flaky {
    fn next_attempt(&self, invocation_id: &str) -> u64 {
        let mut attempts = self.attempts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = attempts.entry(invocation_id.to_owned()).or_insert(0);
        *n += 1;
        *n
    }
}

/// Number of attempts to fail: `{"fail_attempts": N}` in the payload, else env
/// `FERRY_TEST_FLAKY_FAILURES`, else [`DEFAULT_FLAKY_FAILURES`].
fn flaky_failures(payload: &AnyPayload) -> u64 {
    payload
        .as_json()
        .and_then(|v| v.get("fail_attempts").and_then(Value::as_u64))
        .or_else(|| std::env::var(FLAKY_FAILURES_ENV).ok().and_then(|v| v.trim().parse().ok()))
        .unwrap_or(DEFAULT_FLAKY_FAILURES)
}

#[restate_sdk::service]
impl Flaky {
    /// Appends one line to `flaky.jsonl` inside `ctx.run` (journaled, so it
    /// must appear once per invocation even across retries), records every
    /// attempt to `flaky-attempts.jsonl`, and fails with a retryable error on
    /// the first `fail_attempts` attempts (counted in-process). Returns
    /// `"ok after <n> attempts"`.
    #[handler]
    async fn run(&self, ctx: Context<'_>, payload: AnyPayload) -> Result<String, HandlerError> {
        let invocation_id = ctx.invocation_id().to_owned();
        let attempt = self.next_attempt(&invocation_id);
        append_record(
            FLAKY_ATTEMPTS_FILE,
            &json!({
                "invocation_id": invocation_id,
                "attempt": attempt,
                "ts_ms": unix_millis(),
            }),
        )?;

        let side_effect_id = invocation_id.clone();
        let payload_text = payload.lossy_text();
        let written_at: u64 = ctx
            .run(|| async move {
                let ts = unix_millis();
                append_record(
                    FLAKY_FILE,
                    &json!({
                        "invocation_id": side_effect_id,
                        "attempt": attempt,
                        "payload": payload_text,
                        "ts_ms": ts,
                    }),
                )?;
                Ok(ts)
            })
            .name("append")
            .await?;

        let failures = flaky_failures(&payload);
        if attempt <= failures {
            tracing::info!(%invocation_id, attempt, failures, "Flaky/run: failing on purpose");
            // A plain string error (not anyhow) keeps the protocol ErrorMessage free of backtraces.
            let msg = format!(
                "Flaky/run: attempt {attempt} of {invocation_id} fails on purpose ({failures} failing attempts)"
            );
            return Err(HandlerError::from(msg));
        }
        Ok(format!("ok after {attempt} attempts (side effect at {written_at})"))
    }

    /// Sleeps durably for the milliseconds in the payload; a cancellation ends the sleep with an error.
    #[handler]
    async fn nap(&self, ctx: Context<'_>, payload: AnyPayload) -> Result<String, HandlerError> {
        let ms: u64 = payload.lossy_text().trim().parse().unwrap_or(0);
        ctx.sleep(std::time::Duration::from_millis(ms)).await?;
        Ok("rested".to_owned())
    }

    /// Fails for good.
    #[handler]
    async fn terminal(&self, _ctx: Context<'_>) -> Result<(), HandlerError> {
        Err(TerminalError::new_with_code(422, "Flaky/terminal fails on purpose").into())
    }

    /// Never answers; the runtime's attempt timeout ends each attempt.
    #[handler]
    async fn hang(&self, _ctx: Context<'_>) -> Result<(), HandlerError> {
        std::future::pending::<()>().await;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Once
// ---------------------------------------------------------------------------

/// Orders the records of `Once/run` in this process.
#[derive(Default)]
struct Once {
    seq: Arc<AtomicU64>,
}

#[restate_sdk::service]
impl Once {
    /// Runs the journaled step `step`, whose result is a token naming this
    /// execution, records `{"event": "executed"}` for every execution and
    /// `{"event": "observed"}` with the journaled token once the handler is
    /// past the step (which it is only with the step's result committed).
    /// Returns the token.
    #[handler]
    async fn run(&self, ctx: Context<'_>) -> Result<String, HandlerError> {
        let invocation_id = ctx.invocation_id().to_owned();
        let (seq, id) = (self.seq.clone(), invocation_id.clone());
        let token: String = ctx
            .run(|| async move {
                let seq = seq.fetch_add(1, Ordering::SeqCst);
                let token = format!("{id}/{seq}");
                let record =
                    json!({ "invocation_id": id, "run": "step", "event": "executed", "token": token, "seq": seq });
                append_record(ONCE_FILE, &record)?;
                Ok(token)
            })
            .name("step")
            .await?;
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        let record =
            json!({ "invocation_id": invocation_id, "run": "step", "event": "observed", "token": token, "seq": seq });
        append_record(ONCE_FILE, &record)?;
        Ok(token)
    }
}

// ---------------------------------------------------------------------------
// Slow
// ---------------------------------------------------------------------------

struct Slow;

#[restate_sdk::service]
impl Slow {
    /// Records the attempt, works for the milliseconds in the payload, returns `"done"`.
    #[handler]
    async fn run(&self, ctx: Context<'_>, payload: AnyPayload) -> Result<String, HandlerError> {
        let ms: u64 = payload.lossy_text().trim().parse().unwrap_or(0);
        append_record(SLOW_FILE, &json!({ "invocation_id": ctx.invocation_id(), "ts_ms": unix_millis() }))?;
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        Ok("done".to_owned())
    }
}

// ---------------------------------------------------------------------------
// Approval
// ---------------------------------------------------------------------------

struct Approval;

const APPROVAL: &str = "approval";

#[restate_sdk::workflow]
impl Approval {
    /// Waits for the promise `approval` and returns its value, or
    /// `{"code", "message"}` if it was rejected.
    #[handler]
    async fn run(&self, ctx: WorkflowContext<'_>) -> Result<Json<Value>, HandlerError> {
        Ok(Json(match ctx.promise::<AnyPayload>(APPROVAL).await {
            Ok(value) => value.as_json().unwrap_or(Value::Null),
            Err(e) => json!({ "code": e.code(), "message": e.message() }),
        }))
    }

    /// Resolves the promise with the payload, or rejects it for a payload
    /// `{"reject": reason}`.
    #[handler]
    async fn approve(&self, ctx: SharedWorkflowContext<'_>, payload: AnyPayload) -> Result<(), HandlerError> {
        match payload.as_json().as_ref().and_then(|v| v.get("reject")).and_then(Value::as_str) {
            Some(reason) => ctx.reject_promise(APPROVAL, TerminalError::new(reason)),
            None => ctx.resolve_promise(APPROVAL, payload),
        }
        Ok(())
    }

    /// The promise's value once it is resolved, else `"pending"`.
    #[handler]
    async fn peek(&self, ctx: SharedWorkflowContext<'_>) -> Result<Json<Value>, HandlerError> {
        Ok(Json(match ctx.peek_promise::<AnyPayload>(APPROVAL).await {
            Ok(Some(value)) => value.as_json().unwrap_or(Value::Null),
            Ok(None) => json!("pending"),
            Err(e) => json!({ "code": e.code(), "message": e.message() }),
        }))
    }
}

// ---------------------------------------------------------------------------
// Lazy
// ---------------------------------------------------------------------------

struct Lazy;

#[restate_sdk::object(lazy_state)]
impl Lazy {
    /// Adds one to `count`, read lazily, and returns it.
    #[handler]
    async fn add(&self, ctx: ObjectContext<'_>) -> Result<u64, HandlerError> {
        let count = ctx.get::<u64>(STATE_COUNT).await?.unwrap_or(0) + 1;
        ctx.set(STATE_COUNT, count);
        Ok(count)
    }

    /// The keys of the object's state, read lazily.
    #[handler]
    async fn keys(&self, ctx: SharedObjectContext<'_>) -> Result<Json<Vec<String>>, HandlerError> {
        Ok(Json(ctx.get_keys().await?))
    }
}

// ---------------------------------------------------------------------------
// Awake
// ---------------------------------------------------------------------------

struct Awake;

#[restate_sdk::object]
impl Awake {
    /// Creates an awakeable, records its id, and returns what completes it:
    /// its value, or `{"code", "message"}` for a failure.
    #[handler]
    async fn wait(&self, ctx: ObjectContext<'_>) -> Result<Json<Value>, HandlerError> {
        let (id, completed) = ctx.awakeable::<AnyPayload>();
        append_record(AWAKE_FILE, &json!({ "invocation_id": ctx.invocation_id(), "awakeable_id": id }))?;
        Ok(Json(match completed.await {
            Ok(value) => value.as_json().unwrap_or_else(|| Value::String(value.lossy_text())),
            Err(e) => json!({ "code": e.code(), "message": e.message() }),
        }))
    }

    /// Completes the awakeable `id` of its payload: with `value`, or as
    /// failed with `reject` as the message.
    #[handler]
    async fn complete(&self, ctx: SharedObjectContext<'_>, payload: AnyPayload) -> Result<(), HandlerError> {
        let input = payload.as_json().unwrap_or_default();
        let id = input.get("id").and_then(Value::as_str).unwrap_or_default();
        match input.get("reject").and_then(Value::as_str) {
            Some(reason) => ctx.reject_awakeable(id, TerminalError::new(reason)),
            None => {
                let value = input.get("value").cloned().unwrap_or(Value::Null);
                ctx.resolve_awakeable(id, AnyPayload(Bytes::from(value.to_string())));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The SDK's endpoint, each request served in a span joined to its
/// `traceparent`.
#[derive(Clone)]
struct Traced(HyperEndpoint);

impl hyper::service::Service<http::Request<hyper::body::Incoming>> for Traced {
    type Response = http::Response<TracedBody<restate_sdk::endpoint::ResponseBody>>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn call(&self, request: http::Request<hyper::body::Incoming>) -> Self::Future {
        let span = if ferry_telemetry::exporting() {
            let span = tracing::info_span!(
                "handle",
                otel.name = format!("handle {}", request.uri().path()),
                otel.kind = "server",
                url.path = request.uri().path(),
            );
            ferry_telemetry::adopt_from_headers(&span, request.headers());
            span
        } else {
            tracing::Span::none()
        };
        // The SDK runs the handler while the response body is polled.
        let response = span.in_scope(|| self.0.call(request)).into_inner();
        std::future::ready(response.map(|r| r.map(|body| TracedBody { body: Box::pin(body), span })))
    }
}

/// A response body polled inside its request's span.
struct TracedBody<B> {
    body: std::pin::Pin<Box<B>>,
    span: tracing::Span,
}

impl<B: http_body::Body> http_body::Body for TracedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let _entered = this.span.enter();
        this.body.as_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Serves `endpoint` over HTTP/2 until `shutdown`, then lets open
/// connections finish for up to 10 s.
async fn serve(listener: tokio::net::TcpListener, endpoint: Endpoint, shutdown: impl std::future::Future) {
    let service = Traced(HyperEndpoint::new(endpoint));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, remote)) = accepted else { continue };
                let connection = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service.clone());
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::warn!("connection from {remote}: {e}");
                    }
                });
            }
            _ = &mut shutdown => break,
        }
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), graceful.shutdown()).await;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    let telemetry = ferry_telemetry::init(
        &ferry_telemetry::TracingOptions::default(),
        &filter,
        ferry_telemetry::LogFormat::Text,
        "ferry-test-handlers",
        &std::process::id().to_string(),
        &["ferry_test_handlers", "restate_sdk"],
    )?;

    let args = Args::parse();
    let addr = SocketAddr::from((args.host, args.port));
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr()?;

    let endpoint = Endpoint::builder()
        .bind(Sink)
        .bind(Counter)
        .bind(Blob)
        .bind(Flow)
        .bind(Flaky::default())
        .bind(Once::default())
        .bind(Slow)
        .bind(Fanout)
        .bind(Pipeline)
        .bind(Awake)
        .bind(Lazy)
        .bind(Approval)
        .build();

    println!("ferry-test-handlers listening on {local}");
    std::io::stdout().flush()?;

    serve(listener, endpoint, shutdown_signal()).await;
    telemetry.shutdown();
    Ok(())
}
