//! The Restate side of Ferry's benchmark: the real `restate-server` on a
//! tansu broker, running the test handlers.
//!
//! 1. HTTP ingress: `POST /Counter/<key>/add` at a fixed rate, open loop;
//!    request-response latency percentiles.
//! 2. Backlog -> Virtual Object: pre-produces `--records` records
//!    (`{"seq":n}`, `--keys` keys) and subscribes `Counter/add`; measures
//!    completed invocations per second from the subscription's creation to
//!    the last completion, and checks that the counters add up to the backlog.
//! 3. Backlog -> Service: the same with `Sink/handle`.
//!
//! Prints a Markdown table, including the server's peak RSS. Needs
//! `scripts/restate-server.sh install`, `scripts/broker.sh install` and
//! `cargo build --release -p ferry-chaos-tests --bins`.

use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Parser;
use ferry_chaos_tests::restate::RestateServer;
use ferry_chaos_tests::{bin_dir, produce, Broker, Record};
use futures::StreamExt;
use rdkafka::producer::FutureProducer;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

#[derive(Parser)]
#[command(about = "Measures restate-server on Kafka backlogs and HTTP ingress, as a baseline for Ferry")]
struct Args {
    /// Records in each backlog.
    #[arg(long, default_value_t = 100_000)]
    records: usize,
    /// Partitions of each topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Distinct record keys, and Counter keys of the ingress phase.
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    /// Partitions of the Restate cluster (Restate's own default is 24).
    #[arg(long, default_value_t = 8)]
    restate_partitions: u16,
    /// Requests per second in the ingress phase.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Seconds of the ingress phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Give up on a backlog after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// Copy the server's log here at the end (its base directory is removed).
    #[arg(long)]
    keep_log: Option<std::path::PathBuf>,
}

/// The test handlers without `FERRY_TEST_RECORD_DIR`, so that `Sink/handle`
/// does nothing.
async fn start_handlers() -> Result<(Child, String)> {
    let mut child = Command::new(bin_dir().join("ferry-test-handlers"))
        .args(["--port", "0"])
        .env_remove("FERRY_TEST_RECORD_DIR")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start ferry-test-handlers (build it with cargo build --release --bins)")?;
    let stdout = child.stdout.take().context("piped stdout")?;
    let line = tokio::time::timeout(Duration::from_secs(30), BufReader::new(stdout).lines().next_line())
        .await
        .context("test handlers did not start")??
        .context("test handlers exited")?;
    let address = line.rsplit(' ').next().context("listening line")?;
    Ok((child, format!("http://{address}")))
}

fn batching_producer(broker: &Broker) -> Result<FutureProducer> {
    Ok(rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .create()?)
}

fn now_ms() -> i64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970");
    i64::try_from(since_epoch.as_millis()).expect("milliseconds fit in i64")
}

/// One backlog's outcome.
struct Backlog {
    elapsed: Duration,
    /// From the subscription's creation to its first invocation.
    first_invocation: Duration,
}

impl Backlog {
    fn rate(&self, records: usize) -> f64 {
        records as f64 / self.elapsed.as_secs_f64()
    }
}

