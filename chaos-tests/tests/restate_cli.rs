//! Restate's own CLI (`restate` 1.7.12 from npm, installed by
//! `scripts/restate.sh install cli`) against a real node: each command a
//! Restate user reaches for, with its output checked for what they look
//! for.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use anyhow::{ensure, Result};
use ferry_chaos_tests::restate::installed;
use ferry_chaos_tests::{eventually, free_port, Handlers, Node};
use serde_json::Value;

/// Runs `restate args` against `node` (its editor `editor`) and returns what
/// it printed, standard output then standard error.
fn restate(node: &Node, home: &Path, editor: &Path, args: &[&str]) -> Result<(bool, String)> {
    let Output { status, stdout, stderr } = std::process::Command::new(installed("cli")?)
        .env("RESTATE_ADMIN_URL", node.url("/"))
        .env("HOME", home)
        .env("EDITOR", editor)
        .env("NO_COLOR", "1")
        .env("CI", "true")
        .arg("--yes")
        .args(args)
        .output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&stdout), String::from_utf8_lossy(&stderr));
    Ok((status.success(), text))
}

/// Runs a command that must succeed, without the warnings a CLI prints for
/// a server it cannot verify, and returns its output.
fn ok(node: &Node, home: &Path, args: &[&str]) -> Result<String> {
    let (success, text) = restate(node, home, &home.join("editor.sh"), args)?;
    ensure!(success, "restate {args:?} failed:\n{text}");
    ensure!(!text.contains("WARNING"), "restate {args:?} warned:\n{text}");
    Ok(text)
}

