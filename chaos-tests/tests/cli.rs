//! The `ferry` CLI against a real node: every command, in tables and JSON,
//! and its errors.

use std::process::Output;

use anyhow::Result;
use ferry_chaos_tests::{bin_dir, free_port, Handlers, Node};
use serde_json::{json, Value};

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

    cluster_status(&node).await?;

    assert!(ok(port, &["services", "list"])?.contains("VirtualObject"));
    assert_eq!(json(port, &["services", "describe", "Counter"])?["ty"], "VirtualObject");
    let configured = json(port, &["services", "configure", "Counter", "--journal-retention", "2h"])?;
    assert_eq!(configured["journal_retention"], "2h");
    assert_eq!(node.get("/services/Counter").await?["journal_retention"], "2h");
    let bad = fails(port, &["services", "configure", "Counter", "--journal-retention", "soon"])?;
    assert!(bad.contains("InvalidArgument") && bad.contains("journal_retention"), "{bad}");

    let args = ["kafka-clusters", "create", "rt", "--property", "bootstrap.servers=127.0.0.1:9", "--property"];
    let created = json(port, &[&args[..], &["sasl.password=hunter2"]].concat())?;
    assert_eq!((&created["properties"]["sasl.password"], &created["configured"]), (&json!("***"), &json!(false)));
    let clusters = ok(port, &["kafka-clusters", "list"])?;
    assert!(clusters.contains("config file") && clusters.contains("admin API"), "{clusters}");
    let args = ["kafka-clusters", "update", "rt", "--property", "bootstrap.servers=127.0.0.1:10"];
    assert_eq!(json(port, &args)?["brokers"], json!(["127.0.0.1:10"]));
    assert!(fails(port, &["kafka-clusters", "delete", "my-cluster"])?.contains("config file"));
    ok(port, &["kafka-clusters", "delete", "rt"])?;
    assert!(fails(port, &["kafka-clusters", "describe", "rt"])?.contains("NotFound"));

    let args = ["subscriptions", "create", "kafka://my-cluster/t", "service://Counter/add", "--option"];
    let bad = fails(port, &[&args[..], &["auto.offset.reset=earliest", "--start", "newest"]].concat())?;
    assert!(bad.contains("InvalidArgument") && bad.contains("unknown ferry.start.position"), "{bad}");
    let elsewhere = ["--dead-letter-topic", "dead", "--dead-letter-cluster", "other"];
    let bad = fails(port, &[&args[..], &["auto.offset.reset=earliest"], &elsewhere[..]].concat())?;
    assert!(bad.contains("InvalidArgument") && bad.contains("ferry.dead-letter.cluster"), "{bad}");
    let starts = ["--start", "specific-offsets", "--start-offsets", "0:5", "--dead-letter-topic", "t"];
    let created = json(port, &[&args[..], &["auto.offset.reset=earliest"], &starts[..]].concat())?;
    let sub = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["options"]["auto.offset.reset"], "earliest");
    assert_eq!(created["options"]["ferry.start.offsets"], "0:5");
    assert_eq!(created["options"]["ferry.dead-letter.topic"], "t");
    assert!(ok(port, &["subscriptions", "list"])?.contains(&sub));
    assert_eq!(json(port, &["subscriptions", "describe", &sub])?["sink"], "service://Counter/add");
    assert_eq!(json(port, &["subscriptions", "pause", &sub])?["paused"], true);
    assert!(ok(port, &["subscriptions", "list"])?.contains("paused"));
    assert!(json(port, &["subscriptions", "resume", &sub])?.get("paused").is_none_or(|p| p == false));
    assert!(fails(port, &["subscriptions", "pause", "sub_nope"])?.contains("NotFound"));
    assert!(ok(port, &["subscriptions", "delete", &sub])?.contains("goes once its invocations have completed"));
    assert!(fails(port, &["subscriptions", "delete", "sub_nope", "--no-drain"])?.contains("NotFound"));

    // An invocation to act on: one that keeps failing holds its key.
    let (status, sent) = node.ingress("/Counter/k/add/send", Some(r#"{"poison": true}"#), &[]).await?;
    assert_eq!(status, 202, "{sent}");
    let inv = sent["invocationId"].as_str().unwrap().to_owned();
    let listed = json(port, &["invocations", "list", "--target", "Counter"])?;
    assert_eq!(listed["invocations"][0]["id"], inv.as_str());
    assert!(ok(port, &["invocations", "list"])?.contains(&inv));
    assert_eq!(json(port, &["invocations", "describe", &inv])?["target"], "Counter/k/add");
    assert!(ok(port, &["invocations", "pause", &inv])?.contains("paused invocation"));
    assert!(ok(port, &["invocations", "pause", &inv])?.contains("already paused"));
    assert_eq!(json(port, &["invocations", "describe", &inv])?["status"], "paused");
    assert!(ok(port, &["invocations", "resume", &inv])?.contains("resumed"));
    assert!(ok(port, &["invocations", "cancel", &inv])?.contains("cancellation sent"));
    assert!(fails(port, &["invocations", "restart-as-new", &inv])?.contains("only a completed invocation"));
    assert!(ok(port, &["invocations", "kill", &inv])?.contains("killed"));
    assert!(fails(port, &["invocations", "resume", &inv])?.contains("AlreadyExists"), "completed ones stay so");
    let restarted = json(port, &["invocations", "restart-as-new", &inv])?;
    let new_id = restarted["new_invocation_id"].as_str().unwrap().to_owned();
    assert!(new_id.starts_with("inv_1") && new_id != inv, "{restarted}");
    let new = json(port, &["invocations", "describe", &new_id])?;
    assert_eq!((&new["target"], &new["payload_size"]), (&json!("Counter/k/add"), &json!(r#"{"poison": true}"#.len())));
    assert!(ok(port, &["invocations", "kill", &new_id])?.contains("killed"));
    assert!(ok(port, &["invocations", "purge", &inv])?.contains("purged"));
    ok(port, &["deployments", "remove", &id])?;

    // Errors name what went wrong.
    assert!(fails(port, &["invocations", "describe", &inv])?.contains("NotFound"));
    assert!(fails(port, &["invocations", "kill", "inv_nope"])?.contains("NotFound"));
    assert!(fails(port, &["subscriptions", "create", "kafka://nope/t", "service://Counter/add"])?
        .contains("InvalidArgument"));
    assert!(fails(port, &["deployments", "register", "http://127.0.0.1:1"])?.contains("cannot reach"));
    assert!(fails(free_port(), &["services", "list"])?.contains("cannot reach a Ferry node"));
    assert!(fails(free_port(), &["cluster", "status"])?.contains("cannot reach a Ferry node"));
    Ok(())
}

/// The fields of a cluster status that stay put while the node is idle.
fn stable(status: &Value) -> Value {
    let groups: Vec<Value> = status["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| json!([g["group"], g["partition"], g["leader"], g["role"], g["term"], g["voters"], g["learners"]]))
        .collect();
    json!({ "node_id": status["node_id"], "nodes": status["nodes"], "groups": groups, "lag": status["consumer_lag"] })
}

/// `ferry cluster status` of a single node: it leads every group.
async fn cluster_status(node: &Node) -> Result<()> {
    let port = node.admin_port;
    let status = json(port, &["cluster", "status"])?;
    assert_eq!(status["node_id"], 1);
    let nodes = status["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{status}");
    assert_eq!((&nodes[0]["id"], &nodes[0]["name"]), (&json!(1), &json!("node-1")), "{status}");
    assert!(nodes[0]["address"].as_str().unwrap().ends_with(&format!(":{}", node.node_port)), "{status}");
    let groups = status["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 9, "the metadata group and 8 partitions: {status}");
    assert_eq!(groups[0]["partition"], Value::Null);
    for (i, group) in groups.iter().enumerate() {
        assert_eq!(group["group"], i);
        if i > 0 {
            assert_eq!(group["partition"], i - 1);
        }
        assert_eq!((&group["leader"], &group["role"], &group["voters"]), (&json!(1), &json!("leader"), &json!([1])));
        assert!(group["term"].as_u64().unwrap() >= 1, "{group}");
        let applied = group["last_applied_index"].as_u64().unwrap();
        assert!(group["committed_index"].as_u64().unwrap() >= applied, "{group}");
        assert!(group["last_log_index"].as_u64().unwrap() >= applied, "{group}");
    }
    assert_eq!(status["consumer_lag"], json!([]), "no subscriptions yet");
    assert_eq!(status["consumers"], json!([]), "no subscriptions yet");
    assert_eq!(stable(&status), stable(&node.get("/cluster").await?), "gRPC and REST show the same");

    let table = ok(port, &["cluster", "status"])?;
    let sections: Vec<&str> = table.split("\n\n").collect();
    assert_eq!(sections.len(), 4, "nodes, groups, lag, consumers: {table}");
    assert!(sections[0].starts_with("NODE") && sections[0].contains("yes"), "{table}");
    assert!(sections[1].starts_with("GROUP") && sections[1].contains("metadata"), "{table}");
    assert_eq!(sections[1].lines().filter(|l| l.contains("leader")).count(), 9, "{table}");
    assert!(sections[2].starts_with("SUBSCRIPTION") && sections[2].contains("LAG"), "{table}");
    assert!(sections[3].starts_with("SUBSCRIPTION") && sections[3].contains("CONSUMER"), "{table}");
    assert!(groups.iter().all(|g| g["state"].is_null()), "digests only when asked: {status}");

    // Digests of the applied state: the metadata group holds the deployment,
    // so its digest differs from an empty partition's; REST shows the same.
    let status = json(port, &["cluster", "status", "--digests"])?;
    let digests: Vec<&Value> = status["groups"].as_array().unwrap().iter().map(|g| &g["state"]).collect();
    assert_eq!(digests.len(), 9);
    for state in &digests {
        assert_eq!(state["digest"].as_str().unwrap().len(), 32, "{state}");
        assert!(state["applied_index"].is_u64(), "{state}");
    }
    assert_ne!(digests[0]["digest"], digests[1]["digest"], "{status}");
    let rest = node.get("/cluster?state_digests=true").await?;
    let rest: Vec<&Value> = rest["groups"].as_array().unwrap().iter().map(|g| &g["state"]).collect();
    assert_eq!(digests, rest, "gRPC and REST show the same digests");
    let table = ok(port, &["cluster", "status", "--digests"])?;
    let sections: Vec<&str> = table.split("\n\n").collect();
    assert_eq!(sections.len(), 5, "nodes, groups, lag, consumers, digests: {table}");
    assert!(
        sections[4].starts_with("GROUP") && sections[4].contains(digests[0]["digest"].as_str().unwrap()),
        "{table}"
    );
    Ok(())
}
