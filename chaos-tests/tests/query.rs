//! `POST /query` against a real node: the queries Restate's CLI sends and our
//! own (joins, aggregates, filters, limits), answered in JSON and as an Arrow
//! IPC stream, over every introspection table; bad SQL; the limits of a query.

use std::time::Duration;

use anyhow::{ensure, Result};
use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Int64Type};
use arrow::ipc::reader::StreamReader;
use ferry_chaos_tests::{free_port, Handlers, Node};
use serde_json::{json, Value};

/// `POST /query` with `accept`: (status, content type, body).
async fn post(node: &Node, sql: &str, accept: &str) -> Result<(u16, String, bytes::Bytes)> {
    let response =
        node.http.post(node.url("/v4/query")).header("accept", accept).json(&json!({ "query": sql })).send().await?;
    let status = response.status().as_u16();
    let content_type =
        response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    Ok((status, content_type, response.bytes().await?))
}

/// The rows of a query that must succeed, in JSON.
async fn rows(node: &Node, sql: &str) -> Result<Vec<Value>> {
    let (status, content_type, body) = post(node, sql, "application/json").await?;
    ensure!(status == 200, "{sql}: {status} {}", String::from_utf8_lossy(&body));
    ensure!(content_type == "application/json", "{content_type}");
    let body: Value = serde_json::from_slice(&body)?;
    Ok(body["rows"].as_array().cloned().unwrap_or_default())
}

/// The error message of a query that must fail with `status`.
async fn fails(node: &Node, sql: &str, status: u16) -> Result<String> {
    let (got, _, body) = post(node, sql, "application/json").await?;
    let body: Value = serde_json::from_slice(&body)?;
    ensure!(got == status, "{sql}: expected {status}, got {got} {body}");
    Ok(body["message"].as_str().unwrap_or_default().to_owned())
}

async fn call(node: &Node, path: &str, body: &str) -> Result<Value> {
    let (status, value) = node.ingress(path, Some(body), &[("content-type", "application/json")]).await?;
    ensure!(status == 200 || status == 202, "{path}: {status} {value}");
    Ok(value)
}

/// `POST path` without a body, as to a handler that takes no input.
async fn send(node: &Node, path: &str) -> Result<String> {
    let (status, value) = node.ingress(path, Some(""), &[]).await?;
    ensure!(status == 202, "{path}: {status} {value}");
    Ok(value["invocationId"].as_str().unwrap_or_default().to_owned())
}

