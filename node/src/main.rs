//! `ferry-server`: runs one Ferry node.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ferry_ingress::ConsumerProgram;
use ferry_node::config::{Config, LogFormat, Overrides};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts: a background thread gives memory
/// freed a second ago back to the system, so the node's RSS follows what it
/// holds.
#[repr(transparent)]
pub struct MallocConf(*const std::ffi::c_char);

// SAFETY: the pointer is to a static string that is never written.
unsafe impl Sync for MallocConf {}

#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: MallocConf =
    MallocConf(c"background_thread:true,max_background_threads:1,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

/// Runs a Ferry node. With no configuration at all it serves a single-node
/// cluster: admin API on :9070, node port on :5122, data in ./ferry-data.
#[derive(Parser, Debug)]
#[command(name = "ferry-server", version)]
struct Cli {
    /// A TOML configuration file.
    #[arg(long, env = "FERRY_CONFIG")]
    config_file: Option<PathBuf>,
    /// Where the node keeps its data (`base-dir`).
    #[arg(long)]
    base_dir: Option<PathBuf>,
    /// This node's id (`node-id`).
    #[arg(long)]
    node_id: Option<u64>,
    /// This node's name (`node-name`).
    #[arg(long)]
    node_name: Option<String>,
    /// Node-to-node gRPC and /metrics (`bind-address`).
    #[arg(long)]
    bind_address: Option<String>,
    /// The address peers reach this node at (`advertised-address`).
    #[arg(long)]
    advertised_address: Option<String>,
    /// The admin API (`admin.bind-address`).
    #[arg(long)]
    admin_bind_address: Option<String>,
    /// The HTTP ingress (`ingress.bind-address`).
    #[arg(long)]
    ingress_bind_address: Option<String>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    dump_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Runs one subscription's Kafka consumer for the node that started it,
    /// speaking over stdin and stdout.
    #[command(hide = true)]
    KafkaConsumer,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::KafkaConsumer) = cli.command {
        return ferry_ingress::consumer::process_main();
    }
    let consumer_program = match std::env::current_exe() {
        Ok(path) => ConsumerProgram { path, args: vec!["kafka-consumer".to_owned()] },
        Err(e) => {
            eprintln!("ferry-server: cannot find its own executable, which runs the Kafka consumers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let overrides = Overrides {
        base_dir: cli.base_dir,
        node_id: cli.node_id,
        node_name: cli.node_name,
        bind_address: cli.bind_address,
        advertised_address: cli.advertised_address,
        admin_bind_address: cli.admin_bind_address,
        ingress_bind_address: cli.ingress_bind_address,
    };
    let config = match Config::load(cli.config_file.as_deref(), &overrides) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ferry-server: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.dump_config {
        match toml_string(&config) {
            Ok(text) => {
                print!("{text}");
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("ferry-server: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let format = match config.log.format {
        LogFormat::Text => ferry_telemetry::LogFormat::Text,
        LogFormat::Json => ferry_telemetry::LogFormat::Json,
    };
    let telemetry = {
        let _runtime = runtime.enter();
        let instance = config.node_name();
        match ferry_telemetry::init(&config.tracing, &config.log.filter, format, "ferry", &instance, &["ferry"]) {
            Ok(telemetry) => telemetry,
            Err(e) => {
                eprintln!("ferry-server: {e}");
                return ExitCode::from(2);
            }
        }
    };
    let metrics = match metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&LATENCY_BUCKETS_SECONDS)
        .and_then(|b| b.install_recorder())
    {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("ferry-server: cannot install the metrics recorder: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Test builds take fail points from FAILPOINTS; other builds have none.
    let _failpoints = fail::has_failpoints().then(fail::FailScenario::setup);
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            signals.cancel();
        });
        ferry_node::run(config, metrics, consumer_program, shutdown).await
    });
    {
        let _runtime = runtime.enter();
        telemetry.shutdown();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("ferry-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Histogram buckets of every latency metric, in seconds: fine where Ferry's
/// latencies live (milliseconds), coarse out to a minute.
const LATENCY_BUCKETS_SECONDS: [f64; 22] = [
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0,
    10.0, 30.0, 60.0,
];

/// The configuration as TOML, Kafka credentials shown as `***`.
fn toml_string(config: &Config) -> Result<String, String> {
    let mut shown = config.clone();
    for cluster in shown.ingress.kafka_clusters.iter_mut() {
        *cluster = cluster.redacted();
    }
    toml::to_string(&shown).map_err(|e| e.to_string())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}
