//! Ferry and `restate-server` side by side, on one tansu broker with the same
//! handler binary, one system after the other:
//!
//! 1. HTTP ingress: `POST /Counter/<key>/add` at a fixed rate, open loop;
//!    request-response latency percentiles.
//! 2. Backlog -> Virtual Object: pre-produces `--records` records
//!    (`{"seq":n}`, `--keys` keys) and subscribes `Counter/add` (reads and
//!    writes the key's state); completed invocations per second from the
//!    subscription's creation to the last completion, checked against the
//!    sum of the counters.
//! 3. Backlog -> Service: the same with `Sink/handle` (a no-op).
//! 4. A pipeline stage, `Pipeline/run`: three `ctx.run` steps and a call to
//!    `Sink/handle`, over HTTP at the fixed rate (latency percentiles) and
//!    from a backlog (completed invocations per second; each record makes
//!    two invocations, the stage and its call, and the rate counts stages).
//!
//! Prints a Markdown table with both systems and their ratio, the CPU time
//! per invocation of each server (with its child processes) and of the
//! handler process during each backlog, and each server's peak RSS. Needs `scripts/restate.sh install server`,
//! `scripts/broker.sh install` and `cargo build --release --workspace --bins`.

use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Parser;
use ferry_chaos_tests::restate::{Completed, RestateServer};
use ferry_chaos_tests::{bin_dir, cpu_seconds, peak_rss_kib, Broker, Node};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

#[derive(Parser)]
#[command(about = "Measures Ferry and restate-server on Kafka backlogs and HTTP ingress")]
struct Args {
    /// Records in each backlog.
    #[arg(long, default_value_t = 100_000)]
    records: usize,
    /// Records in the `Pipeline/run` backlog (smaller: restate-server keeps
    /// each stage's stream open while it waits for its call, up to its
    /// inactivity timeout, so a large backlog of them takes it long).
    #[arg(long, default_value_t = 10_000)]
    pipeline_records: usize,
    /// Partitions of each topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Distinct record keys, and Counter keys of the ingress phase.
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    /// Partitions of each server (Restate's own default is 24, Ferry's 8).
    #[arg(long, default_value_t = 8)]
    server_partitions: u16,
    /// Requests per second in the ingress phase.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Seconds of the ingress phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Give up on a backlog after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
}

/// A system under test.
enum Server {
    /// The node, and the directory it keeps its data in until it stops.
    Ferry(Box<Node>, #[allow(dead_code)] tempfile::TempDir),
    Restate(RestateServer),
}

impl Server {
    async fn name(&self) -> Result<String> {
        Ok(match self {
            Server::Ferry(..) => format!("Ferry {}", env!("CARGO_PKG_VERSION")),
            Server::Restate(restate) => format!("restate-server {}", restate.version().await?),
        })
    }

    fn http(&self) -> &reqwest::Client {
        match self {
            Server::Ferry(node, _) => &node.http,
            Server::Restate(restate) => &restate.http,
        }
    }

    fn ingress_url(&self, path: &str) -> String {
        match self {
            Server::Ferry(node, _) => format!("http://127.0.0.1:{}{path}", node.ingress_port),
            Server::Restate(restate) => restate.ingress_url(path),
        }
    }

    fn pid(&self) -> u32 {
        match self {
            Server::Ferry(node, _) => node.pid().unwrap_or(0),
            Server::Restate(restate) => restate.pid(),
        }
    }

    async fn subscribe(&self, topic: &str, sink: &str) -> Result<String> {
        match self {
            Server::Ferry(node, _) => node.subscribe_from_start(topic, sink).await,
            Server::Restate(restate) => restate.subscribe(topic, sink).await,
        }
    }

    /// Invocations completed so far, cheap to poll.
    async fn progress(&self) -> Result<f64> {
        match self {
            Server::Ferry(node, _) => node.metric("ferry_invoker_invocations_completed_total").await,
            Server::Restate(restate) => restate.invoker_completed().await,
        }
    }

    /// The durably completed invocations of a subscription.
    async fn completed(&self, subscription: &str) -> Result<Completed> {
        match self {
            Server::Ferry(node, _) => {
                let all = node.invocations(&format!("subscription={subscription}&status=completed")).await?;
                let ms = |inv: &Value, field: &str| -> Option<i64> {
                    let at = humantime::parse_rfc3339(inv[field].as_str()?).ok()?;
                    Some(at.duration_since(UNIX_EPOCH).ok()?.as_millis() as i64)
                };
                Ok(Completed {
                    count: all.len() as u64,
                    first_created_ms: all.iter().filter_map(|inv| ms(inv, "created_at")).min(),
                    last_completed_ms: all.iter().filter_map(|inv| ms(inv, "modified_at")).max(),
                })
            }
            Server::Restate(restate) => restate.completed(subscription).await,
        }
    }
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

fn now_ms() -> i64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970");
    i64::try_from(since_epoch.as_millis()).expect("milliseconds fit in i64")
}

/// One backlog's outcome.
struct Backlog {
    records: usize,
    elapsed: Duration,
    /// CPU seconds of the server (with its child processes) and of the
    /// handler process, from the subscription's creation until every
    /// invocation completed.
    server_cpu: f64,
    handler_cpu: f64,
}

impl Backlog {
    fn rate(&self) -> f64 {
        self.records as f64 / self.elapsed.as_secs_f64()
    }

