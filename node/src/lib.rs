//! The Ferry server: wires the log, the admin API and the Kafka ingress of one
//! node together, and shuts them down in order.

pub mod config;

use std::time::Duration;

use anyhow::Context;
use ferry_admin::Admin;
use ferry_ingress::{ConsumerProgram, IngressStatus, KafkaIngress};
use ferry_invoker::{Discovery, Invoker};
use ferry_partition::{Log, LogReads, Machine};
use ferry_proto::cluster::node_service_server::NodeServiceServer;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info};

pub use config::Config;

async fn bind(what: &str, address: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address).await.with_context(|| format!("cannot bind {what} {address}"))
}

/// The `/metrics` handler: refreshes the gauges read from the log's state,
/// then renders every metric in Prometheus' text format.
fn metrics_page(
    log: Log,
    metrics: PrometheusHandle,
) -> impl Fn() -> std::future::Ready<String> + Clone + Send + Sync + 'static {
    move || {
        log.publish_metrics();
        log.publish_invocation_gauges();
        std::future::ready(metrics.render())
    }
}

/// Runs a server on `servers`; if it fails, the node shuts down.
fn spawn_server<E: std::fmt::Display>(
    servers: &TaskTracker,
    name: &'static str,
    server: impl std::future::Future<Output = Result<(), E>> + Send + 'static,
    shutdown: &CancellationToken,
) {
    let shutdown = shutdown.clone();
    servers.spawn(async move {
        if let Err(e) = server.await {
            error!("{name} failed: {e}");
            shutdown.cancel();
        }
    });
}