async fn send(node: &Node, path: &str) -> Result<String> {
    let (status, body) = node.ingress(path, Some(""), &[]).await?;
    ensure!(status == 202, "{path}: {status} {body}");
    Ok(body["invocationId"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restates_cli_inspects_and_steers_a_node() -> Result<()> {
    let handlers = Handlers::start().await?;
    let dir = tempfile::tempdir()?;
    let node = Node::start_for_broker(&dir.path().join("node"), &format!("127.0.0.1:{}", free_port())).await?;
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home)?;
    // `state edit` opens the state as JSON in $EDITOR; this one sets `count`.
    let editor = home.join("editor.sh");
    std::fs::write(&editor, "#!/bin/sh\nsed -i 's/\"count\": *[0-9]*/\"count\": 42/' \"$1\"\n")?;
    std::fs::set_permissions(&editor, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let cli = |args: &[&str]| ok(&node, &home, args);

    let whoami = cli(&["whoami"])?;
    ensure!(whoami.contains("is healthy"), "{whoami}");
    ensure!(whoami.contains(&format!(":{}/", node.ingress_port)), "the ingress endpoint: {whoami}");

    let registered = cli(&["deployments", "register", &handlers.uri])?;
    let deployments = node.get("/deployments").await?;
    let deployment = deployments["deployments"][0]["id"].as_str().unwrap_or_default().to_owned();
    ensure!(deployment.starts_with("dp_1"), "Restate's id form: {deployments}");
    ensure!(registered.contains("Counter"), "{registered}");
    let again = cli(&["deployments", "register", &handlers.uri])?;
    ensure!(again.contains("already exists") && again.contains(&deployment), "{again}");

    let listed = cli(&["deployments", "list"])?;
    ensure!(listed.contains(&deployment) && listed.contains(&handlers.uri), "{listed}");
    let described = cli(&["deployments", "describe", &deployment])?;
    ensure!(described.contains("Bidirectional") && described.contains("Counter"), "{described}");

    let services = cli(&["services", "list"])?;
    ensure!(services.contains("Counter") && services.contains("virtual object"), "{services}");
    ensure!(services.contains("Approval") && services.contains("workflow"), "{services}");
    let counter = cli(&["services", "describe", "Counter"])?;
    ensure!(counter.contains("VirtualObject") && counter.contains("add") && counter.contains(&deployment), "{counter}");
    let config = cli(&["services", "config", "view", "Approval"])?;
    ensure!(config.contains("Workflow retention time:  1d") && config.contains("Journal retention:  1d"), "{config}");

    // Two completed invocations with state, and two that wait for an
    // awakeable nobody completes.
    let json = [("content-type", "application/json")];
    for n in ["2", "3"] {
        let (status, body) = node.ingress("/Counter/a/add", Some(n), &json).await?;
        ensure!(status == 200, "{status} {body}");
    }
    let waiting = send(&node, "/Awake/w1/wait/send").await?;
    let killed = send(&node, "/Awake/w2/wait/send").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let state = cli(&["state", "get", "Counter", "a"])?;
    ensure!(state.lines().any(|l| l.split_whitespace().eq(["count", "2"])), "{state}");
    cli(&["state", "edit", "Counter", "a"])?;
    let state = cli(&["state", "get", "Counter", "a"])?;
    ensure!(state.lines().any(|l| l.split_whitespace().eq(["count", "42"])), "edited: {state}");
    let (status, count) = node.ingress("/Counter/a/add", Some("1"), &json).await?;
    ensure!(status == 200 && count == 43, "the handler sees the edit: {status} {count}");
    // A key held by an invocation is not edited under it.
    let (held, refused) = restate(&node, &home, &editor, &["state", "edit", "Awake", "w1"])?;
    ensure!(!held && refused.contains("409 Conflict"), "{refused}");

    let active = cli(&["invocations", "list"])?;
    ensure!(active.contains(&waiting) && active.contains("Awake/w1/wait"), "{active}");
    ensure!(!active.contains("Counter/a/add"), "completed ones are not active: {active}");
    let all = cli(&["invocations", "list", "--all"])?;
    ensure!(all.contains("Counter/a/add") && all.contains("completed"), "{all}");
    // The list's filters.
    let counter = cli(&["invocations", "list", "--service", "Counter", "--completion-result", "success"])?;
    ensure!(counter.contains("Counter/a/add") && !counter.contains("Awake"), "{counter}");
    let w1 = cli(&["invocations", "list", "--service", "Awake", "--key", "w1", "--virtual-objects-only"])?;
    ensure!(w1.contains(&waiting) && !w1.contains(&killed), "{w1}");
    let by_handler = cli(&["invocations", "list", "--all", "--handler", "add", "--limit", "1"])?;
    ensure!(by_handler.matches("Counter/a/add").count() == 1 && !by_handler.contains("Awake"), "{by_handler}");
    let one = cli(&["invocations", "describe", &waiting])?;
    ensure!(one.contains("Awake/w1/wait") && one.contains("Command: Input"), "{one}");

    let sql = cli(&["sql", "select target, status from sys_invocation where target_service_name = 'Counter'"])?;
    ensure!(sql.matches("Counter/a/add").count() == 3 && sql.contains("3 rows"), "{sql}");

    // Restarted as new: the first add runs again with its input.
    let first =
        query_json(&node, "SELECT id FROM sys_invocation WHERE target = 'Counter/a/add' ORDER BY created_at").await?;
    let first = first.first().and_then(|row| row["id"].as_str()).unwrap_or_default().to_owned();
    let restarted = cli(&["invocations", "restart-as-new", &first])?;
    ensure!(restarted.contains("Restarted 1"), "{restarted}");
    wait_for(&node, "SELECT id FROM sys_invocation WHERE target = 'Counter/a/add' AND status = 'completed' OFFSET 3")
        .await?;
    let (status, count) = node.ingress("/Counter/a/add", Some("1"), &json).await?;
    ensure!(status == 200 && count == 45, "four adds after the edit: {status} {count}");

    // Paused while it waits, then resumed.
    let paused = cli(&["invocations", "pause", &waiting])?;
    ensure!(paused.contains("Paused 1"), "{paused}");
    wait_for(&node, &format!("SELECT id FROM sys_invocation WHERE id = '{waiting}' AND status = 'paused'")).await?;
    let (again, refused) = restate(&node, &home, &editor, &["invocations", "pause", &waiting])?;
    ensure!(!again && refused.contains("No invocations found"), "paused already: {refused}");
    let resumed = cli(&["invocations", "resume", &waiting])?;
    ensure!(resumed.contains("Resumed 1"), "{resumed}");
    wait_for(&node, &format!("SELECT id FROM sys_invocation WHERE id = '{waiting}' AND status <> 'paused'")).await?;

    let cancelled = cli(&["invocations", "cancel", &waiting])?;
    ensure!(cancelled.contains("Cancelled 1"), "{cancelled}");
    let kill = cli(&["invocations", "kill", &killed])?;
    ensure!(kill.contains("Killed 1"), "{kill}");
    wait_for(&node, &format!("select id from sys_invocation where id = '{killed}' and status = 'completed'")).await?;
    let purged = cli(&["invocations", "purge", &killed])?;
    ensure!(purged.contains("Purged 1"), "{purged}");
    wait_for(&node, &format!("select id from sys_invocation where id = '{waiting}' and status = 'completed'")).await?;
    let after = cli(&["invocations", "list", "--all"])?;
    ensure!(!after.contains(&killed), "purged: {after}");
    ensure!(after.contains(&waiting), "cancelled and kept: {after}");

    cli(&["state", "clear", "Counter/a"])?;
    let cleared =
        query_json(&node, "SELECT key FROM state WHERE service_name = 'Counter' AND service_key = 'a'").await?;
    ensure!(cleared.is_empty(), "cleared: {cleared:?}");

    let clusters = cli(&["kafka-clusters", "list"])?;
    ensure!(clusters.contains("my-cluster") && clusters.contains("PLAINTEXT://127.0.0.1:"), "{clusters}");
    let created = cli(&[
        "subscriptions",
        "create",
        "kafka://my-cluster/orders",
        "service://Counter/add",
        "auto.offset.reset=earliest",
    ])?;
    let subscription =
        node.get("/subscriptions").await?["subscriptions"][0]["id"].as_str().unwrap_or_default().to_owned();
    ensure!(subscription.starts_with("sub_1") && created.contains(&subscription), "{created}");
    let listed = cli(&["subscriptions", "list"])?;
    ensure!(listed.contains(&subscription) && listed.contains("service://Counter/add"), "{listed}");
    let described = cli(&["subscriptions", "describe", &subscription])?;
    ensure!(described.contains("kafka://my-cluster/orders") && described.contains("earliest"), "{described}");
    let cluster = cli(&["kafka-clusters", "describe", "my-cluster"])?;
    ensure!(cluster.contains(&subscription), "the cluster's subscriptions: {cluster}");
    cli(&["subscriptions", "delete", &subscription])?;
    eventually(Duration::from_secs(30), "the deleted subscription gone", || async {
        Ok((node.get("/subscriptions").await?["subscriptions"] == serde_json::json!([])).then_some(()))
    })
    .await?;

    // A cluster registered at runtime, beside the config file's.
    let created = cli(&["kafka-clusters", "create", "rt", "bootstrap.servers=127.0.0.1:9", "sasl.password=hunter2"])?;
    ensure!(created.contains("Kafka cluster rt created"), "{created}");
    let clusters = cli(&["kafka-clusters", "list"])?;
    ensure!(clusters.contains("my-cluster") && clusters.contains("rt "), "{clusters}");
    let described = cli(&["kafka-clusters", "describe", "rt"])?;
    ensure!(described.contains("***") && !described.contains("hunter2"), "secrets redacted: {described}");
    let patched =
        cli(&["kafka-clusters", "patch", "rt", "--set", "client.id=ferry-test", "--set", "sasl.password=hunter3"])?;
    ensure!(patched.contains("Kafka cluster rt updated"), "{patched}");
    let rt = node.get("/kafka-clusters/rt").await?;
    ensure!(rt["properties"]["client.id"] == "ferry-test" && rt["properties"]["sasl.password"] == "***", "{rt}");
    let cluster_editor = home.join("cluster-editor.sh");
    std::fs::write(&cluster_editor, "#!/bin/sh\necho 'client.rack=r2' >> \"$1\"\n")?;
    std::fs::set_permissions(&cluster_editor, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let (edited, text) = restate(&node, &home, &cluster_editor, &["kafka-clusters", "edit", "rt"])?;
    ensure!(edited && text.contains("Kafka cluster rt updated"), "{text}");
    let rt = node.get("/kafka-clusters/rt").await?;
    ensure!(rt["properties"]["client.rack"] == "r2" && rt["properties"]["client.id"] == "ferry-test", "{rt}");
    cli(&["subscriptions", "create", "kafka://rt/orders", "service://Counter/add"])?;
    let (deleted, refused) = restate(&node, &home, &editor, &["kafka-clusters", "delete", "rt"])?;
    ensure!(!deleted && refused.contains("--force"), "in use: {refused}");
    // It warns that the subscription is orphaned.
    let (deleted, text) = restate(&node, &home, &editor, &["kafka-clusters", "delete", "--force", "rt"])?;
    ensure!(deleted && text.contains("Kafka cluster rt deleted") && text.contains("orphaned"), "{text}");
    ensure!(node.admin(reqwest::Method::GET, "/kafka-clusters/rt", None).await?.0 == 404);

    // A service's settings, changed until a deployment registers it again.
    let patched =
        cli(&["services", "config", "patch", "Counter", "--journal-retention", "2d", "--abort-timeout", "15m"])?;
    ensure!(patched.contains("Journal retention") && patched.contains("2d"), "{patched}");
    let config = cli(&["services", "config", "view", "Counter"])?;
    ensure!(config.contains("Journal retention:  2d") && config.contains("15m"), "{config}");
    // `services config edit` and `kafka-clusters edit` open a file in $EDITOR.
    let service_editor = home.join("service-editor.sh");
    std::fs::write(&service_editor, "#!/bin/sh\necho 'idempotency_retention = \"3d\"' >> \"$1\"\n")?;
    std::fs::set_permissions(&service_editor, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let (edited, text) = restate(&node, &home, &service_editor, &["services", "config", "edit", "Counter"])?;
    ensure!(edited, "{text}");
    let counter = node.get("/services/Counter").await?;
    ensure!(counter["idempotency_retention"] == "3days" && counter["journal_retention"] == "2days", "{counter}");
    cli(&["services", "config", "patch", "Counter", "--public", "false"])?;
    let (status, body) = node.ingress("/Counter/a/add", Some("1"), &json).await?;
    ensure!(status == 400 && body.to_string().contains("private"), "a private service: {status} {body}");
    let (wrong, refused) = restate(
        &node,
        &home,
        &editor,
        &["services", "config", "patch", "Counter", "--workflow-completion-retention", "1h"],
    )?;
    ensure!(!wrong && refused.contains("400"), "only workflows: {refused}");

    let removed = cli(&["deployments", "remove", &deployment, "--force"])?;
    ensure!(!node.get("/deployments").await?.to_string().contains(&deployment), "{removed}");
    Ok(())
}

/// Waits until `sql` answers a row.
async fn wait_for(node: &Node, sql: &str) -> Result<()> {
    for _ in 0..100 {
        if !query_json(node, sql).await?.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("no row for {sql}")
}

/// `POST /query` in JSON: the rows.
async fn query_json(node: &Node, sql: &str) -> Result<Vec<Value>> {
    let response = node
        .http
        .post(node.url("/query"))
        .header("accept", "application/json")
        .json(&serde_json::json!({ "query": sql }))
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await?;
    ensure!(status == 200, "{sql}: {status} {body}");
    Ok(body["rows"].as_array().cloned().unwrap_or_default())
}