async fn start(config: &[(&str, &str)]) -> Result<(Handlers, tempfile::TempDir, Node)> {
    let handlers = Handlers::start().await?;
    let dir = tempfile::tempdir()?;
    let bootstrap = format!("127.0.0.1:{}", free_port());
    let node = Node::start_configured(&dir.path().join("node"), &bootstrap, config).await?;
    let (status, body) = node.post("/deployments", json!({ "uri": handlers.uri })).await?;
    ensure!(status == 201, "register: {status} {body}");
    Ok((handlers, dir, node))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_over_every_table_in_json_and_arrow() -> Result<()> {
    let (_handlers, _dir, node) = start(&[]).await?;
    // 60 completed invocations over 6 keys, each adding its number.
    for n in 0..60 {
        call(&node, &format!("/Counter/k{}/add", n % 6), &n.to_string()).await?;
    }
    // One invocation holds key `w`, the next waits for it in the inbox.
    let holder = send(&node, "/Awake/w/wait/send").await?;
    let queued = send(&node, "/Awake/w/wait/send").await?;
    // A workflow whose promise was resolved.
    let run = send(&node, "/Approval/p1/run/send").await?;
    for _ in 0..100 {
        let status = rows(&node, &format!("SELECT status FROM sys_invocation WHERE id = '{run}'")).await?;
        if status == [json!({"status": "suspended"})] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    call(&node, "/Approval/p1/approve", "\"yes\"").await?;

    // Aggregates, with the CLI's FIRST_VALUE(... ORDER BY ...).
    let counts = rows(
        &node,
        "SELECT target_service_key AS key, COUNT(1) AS n, FIRST_VALUE(id ORDER BY created_at ASC) AS oldest \
         FROM sys_invocation WHERE target_service_name = 'Counter' GROUP BY target_service_key ORDER BY key",
    )
    .await?;
    ensure!(counts.len() == 6, "{counts:?}");
    ensure!(counts.iter().all(|r| r["n"] == 10 && r["oldest"].as_str().is_some_and(|id| id.starts_with("inv_1"))));

    // The state the invocations left, by key (one partition) and in all.
    let state =
        rows(&node, "SELECT key, value_utf8, value FROM state WHERE service_name = 'Counter' AND service_key = 'k1'")
            .await?;
    // Ten adds; `value` is the stored bytes in hex.
    ensure!(state.len() == 1 && state[0]["value_utf8"] == "10" && state[0]["value"] == "3130", "{state:?}");
    let totals =
        rows(&node, "SELECT COUNT(*) AS keys FROM state WHERE service_name = 'Counter' AND key = 'count'").await?;
    ensure!(totals[0]["keys"] == 6, "{totals:?}");

    // A join, as `restate invocations list` makes it, and one of our own.
    let joined = rows(
        &node,
        &format!(
            "SELECT inv.id, inv.target, dp.id IS NOT NULL AS pinned_deployment_exists, inv.created_at \
             FROM sys_invocation inv LEFT JOIN sys_deployment dp ON dp.id = inv.pinned_deployment_id \
             WHERE inv.id IN ('{holder}', '{queued}') ORDER BY inv.created_at DESC, inv.id"
        ),
    )
    .await?;
    ensure!(joined.len() == 2 && joined[0]["id"] == queued.as_str(), "{joined:?}");
    ensure!(joined[0]["created_at"].as_str().is_some_and(|t| t.ends_with('Z')), "RFC 3339 in UTC: {joined:?}");
    let by_type = rows(
        &node,
        "SELECT s.ty, COUNT(*) AS n FROM sys_invocation i JOIN sys_service s ON s.name = i.target_service_name \
         GROUP BY s.ty ORDER BY s.ty",
    )
    .await?;
    ensure!(by_type.iter().any(|r| r["ty"] == "virtual_object" && r["n"].as_u64() >= Some(62)), "{by_type:?}");
    ensure!(by_type.iter().any(|r| r["ty"] == "workflow"), "{by_type:?}");

    // Limits and filters on statuses, both tables.
    let newest = rows(&node, "SELECT id FROM sys_invocation ORDER BY created_at DESC LIMIT 3").await?;
    ensure!(newest.len() == 3, "{newest:?}");
    let inboxed = rows(&node, "SELECT id FROM sys_invocation_status WHERE status = 'inboxed'").await?;
    ensure!(inboxed == [json!({ "id": queued })], "{inboxed:?}");
    let pending = rows(&node, "SELECT id FROM sys_invocation WHERE status = 'pending'").await?;
    ensure!(pending == [json!({ "id": queued })], "{pending:?}");

    // Who holds the key, and who waits for it.
    let holders =
        rows(&node, "SELECT invocation_id FROM sys_keyed_service_status WHERE service_name = 'Awake'").await?;
    ensure!(holders == [json!({ "invocation_id": holder })], "{holders:?}");
    let inbox = rows(&node, "SELECT id, service_key FROM sys_inbox").await?;
    ensure!(inbox == [json!({ "id": queued, "service_key": "w" })], "{inbox:?}");

    // The journal of the workflow's run: its input, the wait for the
    // promise, and the promise's completion.
    let sql = format!("SELECT index, entry_type, promise_name FROM sys_journal WHERE id = '{run}' ORDER BY index");
    let mut journal = Vec::new();
    for _ in 0..100 {
        journal = rows(&node, &sql).await?;
        if journal.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expected = [
        json!({"index": 0, "entry_type": "Command: Input"}),
        json!({"index": 1, "entry_type": "Command: GetPromise", "promise_name": "approval"}),
        json!({"index": 2, "entry_type": "Notification: GetPromiseCompletion"}),
    ];
    ensure!(journal == expected, "{journal:?}");

    // The workflow's promise.
    for _ in 0..50 {
        if !rows(&node, "SELECT key FROM sys_promise WHERE completed").await?.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let promises =
        rows(&node, "SELECT service_key, key, completed, completion_success_value_utf8 FROM sys_promise").await?;
    ensure!(
        promises
            == [
                json!({"service_key": "p1", "key": "approval", "completed": true, "completion_success_value_utf8": "\"yes\""})
            ],
        "{promises:?}"
    );

    // Idempotency keys: on the invocation, and in sys_idempotency.
    let keyed = [("content-type", "application/json"), ("idempotency-key", "order-7")];
    let (status, body) = node.ingress("/Counter/i/add", Some("1"), &keyed).await?;
    ensure!(status == 200, "{status} {body}");
    let id = rows(&node, "SELECT id FROM sys_invocation WHERE idempotency_key = 'order-7'").await?;
    ensure!(id.len() == 1, "{id:?}");
    let idempotency = rows(
        &node,
        "SELECT service_name, service_key, service_handler, idempotency_key, invocation_id FROM sys_idempotency",
    )
    .await?;
    ensure!(
        idempotency
            == [json!({"service_name": "Counter", "service_key": "i", "service_handler": "add",
                       "idempotency_key": "order-7", "invocation_id": id[0]["id"]})],
        "{idempotency:?}"
    );

    // The tables, as information_schema lists them.
    let tables = rows(&node, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'").await?;
    for table in [
        "sys_invocation",
        "sys_invocation_status",
        "sys_journal",
        "state",
        "sys_inbox",
        "sys_keyed_service_status",
        "sys_promise",
        "sys_idempotency",
        "sys_service",
        "sys_deployment",
    ] {
        ensure!(tables.iter().any(|t| t["table_name"] == table), "{table} in {tables:?}");
    }

    // Arrow IPC for any other Accept: what the CLI counts with (an Int64).
    let (status, content_type, body) =
        post(&node, "SELECT COUNT(1) FROM sys_invocation WHERE status != 'completed'", "*/*").await?;
    ensure!(status == 200 && content_type == "application/vnd.apache.arrow.stream", "{status} {content_type}");
    let batches = StreamReader::try_new(std::io::Cursor::new(body), None)?.collect::<Result<Vec<_>, _>>()?;
    ensure!(batches[0].column(0).data_type() == &DataType::Int64, "{:?}", batches[0].schema());
    ensure!(batches[0].column(0).as_primitive::<Int64Type>().value(0) >= 2, "{batches:?}");
    let (_, _, body) = post(&node, "SELECT id, created_at FROM sys_invocation WHERE false", "*/*").await?;
    let empty = StreamReader::try_new(std::io::Cursor::new(body), None)?;
    ensure!(empty.schema().fields().len() == 2, "a schema even without rows");

    // Bad SQL: a 400 with the engine's message.
    ensure!(fails(&node, "SELEC id FROM sys_invocation", 400).await?.contains("SELEC"));
    ensure!(fails(&node, "SELECT nope FROM sys_invocation", 400).await?.contains("nope"));
    ensure!(fails(&node, "SELECT * FROM sys_nothing", 400).await?.contains("sys_nothing"));
    let (status, _, body) = post(&node, "not json", "application/json").await?;
    ensure!(status == 400, "{status} {}", String::from_utf8_lossy(&body));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_stay_within_their_limits() -> Result<()> {
    let config = [("FERRY_ADMIN__QUERY__MAX_ROWS", "20"), ("FERRY_ADMIN__QUERY__MEMORY_BYTES", "1048576")];
    let (_handlers, _dir, node) = start(&config).await?;
    // 4 MB of state in 40 keys: four times the memory a query may use.
    for key in 0..40 {
        let blob = format!("\"{key}{}\"", "x".repeat(100_000));
        call(&node, &format!("/Blob/b{key}/put"), &blob).await?;
    }
    // A scan streams: counting all of it fits.
    let sizes = rows(&node, "SELECT COUNT(*) AS n, SUM(value_length) AS bytes FROM state").await?;
    ensure!(sizes[0]["n"] == 40 && sizes[0]["bytes"].as_u64() >= Some(4_000_000), "{sizes:?}");
    // An operator that must hold it all fails, and says why.
    for sql in ["SELECT COUNT(DISTINCT value) FROM state", "SELECT value FROM state ORDER BY value LIMIT 39"] {
        let message = fails(&node, sql, 400).await?;
        ensure!(message.contains("Resources exhausted"), "{sql}: {message}");
    }
    // So does an answer over the row limit.
    let message = fails(&node, "SELECT id FROM sys_invocation", 400).await?;
    ensure!(message.contains("more than 20 rows"), "{message}");
    ensure!(rows(&node, "SELECT id FROM sys_invocation LIMIT 20").await?.len() == 20);
    Ok(())
}
