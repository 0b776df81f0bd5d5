//! Configuration: built-in defaults, then a TOML file (`--config-file` or
//! `FERRY_CONFIG`), then `FERRY_` environment variables with `__` between
//! levels, then command-line flags; validated before anything starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_ingress::ClusterOptions;
use ferry_partition::wire::v1::RetentionPolicy;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// Environment variables with the `FERRY_` prefix that are not configuration
/// keys, or that are read as text whatever they look like.
const NON_CONFIG_ENV: [&str; 3] = ["config", "admin_address", "node_name"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct Config {
    /// This node's id in the cluster.
    pub node_id: u64,
    /// A name for people: shown by `ferry cluster status`, in logs and as
    /// the trace resource's `service.instance.id`. By default the name this
    /// node's `peers` entry gives, else `node-<id>`.
    pub node_name: Option<String>,
    /// Where the node keeps its data.
    pub base_dir: PathBuf,
    /// Node-to-node gRPC and `/metrics`.
    pub bind_address: SocketAddr,
    /// The address peers use to reach `bind-address`; derived from it by default.
    pub advertised_address: Option<String>,
    /// Partitions of the key space; fixed when the cluster is created.
    pub partitions: u32,
    /// Every node of the cluster (this one may be left out). Empty: a
    /// single-node cluster. The first start of the lowest-id node of each
    /// group creates it; later starts rejoin with their data.
    pub peers: Vec<Peer>,
    pub admin: AdminConfig,
    pub ingress: IngressConfig,
    pub raft: RaftConfig,
    pub log: LogConfig,
    /// OpenTelemetry trace export.
    pub tracing: ferry_telemetry::TracingOptions,
    pub invoker: ferry_invoker::Options,
    pub invocation: InvocationConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: 1,
            node_name: None,
            base_dir: PathBuf::from("ferry-data"),
            bind_address: "0.0.0.0:5122".parse().expect("valid default"),
            advertised_address: None,
            partitions: 8,
            peers: Vec::new(),
            admin: AdminConfig::default(),
            ingress: IngressConfig::default(),
            raft: RaftConfig::default(),
            log: LogConfig::default(),
            tracing: ferry_telemetry::TracingOptions::default(),
            invoker: ferry_invoker::Options::default(),
            invocation: InvocationConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct AdminConfig {
    pub bind_address: SocketAddr,
    /// What each SQL query (`POST /query`) may use.
    pub query: QueryConfig,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { bind_address: "0.0.0.0:9070".parse().expect("valid default"), query: QueryConfig::default() }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct QueryConfig {
    /// Rows in an answer; a query that returns more fails and says so.
    pub max_rows: usize,
    /// Memory of a query's sorts, joins and aggregates, and of its answer.
    pub memory_bytes: usize,
    /// Wall time of a query, waiting for its turn included.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Queries that run at once; more wait for a turn.
    pub concurrency: usize,
}

impl Default for QueryConfig {
    fn default() -> Self {
        let limits = ferry_query::Limits::default();
        QueryConfig {
            max_rows: limits.max_rows,
            memory_bytes: limits.memory_bytes,
            timeout: limits.timeout,
            concurrency: limits.concurrency,
        }
    }
}

impl QueryConfig {
    pub fn limits(&self) -> ferry_query::Limits {
        ferry_query::Limits {
            max_rows: self.max_rows,
            memory_bytes: self.memory_bytes,
            timeout: self.timeout,
            concurrency: self.concurrency,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct IngressConfig {
    /// HTTP ingress (invocations over HTTP).
    pub bind_address: SocketAddr,
    pub kafka_clusters: Vec<ClusterOptions>,
    pub kafka: ferry_ingress::Options,
}

impl Default for IngressConfig {
    fn default() -> Self {
        IngressConfig {
            bind_address: "0.0.0.0:8080".parse().expect("valid default"),
            kafka_clusters: Vec::new(),
            kafka: ferry_ingress::Options::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct InvocationConfig {
    /// How failed attempts are retried.
    pub default_retry_policy: ferry_invoker::RetryPolicy,
    /// How long a completed invocation keeps its journal, and (without an
    /// idempotency key, not a workflow's run) is kept at all.
    #[serde(with = "humantime_serde")]
    pub default_journal_retention: Duration,
    /// How long a completed invocation with an idempotency key is kept.
    #[serde(with = "humantime_serde")]
    pub default_idempotency_retention: Duration,
    /// How long a completed workflow run is kept.
    #[serde(with = "humantime_serde")]
    pub default_workflow_completion_retention: Duration,
}

impl Default for InvocationConfig {
    fn default() -> Self {
        let day = Duration::from_millis(RetentionPolicy::DEFAULT.journal_ms);
        InvocationConfig {
            default_retry_policy: ferry_invoker::RetryPolicy::default(),
            default_journal_retention: day,
            default_idempotency_retention: Duration::from_millis(RetentionPolicy::DEFAULT.idempotency_ms),
            default_workflow_completion_retention: Duration::from_millis(
                RetentionPolicy::DEFAULT.workflow_completion_ms,
            ),
        }
    }
}

impl InvocationConfig {
    /// The retention defaults, which services and handlers may override.
    pub fn retention(&self) -> RetentionPolicy {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        RetentionPolicy {
            journal_ms: ms(self.default_journal_retention),
            idempotency_ms: ms(self.default_idempotency_retention),
            workflow_completion_ms: ms(self.default_workflow_completion_retention),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct RaftConfig {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_ms_min: u64,
    pub election_timeout_ms_max: u64,
    /// Build a snapshot of a group after this many applied entries.
    pub snapshot_entries_since_last: u64,
    /// Entries kept after a snapshot for followers that lag a little.
    pub entries_kept_after_snapshot: u64,
    /// Most appends waiting for one flush to disk.
    pub flush_queue_max: usize,
    /// sled's page cache, for the Raft log.
    pub cache_bytes: u64,
    /// The page cache of the partition-state databases, shared out among
    /// the node's groups.
    pub state_cache_bytes: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        let defaults = ferry_log::Options::single_node(PathBuf::new(), 1);
        RaftConfig {
            heartbeat_interval_ms: defaults.heartbeat_interval_ms,
            election_timeout_ms_min: defaults.election_timeout_min_ms,
            election_timeout_ms_max: defaults.election_timeout_max_ms,
            snapshot_entries_since_last: defaults.snapshot_entries_since_last,
            entries_kept_after_snapshot: defaults.entries_kept_after_snapshot,
            flush_queue_max: defaults.flush_queue_max,
            cache_bytes: defaults.cache_bytes,
            state_cache_bytes: defaults.state_cache_bytes,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct LogConfig {
    /// `tracing` filter directives, e.g. `info,ferry_log=debug`.
    pub filter: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { filter: "info,openraft=warn".to_owned(), format: LogFormat::Text }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    Text,
    Json,
}

/// A node's name: the one given, or `node-<id>`.
fn name_of(id: u64, name: Option<&str>) -> String {
    name.map_or_else(|| format!("node-{id}"), str::to_owned)
}

/// Names are printed in tables and logs: visible characters, no spaces.
fn check_name(name: Option<&str>) -> Result<(), String> {
    match name {
        Some(name) if name.is_empty() || name.len() > 64 => {
            Err(format!("node-name {name:?} must have 1 to 64 characters"))
        }
        Some(name) if !name.chars().all(|c| c.is_ascii_graphic()) => {
            Err(format!("node-name {name:?} may only hold visible ASCII characters"))
        }
        _ => Ok(()),
    }
}

/// A node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Peer {
    pub node_id: u64,
    /// Its `node-name`; `node-<id>` by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Its `advertised-address`: where its node port is reached.
    pub address: String,
}

/// Values given as command-line flags; they override everything else.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub base_dir: Option<PathBuf>,
    pub node_id: Option<u64>,
    pub node_name: Option<String>,
    pub bind_address: Option<String>,
    pub advertised_address: Option<String>,
    pub admin_bind_address: Option<String>,
    pub ingress_bind_address: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("invalid configuration: {0}")]
    Parse(#[from] Box<figment::Error>),
    #[error("invalid configuration: {key}: {reason}")]
    Invalid { key: String, reason: String },
}

impl Config {
    /// Loads the configuration from every source, in order of precedence.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, Error> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(Error::MissingFile(file.to_owned()));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        figment = figment.merge(
            Env::prefixed("FERRY_")
                .ignore(&NON_CONFIG_ENV)
                .map(|key| key.as_str().replace("__", ".").replace('_', "-").into()),
        );
        // A name is text even when it looks like a number.
        if let Ok(name) = std::env::var("FERRY_NODE_NAME") {
            figment = figment.merge(Serialized::default("node-name", name));
        }
        let flags: [(&str, Option<String>); 7] = [
            ("base-dir", overrides.base_dir.as_ref().map(|p| p.display().to_string())),
            ("node-id", overrides.node_id.map(|n| n.to_string())),
            ("node-name", overrides.node_name.clone()),
            ("bind-address", overrides.bind_address.clone()),
            ("advertised-address", overrides.advertised_address.clone()),
            ("admin.bind-address", overrides.admin_bind_address.clone()),
            ("ingress.bind-address", overrides.ingress_bind_address.clone()),
        ];
        for (key, value) in flags {
            if let Some(value) = value {
                // Numbers given as flags parse like any other value; a name
                // stays a string.
                let value: figment::value::Value = match key {
                    "node-name" => value.into(),
                    _ => value.parse().unwrap_or_else(|_| value.into()),
                };
                figment = figment.merge(Serialized::default(key, value));
            }
        }
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |key: &str, reason: String| Err(Error::Invalid { key: key.to_owned(), reason });
        if self.node_id == 0 {
            return invalid("node-id", "must be positive".to_owned());
        }
        if let Err(reason) = check_name(self.node_name.as_deref()) {
            return invalid("node-name", reason);
        }
        for (i, peer) in self.peers.iter().enumerate() {
            let key = format!("peers[{i}]");
            if peer.node_id == 0 {
                return invalid(&key, "node-id must be positive".to_owned());
            }
            if self.peers[..i].iter().any(|p| p.node_id == peer.node_id) {
                return invalid(&key, format!("node-id {} is listed twice", peer.node_id));
            }
            if let Err(reason) = check_name(peer.node_name.as_deref()) {
                return invalid(&key, reason);
            }
            let name = name_of(peer.node_id, peer.node_name.as_deref());
            if self.peers[..i].iter().any(|p| name_of(p.node_id, p.node_name.as_deref()) == name) {
                return invalid(&key, format!("node-name {name:?} is listed twice"));
            }
            if peer.node_id == self.node_id
                && self.node_name.is_some()
                && peer.node_name.is_some()
                && peer.node_name != self.node_name
            {
                return invalid(&key, format!("this node's name differs from node-name {:?}", self.node_name()));
            }
            let port = peer.address.rsplit_once(':').and_then(|(host, port)| (!host.is_empty()).then_some(port));
            if port.and_then(|p| p.parse::<u16>().ok()).is_none() {
                return invalid(&key, format!("address {:?} is not host:port", peer.address));
            }
            if peer.node_id == self.node_id && self.advertised_address.as_ref().is_some_and(|a| a != &peer.address) {
                return invalid(
                    &key,
                    format!(
                        "this node's address differs from advertised-address {:?}",
                        self.advertised_address.as_deref().unwrap_or_default()
                    ),
                );
            }
        }
        if !(1..=1024).contains(&self.partitions) {
            return invalid("partitions", format!("{} is not between 1 and 1024", self.partitions));
        }
        for (i, cluster) in self.ingress.kafka_clusters.iter().enumerate() {
            if let Err(reason) = cluster.validate() {
                return invalid(&format!("ingress.kafka-clusters[{i}]"), reason);
            }
            if self.ingress.kafka_clusters[..i].iter().any(|c| c.name == cluster.name) {
                return invalid(&format!("ingress.kafka-clusters[{i}]"), format!("duplicate name {:?}", cluster.name));
            }
        }
        if let Err(reason) = self.ingress.kafka.validate() {
            return invalid("ingress.kafka", reason);
        }
        let raft = &self.raft;
        if raft.heartbeat_interval_ms == 0 || raft.election_timeout_ms_min <= raft.heartbeat_interval_ms {
            return invalid("raft.election-timeout-ms-min", "must be above raft.heartbeat-interval-ms".to_owned());
        }
        if raft.election_timeout_ms_max <= raft.election_timeout_ms_min {
            return invalid("raft.election-timeout-ms-max", "must be above raft.election-timeout-ms-min".to_owned());
        }
        if raft.flush_queue_max == 0 || raft.snapshot_entries_since_last == 0 {
            return invalid("raft", "flush-queue-max and snapshot-entries-since-last must be positive".to_owned());
        }
        if let Err(reason) = self.invocation.default_retry_policy.validate() {
            return invalid("invocation.default-retry-policy", reason);
        }
        if self.invoker.concurrency_per_partition == 0 || self.invoker.max_effects_per_entry == 0 {
            return invalid("invoker", "concurrency-per-partition and max-effects-per-entry must be positive".into());
        }
        if let Err(reason) = self.tracing.validate() {
            return invalid("tracing", reason);
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.filter) {
            return invalid("log.filter", e.to_string());
        }
        Ok(())
    }

    /// This node's name: `node-name`, else the name its `peers` entry gives,
    /// else `node-<id>`.
    pub fn node_name(&self) -> String {
        let listed = self.peers.iter().find(|p| p.node_id == self.node_id).and_then(|p| p.node_name.as_deref());
        name_of(self.node_id, self.node_name.as_deref().or(listed))
    }

    /// The name of every node of the cluster, this one included.
    pub fn node_names(&self) -> std::collections::BTreeMap<u64, String> {
        let mut names: std::collections::BTreeMap<u64, String> =
            self.peers.iter().map(|p| (p.node_id, name_of(p.node_id, p.node_name.as_deref()))).collect();
        names.insert(self.node_id, self.node_name());
        names
    }

    /// The address peers reach this node at.
    pub fn advertised_address(&self) -> String {
        match &self.advertised_address {
            Some(address) => address.clone(),
            None if self.bind_address.ip().is_unspecified() => format!("127.0.0.1:{}", self.bind_address.port()),
            None => self.bind_address.to_string(),
        }
    }

    /// The URL of this node's HTTP ingress: its bind address, with the
    /// advertised host when it binds every interface.
    pub fn ingress_endpoint(&self) -> String {
        let ingress = self.ingress.bind_address;
        if ingress.ip().is_unspecified() {
            let advertised = self.advertised_address();
            let host = advertised.rsplit_once(':').map_or(advertised.as_str(), |(host, _)| host);
            format!("http://{host}:{}/", ingress.port())
        } else {
            format!("http://{ingress}/")
        }
    }

    /// Every node of the cluster with its address, this one included.
    pub fn nodes(&self) -> ferry_log::placement::Nodes {
        let mut nodes: ferry_log::placement::Nodes =
            self.peers.iter().map(|p| (p.node_id, p.address.clone())).collect();
        nodes.entry(self.node_id).or_insert_with(|| self.advertised_address());
        nodes
    }

    pub fn log_options(&self) -> ferry_log::Options {
        let nodes = self.nodes();
        ferry_log::Options {
            node_id: self.node_id,
            advertised_address: nodes[&self.node_id].clone(),
            nodes,
            data_dir: self.base_dir.clone(),
            partitions: self.partitions,
            heartbeat_interval_ms: self.raft.heartbeat_interval_ms,
            election_timeout_min_ms: self.raft.election_timeout_ms_min,
            election_timeout_max_ms: self.raft.election_timeout_ms_max,
            snapshot_entries_since_last: self.raft.snapshot_entries_since_last,
            entries_kept_after_snapshot: self.raft.entries_kept_after_snapshot,
            flush_queue_max: self.raft.flush_queue_max,
            cache_bytes: self.raft.cache_bytes,
            state_cache_bytes: self.raft.state_cache_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clear_env() {
        for (key, _) in std::env::vars() {
            if key.starts_with("FERRY_") {
                std::env::remove_var(key);
            }
        }
    }

    fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let path = dir.path().join("ferry.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn defaults_run_a_single_node() {
        clear_env();
        let config = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.admin.bind_address.port(), 9070);
        assert_eq!(config.ingress.bind_address.port(), 8080);
        assert_eq!(config.bind_address.port(), 5122);
        assert_eq!(config.advertised_address(), "127.0.0.1:5122");
    }

    #[test]
    fn precedence_is_file_then_env_then_flags() {
        clear_env();
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            &dir,
            r#"
            base-dir = "/from/file"
            partitions = 4
            [admin]
            bind-address = "127.0.0.1:1001"
            [[ingress.kafka-clusters]]
            name = "my-cluster"
            brokers = ["PLAINTEXT://127.0.0.1:9092"]
            "sasl.username" = "me"
            "session.timeout.ms" = 6000
            "#,
        );
        std::env::set_var("FERRY_ADMIN__BIND_ADDRESS", "127.0.0.1:1002");
        std::env::set_var("FERRY_INVOCATION__DEFAULT_RETRY_POLICY__MAX_ATTEMPTS", "3");
        std::env::set_var("FERRY_INVOKER__ATTEMPT_TIMEOUT", "2s");
        std::env::set_var("FERRY_PARTITIONS", "16");
        let overrides = Overrides { admin_bind_address: Some("127.0.0.1:1003".into()), ..Default::default() };
        let config = Config::load(Some(&file), &overrides).unwrap();
        assert_eq!(config.base_dir, PathBuf::from("/from/file"));
        assert_eq!(config.partitions, 16);
        assert_eq!(config.admin.bind_address.to_string(), "127.0.0.1:1003");
        let cluster = &config.ingress.kafka_clusters[0];
        assert_eq!(cluster.name, "my-cluster");
        assert_eq!(cluster.properties["sasl.username"].to_string(), "me");
        assert_eq!(cluster.properties["session.timeout.ms"].to_string(), "6000");
        assert_eq!(config.invocation.default_retry_policy.max_attempts, Some(3));
        assert_eq!(config.invoker.attempt_timeout, std::time::Duration::from_secs(2));
        clear_env();
    }

    #[test]
    fn retention_defaults_to_a_day_as_restates_and_takes_durations() {
        clear_env();
        let day =
            RetentionPolicy { journal_ms: 86_400_000, idempotency_ms: 86_400_000, workflow_completion_ms: 86_400_000 };
        assert_eq!(Config::default().invocation.retention(), day);
        let dir = tempfile::tempdir().unwrap();
        let file = write(&dir, "[invocation]\ndefault-journal-retention = \"60s\"\n");
        std::env::set_var("FERRY_INVOCATION__DEFAULT_IDEMPOTENCY_RETENTION", "0s");
        let config = Config::load(Some(&file), &Overrides::default()).unwrap();
        let expected = RetentionPolicy { journal_ms: 60_000, idempotency_ms: 0, workflow_completion_ms: 86_400_000 };
        assert_eq!(config.invocation.retention(), expected);
        clear_env();
        let bad = write(&dir, "[invocation]\ndefault-journal-retention = \"soon\"\n");
        let err = Config::load(Some(&bad), &Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("default-journal-retention"), "{err}");
    }

    #[test]
    fn kafka_clusters_from_one_environment_variable() {
        clear_env();
        std::env::set_var("FERRY_INGRESS__KAFKA_CLUSTERS", r#"[{name="c",brokers=["PLAINTEXT://127.0.0.1:9092"]}]"#);
        std::env::set_var("FERRY_CONFIG", "ignored-here");
        std::env::set_var("FERRY_ADMIN_ADDRESS", "ignored-too");
        let config = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(config.ingress.kafka_clusters.len(), 1);
        assert_eq!(config.ingress.kafka_clusters[0].brokers, vec!["PLAINTEXT://127.0.0.1:9092".to_owned()]);
        clear_env();
    }

    #[test]
    fn errors_name_the_key() {
        clear_env();
        let dir = tempfile::tempdir().unwrap();
        let unknown = write(&dir, "[admin]\nbind-adress = \"127.0.0.1:1\"\n");
        let err = Config::load(Some(&unknown), &Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("bind-adress"), "{err}");

        let bad_broker = write(&dir, "[[ingress.kafka-clusters]]\nname = \"c\"\nbrokers = [\"PLAINTEXT://nohost\"]\n");
        let err = Config::load(Some(&bad_broker), &Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("ingress.kafka-clusters[0]") && err.contains("nohost"), "{err}");

        let bad_protocol = write(&dir, "[[ingress.kafka-clusters]]\nname = \"c\"\nbrokers = [\"HTTP://h:1\"]\n");
        let err = Config::load(Some(&bad_protocol), &Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("unknown protocol"), "{err}");

        let bad_factor = write(&dir, "[invocation.default-retry-policy]\nexponentiation-factor = 0.5\n");
        let err = Config::load(Some(&bad_factor), &Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("invocation.default-retry-policy") && err.contains("exponentiation-factor"), "{err}");

        let bad_address = write(&dir, "bind-address = \"nope\"\n");
        let err = Config::load(Some(&bad_address), &Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("bind-address") || err.contains("bind_address"), "{err}");

        std::env::set_var("FERRY_NOT_A_KEY", "1");
        let err = Config::load(None, &Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("not-a-key"), "{err}");
        clear_env();

        let err = Config::load(Some(Path::new("/no/such/ferry.toml")), &Overrides::default()).unwrap_err();
        assert!(matches!(err, Error::MissingFile(_)));
    }

    #[test]
    fn node_names_default_to_the_id_and_must_be_unique() {
        clear_env();
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            &dir,
            r#"
            node-id = 2
            peers = [
                { node-id = 1, node-name = "east", address = "a:1" },
                { node-id = 2, address = "b:1" },
                { node-id = 3, address = "c:1" },
            ]
            "#,
        );
        let config = Config::load(Some(&file), &Overrides::default()).unwrap();
        assert_eq!(config.node_name(), "node-2");
        let names: Vec<(u64, String)> = config.node_names().into_iter().collect();
        assert_eq!(names, [(1, "east".into()), (2, "node-2".into()), (3, "node-3".into())]);
        let listed = Overrides { node_id: Some(1), ..Default::default() };
        assert_eq!(Config::load(Some(&file), &listed).unwrap().node_name(), "east", "named by its peers entry");

        // A name given as a flag stays a string, even when it looks like a number.
        let overrides = Overrides { node_name: Some("42".into()), ..Default::default() };
        let err = Config::load(Some(&file), &overrides);
        assert_eq!(err.unwrap().node_name(), "42");
        std::env::set_var("FERRY_NODE_NAME", "west");
        assert_eq!(Config::load(Some(&file), &Overrides::default()).unwrap().node_names()[&2], "west");
        std::env::set_var("FERRY_NODE_NAME", "7");
        assert_eq!(Config::load(Some(&file), &Overrides::default()).unwrap().node_name(), "7");
        clear_env();

        let cases = [
            ("node-name = \"\"", "1 to 64"),
            ("node-name = \"a b\"", "visible ASCII"),
            ("peers = [{ node-id = 2, node-name = \"x\", address = \"a:1\" }, { node-id = 3, node-name = \"x\", address = \"b:1\" }]", "listed twice"),
            ("peers = [{ node-id = 2, address = \"a:1\" }, { node-id = 3, node-name = \"node-2\", address = \"b:1\" }]", "listed twice"),
            ("node-name = \"a\"\npeers = [{ node-id = 1, node-name = \"b\", address = \"a:1\" }]", "differs"),
        ];
        for (text, expected) in cases {
            let file = write(&dir, text);
            let err = Config::load(Some(&file), &Overrides::default()).unwrap_err().to_string();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }
}
