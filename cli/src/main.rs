//! `ferry`: manages a Ferry cluster from a terminal through the gRPC
//! `AdminService` of any node. Prints tables for people, `--json` for scripts.

use std::collections::HashMap;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ferry_proto::admin as pb;
use ferry_proto::admin::admin_service_client::AdminServiceClient;
use serde::Serialize;
use tonic::transport::Channel;

#[derive(Parser)]
#[command(name = "ferry", version, about = "Manages a Ferry cluster through its gRPC admin API")]
struct Cli {
    /// A node's admin address (gRPC and REST share the port).
    #[arg(long, env = "FERRY_ADMIN_ADDRESS", default_value = "http://127.0.0.1:9070", global = true)]
    address: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Deployments: endpoints serving Restate SDK services.
    #[command(subcommand)]
    Deployments(Deployments),
    /// Services registered by deployments.
    #[command(subcommand)]
    Services(Services),
    /// Kafka subscriptions.
    #[command(subcommand)]
    Subscriptions(Subscriptions),
    /// Kafka clusters: those of the config file and those registered at runtime.
    #[command(subcommand)]
    KafkaClusters(KafkaClusters),
    /// Invocations.
    #[command(subcommand)]
    Invocations(Invocations),
    /// The cluster: nodes, Raft groups, consumer lag.
    #[command(subcommand)]
    Cluster(Cluster),
    /// Runs SQL over the cluster's state: Restate's introspection tables
    /// (sys_invocation, sys_journal, state, sys_inbox, sys_promise,
    /// sys_service, sys_deployment, ...; `SHOW TABLES` lists them).
    Sql { query: String },
}

#[derive(Subcommand)]
enum Cluster {
    /// Nodes, each partition's leader, term and log indexes as the answering
    /// node sees them, and the lag of the Kafka partitions it consumes.
    Status {
        /// Also show a digest of each group's applied state; replicas that
        /// show the same digest at the same applied index agree.
        #[arg(long)]
        digests: bool,
    },
}

#[derive(Subcommand)]
enum Deployments {
    /// Discovers and registers the deployment at URI.
    Register {
        uri: String,
        /// Talk HTTP/1.1 to the deployment instead of HTTP/2 with prior knowledge.
        #[arg(long)]
        http1: bool,
        /// A header sent with every request to the deployment, NAME=VALUE.
        #[arg(long = "header", value_parser = key_value)]
        headers: Vec<(String, String)>,
    },
    List,
    Describe {
        id: String,
    },
    Remove {
        id: String,
    },
}

#[derive(Subcommand)]
enum Services {
    List,
    Describe {
        name: String,
    },
    /// Changes a service's settings until a deployment registers it again;
    /// durations as "1d", "12h" or ISO 8601 ("PT1H").
    Configure {
        name: String,
        /// Whether the HTTP ingress may call it (otherwise only other services do).
        #[arg(long)]
        public: Option<bool>,
        #[arg(long)]
        journal_retention: Option<String>,
        #[arg(long)]
        idempotency_retention: Option<String>,
        /// Workflows only.
        #[arg(long)]
        workflow_completion_retention: Option<String>,
        #[arg(long)]
        inactivity_timeout: Option<String>,
        #[arg(long)]
        abort_timeout: Option<String>,
    },
}

#[derive(Subcommand)]
enum Subscriptions {
    /// Subscribes SINK (`service://<Service>/<handler>`) to SOURCE (`kafka://<cluster>/<topic>`).
    Create {
        source: String,
        sink: String,
        /// A librdkafka consumer option, or one of Ferry's (`ferry.`), NAME=VALUE
        /// (e.g. fetch.wait.max.ms=50).
        #[arg(long = "option", value_parser = key_value)]
        options: Vec<(String, String)>,
        /// Where partitions the group has no committed offset for start:
        /// group-offsets, earliest, latest, specific-offsets or at-timestamp
        /// (ferry.start.position).
        #[arg(long)]
        start: Option<String>,
        /// With `--start at-timestamp`: an RFC 3339 time, e.g. 2026-12-01T08:00:00Z.
        #[arg(long)]
        start_timestamp: Option<String>,
        /// With `--start specific-offsets`: PARTITION:OFFSET,... e.g. 0:100,1:250.
        #[arg(long)]
        start_offsets: Option<String>,
        /// The topic records whose invocation ends failed go to (ferry.dead-letter.topic).
        #[arg(long)]
        dead_letter_topic: Option<String>,
        /// The cluster of the dead-letter topic, if not the source's (ferry.dead-letter.cluster).
        #[arg(long)]
        dead_letter_cluster: Option<String>,
    },
    List,
    Describe {
        id: String,
    },
    /// Stops consuming at once; the subscription goes once the invocations of
    /// its records have completed.
    Delete {
        id: String,
        /// Delete at once, killing the invocations that have not completed.
        #[arg(long)]
        no_drain: bool,
    },
    /// Stops consuming; the group keeps its committed offsets.
    Pause {
        id: String,
    },
    /// Consumes again from the group's committed offsets.
    Resume {
        id: String,
    },
}

