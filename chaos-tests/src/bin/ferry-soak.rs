//! Soak benchmark: one node, a live Kafka stream into `Counter/add` (reads
//! and writes its key's state) over `--keys` keys at `--rate` records per
//! second until `--records` records are handled. Every `--sample-seconds` it
//! samples the node: resident memory (with its Kafka consumer process),
//! data-directory size, records completed per second, p99 record-to-commit
//! latency, the longest apply wait (an upper bound: the histogram bucket it
//! fell in), and CPU time per completed invocation of the node and of the
//! handler process. At the end it SIGKILLs the node, restarts it on its data
//! and times the first new HTTP invocation answered.
//!
//! Writes the samples as CSV and a plot of memory and throughput over the
//! run (SVG) to `--out`, and prints them as a Markdown table. Needs
//! `scripts/broker.sh install` and `cargo build --release --workspace --bins`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use ferry_chaos_tests::{cpu_seconds, produce, rss_kib, Broker, Handlers, Node, Record};
use serde_json::json;

#[derive(Parser)]
#[command(about = "Runs one node under a steady Kafka stream and samples its memory, disk and speed")]
struct Args {
    /// Records to handle.
    #[arg(long, default_value_t = 2_000_000)]
    records: u64,
    /// Distinct record keys (Counter objects).
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Records produced per second.
    #[arg(long, default_value_t = 4_000)]
    rate: u64,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 4)]
    topic_partitions: i32,
    /// Partitions of the node.
    #[arg(long, default_value_t = 8)]
    server_partitions: u32,
    /// `invocation.default-journal-retention` of the node (`1d` keeps everything of the run).
    #[arg(long, default_value = "1d")]
    journal_retention: String,
    #[arg(long, default_value_t = 10)]
    sample_seconds: u64,
    /// Where the CSV and the plot go.
    #[arg(long, default_value = "target/soak")]
    out: PathBuf,
    /// Names the files of this run.
    #[arg(long, default_value = "soak")]
    label: String,
}

const MIB: f64 = (1 << 20) as f64;

/// One sample of the node.
struct Sample {
    seconds: f64,
    completed: f64,
    rss_mib: f64,
    disk_mib: f64,
    disk_used_mib: f64,
    state_mib: f64,
    records_per_second: f64,
    p99_latency_ms: f64,
    longest_apply_wait_ms: f64,
    longest_apply_ms: f64,
    ferry_cpu_us: f64,
    handler_cpu_us: f64,
}

/// The columns of a sample, as the CSV names them and the table titles them.
const COLUMNS: [(&str, &str); 12] = [
    ("seconds", "seconds"),
    ("completed", "completed"),
    ("rss_mib", "RSS MiB"),
    ("disk_mib", "disk MiB"),
    ("disk_used_mib", "disk used MiB"),
    ("state_mib", "state MiB"),
    ("records_per_second", "records/s"),
    ("p99_record_to_commit_ms", "p99 ms"),
    ("longest_apply_wait_ms", "apply wait <= ms"),
    ("longest_apply_ms", "apply <= ms"),
    ("ferry_cpu_us_per_invocation", "Ferry CPU us/inv"),
    ("handler_cpu_us_per_invocation", "handler CPU us/inv"),
];

impl Sample {
    /// The values, formatted, in the order of [`COLUMNS`].
    fn values(&self) -> [String; 12] {
        [
            format!("{:.0}", self.seconds),
            format!("{:.0}", self.completed),
            format!("{:.1}", self.rss_mib),
            format!("{:.1}", self.disk_mib),
            format!("{:.1}", self.disk_used_mib),
            format!("{:.1}", self.state_mib),
            format!("{:.0}", self.records_per_second),
            self.p99_latency_ms.to_string(),
            self.longest_apply_wait_ms.to_string(),
            self.longest_apply_ms.to_string(),
            format!("{:.0}", self.ferry_cpu_us),
            format!("{:.0}", self.handler_cpu_us),
        ]
    }
}

fn dir_bytes(path: &Path) -> u64 {
    dir_sizes(path).0
}

/// The lengths of the files under `path`, and the disk space they take
/// (less where they are sparse).
fn dir_sizes(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(path) else { return (0, 0) };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_sizes(&e.path()),
            Ok(m) => (m.len(), m.blocks() * 512),
            Err(_) => (0, 0),
        })
        .fold((0, 0), |(len, used), (l, u)| (len + l, used + u))
}