    /// CPU microseconds per record of the server and of the handler process.
    fn cpu_us(&self) -> (f64, f64) {
        (self.server_cpu * 1e6 / self.records as f64, self.handler_cpu * 1e6 / self.records as f64)
    }
}

/// Pre-produces `records` records to a new topic, subscribes `sink` to it,
/// and waits until all of them are durably completed invocations (and the
/// invocations they make: `per_record` in all for each).
#[allow(clippy::too_many_arguments)]
async fn backlog(
    server: &Server,
    handler_pid: u32,
    broker: &Broker,
    args: &Args,
    records: usize,
    topic: &str,
    sink: &str,
    per_record: usize,
) -> Result<Backlog> {
    broker.create_topic(topic, args.partitions).await?;
    let started = Instant::now();
    broker.produce_backlog(topic, records, args.keys).await?;
    eprintln!("produced {} records to {topic} in {:.1?}", records, started.elapsed());

    // The invoker's counter is cheap to poll; the SQL count, exact but a scan
    // of every invocation, is only read once the counter has caught up.
    let baseline = server.progress().await?;
    let target = (records * per_record) as f64;
    let subscribed_ms = now_ms();
    let started = Instant::now();
    let cpu_at_start = (cpu_seconds(server.pid()), cpu_seconds(handler_pid));
    let subscription = server.subscribe(topic, sink).await?;
    let timeout = Duration::from_secs(args.timeout);
    let mut last_report = Instant::now();
    loop {
        let done = server.progress().await? - baseline;
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
    let cpu = (cpu_seconds(server.pid()) - cpu_at_start.0, cpu_seconds(handler_pid) - cpu_at_start.1);
    let completed = loop {
        let completed = server.completed(&subscription).await?;
        if completed.count >= records as u64 {
            break completed;
        }
        if started.elapsed() > timeout {
            bail!("only {} of {target} invocations of {sink} durably completed", completed.count);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    if completed.count != records as u64 {
        bail!("{} completed invocations of {sink} for {} records", completed.count, records);
    }
    let span = |from: i64, to: Option<i64>| -> Result<Duration> {
        let to = to.context("completed invocations without timestamps")?;
        Ok(Duration::from_millis(u64::try_from(to - from).context("timestamp before the subscription")?))
    };
    let elapsed = span(subscribed_ms, completed.last_completed_ms)?;
    Ok(Backlog { records, elapsed, server_cpu: cpu.0, handler_cpu: cpu.1 })
}

/// The sum of `Counter/get` counts over the backlog's keys.
async fn counter_sum(server: &Server, keys: usize) -> Result<u64> {
    let counts = futures::stream::iter(0..keys)
        .map(|k| async move {
            let url = server.ingress_url(&format!("/Counter/key-{k}/get"));
            let response = server.http().post(url).send().await?.error_for_status()?;
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

/// `POST` to the path `path` gives for each n at `rate` per second for
/// `seconds`, each request sent at its scheduled time whether or not
/// earlier ones answered.
async fn ingress_latency(server: &Server, rate: u32, seconds: u64, path: impl Fn(u64) -> String) -> Result<Latencies> {
    let request = |n: u64| {
        let url = server.ingress_url(&path(n));
        let call = server.http().post(url).header("content-type", "application/json").body(format!("{{\"seq\":{n}}}"));
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

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Everything measured of one server.
struct Measured {
    name: String,
    latencies: Latencies,
    object: Backlog,
    service: Backlog,
    pipeline_latencies: Latencies,
    pipeline: Backlog,
    rss_kib: u64,
}

async fn measure(server: &Server, handler_pid: u32, broker: &Broker, args: &Args, tag: &str) -> Result<Measured> {
    // First, while the server has no backlog's flushes and compactions to
    // catch up with.
    let keys = args.keys;
    let latencies =
        ingress_latency(server, args.rate, args.seconds, |n| format!("/Counter/lat-{}/add", n as usize % keys)).await?;
    let records = args.records;
    let object =
        backlog(server, handler_pid, broker, args, records, &format!("{tag}-counter"), "service://Counter/add", 1)
            .await?;
    let sum = counter_sum(server, args.keys).await?;
    if sum != args.records as u64 {
        bail!("the counters add up to {sum}, not {}", args.records);
    }
    let service =
        backlog(server, handler_pid, broker, args, records, &format!("{tag}-sink"), "service://Sink/handle", 1).await?;
    let pipeline_latencies = ingress_latency(server, args.rate, args.seconds, |_| "/Pipeline/run".to_owned()).await?;
    let (records, topic) = (args.pipeline_records, format!("{tag}-pipeline"));
    let pipeline = backlog(server, handler_pid, broker, args, records, &topic, "service://Pipeline/run", 2).await?;
    Ok(Measured {
        name: server.name().await?,
        latencies,
        object,
        service,
        pipeline_latencies,
        pipeline,
        rss_kib: peak_rss_kib(server.pid()).unwrap_or(0),
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let broker = Broker::start().await?;
    let (handlers, uri) = start_handlers().await?;
    let handler_pid = handlers.id().context("handler process")?;

    let dir = tempfile::tempdir()?;
    let partitions = [("FERRY_PARTITIONS", args.server_partitions.to_string())];
    let config: Vec<(&str, &str)> = partitions.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let node = Node::start_configured(&dir.path().join("ferry"), &broker.bootstrap(), &config).await?;
    let (status, body) = node.post("/deployments", json!({ "uri": uri })).await?;
    if status != 201 {
        bail!("register with Ferry: {status} {body}");
    }
    // Each server is stopped before the next one is measured.
    let server = Server::Ferry(Box::new(node), dir);
    let ferry = measure(&server, handler_pid, &broker, &args, "ferry").await?;
    if let Server::Ferry(node, _) = &server {
        let stalls = node.metric("ferry_invoker_stalls_total").await?;
        let abandoned = node.metric("ferry_invoker_attempts_total{outcome=\"stalled\"}").await?;
        println!("ferry: {stalls} stalls noticed, {abandoned} attempts abandoned for them");
        let attempts = node.metric("ferry_invoker_attempts_total").await?;
        let completed = node.metric("ferry_invoker_invocations_completed_total").await?;
        let checkpoints = node.metric("ferry_invoker_checkpoints_total").await?;
        println!(
            "ferry: {:.2} attempts per completed invocation over the whole run, {checkpoints} checkpoints",
            attempts / completed
        );
    }
    drop(server);

    let restate = RestateServer::start(&broker.bootstrap(), args.server_partitions).await?;
    restate.register(&uri).await?;
    let server = Server::Restate(restate);
    let restate = measure(&server, handler_pid, &broker, &args, "restate").await?;
    drop(server);

    println!(
        "| {} records ({} for the pipeline), {} topic partitions, {} keys, {} server partitions | {} | {} | ratio |",
        args.records,
        args.pipeline_records,
        args.partitions,
        args.keys,
        args.server_partitions,
        ferry.name,
        restate.name
    );
    println!("|---|---|---|---|");
    for (what, f, r) in [
        ("Kafka -> Virtual Object `Counter/add`, completed invocations/s", &ferry.object, &restate.object),
        ("Kafka -> Service `Sink/handle`, completed invocations/s", &ferry.service, &restate.service),
        (
            "Kafka -> `Pipeline/run` (3 steps, 1 call; its own backlog), completed stages/s",
            &ferry.pipeline,
            &restate.pipeline,
        ),
    ] {
        let (f, r) = (f.rate(), r.rate());
        println!("| {what} | **{f:.0}** | {r:.0} | {:.2}x |", f / r);
    }
    for (what, f, r) in [
        ("Kafka -> Virtual Object, CPU us per invocation: server / handler", &ferry.object, &restate.object),
        ("Kafka -> Service, CPU us per invocation: server / handler", &ferry.service, &restate.service),
        ("Kafka -> `Pipeline/run`, CPU us per stage: server / handler", &ferry.pipeline, &restate.pipeline),
    ] {
        let (f, r) = (f.cpu_us(), r.cpu_us());
        println!("| {what} | **{:.0} / {:.0}** | {:.0} / {:.0} | {:.2}x |", f.0, f.1, r.0, r.1, r.0 / f.0);
    }
    for (path, f, r) in [
        ("/Counter/<key>/add", &ferry.latencies, &restate.latencies),
        ("/Pipeline/run", &ferry.pipeline_latencies, &restate.pipeline_latencies),
    ] {
        for (what, q) in [("p50", 0.5), ("p99", 0.99)] {
            let (f, r) = (ms(f.quantile(q)), ms(r.quantile(q)));
            println!(
                "| HTTP `POST {path}` at {} req/s, {what} | **{f:.1} ms** | {r:.1} ms | {:.2}x |",
                args.rate,
                r / f
            );
        }
    }
    println!(
        "| ingress errors | {} | {} | |",
        ferry.latencies.errors + ferry.pipeline_latencies.errors,
        restate.latencies.errors + restate.pipeline_latencies.errors
    );
    println!("| peak RSS | {:.0} MiB | {:.0} MiB | |", ferry.rss_kib as f64 / 1024.0, restate.rss_kib as f64 / 1024.0);
    Ok(())
}