#[derive(Subcommand)]
enum KafkaClusters {
    List,
    /// A cluster with the subscriptions that read from it.
    Describe {
        name: String,
    },
    /// Registers cluster NAME; bootstrap.servers is required.
    Create {
        name: String,
        /// A librdkafka property, NAME=VALUE (e.g. bootstrap.servers=kafka:9092).
        #[arg(long = "property", value_parser = key_value, required = true)]
        properties: Vec<(String, String)>,
    },
    /// Replaces every property of registered cluster NAME; its subscriptions'
    /// consumers restart with them.
    Update {
        name: String,
        /// A librdkafka property, NAME=VALUE; a secret given as *** keeps its value.
        #[arg(long = "property", value_parser = key_value, required = true)]
        properties: Vec<(String, String)>,
    },
    /// Forgets registered cluster NAME.
    Delete {
        name: String,
        /// Even if subscriptions read from it (they wait for a cluster of that name).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum Invocations {
    List {
        /// Only invocations in this status (e.g. backing-off, completed).
        #[arg(long, default_value = "")]
        status: String,
        /// Only invocations of this service, or <Service>/<handler>.
        #[arg(long, default_value = "")]
        target: String,
        /// Only invocations from this subscription.
        #[arg(long, default_value = "")]
        subscription: String,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    Describe {
        id: String,
    },
    /// Tells the handler it is cancelled.
    Cancel {
        id: String,
    },
    /// Completes the invocation as failed at once.
    Kill {
        id: String,
    },
    /// Forgets a completed invocation.
    Purge {
        id: String,
    },
    /// Drops the journal of a completed invocation, keeping its result.
    PurgeJournal {
        id: String,
    },
    /// Runs a paused, backing-off or suspended invocation now.
    Resume {
        id: String,
    },
    /// Stops a running, backing-off or suspended invocation until it is resumed.
    Pause {
        id: String,
    },
    /// Starts a completed invocation's handler again with its input, under a new id.
    RestartAsNew {
        id: String,
    },
}

fn key_value(text: &str) -> Result<(String, String), String> {
    let (key, value) = text.split_once('=').ok_or_else(|| format!("{text:?} is not NAME=VALUE"))?;
    Ok((key.to_owned(), value.to_owned()))
}

fn strings(columns: &[&str]) -> Vec<String> {
    columns.iter().map(|c| (*c).to_owned()).collect()
}

/// `rows` under a header of `columns`.
struct Table {
    columns: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn print(&self) {
        let mut widths: Vec<usize> = self.columns.iter().map(|c| c.len()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let line = |cells: Vec<&str>| {
            let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
            println!("{}", padded.join("  ").trim_end());
        };
        line(self.columns.iter().map(String::as_str).collect());
        for row in &self.rows {
            line(row.iter().map(String::as_str).collect());
        }
    }
}

/// What a command prints: JSON as is, or its tables a blank line apart.
struct Output<T> {
    value: T,
    tables: Vec<Table>,
}

impl<T: Serialize> Output<T> {
    /// An output shown as one table.
    fn table(value: T, columns: &[&str], rows: Vec<Vec<String>>) -> Self {
        Output { value, tables: vec![Table { columns: strings(columns), rows }] }
    }

    fn print(&self, json: bool) -> Result<()> {
        if json {
            println!("{}", serde_json::to_string_pretty(&self.value)?);
            return Ok(());
        }
        for (i, table) in self.tables.iter().enumerate() {
            if i > 0 {
                println!();
            }
            table.print();
        }
        Ok(())
    }
}

/// The answer of `ferry sql`: its rows as a table, nulls as `-`; with
/// `--json`, as the node answers `POST /query`.
fn sql(answer: pb::QueryResponse) -> Result<Output<serde_json::Value>> {
    let value: serde_json::Value = serde_json::from_str(&answer.json).context("the answer is not JSON")?;
    let rows = value["rows"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|row| {
                    answer
                        .columns
                        .iter()
                        .map(|column| match &row[column] {
                            serde_json::Value::Null => "-".to_owned(),
                            serde_json::Value::String(s) => s.clone(),
                            other => other.to_string(),
                        })
                        .collect()
                })
                .collect()
        })
        .unwrap_or_default();
    let columns = answer.columns.iter().map(|c| c.to_uppercase()).collect();
    Ok(Output { value, tables: vec![Table { columns, rows }] })
}

/// The tables of `ferry cluster status`: nodes, groups and consumer lag.
fn cluster_status(status: pb::ClusterStatus) -> Output<pb::ClusterStatus> {
    let optional = |value: Option<u64>| value.map_or_else(|| "-".to_owned(), |v| v.to_string());
    let ids = |ids: &[u64]| {
        let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
        if ids.is_empty() {
            "-".to_owned()
        } else {
            ids.join(",")
        }
    };
    let nodes = Table {
        columns: strings(&["NODE", "NAME", "ADDRESS", "ANSWERED"]),
        rows: status
            .nodes
            .iter()
            .map(|n| {
                let answered = if n.id == status.node_id { "yes" } else { "" };
                vec![n.id.to_string(), n.name.clone(), n.address.clone(), answered.to_owned()]
            })
            .collect(),
    };
    let groups = Table {
        columns: strings(&[
            "GROUP",
            "PARTITION",
            "LEADER",
            "ROLE",
            "TERM",
            "LAST-LOG",
            "COMMITTED",
            "APPLIED",
            "VOTERS",
            "LEARNERS",
        ]),
        rows: status
            .groups
            .iter()
            .map(|g| {
                vec![
                    g.group.to_string(),
                    g.partition.map_or_else(|| "metadata".to_owned(), |p| p.to_string()),
                    optional(g.leader),
                    g.role.clone(),
                    g.term.to_string(),
                    optional(g.last_log_index),
                    optional(g.committed_index),
                    optional(g.last_applied_index),
                    ids(&g.voters),
                    ids(&g.learners),
                ]
            })
            .collect(),
    };
    let lag = Table {
        columns: strings(&["SUBSCRIPTION", "TOPIC", "PARTITION", "LAG"]),
        rows: status
            .consumer_lag
            .iter()
            .map(|l| vec![l.subscription_id.clone(), l.topic.clone(), l.partition.to_string(), l.lag.to_string()])
            .collect(),
    };
    let consumers = Table {
        columns: strings(&["SUBSCRIPTION", "CONSUMER", "DETAIL"]),
        rows: status
            .consumers
            .iter()
            .map(|c| vec![c.subscription_id.clone(), c.state.clone(), c.detail.clone()])
            .collect(),
    };
    let mut tables = vec![nodes, groups, lag, consumers];
    if status.groups.iter().any(|g| g.state.is_some()) {
        tables.push(Table {
            columns: strings(&["GROUP", "APPLIED", "STATE-DIGEST"]),
            rows: status
                .groups
                .iter()
                .filter_map(|g| {
                    let state = g.state.as_ref()?;
                    Some(vec![g.group.to_string(), optional(state.applied_index), state.digest.clone()])
                })
                .collect(),
        });
    }
    Output { value: status, tables }
}

/// A one-row table of `(field, value)` pairs, for `describe`.
fn fields<T: Serialize>(value: T) -> Result<Output<T>> {
    let json = serde_json::to_value(&value)?;
    let rows = json
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| vec![k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_owned)])
        .collect();
    Ok(Output::table(value, &["FIELD", "VALUE"], rows))
}