/// A histogram's cumulative bucket counts (upper bound -> count), summed
/// over every label set, from a Prometheus page.
fn buckets(page: &str, name: &str) -> BTreeMap<u64, f64> {
    let prefix = format!("{name}_bucket{{");
    let mut buckets = BTreeMap::new();
    for line in page.lines().filter(|l| l.starts_with(&prefix)) {
        let Some(le) = line.split("le=\"").nth(1).and_then(|rest| rest.split('"').next()) else { continue };
        let Some(count) = line.rsplit(' ').next().and_then(|c| c.parse::<f64>().ok()) else { continue };
        // Bounds in nanoseconds keep the map ordered; +Inf last.
        let bound = le.parse::<f64>().map_or(u64::MAX, |s| (s * 1e9) as u64);
        *buckets.entry(bound).or_default() += count;
    }
    buckets
}

/// The bound of the bucket holding quantile `q` of what was recorded
/// between `before` and `after`, in milliseconds.
fn quantile_ms(before: &BTreeMap<u64, f64>, after: &BTreeMap<u64, f64>, q: f64) -> f64 {
    let diff: Vec<(u64, f64)> =
        after.iter().map(|(&le, &n)| (le, n - before.get(&le).copied().unwrap_or(0.0))).collect();
    let total = diff.last().map_or(0.0, |&(_, n)| n);
    if total <= 0.0 {
        return 0.0;
    }
    let bound = diff.iter().find(|&&(_, n)| n >= q * total).map_or(u64::MAX, |&(le, _)| le);
    if bound == u64::MAX {
        f64::INFINITY
    } else {
        bound as f64 / 1e6
    }
}

fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(['{', ' '])))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn metrics_page(node: &Node) -> Result<String> {
    let url = format!("http://127.0.0.1:{}/metrics", node.node_port);
    Ok(node.http.get(url).send().await?.error_for_status()?.text().await?)
}

/// Produces `args.records` records at `args.rate` per second, in chunks of
/// a tenth of a second.
async fn stream(broker: &Broker, args: &Args, topic: &str) -> Result<()> {
    let producer = broker.batching_producer(5)?;
    let chunk = (args.rate / 10).max(1);
    let mut ticks = tokio::time::interval(Duration::from_millis(100));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent = 0;
    while sent < args.records {
        ticks.tick().await;
        let n = chunk.min(args.records - sent);
        let records: Vec<Record> = (sent..sent + n)
            .map(|seq| Record {
                key: Some(format!("key-{}", seq % args.keys).into_bytes()),
                payload: format!("{{\"seq\":{seq}}}").into_bytes(),
                headers: vec![],
            })
            .collect();
        produce(&producer, topic, &records).await?;
        sent += n;
    }
    Ok(())
}

fn csv(samples: &[Sample]) -> String {
    let mut text = COLUMNS.map(|(name, _)| name).join(",") + "\n";
    for sample in samples {
        text += &(sample.values().join(",") + "\n");
    }
    text
}

