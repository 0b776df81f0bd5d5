//! The `ferry` CLI against a real node: every command, in tables and JSON,
//! and its errors.

use std::process::Output;

use anyhow::Result;
use ferry_chaos_tests::{bin_dir, free_port, Handlers, Node};
use serde_json::Value;

fn ferry(node_admin_port: u16, args: &[&str]) -> Result<Output> {
    Ok(std::process::Command::new(bin_dir().join("ferry"))
        .env_remove("FERRY_ADMIN_ADDRESS")
        .args(["--address", &format!("http://127.0.0.1:{node_admin_port}")])
        .args(args)
        .output()?)
}

/// Runs a command that must succeed and returns its standard output.
fn ok(port: u16, args: &[&str]) -> Result<String> {
    let out = ferry(port, args)?;
    assert!(out.status.success(), "ferry {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?)
}

fn json(port: u16, args: &[&str]) -> Result<Value> {
    let mut with_json = vec!["--json"];
    with_json.extend_from_slice(args);
    Ok(serde_json::from_str(&ok(port, &with_json)?)?)
}

/// Runs a command that must fail and returns its standard error.
fn fails(port: u16, args: &[&str]) -> Result<String> {
    let out = ferry(port, args)?;
    assert!(!out.status.success(), "ferry {args:?} succeeded: {}", String::from_utf8_lossy(&out.stdout));
    Ok(String::from_utf8(out.stderr)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_against_a_node() -> Result<()> {
    let handlers = Handlers::start().await?;
    let dir = tempfile::tempdir()?;
    let node = Node::start_for_broker(&dir.path().join("node"), &format!("127.0.0.1:{}", free_port())).await?;
    let port = node.admin_port;

    let table = ok(port, &["deployments", "register", &handlers.uri])?;
    assert!(table.starts_with("DEPLOYMENT") && table.contains("Counter"), "{table}");
    let deployments = json(port, &["deployments", "list"])?;
    let id = deployments["deployments"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(deployments, node.get("/deployments").await?, "gRPC and REST show the same");
    assert_eq!(json(port, &["deployments", "describe", &id])?["uri"], handlers.uri.as_str());
    assert!(ok(port, &["deployments", "list"])?.contains(&id));

    assert!(ok(port, &["services", "list"])?.contains("VirtualObject"));
    assert_eq!(json(port, &["services", "describe", "Counter"])?["ty"], "VirtualObject");

    let args = ["subscriptions", "create", "kafka://my-cluster/t", "service://Counter/add", "--option"];
    let created = json(port, &[&args[..], &["auto.offset.reset=earliest"]].concat())?;
    let sub = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["options"]["auto.offset.reset"], "earliest");
    assert!(ok(port, &["subscriptions", "list"])?.contains(&sub));
    assert_eq!(json(port, &["subscriptions", "describe", &sub])?["sink"], "service://Counter/add");
    ok(port, &["subscriptions", "delete", &sub])?;

    // An invocation to act on: one that keeps failing holds its key.
    let (status, sent) = node.ingress("/Counter/k/add/send", Some(r#"{"poison": true}"#), &[]).await?;
    assert_eq!(status, 202, "{sent}");
    let inv = sent["invocationId"].as_str().unwrap().to_owned();
    let listed = json(port, &["invocations", "list", "--target", "Counter"])?;
    assert_eq!(listed["invocations"][0]["id"], inv.as_str());
    assert!(ok(port, &["invocations", "list"])?.contains(&inv));
    assert_eq!(json(port, &["invocations", "describe", &inv])?["target"], "Counter/k/add");
    assert!(ok(port, &["invocations", "cancel", &inv])?.contains("cancellation sent"));
    assert!(fails(port, &["invocations", "resume", &inv])?.contains("AlreadyExists"), "only paused ones resume");
    assert!(ok(port, &["invocations", "kill", &inv])?.contains("killed"));
    assert!(ok(port, &["invocations", "purge", &inv])?.contains("purged"));
    ok(port, &["deployments", "remove", &id])?;

    // Errors name what went wrong.
    assert!(fails(port, &["invocations", "describe", &inv])?.contains("NotFound"));
    assert!(fails(port, &["invocations", "kill", "inv_nope"])?.contains("NotFound"));
    assert!(fails(port, &["subscriptions", "create", "kafka://nope/t", "service://Counter/add"])?
        .contains("InvalidArgument"));
    assert!(fails(port, &["deployments", "register", "http://127.0.0.1:1"])?.contains("cannot reach"));
    assert!(fails(free_port(), &["services", "list"])?.contains("cannot reach a Ferry node"));
    Ok(())
}
