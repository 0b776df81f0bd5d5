//! Kafka -> durable invocations on one node.
//!
//! Phase 1 (throughput): pre-produces a backlog of records to a topic, then
//! subscribes and measures how fast the node turns the backlog into committed
//! invocations (fsync on). Phase 2 (latency): produces at a fixed rate to a
//! second topic and reads the node's record-timestamp-to-commit latency.
//! Prints a Markdown table, including the node's peak RSS.
//!
//! Build everything in release first: `cargo build --release --workspace --bins`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use ferry_chaos_tests::{eventually, node_with_handlers, peak_rss_kib, produce, Node, Record};

#[derive(Parser)]
#[command(about = "Measures Kafka -> durable invocation throughput and latency on one Ferry node")]
struct Args {
    /// Records in the throughput backlog.
    #[arg(long, default_value_t = 200_000)]
    records: usize,
    /// Partitions of each topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Sink of the subscriptions: a Service handler, or Counter/add for a Virtual Object.
    #[arg(long, default_value = "service://Sink/handle")]
    sink: String,
    /// Records per second in the latency phase.
    #[arg(long, default_value_t = 5_000)]
    rate: usize,
    /// Seconds of the latency phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

/// A quantile of a subscription's record-to-commit latency, interpolated
/// within the Prometheus histogram bucket it falls in.
async fn quantile(node: &Node, subscription: &str, q: f64) -> Result<f64> {
    let text = node.http.get(format!("http://127.0.0.1:{}/metrics", node.node_port)).send().await?.text().await?;
    let wanted = format!("subscription=\"{subscription}\"");
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with("ferry_ingress_record_commit_latency_seconds_bucket{") && l.contains(&wanted))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().context("latency histogram not in /metrics")?.1;
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Ok(lower);
            }
            let inside = count - below;
            return Ok(if inside == 0.0 { le } else { lower + (le - lower) * (rank - below) / inside });
        }
        (lower, below) = (le, count);
    }
    bail!("no bucket holds quantile {q}")
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let (broker, _handlers, _dir, node) = node_with_handlers(&[]).await?;

    // Phase 1: a backlog, consumed as fast as the node can.
    broker.create_topic("backlog", args.partitions).await?;
    let producer = broker.batching_producer(20)?;
    let started = Instant::now();
    let records: Vec<Record> = (0..args.records)
        .map(|i| Record {
            key: Some(format!("key-{}", i % 1000).into_bytes()),
            payload: format!("{{\"seq\":{i}}}").into_bytes(),
            headers: vec![],
        })
        .collect();
    for chunk in records.chunks(50_000) {
        produce(&producer, "backlog", chunk).await?;
    }
    eprintln!("produced {} records in {:.1?}", args.records, started.elapsed());

    let started = Instant::now();
    let sub = node.subscribe_from_start("backlog", &args.sink).await?;
    let total = args.records as f64;
    node.wait_for_metric("ferry_ingress_records_appended_total", total).await?;
    let elapsed = started.elapsed();
    let throughput = total / elapsed.as_secs_f64();
    let first = node.get(&format!("/invocations?subscription={sub}&limit=1")).await?;
    if first["invocations"].as_array().is_none_or(|a| a.is_empty()) {
        bail!("no invocation of {sub} is visible");
    }

    // Phase 2: a steady rate; latency from record timestamp to Raft commit.
    broker.create_topic("steady", args.partitions).await?;
    let steady = node.subscribe_from_start("steady", &args.sink).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sent = broker.produce_at_rate("steady", args.rate, args.seconds, |_| "{}".to_owned()).await?;
    eventually(Duration::from_secs(120), "the steady records to be appended", || async {
        Ok((node.metric("ferry_ingress_records_appended_total").await? >= total + sent as f64).then_some(()))
    })
    .await?;
    let p50 = quantile(&node, &steady, 0.5).await?;
    let p99 = quantile(&node, &steady, 0.99).await?;
    let rss = node.pid().and_then(peak_rss_kib).unwrap_or(0);

    println!("| workload | records | partitions | result |");
    println!("|---|---|---|---|");
    println!(
        "| backlog -> `{}` | {} | {} | **{:.0} records/s** ({:.1?}) |",
        args.sink, args.records, args.partitions, throughput, elapsed
    );
    println!(
        "| {} records/s for {} s -> `{}` | {} | {} | record -> commit p50 **{:.1} ms**, p99 **{:.1} ms** |",
        args.rate,
        args.seconds,
        args.sink,
        sent,
        args.partitions,
        p50 * 1000.0,
        p99 * 1000.0
    );
    println!("| node peak RSS | | | {:.0} MiB |", rss as f64 / 1024.0);
    Ok(())
}