/// Memory (left axis) and throughput (right axis) over the run.
fn plot(samples: &[Sample], title: &str) -> String {
    let (width, height, margin) = (760.0, 360.0, 60.0);
    let t_max = samples.last().map_or(1.0, |s| s.seconds).max(1.0);
    let rss_max = samples.iter().map(|s| s.rss_mib).fold(1.0, f64::max) * 1.1;
    let rate_max = samples.iter().map(|s| s.records_per_second).fold(1.0, f64::max) * 1.1;
    let x = |t: f64| margin + t / t_max * (width - 2.0 * margin);
    let y = |v: f64, max: f64| height - margin - v / max * (height - 2.0 * margin);
    let line = |value: &dyn Fn(&Sample) -> f64, max: f64| {
        samples.iter().map(|s| format!("{:.1},{:.1}", x(s.seconds), y(value(s), max))).collect::<Vec<_>>().join(" ")
    };
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" \
         font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{margin}\" y=\"24\" font-size=\"14\">{title}</text>\n"
    );
    let (left, right, bottom) = (margin, width - margin, height - margin);
    let _ = writeln!(svg, "<path d=\"M{left},{margin} V{bottom} H{right} V{margin}\" stroke=\"#888\" fill=\"none\"/>");
    for i in 0..=4 {
        let f = f64::from(i) / 4.0;
        let (yy, tx) = (y(f * rss_max, rss_max), x(f * t_max));
        let _ = writeln!(
            svg,
            "<text x=\"{:.0}\" y=\"{yy:.0}\" text-anchor=\"end\" fill=\"#c33\">{:.0}</text>",
            left - 4.0,
            f * rss_max
        );
        let _ = writeln!(svg, "<text x=\"{:.0}\" y=\"{yy:.0}\" fill=\"#36c\">{:.0}</text>", right + 4.0, f * rate_max);
        let _ = writeln!(
            svg,
            "<text x=\"{tx:.0}\" y=\"{:.0}\" text-anchor=\"middle\">{:.0}</text>",
            bottom + 16.0,
            f * t_max
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"{:.0}\" y=\"{:.0}\" text-anchor=\"middle\">seconds</text>",
        width / 2.0,
        height - 16.0
    );
    let _ = writeln!(svg, "<text x=\"{left}\" y=\"{:.0}\" fill=\"#c33\">RSS (MiB)</text>", margin - 8.0);
    let _ = writeln!(
        svg,
        "<text x=\"{right}\" y=\"{:.0}\" text-anchor=\"end\" fill=\"#36c\">records/s</text>",
        margin - 8.0
    );
    let _ = writeln!(
        svg,
        "<polyline points=\"{}\" stroke=\"#c33\" fill=\"none\" stroke-width=\"2\"/>",
        line(&|s| s.rss_mib, rss_max)
    );
    let _ = writeln!(
        svg,
        "<polyline points=\"{}\" stroke=\"#36c\" fill=\"none\" stroke-width=\"2\"/>",
        line(&|s| s.records_per_second, rate_max)
    );
    svg.push_str("</svg>\n");
    svg
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    humantime::parse_duration(&args.journal_retention).context("--journal-retention")?;
    let broker = Broker::start().await?;
    let handlers = Handlers::start().await?;
    let dir = tempfile::tempdir()?;
    let base_dir = dir.path().join("ferry");
    let config = [
        ("FERRY_PARTITIONS", args.server_partitions.to_string()),
        ("FERRY_INVOCATION__DEFAULT_JOURNAL_RETENTION", args.journal_retention.clone()),
        ("FERRY_LOG__FILTER", "warn".to_owned()),
    ];
    let config: Vec<(&str, &str)> = config.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut node = Node::start_configured(&base_dir, &broker.bootstrap(), &config).await?;
    let (status, body) = node.post("/deployments", json!({ "uri": handlers.uri })).await?;
    if status != 201 {
        bail!("register: {status} {body}");
    }
    let topic = "soak";
    broker.create_topic(topic, args.topic_partitions).await?;
    node.subscribe_from_start(topic, "service://Counter/add").await?;

    std::fs::create_dir_all(&args.out)?;
    let csv_path = args.out.join(format!("{}.csv", args.label));
    let svg_path = args.out.join(format!("{}.svg", args.label));
    let title = format!(
        "ferry-soak: {} records, {} keys, {}/s, journal retention {}",
        args.records, args.keys, args.rate, args.journal_retention
    );
    let started = Instant::now();
    let producing = stream(&broker, &args, topic);
    tokio::pin!(producing);
    let mut produced = false;
    let (node_pid, handler_pid) = (node.pid().context("node pid")?, handlers.pid().context("handler pid")?);
    let mut samples: Vec<Sample> = Vec::new();
    let mut previous = (0.0, metrics_page(&node).await?, cpu_seconds(node_pid), cpu_seconds(handler_pid));
    let cpu_at_start = (previous.2, previous.3);
    let mut ticks = tokio::time::interval(Duration::from_secs(args.sample_seconds));
    ticks.tick().await;
    loop {
        tokio::select! {
            result = &mut producing, if !produced => {
                result?;
                produced = true;
                eprintln!("all {} records produced after {:.0?}", args.records, started.elapsed());
                continue;
            }
            _ = ticks.tick() => {}
        }
        let page = metrics_page(&node).await?;
        let completed = metric(&page, "ferry_invoker_invocations_completed_total");
        let (ferry_cpu, handler_cpu) = (cpu_seconds(node_pid), cpu_seconds(handler_pid));
        let done = (completed - previous.0).max(1.0);
        let latency = "ferry_ingress_record_commit_latency_seconds";
        let disk = dir_sizes(&base_dir);
        let sample = Sample {
            seconds: started.elapsed().as_secs_f64(),
            completed,
            rss_mib: rss_kib(node_pid) as f64 / 1024.0,
            disk_mib: disk.0 as f64 / MIB,
            disk_used_mib: disk.1 as f64 / MIB,
            state_mib: dir_bytes(&base_dir.join("state")) as f64 / MIB,
            records_per_second: (completed - previous.0) / args.sample_seconds as f64,
            p99_latency_ms: quantile_ms(&buckets(&previous.1, latency), &buckets(&page, latency), 0.99),
            longest_apply_wait_ms: quantile_ms(
                &buckets(&previous.1, "ferry_log_apply_wait_seconds"),
                &buckets(&page, "ferry_log_apply_wait_seconds"),
                1.0,
            ),
            longest_apply_ms: quantile_ms(
                &buckets(&previous.1, "ferry_log_apply_seconds"),
                &buckets(&page, "ferry_log_apply_seconds"),
                1.0,
            ),
            ferry_cpu_us: (ferry_cpu - previous.2) * 1e6 / done,
            handler_cpu_us: (handler_cpu - previous.3) * 1e6 / done,
        };
        eprintln!(
            "{:>5.0}s {:>9.0} done {:>7.1} MiB RSS {:>7.1} MiB disk ({:.1} used, {:.1} state) {:>6.0}/s p99 {:>6} ms apply wait <= {:>5} ms \
             apply <= {:>5} ms cpu {:.0}/{:.0} us",
            sample.seconds,
            sample.completed,
            sample.rss_mib,
            sample.disk_mib,
            sample.disk_used_mib,
            sample.state_mib,
            sample.records_per_second,
            sample.p99_latency_ms,
            sample.longest_apply_wait_ms,
            sample.longest_apply_ms,
            sample.ferry_cpu_us,
            sample.handler_cpu_us
        );
        previous = (completed, page, ferry_cpu, handler_cpu);
        samples.push(sample);
        // Written as the run goes, so that a run cut short leaves its samples.
        std::fs::write(&csv_path, csv(&samples))?;
        std::fs::write(&svg_path, plot(&samples, &title))?;
        if completed >= args.records as f64 {
            break;
        }
    }

    let invocations = previous.0.max(1.0);
    let cpu_per_invocation =
        ((previous.2 - cpu_at_start.0) * 1e6 / invocations, (previous.3 - cpu_at_start.1) * 1e6 / invocations);

    // SIGKILL with the whole run's history on disk, then the first new
    // invocation answered.
    node.kill().await;
    let killed = Instant::now();
    node.restart().await?;
    loop {
        if let Ok((200, _)) = node.ingress("/Counter/after-restart/add", Some("{\"seq\":0}"), &[]).await {
            break;
        }
        if killed.elapsed() > Duration::from_secs(300) {
            bail!("no invocation answered within 300 s of the restart");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let restart = killed.elapsed();

    println!("| {} |", COLUMNS.map(|(_, title)| title).join(" | "));
    println!("|{}", "---|".repeat(COLUMNS.len()));
    for sample in &samples {
        println!("| {} |", sample.values().join(" | "));
    }
    let at = |n: f64| samples.iter().find(|s| s.completed >= n);
    if let (Some(early), Some(last)) = (at(args.records as f64 / 10.0), samples.last()) {
        println!(
            "\nRSS at {:.0} records: {:.1} MiB; at {:.0}: {:.1} MiB; data dir at the end: {:.1} MiB",
            early.completed, early.rss_mib, last.completed, last.rss_mib, last.disk_mib
        );
    }
    println!(
        "CPU per invocation over the run: Ferry {:.0} us, handler {:.0} us; longest apply wait <= {} ms, longest \
         applied batch <= {} ms; SIGKILL to the first new invocation answered: {:.2} s",
        cpu_per_invocation.0,
        cpu_per_invocation.1,
        samples.iter().map(|s| s.longest_apply_wait_ms).fold(0.0, f64::max),
        samples.iter().map(|s| s.longest_apply_ms).fold(0.0, f64::max),
        restart.as_secs_f64()
    );
    println!("samples: {}, plot: {}", csv_path.display(), svg_path.display());
    Ok(())
}
