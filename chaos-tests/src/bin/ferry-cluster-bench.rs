//! A three-node cluster on this machine against one node, and failover.
//!
//! 1. Throughput: for one node, then three, a pre-produced backlog of
//!    `--records` records to `Counter/add` (Virtual Object) and to
//!    `Sink/handle` (Service); completed invocations per second from the
//!    subscription's creation until the cluster's completion counters reach
//!    the backlog.
//! 2. Failover, on the three nodes: records at `--rate` per second to
//!    `Sink/handle` for `--seconds`; halfway, SIGKILL one node. Reports the
//!    time from the kill to the first invocation completed in a partition the
//!    killed node led (by its successor), and invocations completed per
//!    500 ms window before and after the kill.
//! 3. With `--idle-partitions N`, only this: the cost of an idle three-node
//!    cluster of N partitions (N + 1 Raft groups, each followed by every
//!    node), as the CPU time each node's process used over `--seconds`
//!    after its groups settled.
//!
//! Build first: `cargo build --release --workspace --bins`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Parser;
use ferry_chaos_tests::{eventually, Broker, Cluster, Handlers, Node};
use ferry_partition::partitioner::partition_of;
use ferry_partition::store::key;
use rdkafka::producer::{FutureRecord, Producer};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(about = "Measures a three-node Ferry cluster against one node, and its failover")]
struct Args {
    /// Records in each backlog.
    #[arg(long, default_value_t = 50_000)]
    records: usize,
    /// Partitions of each topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Distinct record keys.
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    /// Records per second in the failover phase.
    #[arg(long, default_value_t = 1000)]
    rate: usize,
    /// Seconds of the failover phase; the kill is halfway.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Only the failover phase.
    #[arg(long)]
    failover_only: bool,
    /// Only the idle cost of three nodes with this many partitions.
    #[arg(long)]
    idle_partitions: Option<u32>,
}

/// Partitions of each Ferry node (its default).
const SERVER_PARTITIONS: u32 = 8;
/// Consumers of a dead node are replaced after this long.
const SESSION_TIMEOUT_MS: &str = "6000";

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

async fn subscribe(node: &Node, topic: &str, sink: &str) -> Result<String> {
    let (status, body) = node
        .post(
            "/subscriptions",
            json!({"source": format!("kafka://my-cluster/{topic}"), "sink": sink,
                   "options": {"auto.offset.reset": "earliest", "session.timeout.ms": SESSION_TIMEOUT_MS,
                               "fetch.wait.max.ms": "10"}}),
        )
        .await?;
    if status != 201 {
        bail!("subscribe: {status} {body}");
    }
    Ok(body["id"].as_str().context("id")?.to_owned())
}

/// Invocations completed on the running nodes of `cluster` (each counts what it led).
async fn completed(cluster: &Cluster, running: &[u64]) -> Result<f64> {
    let mut total = 0.0;
    for &id in running {
        total += cluster.node(id).metric("ferry_invoker_invocations_completed_total").await?;
    }
    Ok(total)
}

