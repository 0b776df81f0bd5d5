//! Kafka -> handler -> Kafka through the egress, on one node: every record's
//! invocation fails and its record goes to the subscription's dead-letter
//! topic.
//!
//! Phase 1 (throughput): pre-produces a backlog of failing records, then
//! subscribes and measures how fast their dead letters reach Kafka (fsync on).
//! Phase 2 (latency): produces failing records at a fixed rate, each with the
//! time it was sent, and reads the dead-letter topic: latency is a dead
//! letter's timestamp (set when the egress produced it) less its record's
//! send time. Prints a Markdown table.
//!
//! Build everything in release first: `cargo build --release --workspace --bins`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Parser;
use ferry_chaos_tests::{eventually, node_with_handlers, produce, Node, Record};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(about = "Measures Kafka -> handler -> Kafka (dead letters) throughput and latency on one Ferry node")]
struct Args {
    /// Records in the throughput backlog.
    #[arg(long, default_value_t = 50_000)]
    records: usize,
    /// Partitions of each topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Records per second in the latency phase.
    #[arg(long, default_value_t = 1_000)]
    rate: usize,
    /// Seconds of the latency phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Subscribes `Sink/handle` to `topic` with dead letters to `dead`.
async fn subscribe(node: &Node, topic: &str, dead: &str) -> Result<String> {
    let options = json!({"auto.offset.reset": "earliest", "fetch.wait.max.ms": "10", "ferry.dead-letter.topic": dead});
    node.subscribe(topic, "service://Sink/handle", options).await
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let (broker, _handlers, _dir, node) = node_with_handlers(&[]).await?;
    for topic in ["backlog", "backlog-dead", "steady", "steady-dead"] {
        broker.create_topic(topic, args.partitions).await?;
    }

    // Phase 1: a backlog of failing records, their dead letters produced as fast as the node can.
    let producer = broker.batching_producer(20)?;
    let records: Vec<Record> = (0..args.records)
        .map(|i| Record {
            key: Some(format!("key-{}", i % 1000).into_bytes()),
            payload: json!({"seq": i, "fail": "refused"}).to_string().into_bytes(),
            headers: vec![],
        })
        .collect();
    for chunk in records.chunks(50_000) {
        produce(&producer, "backlog", chunk).await?;
    }
    // The egress of a partition that has just got its leader waits out its
    // fence (7 s) before its first batch: a first dead letter goes before the clock starts.
    subscribe(&node, "steady", "steady-dead").await?;
    produce(&producer, "steady", &[Record { key: None, payload: br#"{"fail": "warm"}"#.to_vec(), headers: vec![] }])
        .await?;
    eventually(Duration::from_secs(60), "the first dead letter", || async {
        Ok((node.metric("ferry_egress_records_total").await? >= 1.0).then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let before = node.metric("ferry_egress_records_total").await?;
    let started = Instant::now();
    subscribe(&node, "backlog", "backlog-dead").await?;
    node.wait_for_metric("ferry_egress_records_total", before + args.records as f64).await?;
    let elapsed = started.elapsed();
    let throughput = args.records as f64 / elapsed.as_secs_f64();

    // Phase 2: a steady rate; latency from a record's send to its dead letter.
    let sent = broker
        .produce_at_rate("steady", args.rate, args.seconds, |n| {
            json!({"seq": n, "fail": "refused", "sent_ms": now_ms()}).to_string()
        })
        .await?;
    let dead = eventually(Duration::from_secs(120), "a dead letter for each steady record", || async {
        let dead = broker.read_topic("steady-dead", args.partitions).await?;
        Ok((dead.len() > sent).then_some(dead))
    })
    .await?;
    let mut latencies: Vec<i64> = dead
        .iter()
        .filter_map(|record| {
            let payload: Value = serde_json::from_slice(&record.payload).ok()?;
            Some(record.timestamp_ms? - payload.get("sent_ms")?.as_i64()?)
        })
        .collect();
    if latencies.len() != sent {
        bail!("{} dead letters with a send time for {sent} records", latencies.len());
    }
    latencies.sort_unstable();
    let quantile = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    let rss = node.pid().and_then(ferry_chaos_tests::peak_rss_kib).context("node RSS")?;

    println!("| workload | records | partitions | result |");
    println!("|---|---|---|---|");
    println!(
        "| failing backlog -> `Sink/handle` -> dead-letter topic | {} | {} | **{:.0} dead letters/s** ({:.1?}) |",
        args.records, args.partitions, throughput, elapsed
    );
    println!(
        "| {} failing records/s for {} s -> dead-letter topic | {} | {} | record sent -> dead letter produced p50 **{} ms**, p99 **{} ms** |",
        args.rate,
        args.seconds,
        sent,
        args.partitions,
        quantile(0.5),
        quantile(0.99)
    );
    println!("| node peak RSS | | | {:.0} MiB |", rss as f64 / 1024.0);
    Ok(())
}
