//! The real `restate-server`, as a baseline for Ferry's benchmarks: one node
//! on loopback ports with its own temporary base directory, whose one Kafka
//! cluster, `my-cluster`, is a given broker. `scripts/restate.sh install
//! server` puts the binary where [`RestateServer::binary`] looks for it.
//!
//! The process is killed, and its directory removed, when the handle is
//! dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::free_port;

/// Environment variable naming the binary, instead of the one the install
/// script puts under `target/restate-server`.
pub const BINARY_ENV: &str = "FERRY_RESTATE_SERVER";

/// One single-node Restate cluster.
pub struct RestateServer {
    child: Child,
    dir: tempfile::TempDir,
    pub admin_port: u16,
    pub ingress_port: u16,
    /// The node-to-node (fabric) port, which also serves `/metrics`.
    pub node_port: u16,
    pub partitions: u16,
    pub http: reqwest::Client,
}

impl RestateServer {
    /// The `restate-server` binary: `$FERRY_RESTATE_SERVER`, or the one
    /// `scripts/restate.sh install server` puts under `target/`.
    pub fn binary() -> Result<PathBuf> {
        if let Some(path) = std::env::var_os(BINARY_ENV) {
            return Ok(path.into());
        }
        installed("server")
    }

    /// Starts a node with `partitions` partitions whose Kafka cluster
    /// `my-cluster` is at `bootstrap` (`host:port`), and waits until every
    /// partition has a leader.
    pub async fn start(bootstrap: &str, partitions: u16) -> Result<RestateServer> {
        let dir = tempfile::Builder::new().prefix("restate-").tempdir()?;
        let (admin_port, ingress_port, node_port) = (free_port(), free_port(), free_port());
        let config = dir.path().join("restate.toml");
        std::fs::write(&config, config_toml(dir.path(), bootstrap, partitions, admin_port, ingress_port, node_port))?;
        let log = std::fs::File::create(dir.path().join("restate.log"))?;
        let mut command = Command::new(Self::binary()?);
        // Only the configuration file reaches the server: it reads overrides
        // from RESTATE_* variables and its log filter from RUST_LOG.
        for (key, _) in std::env::vars_os().filter(|(k, _)| k.to_string_lossy().starts_with("RESTATE_")) {
            command.env_remove(key);
        }
        let child = command
            .env_remove("RUST_LOG")
            .arg("--config-file")
            .arg(&config)
            .arg("--no-logo")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start restate-server")?;
        let mut server = RestateServer {
            child,
            dir,
            admin_port,
            ingress_port,
            node_port,
            partitions,
            http: reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?,
        };
        server.wait_ready(Duration::from_secs(60)).await?;
        Ok(server)
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("restate-server exited with {status}; log:\n{}", self.log_tail());
            }
            if self.ready().await {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("restate-server not ready after {timeout:?}; log:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn ready(&self) -> bool {
        let healthy =
            |url: String| async move { self.http.get(url).send().await.is_ok_and(|r| r.status().is_success()) };
        healthy(self.admin_url("/health")).await
            && healthy(self.ingress_url("/restate/health")).await
            && self.metric("restate_num_active_partition_leaders", &[]).await.ok() == Some(f64::from(self.partitions))
    }

    /// The base directory, which holds `restate.toml` and `restate.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's stdout and stderr.
    pub fn log_path(&self) -> PathBuf {
        self.dir().join("restate.log")
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    pub fn ingress_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.ingress_port)
    }

    /// The server's version, from the admin API's `/version`.
    pub async fn version(&self) -> Result<String> {
        let body: Value = self.http.get(self.admin_url("/version")).send().await?.error_for_status()?.json().await?;
        Ok(body["version"].as_str().context("version")?.to_owned())
    }

    /// POSTs `body` to the admin API and returns the JSON answer, failing on
    /// any status but `expected`.
    pub async fn admin_post(&self, path: &str, body: Value, expected: u16) -> Result<Value> {
        let response = self.http.post(self.admin_url(path)).json(&body).send().await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        if status != expected {
            bail!("POST {path}: {status} {text}");
        }
        Ok(serde_json::from_str(&text)?)
    }

    /// Registers the deployment at `uri` and returns its id.
    pub async fn register(&self, uri: &str) -> Result<String> {
        let body = self.admin_post("/deployments", json!({ "uri": uri }), 201).await?;
        Ok(body["id"].as_str().context("deployment id")?.to_owned())
    }

    /// Subscribes `sink` (e.g. `service://Counter/add`) to `topic` of
    /// `my-cluster` from its earliest offset, and returns the subscription id.
    /// The topic must exist: a consumer of a missing topic fails and retries.
    pub async fn subscribe(&self, topic: &str, sink: &str) -> Result<String> {
        let body = json!({
            "source": format!("kafka://my-cluster/{topic}"),
            "sink": sink,
            // tansu answers a fetch only after fetch.wait.max.ms, even when
            // records are waiting.
            "options": {"auto.offset.reset": "earliest", "fetch.wait.max.ms": "10"},
        });
        let body = self.admin_post("/subscriptions", body, 201).await?;
        Ok(body["id"].as_str().context("subscription id")?.to_owned())
    }