/// Pre-produces `args.records` records to a new topic, subscribes `sink` to
/// it, and waits until all of them are durably completed invocations.
async fn backlog(restate: &RestateServer, broker: &Broker, args: &Args, topic: &str, sink: &str) -> Result<Backlog> {
    broker.create_topic(topic, args.partitions).await?;
    let producer = batching_producer(broker)?;
    let started = Instant::now();
    let records: Vec<Record> = (0..args.records)
        .map(|i| Record {
            key: Some(format!("key-{}", i % args.keys).into_bytes()),
            payload: format!("{{\"seq\":{i}}}").into_bytes(),
            headers: vec![],
        })
        .collect();
    for chunk in records.chunks(50_000) {
        produce(&producer, topic, chunk).await?;
    }
    eprintln!("produced {} records to {topic} in {:.1?}", args.records, started.elapsed());

    // The invoker's counter is cheap to poll; the SQL count, exact but a scan
    // of every invocation, is only read once the counter has caught up.
    let baseline = restate.invoker_completed().await?;
    let target = args.records as f64;
    let subscribed_ms = now_ms();
    let started = Instant::now();
    let subscription = restate.subscribe(topic, sink).await?;
    let timeout = Duration::from_secs(args.timeout);
    let mut last_report = Instant::now();
    loop {
        let done = restate.invoker_completed().await? - baseline;
        if done >= target {
            break;
        }
        if started.elapsed() > timeout {
            bail!("only {done} of {target} invocations of {sink} completed after {timeout:?}");
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            eprintln!("{done} / {target} invocations of {sink} completed after {:.1?}", started.elapsed());
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let completed = loop {
        let completed = restate.completed(&subscription).await?;
        if completed.count >= args.records as u64 {
            break completed;
        }
        if started.elapsed() > timeout {
            bail!("only {} of {target} invocations of {sink} durably completed", completed.count);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    if completed.count != args.records as u64 {
        bail!("{} completed invocations of {sink} for {} records", completed.count, args.records);
    }
    let span = |from: i64, to: Option<i64>| -> Result<Duration> {
        let to = to.context("completed invocations without timestamps")?;
        Ok(Duration::from_millis(u64::try_from(to - from).context("timestamp before the subscription")?))
    };
    Ok(Backlog {
        elapsed: span(subscribed_ms, completed.last_completed_ms)?,
        first_invocation: span(subscribed_ms, completed.first_created_ms)?,
    })
}

/// The sum of `Counter/get` counts over the backlog's keys.
async fn counter_sum(restate: &RestateServer, keys: usize) -> Result<u64> {
    let counts = futures::stream::iter(0..keys)
        .map(|k| async move {
            let url = restate.ingress_url(&format!("/Counter/key-{k}/get"));
            let response = restate.http.post(url).send().await?.error_for_status()?;
            let body: Value = response.json().await?;
            body["count"].as_u64().with_context(|| format!("no count for key-{k}: {body}"))
        })
        .buffer_unordered(16);
    counts.fold(Ok(0), |sum: Result<u64>, count| async move { Ok(sum? + count?) }).await
}

/// Latencies of the ingress phase, sorted.
struct Latencies {
    sorted: Vec<Duration>,
    errors: usize,
}

impl Latencies {
    fn quantile(&self, q: f64) -> Duration {
        let rank = (q * self.sorted.len() as f64).ceil() as usize;
        self.sorted.get(rank.saturating_sub(1)).copied().unwrap_or_default()
    }
}

/// `POST /Counter/lat-<n>/add` at `rate` per second for `seconds`, each
/// request sent at its scheduled time whether or not earlier ones answered.
async fn ingress_latency(restate: &RestateServer, rate: u32, seconds: u64, keys: usize) -> Result<Latencies> {
    let request = |n: u64| {
        let url = restate.ingress_url(&format!("/Counter/lat-{}/add", n as usize % keys));
        let call = restate.http.post(url).header("content-type", "application/json").body(format!("{{\"seq\":{n}}}"));
        async move {
            let sent = Instant::now();
            let ok = call.send().await.and_then(|r| r.error_for_status()).is_ok();
            ok.then(|| sent.elapsed())
        }
    };
    // Opens the client's connections and warms the keys' state.
    for n in 0..20 {
        request(n).await.context("warm-up request failed")?;
    }
    let period = Duration::from_secs(1) / rate;
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut calls = tokio::task::JoinSet::new();
    for n in 0..u64::from(rate) * seconds {
        ticks.tick().await;
        calls.spawn(request(n));
    }
    let mut latencies = Latencies { sorted: Vec::new(), errors: 0 };
    while let Some(result) = calls.join_next().await {
        match result? {
            Some(latency) => latencies.sorted.push(latency),
            None => latencies.errors += 1,
        }
    }
    latencies.sorted.sort();
    Ok(latencies)
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmHWM:")?.trim().strip_suffix("kB")?.trim().parse().ok())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let broker = Broker::start().await?;
    let (_handlers, uri) = start_handlers().await?;
    let restate = RestateServer::start(&broker.bootstrap(), args.restate_partitions).await?;
    eprintln!("restate-server in {} (admin :{})", restate.dir().display(), restate.admin_port);
    restate.register(&uri).await?;

    // First, while the server has no backlog's flushes and compactions to
    // catch up with.
    let latencies = ingress_latency(&restate, args.rate, args.seconds, args.keys).await?;
    let object = backlog(&restate, &broker, &args, "counter-backlog", "service://Counter/add").await?;
    let sum = counter_sum(&restate, args.keys).await?;
    if sum != args.records as u64 {
        bail!("the counters add up to {sum}, not {}", args.records);
    }
    let service = backlog(&restate, &broker, &args, "sink-backlog", "service://Sink/handle").await?;
    let rss = peak_rss_kib(restate.pid()).unwrap_or(0);
    let version = restate.version().await?;
    if let Some(path) = &args.keep_log {
        std::fs::copy(restate.log_path(), path)?;
    }

    println!("| restate-server {version} ({} partitions) | requests | result |", args.restate_partitions);
    println!("|---|---|---|");
    println!(
        "| ingress `POST /Counter/<key>/add`, {} req/s for {} s | {} | p50 **{:.1} ms**, p99 **{:.1} ms**, max {:.1} ms, {} errors |",
        args.rate,
        args.seconds,
        latencies.sorted.len() + latencies.errors,
        ms(latencies.quantile(0.5)),
        ms(latencies.quantile(0.99)),
        ms(latencies.quantile(1.0)),
        latencies.errors,
    );
    for (sink, outcome) in [("Counter/add (Virtual Object)", &object), ("Sink/handle (Service)", &service)] {
        println!(
            "| backlog ({} topic partitions, {} keys) -> `{sink}` | {} | **{:.0} completed invocations/s** ({:.1?}; first after {:.0} ms) |",
            args.partitions,
            args.keys,
            args.records,
            outcome.rate(args.records),
            outcome.elapsed,
            ms(outcome.first_invocation),
        );
    }
    println!("| restate-server peak RSS | | {:.0} MiB |", rss as f64 / 1024.0);
    Ok(())
}
