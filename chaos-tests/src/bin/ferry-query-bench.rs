//! Query benchmark: one node keeping `--records` completed invocations
//! (Kafka -> `Counter/add` over `--keys` keys; the default retention of a
//! day keeps every one), then what a Restate user runs over them: `restate
//! invocations list`, `restate sql` with a count over `sys_invocation`, and
//! the same count over `POST /query`. For each, `--runs` times: the wall
//! time, and the node's resident memory before it and at its peak while it
//! ran (sampled every 10 ms). Prints a Markdown table. Needs
//! `scripts/broker.sh install`, `scripts/restate.sh install cli` and
//! `cargo build --release --workspace --bins`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use ferry_chaos_tests::restate::installed;
use ferry_chaos_tests::{node_with_handlers, rss_kib, Node};
use serde_json::json;

#[derive(Parser)]
#[command(about = "Times Restate's CLI and SQL over a node keeping many invocations")]
struct Args {
    /// Completed invocations the node keeps.
    #[arg(long, default_value_t = 1_000_000)]
    records: usize,
    /// Distinct record keys (Counter objects).
    #[arg(long, default_value_t = 10_000)]
    keys: usize,
    /// Times each query runs.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// Runs `work` while sampling `pid`'s resident memory: (seconds, KiB before, peak KiB).
async fn measure<F: std::future::Future<Output = Result<()>>>(pid: u32, work: F) -> Result<(f64, u64, u64)> {
    let before = rss_kib(pid);
    let peak = Arc::new(AtomicU64::new(before));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let started = Instant::now();
    let result = work.await;
    let seconds = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    sampler.await?;
    result?;
    Ok((seconds, before, peak.load(Ordering::Relaxed).max(rss_kib(pid))))
}

fn restate(node: &Node, home: &std::path::Path, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(installed("cli")?)
        .env("RESTATE_ADMIN_URL", node.url("/"))
        .env("HOME", home)
        .env("NO_COLOR", "1")
        .args(["--request-timeout", "120000"])
        .args(args)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.success(), "restate {args:?}: {text}{}", String::from_utf8_lossy(&out.stderr));
    Ok(text)
}

const COUNT: &str = "SELECT COUNT(*) AS n FROM sys_invocation";

#[derive(Debug, Clone, Copy)]
enum Query {
    List,
    SqlCount,
    HttpCount,
}

impl Query {
    fn name(self) -> &'static str {
        match self {
            Query::List => "`restate invocations list`",
            Query::SqlCount => "`restate sql \"SELECT COUNT(*) FROM sys_invocation\"`",
            Query::HttpCount => "the same count over `POST /query` (JSON)",
        }
    }

    async fn run(self, node: &Node, home: &std::path::Path, records: usize) -> Result<()> {
        match self {
            Query::List => restate(node, home, &["invocations", "list"]).map(drop),
            Query::SqlCount => {
                let out = restate(node, home, &["sql", COUNT])?;
                ensure!(out.contains(&records.to_string()), "{out}");
                Ok(())
            }
            Query::HttpCount => {
                let response = node
                    .http
                    .post(node.url("/query"))
                    .header("accept", "application/json")
                    .json(&json!({ "query": COUNT }))
                    .send()
                    .await?;
                let body: serde_json::Value = response.json().await?;
                ensure!(body["rows"][0]["n"] == records, "{body}");
                Ok(())
            }
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let config = [("FERRY_LOG__FILTER", "warn"), ("FERRY_ADMIN__QUERY__TIMEOUT", "300s")];
    let (broker, _handlers, dir, node) = node_with_handlers(&config).await?;
    let topic = "query-bench";
    broker.create_topic(topic, 4).await?;
    node.subscribe_from_start(topic, "service://Counter/add").await?;
    let started = Instant::now();
    broker.produce_backlog(topic, args.records, args.keys).await?;
    loop {
        let completed = node.metric("ferry_invoker_invocations_completed_total").await? as usize;
        eprintln!("{completed} of {} invocations completed after {:.0?}", args.records, started.elapsed());
        if completed >= args.records {
            break;
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    let pid = node.pid().context("node pid")?;
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home)?;

    println!("| query, over {} retained invocations | wall time, each run | node RSS before -> peak |", args.records);
    println!("|---|---|---|");
    for query in [Query::List, Query::SqlCount, Query::HttpCount] {
        let mut times = Vec::new();
        let mut memory = Vec::new();
        for _ in 0..args.runs {
            let (seconds, before, peak) = measure(pid, query.run(&node, &home, args.records)).await?;
            times.push(format!("{seconds:.2} s"));
            memory.push(format!("{} -> {} MiB", before / 1024, peak / 1024));
        }
        println!("| {} | {} | {} |", query.name(), times.join(", "), memory.join(", "));
    }
    Ok(())
}