fn done(what: String) -> Output<serde_json::Value> {
    Output::table(serde_json::json!({ "done": what }), &["DONE"], vec![vec![what]])
}

async fn run(cli: Cli) -> Result<()> {
    let channel = Channel::from_shared(cli.address.clone())
        .with_context(|| format!("invalid address {}", cli.address))?
        .connect()
        .await
        .with_context(|| format!("cannot reach a Ferry node at {}", cli.address))?;
    let mut admin = AdminServiceClient::new(channel);
    let json = cli.json;
    match cli.command {
        Command::Deployments(command) => match command {
            Deployments::Register { uri, http1, headers } => {
                let request = pb::RegisterDeploymentRequest {
                    uri,
                    additional_headers: headers.into_iter().collect::<HashMap<_, _>>(),
                    use_http_11: http1,
                    force: None,
                    dry_run: false,
                };
                let registered = admin.register_deployment(request).await?.into_inner();
                let rows = registered.services.iter().map(|s| vec![registered.id.clone(), s.name.clone()]).collect();
                Output::table(registered, &["DEPLOYMENT", "SERVICE"], rows).print(json)
            }
            Deployments::List => {
                let list = admin.list_deployments(pb::ListDeploymentsRequest {}).await?.into_inner();
                let rows = list
                    .deployments
                    .iter()
                    .map(|d| {
                        let services: Vec<&str> = d.services.iter().map(|s| s.name.as_str()).collect();
                        vec![d.id.clone(), d.uri.clone(), d.protocol_type.clone(), services.join(",")]
                    })
                    .collect();
                Output::table(list, &["ID", "URI", "PROTOCOL", "SERVICES"], rows).print(json)
            }
            Deployments::Describe { id } => {
                fields(admin.get_deployment(pb::GetDeploymentRequest { id }).await?.into_inner())?.print(json)
            }
            Deployments::Remove { id } => {
                admin.remove_deployment(pb::RemoveDeploymentRequest { id: id.clone() }).await?;
                done(format!("removed deployment {id}")).print(json)
            }
        },
        Command::Services(command) => match command {
            Services::List => {
                let list = admin.list_services(pb::ListServicesRequest {}).await?.into_inner();
                let rows = list
                    .services
                    .iter()
                    .map(|s| {
                        let handlers: Vec<&str> = s.handlers.iter().map(|h| h.name.as_str()).collect();
                        vec![s.name.clone(), s.ty.clone(), s.revision.to_string(), handlers.join(",")]
                    })
                    .collect();
                Output::table(list, &["NAME", "TYPE", "REVISION", "HANDLERS"], rows).print(json)
            }
            Services::Describe { name } => {
                fields(admin.get_service(pb::GetServiceRequest { name }).await?.into_inner())?.print(json)
            }
            Services::Configure {
                name,
                public,
                journal_retention,
                idempotency_retention,
                workflow_completion_retention,
                inactivity_timeout,
                abort_timeout,
            } => {
                let request = pb::ModifyServiceRequest {
                    name,
                    public,
                    journal_retention,
                    idempotency_retention,
                    workflow_completion_retention,
                    inactivity_timeout,
                    abort_timeout,
                };
                fields(admin.modify_service(request).await?.into_inner())?.print(json)
            }
        },
        Command::Subscriptions(command) => match command {
            Subscriptions::Create {
                source,
                sink,
                options,
                start,
                start_timestamp,
                start_offsets,
                dead_letter_topic,
                dead_letter_cluster,
            } => {
                let mut options: std::collections::HashMap<String, String> = options.into_iter().collect();
                let ferry_options = [
                    ("ferry.start.position", start),
                    ("ferry.start.timestamp", start_timestamp),
                    ("ferry.start.offsets", start_offsets),
                    ("ferry.dead-letter.topic", dead_letter_topic),
                    ("ferry.dead-letter.cluster", dead_letter_cluster),
                ];
                for (key, value) in ferry_options {
                    if let Some(value) = value {
                        options.insert(key.to_owned(), value);
                    }
                }
                let request = pb::CreateSubscriptionRequest { source, sink, options };
                fields(admin.create_subscription(request).await?.into_inner())?.print(json)
            }
            Subscriptions::List => {
                let request = pb::ListSubscriptionsRequest::default();
                let list = admin.list_subscriptions(request).await?.into_inner();
                let rows = list
                    .subscriptions
                    .iter()
                    .map(|s| {
                        let state = match (s.draining, s.paused) {
                            (true, _) => "draining",
                            (false, true) => "paused",
                            (false, false) => "active",
                        };
                        vec![s.id.clone(), s.source.clone(), s.sink.clone(), state.to_owned()]
                    })
                    .collect();
                Output::table(list, &["ID", "SOURCE", "SINK", "STATE"], rows).print(json)
            }
            Subscriptions::Pause { id } => {
                fields(admin.pause_subscription(pb::PauseSubscriptionRequest { id }).await?.into_inner())?.print(json)
            }
            Subscriptions::Resume { id } => {
                fields(admin.resume_subscription(pb::ResumeSubscriptionRequest { id }).await?.into_inner())?.print(json)
            }
            Subscriptions::Describe { id } => {
                fields(admin.get_subscription(pb::GetSubscriptionRequest { id }).await?.into_inner())?.print(json)
            }
            Subscriptions::Delete { id, no_drain } => {
                admin
                    .delete_subscription(pb::DeleteSubscriptionRequest { id: id.clone(), skip_drain: no_drain })
                    .await?;
                let what = match no_drain {
                    true => format!("deleted subscription {id}; its open invocations are being killed"),
                    false => format!("subscription {id} stopped; it goes once its invocations have completed"),
                };
                done(what).print(json)
            }
        },
        Command::KafkaClusters(command) => match command {
            KafkaClusters::List => {
                let list = admin.list_kafka_clusters(pb::ListKafkaClustersRequest {}).await?.into_inner();
                let rows = list
                    .clusters
                    .iter()
                    .map(|c| {
                        let from = if c.configured { "config file" } else { "admin API" };
                        vec![c.name.clone(), c.brokers.join(","), from.to_owned(), c.created_at.clone()]
                    })
                    .collect();
                Output::table(list, &["NAME", "BROKERS", "FROM", "CREATED"], rows).print(json)
            }
            KafkaClusters::Describe { name } => {
                fields(admin.get_kafka_cluster(pb::GetKafkaClusterRequest { name }).await?.into_inner())?.print(json)
            }
            KafkaClusters::Create { name, properties } => {
                let request = pb::CreateKafkaClusterRequest { name, properties: properties.into_iter().collect() };
                fields(admin.create_kafka_cluster(request).await?.into_inner())?.print(json)
            }
            KafkaClusters::Update { name, properties } => {
                let request = pb::UpdateKafkaClusterRequest { name, properties: properties.into_iter().collect() };
                fields(admin.update_kafka_cluster(request).await?.into_inner())?.print(json)
            }
            KafkaClusters::Delete { name, force } => {
                admin.delete_kafka_cluster(pb::DeleteKafkaClusterRequest { name: name.clone(), force }).await?;
                done(format!("deleted Kafka cluster {name}")).print(json)
            }
        },
        Command::Invocations(command) => match command {
            Invocations::List { status, target, subscription, limit } => {
                let request =
                    pb::ListInvocationsRequest { status, target, subscription, limit, page_token: String::new() };
                let list = admin.list_invocations(request).await?.into_inner();
                let rows = list
                    .invocations
                    .iter()
                    .map(|i| {
                        let until = if i.retained_until.is_empty() { "-" } else { &i.retained_until };
                        vec![i.id.clone(), i.target.clone(), i.status.clone(), i.attempts.to_string(), until.to_owned()]
                    })
                    .collect();
                Output::table(list, &["ID", "TARGET", "STATUS", "ATTEMPTS", "RETAINED UNTIL"], rows).print(json)
            }
            Invocations::Describe { id } => {
                fields(admin.get_invocation(pb::GetInvocationRequest { id }).await?.into_inner())?.print(json)
            }
            Invocations::Cancel { id } => {
                let response = admin.cancel_invocation(pb::InvocationActionRequest { id: id.clone() }).await?;
                let what = if response.into_inner().accepted { "cancellation sent to" } else { "cancelled" };
                done(format!("{what} invocation {id}")).print(json)
            }
            Invocations::Kill { id } => {
                admin.kill_invocation(pb::InvocationActionRequest { id: id.clone() }).await?;
                done(format!("killed invocation {id}")).print(json)
            }
            Invocations::Purge { id } => {
                admin.purge_invocation(pb::InvocationActionRequest { id: id.clone() }).await?;
                done(format!("purged invocation {id}")).print(json)
            }
            Invocations::PurgeJournal { id } => {
                admin.purge_invocation_journal(pb::InvocationActionRequest { id: id.clone() }).await?;
                done(format!("purged the journal of invocation {id}")).print(json)
            }
            Invocations::Resume { id } => {
                admin.resume_invocation(pb::InvocationActionRequest { id: id.clone() }).await?;
                done(format!("resumed invocation {id}")).print(json)
            }
            Invocations::Pause { id } => {
                let response = admin.pause_invocation(pb::InvocationActionRequest { id: id.clone() }).await?;
                let what = if response.into_inner().accepted { "paused" } else { "already paused:" };
                done(format!("{what} invocation {id}")).print(json)
            }
            Invocations::RestartAsNew { id } => {
                let request = pb::InvocationActionRequest { id: id.clone() };
                let new_id = admin.restart_invocation_as_new(request).await?.into_inner().new_invocation_id;
                let value = serde_json::json!({ "invocation_id": id, "new_invocation_id": new_id });
                Output::table(value, &["INVOCATION", "NEW INVOCATION"], vec![vec![id, new_id]]).print(json)
            }
        },
        Command::Sql { query } => sql(admin.query(pb::QueryRequest { query }).await?.into_inner())?.print(json),
        Command::Cluster(Cluster::Status { digests }) => {
            let request = pb::GetClusterStatusRequest { state_digests: digests };
            cluster_status(admin.get_cluster_status(request).await?.into_inner()).print(json)
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let message = match e.downcast_ref::<tonic::Status>() {
                Some(status) => format!("{:?}: {}", status.code(), status.message()),
                None => format!("{e:#}"),
            };
            eprintln!("ferry: {message}");
            ExitCode::FAILURE
        }
    }
}