/// Completed invocations per second of a backlog into `sink`.
async fn backlog(args: &Args, broker: &Broker, cluster: &Cluster, size: u64, sink: &str) -> Result<f64> {
    let topic = format!("backlog-{size}-{}", sink.rsplit('/').next().unwrap_or("sink"));
    broker.create_topic(&topic, args.partitions).await?;
    broker.produce_backlog(&topic, args.records, args.keys).await?;
    let running: Vec<u64> = (1..=size).collect();
    let before = completed(cluster, &running).await?;
    let started = Instant::now();
    subscribe(cluster.node(1), &topic, sink).await?;
    let total = args.records as f64;
    loop {
        let done = completed(cluster, &running).await? - before;
        if done >= total {
            break;
        }
        if started.elapsed() > Duration::from_secs(900) {
            bail!("only {done} of {total} completed after 900 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(total / started.elapsed().as_secs_f64())
}

fn millis(invocation: &Value) -> Option<i64> {
    let at = humantime::parse_rfc3339(invocation["modified_at"].as_str()?).ok()?;
    Some(at.duration_since(UNIX_EPOCH).ok()?.as_millis() as i64)
}

fn partition(invocation: &Value) -> Option<u32> {
    let (partition_key, _) = key::id_parts(invocation["id"].as_str()?)?;
    Some(partition_of(partition_key, SERVER_PARTITIONS))
}

/// CPU time (user + system) a process has used so far, from /proc.
fn cpu_time(pid: u32, ticks_per_second: f64) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesized command name; utime and stime are the
    // 14th and 15th fields of the line.
    let fields: Vec<&str> = stat.rsplit_once(')').context("stat")?.1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(Duration::from_secs_f64(ticks / ticks_per_second))
}

/// The idle cost of three nodes with `partitions` partitions.
async fn idle(args: &Args, broker: &Broker, dir: &std::path::Path, partitions: u32) -> Result<()> {
    let config = [("FERRY_PARTITIONS", partitions.to_string())];
    let config: Vec<(&str, &str)> = config.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let cluster = Cluster::start(dir, 3, &broker.bootstrap(), &config).await?;
    cluster.wait_balanced(Duration::from_secs(60)).await?;
    // Placement moves leaders back to their preferred nodes once groups are idle.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let ticks = std::process::Command::new("getconf").arg("CLK_TCK").output()?;
    let ticks: f64 = String::from_utf8(ticks.stdout)?.trim().parse().context("CLK_TCK")?;
    let pids: Vec<u32> =
        (1..=3).map(|id| cluster.node(id).pid().context("node is not running")).collect::<Result<_>>()?;
    let before: Vec<Duration> = pids.iter().map(|&pid| cpu_time(pid, ticks)).collect::<Result<_>>()?;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "| idle, {partitions} partitions ({} Raft groups on each of 3 nodes) | CPU, % of one core |",
        partitions + 1
    );
    println!("|---|---|");
    let mut total = 0.0;
    for (id, (&pid, before)) in (1..).zip(pids.iter().zip(before)) {
        let used = (cpu_time(pid, ticks)? - before).as_secs_f64() / elapsed * 100.0;
        total += used;
        println!("| node {id} | {used:.1}% |");
    }
    println!("| all three, over {elapsed:.0} s | **{total:.1}%** |");
    let (mut heartbeats, mut rpcs) = (0.0, 0.0);
    for id in 1..=3 {
        heartbeats += cluster.node(id).metric("ferry_raft_heartbeats_total").await?;
        rpcs += cluster.node(id).metric("ferry_raft_heartbeat_rpcs_total").await?;
    }
    println!("| heartbeats per `Heartbeats` RPC | {:.1} |", heartbeats / rpcs);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let broker = Broker::start().await?;
    if let Some(partitions) = args.idle_partitions {
        let dir = tempfile::tempdir()?;
        return idle(&args, &broker, dir.path(), partitions).await;
    }
    let handlers = Handlers::start().await?;
    let dir = tempfile::tempdir()?;

    let mut rows = Vec::new();
    let mut three = None;
    let sizes: &[u64] = if args.failover_only { &[3] } else { &[1, 3] };
    for &size in sizes {
        let cluster =
            Cluster::start(&dir.path().join(format!("cluster-{size}")), size, &broker.bootstrap(), &[]).await?;
        cluster.wait_balanced(Duration::from_secs(30)).await?;
        let (status, body) = cluster.node(1).post("/deployments", json!({ "uri": handlers.uri })).await?;
        if status != 201 {
            bail!("register deployment: {status} {body}");
        }
        for sink in ["service://Counter/add", "service://Sink/handle"].into_iter().filter(|_| !args.failover_only) {
            let throughput = backlog(&args, &broker, &cluster, size, sink).await?;
            eprintln!("{size} node(s), {sink}: {throughput:.0} invocations/s");
            rows.push((size, sink, throughput));
        }
        if size == 3 {
            three = Some(cluster);
        }
    }
    let mut cluster = three.context("three-node cluster")?;

    // Failover: steady records, one node killed halfway.
    let victim = 2u64;
    let text = cluster
        .node(victim)
        .http
        .get(format!("http://127.0.0.1:{}/metrics", cluster.node(victim).node_port))
        .send()
        .await?
        .text()
        .await?;
    let led: BTreeSet<u32> = text
        .lines()
        .filter_map(|l| l.strip_prefix("ferry_raft_leader{group=\""))
        .filter_map(|rest| {
            let (group, value) = rest.split_once("\"} ")?;
            (value.trim() == "1").then(|| group.parse::<u32>().ok()).flatten()
        })
        .filter(|&group| group > 0)
        .map(|group| group - 1)
        .collect();
    if led.is_empty() {
        bail!("node {victim} leads no partition");
    }
    broker.create_topic("steady", args.partitions).await?;
    let subscription = subscribe(cluster.node(1), "steady", "service://Sink/handle").await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let producer = broker.batching_producer(1)?;
    let per_tick = (args.rate / 100).max(1);
    let mut interval = tokio::time::interval(Duration::from_millis(10));
    let started = Instant::now();
    let kill_after = Duration::from_secs(args.seconds / 2);
    let mut killed_at = None;
    let mut sent = 0usize;
    while started.elapsed() < Duration::from_secs(args.seconds) {
        interval.tick().await;
        if killed_at.is_none() && started.elapsed() >= kill_after {
            cluster.node_mut(victim).kill().await;
            killed_at = Some(now_ms());
            eprintln!("killed node {victim}, leader of partitions {led:?}");
        }
        for i in 0..per_tick {
            let key = format!("key-{}", (sent + i) % args.keys);
            let record = FutureRecord::<str, str>::to("steady").key(&key).payload("{}");
            drop(producer.send_result(record).map_err(|(e, _)| e)?);
        }
        sent += per_tick;
    }
    producer.flush(Duration::from_secs(30))?;
    let killed_at = killed_at.context("kill")?;
    let survivor = cluster.node(1);
    let invocations = eventually(Duration::from_secs(180), "every steady record to complete", || async {
        let all = survivor.invocations(&format!("subscription={subscription}")).await?;
        Ok((all.len() >= sent && all.iter().all(|i| i["status"] == "completed")).then_some(all))
    })
    .await?;
    let times: Vec<(i64, u32)> = invocations.iter().filter_map(|i| Some((millis(i)?, partition(i)?))).collect();
    let failover_ms = times
        .iter()
        .filter(|(at, p)| *at >= killed_at && led.contains(p))
        .map(|(at, _)| at - killed_at)
        .min()
        .context("no invocation completed in the killed node's partitions")?;
    let window = 500i64;
    let per_window = |from: i64| times.iter().filter(|(at, _)| *at >= from && *at < from + window).count() as f64;
    let before: f64 = (1..=6).map(|w| per_window(killed_at - w * window)).sum::<f64>() / 6.0;
    let after: Vec<f64> = (0..20).map(|w| per_window(killed_at + w * window)).collect();
    let (low_at, lowest) =
        after.iter().copied().enumerate().fold((0, f64::INFINITY), |low, (w, c)| if c < low.1 { (w, c) } else { low });
    let recovered = after[low_at..].iter().position(|&c| c >= before * 0.9).map(|w| (low_at + w) as i64 * window);
    cluster.node_mut(victim).restart().await?;

    if !rows.is_empty() {
        println!("| workload | 1 node | 3 nodes | ratio |");
        println!("|---|---|---|---|");
    }
    for sink in ["service://Counter/add", "service://Sink/handle"].into_iter().filter(|_| !rows.is_empty()) {
        let of = |size| rows.iter().find(|(s, k, _)| *s == size && *k == sink).map_or(0.0, |r| r.2);
        println!(
            "| {} records -> `{sink}`, completed invocations/s | {:.0} | {:.0} | {:.2}x |",
            args.records,
            of(1),
            of(3),
            of(3) / of(1)
        );
    }
    println!();
    println!("| failover: {} records/s to `Sink/handle`, node {victim} SIGKILLed | result |", args.rate);
    println!("|---|---|");
    println!("| kill -> first invocation completed in a partition it led | **{failover_ms} ms** |");
    println!("| completed per 500 ms before the kill (mean of 6) | {before:.0} |");
    println!("| lowest 500 ms window in the 10 s after | {lowest:.0} |");
    match recovered {
        Some(ms) => println!("| back to 90% of the rate | after {ms} ms |"),
        None => println!("| back to 90% of the rate | not within 10 s |"),
    }
    Ok(())
}