    /// Runs a SQL query on the admin API's `/query` and returns its rows.
    pub async fn query(&self, sql: &str) -> Result<Vec<Value>> {
        let response = self
            .http
            .post(self.admin_url("/query"))
            .header(reqwest::header::ACCEPT, "application/json")
            .json(&json!({ "query": sql }))
            .send()
            .await?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            bail!("query {sql:?}: {status} {text}");
        }
        let mut body: Value = serde_json::from_str(&text)?;
        match body["rows"].take() {
            Value::Array(rows) => Ok(rows),
            _ => bail!("query {sql:?}: no rows in {text}"),
        }
    }

    /// The sum of a Prometheus metric from `/metrics` over the label sets
    /// that contain every `name="value"` pair of `labels`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        let url = format!("http://127.0.0.1:{}/metrics", self.node_port);
        let text = self.http.get(url).send().await?.error_for_status()?.text().await?;
        let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        Ok(text
            .lines()
            .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(['{', ' '])))
            .filter(|l| {
                let label_set = l.split_once('{').and_then(|(_, rest)| rest.split_once('}')).map_or("", |(set, _)| set);
                wanted.iter().all(|w| label_set.split(',').any(|pair| pair == w))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// Invocations the invoker has seen through to their end (the handler
    /// returned), counted by `restate_invoker_invocation_tasks_total`. Each
    /// one is durably completed a log append later; [`Self::completed`]
    /// counts those.
    pub async fn invoker_completed(&self) -> Result<f64> {
        self.metric("restate_invoker_invocation_tasks_total", &[("status", "completed")]).await
    }

    /// The durably completed invocations of a subscription, from
    /// `sys_invocation`.
    pub async fn completed(&self, subscription: &str) -> Result<Completed> {
        let rows = self
            .query(&format!(
                "SELECT count(*) AS n, CAST(min(created_at) AS BIGINT) AS first_created_ms, \
                 CAST(max(completed_at) AS BIGINT) AS last_completed_ms FROM sys_invocation \
                 WHERE invoked_by_subscription_id = '{subscription}' AND status = 'completed'"
            ))
            .await?;
        let row = rows.first().context("no row from count(*)")?;
        Ok(Completed {
            count: row["n"].as_u64().context("count")?,
            first_created_ms: row["first_created_ms"].as_i64(),
            last_completed_ms: row["last_completed_ms"].as_i64(),
        })
    }

    /// SIGTERM, then waits for a clean exit.
    pub async fn terminate(mut self) -> Result<std::process::ExitStatus> {
        tokio::process::Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("restate-server did not exit within 30 s of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for RestateServer {
    fn drop(&mut self) {
        // Reaped before the base directory goes, so nothing writes into it
        // while it is removed.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Durably completed invocations of one subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completed {
    pub count: u64,
    /// When the first of them was created, in milliseconds since the epoch.
    pub first_created_ms: Option<i64>,
    /// When the last of them completed, in milliseconds since the epoch.
    pub last_completed_ms: Option<i64>,
}

/// A TOML basic string: JSON's string escapes are all valid TOML escapes.
fn toml_string(s: &str) -> String {
    Value::from(s).to_string()
}

fn config_toml(
    base_dir: &Path,
    bootstrap: &str,
    partitions: u16,
    admin_port: u16,
    ingress_port: u16,
    node_port: u16,
) -> String {
    let base_dir = toml_string(&base_dir.join("data").to_string_lossy());
    let brokers = toml_string(&format!("PLAINTEXT://{bootstrap}"));
    format!(
        r#"node-name = "bench"
cluster-name = "ferry-bench"
base-dir = {base_dir}
auto-provision = true
default-num-partitions = {partitions}
disable-telemetry = true
log-disable-ansi-codes = true
# The server asks GitHub for its latest release at start-up and logs the failed
# connection as an error.
log-filter = "warn,restate=info,octocrab=off"
listen-mode = "tcp"
bind-address = "127.0.0.1:{node_port}"
advertised-address = "http://127.0.0.1:{node_port}/"

[admin]
bind-address = "127.0.0.1:{admin_port}"
advertised-address = "http://127.0.0.1:{admin_port}/"

[ingress]
bind-address = "127.0.0.1:{ingress_port}"
advertised-address = "http://127.0.0.1:{ingress_port}/"

[[ingress.kafka-clusters]]
name = "my-cluster"
brokers = [{brokers}]
"#
    )
}

/// The binary of one of Restate's programs, `server` or `cli`, where
/// `scripts/restate.sh install <program>` puts it.
pub fn installed(program: &str) -> Result<PathBuf> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "linux-x64",
        "aarch64" => "linux-arm64",
        arch => bail!("no Restate packages for {arch}"),
    };
    let (dir, package, binary) = match program {
        "server" => ("restate-server", "restate-server", "restate-server"),
        "cli" => ("restate-cli", "restate", "restate"),
        other => bail!("no Restate program {other}"),
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target")
        .join(dir)
        .join(format!("node_modules/@restatedev/{package}-{arch}/bin/{binary}"));
    if !path.exists() {
        bail!("{} is missing: run scripts/restate.sh install {program}", path.display());
    }
    Ok(path)
}