/// Runs a node until `shutdown` fires; its Kafka consumers run as
/// `consumer_program`. Stops, in order: Kafka consumers (their last offsets
/// committed), the invoker, the admin API, the node port, then the Raft
/// groups.
pub async fn run(
    config: Config,
    metrics: PrometheusHandle,
    consumer_program: ConsumerProgram,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let node_listener = bind("bind-address", config.bind_address).await?;
    let admin_listener = bind("admin.bind-address", config.admin.bind_address).await?;
    let ingress_listener = bind("ingress.bind-address", config.ingress.bind_address).await?;

    let log_tasks = TaskTracker::new();
    let log_cancel = CancellationToken::new();
    let log = Log::open(config.log_options(), |_| Machine::default(), &log_tasks, log_cancel.clone())
        .await
        .with_context(|| format!("cannot open the log in {}", config.base_dir.display()))?;

    let servers = TaskTracker::new();
    let servers_cancel = CancellationToken::new();
    let node_service = NodeServiceServer::new(log.node_server())
        .max_decoding_message_size(ferry_log::MESSAGE_BYTES_MAX)
        .max_encoding_message_size(ferry_log::MESSAGE_BYTES_MAX);
    let node_app = tonic::service::Routes::new(node_service)
        .into_axum_router()
        .route("/metrics", axum::routing::get(metrics_page(log.clone(), metrics)));
    let stopped = servers_cancel.clone().cancelled_owned();
    let node_server = axum::serve(node_listener, node_app).with_graceful_shutdown(stopped);
    spawn_server(&servers, "node server", std::future::IntoFuture::into_future(node_server), &shutdown);

    if config.nodes().len() == 1 {
        log.wait_for_leaders(Duration::from_secs(30)).await.context("raft groups elected no leader")?;
    } else if let Err(e) = log.wait_for_leaders(Duration::from_secs(10)).await {
        // Peers may start later; the groups elect leaders once a majority is up.
        info!("not every group has a leader yet ({e}); serving anyway");
    }

    let ingress_status = IngressStatus::default();
    let settings = ferry_admin::Settings {
        clusters: config.ingress.kafka_clusters.clone(),
        names: config.node_names(),
        query: config.admin.query.limits(),
        ingress_endpoint: config.ingress_endpoint(),
        retention: config.invocation.retention(),
        inactivity_timeout: config.invoker.stream_inactivity,
        abort_timeout: config.invoker.attempt_timeout,
        started_at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    };
    let admin = Admin::new(log.clone(), Discovery::default(), ingress_status.clone(), settings);
    let admin_server = ferry_admin::server::serve(admin_listener, admin, servers_cancel.clone());
    spawn_server(&servers, "admin server", admin_server, &shutdown);

    let invoker_cancel = CancellationToken::new();
    let invoker = Invoker::new(
        log.clone(),
        config.invoker.clone(),
        config.invocation.default_retry_policy.clone(),
        config.invocation.retention(),
    );
    let invoker_task = tokio::spawn(invoker.run(invoker_cancel.clone()));

    let retention = config.invocation.retention();
    let http_ingress = ferry_ingress::http::serve(ingress_listener, log.clone(), retention, servers_cancel.clone());
    spawn_server(&servers, "HTTP ingress", http_ingress, &shutdown);

    let ingress_cancel = CancellationToken::new();
    let ingress = KafkaIngress::new(
        log.clone(),
        config.ingress.kafka_clusters.clone(),
        config.ingress.kafka.clone(),
        retention,
        ingress_status,
        consumer_program,
    );
    let ingress_task = tokio::spawn(ingress.run(ingress_cancel.clone()));
    let egress = ferry_ingress::egress::Egress::new(log.clone(), config.ingress.kafka_clusters.clone());
    let egress_task = tokio::spawn(egress.run(ingress_cancel.clone()));

    info!(
        node_id = config.node_id,
        node_name = %config.node_name(),
        admin = %config.admin.bind_address,
        ingress = %config.ingress.bind_address,
        node = %config.bind_address,
        partitions = config.partitions,
        base_dir = %config.base_dir.display(),
        "ferry is ready"
    );

    // The invoker and the Kafka ingress and egress run until they are told
    // to stop; if any ends before that, or a Raft group stops on a fatal error, the
    // node goes down loudly rather than running on without it.
    let mut ingress_task = std::pin::pin!(ingress_task);
    let mut invoker_task = std::pin::pin!(invoker_task);
    let mut egress_task = std::pin::pin!(egress_task);
    let failure = tokio::select! {
        _ = shutdown.cancelled() => None,
        reason = log.failed() => Some(reason),
        ended = &mut ingress_task => Some(format!("the Kafka ingress ended: {}", ended_how(ended))),
        ended = &mut invoker_task => Some(format!("the invoker ended: {}", ended_how(ended))),
        ended = &mut egress_task => Some(format!("the Kafka egress ended: {}", ended_how(ended))),
    };
    match &failure {
        Some(reason) => error!("shutting down: {reason}"),
        None => info!("shutting down"),
    }
    ingress_cancel.cancel();
    if !ingress_task.is_finished() {
        if let Err(e) = ingress_task.await {
            error!("kafka ingress ended abnormally: {e}");
        }
    }
    if !egress_task.is_finished() {
        if let Err(e) = egress_task.await {
            error!("kafka egress ended abnormally: {e}");
        }
    }
    invoker_cancel.cancel();
    if !invoker_task.is_finished() {
        if let Err(e) = invoker_task.await {
            error!("invoker ended abnormally: {e}");
        }
    }
    servers_cancel.cancel();
    servers.close();
    servers.wait().await;
    log.shutdown().await;
    log_cancel.cancel();
    log_tasks.close();
    log_tasks.wait().await;
    info!("stopped");
    match failure {
        Some(reason) => Err(anyhow::anyhow!(reason)),
        None => Ok(()),
    }
}

/// How a task that should have run until shutdown ended.
fn ended_how(result: Result<(), tokio::task::JoinError>) -> String {
    match result {
        Ok(()) => "it returned".to_owned(),
        Err(e) if e.is_panic() => {
            format!("it panicked: {}", ferry_telemetry::panic_message(e.into_panic().as_ref()))
        }
        Err(e) => e.to_string(),
    }
}
