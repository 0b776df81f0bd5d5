//! What exporting traces costs: Kafka -> Service throughput on one node with
//! trace export off, at 1% sampling and at 100% sampling.
//!
//! For each setting a fresh node (and its own OTLP receiver on loopback, in
//! this process) consumes a pre-produced backlog of `--records` records into
//! `Sink/handle`; the figure is completed invocations per second from the
//! subscription's creation to the last completion. Settings take turns for
//! `--rounds` rounds and the best round of each is reported, so that a slow
//! moment of the machine does not count against one setting. Prints a
//! Markdown table. Build first: `cargo build --release --workspace --bins`.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use ferry_chaos_tests::otlp::Receiver;
use ferry_chaos_tests::{Broker, Handlers, Node};
use serde_json::json;

#[derive(Parser)]
#[command(about = "Measures Kafka -> Service throughput with trace export off, at 1% and at 100%")]
struct Args {
    /// Records in each backlog.
    #[arg(long, default_value_t = 50_000)]
    records: usize,
    /// Partitions of each topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Rounds over the three settings.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Give up on a backlog after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

/// One measured backlog: records/s and the spans the receiver got.
struct Run {
    throughput: f64,
    spans: usize,
}

async fn run(args: &Args, broker: &Broker, handlers: &Handlers, sampling: Option<f64>, topic: &str) -> Result<Run> {
    let receiver = Receiver::start().await?;
    let dir = tempfile::tempdir()?;
    let endpoint = receiver.endpoint();
    let ratio = sampling.map(|s| s.to_string()).unwrap_or_default();
    let mut config: Vec<(&str, &str)> = Vec::new();
    if sampling.is_some() {
        config.push(("FERRY_TRACING__ENDPOINT", &endpoint));
        config.push(("FERRY_TRACING__SAMPLING_RATIO", &ratio));
    }
    let node = Node::start_configured(&dir.path().join("node"), &broker.bootstrap(), &config).await?;
    let (status, body) = node.post("/deployments", json!({ "uri": handlers.uri })).await?;
    if status != 201 {
        bail!("register deployment: {status} {body}");
    }
    broker.create_topic(topic, args.partitions).await?;
    broker.produce_backlog(topic, args.records, args.records).await?;

    let started = Instant::now();
    node.subscribe_from_start(topic, "service://Sink/handle").await?;
    let total = args.records as f64;
    loop {
        let completed = node.metric("ferry_invoker_invocations_completed_total").await?;
        if completed >= total {
            break;
        }
        if started.elapsed() > Duration::from_secs(args.timeout) {
            bail!("only {completed} of {total} invocations completed after {} s", args.timeout);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let throughput = total / started.elapsed().as_secs_f64();
    // Let the last batches of spans arrive before counting them.
    if sampling.is_some() {
        tokio::time::sleep(Duration::from_secs(6)).await;
    }
    Ok(Run { throughput, spans: receiver.count() })
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let broker = Broker::start().await?;
    let handlers = Handlers::start().await?;
    let settings: [(&str, Option<f64>); 3] = [("off", None), ("1%", Some(0.01)), ("100%", Some(1.0))];
    let mut best: Vec<Option<Run>> = settings.iter().map(|_| None).collect();
    for round in 0..args.rounds {
        for (i, (name, sampling)) in settings.iter().enumerate() {
            let measured = run(&args, &broker, &handlers, *sampling, &format!("backlog-{round}-{i}")).await?;
            eprintln!(
                "round {round}, export {name}: {:.0} records/s, {} spans exported",
                measured.throughput, measured.spans
            );
            if best[i].as_ref().is_none_or(|b| measured.throughput > b.throughput) {
                best[i] = Some(measured);
            }
        }
    }
    let baseline = best[0].as_ref().map_or(1.0, |b| b.throughput);
    println!("| trace export | Kafka -> `Sink/handle` | vs off | spans exported |");
    println!("|---|---|---|---|");
    for ((name, _), run) in settings.iter().zip(&best) {
        let run = run.as_ref().expect("every setting ran");
        println!(
            "| {name} | **{:.0} records/s** | {:+.1}% | {} |",
            run.throughput,
            (run.throughput / baseline - 1.0) * 100.0,
            run.spans
        );
    }
    Ok(())
}
