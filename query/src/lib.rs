//! SQL over the cluster's state, as Restate answers it on `POST /query`:
//! its introspection tables (`sys_invocation`, `sys_journal`, `state`, ...)
//! with its column names, planned and run by Apache DataFusion.
//!
//! Every node follows every partition, so a query reads the partitions'
//! applied state on the node asked. A table is scanned a partition at a
//! time, a chunk of rows at a time ([`tables::PartitionTable::read`]); a
//! filter on an invocation id or on a Virtual Object key reads the one
//! partition it names. Each query runs under [`Limits`]: a memory pool
//! (operators that would exceed it fail the query), a row limit on the
//! answer and a time limit.

mod rows;
mod scan;
mod tables;

use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use ferry_partition::{Log, LogReads};
use futures::StreamExt;
use tokio::sync::Semaphore;

/// What one query may use.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Rows in an answer.
    pub max_rows: usize,
    /// Memory of the query's operators (sorts, joins, aggregates) and of its
    /// answer.
    pub memory_bytes: usize,
    /// Wall time, waiting for a turn included.
    pub timeout: Duration,
    /// Queries that run at once; more wait for a turn.
    pub concurrency: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_rows: 100_000, memory_bytes: 256 << 20, timeout: Duration::from_secs(30), concurrency: 2 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The query is wrong or asks for more than its limits: the engine's message.
    #[error("{0}")]
    Query(String),
    #[error("{0}")]
    Internal(String),
}

impl From<DataFusionError> for Error {
    fn from(e: DataFusionError) -> Self {
        match e.find_root() {
            DataFusionError::External(_) | DataFusionError::IoError(_) | DataFusionError::Internal(_) => {
                Error::Internal(e.to_string())
            }
            _ => Error::Query(e.to_string()),
        }
    }
}

impl From<arrow::error::ArrowError> for Error {
    fn from(e: arrow::error::ArrowError) -> Self {
        Error::Internal(e.to_string())
    }
}

/// The answer to a query.
#[derive(Debug)]
pub struct Answer {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
}

impl Answer {
    pub fn rows(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }

    /// `{"rows": [{column: value, ...}, ...]}`, nulls left out, bytes in hex.
    pub fn to_json(&self) -> Result<Vec<u8>, Error> {
        let mut out = b"{\"rows\":".to_vec();
        if self.rows() == 0 {
            out.extend_from_slice(b"[]");
        } else {
            let mut writer = arrow::json::ArrayWriter::new(&mut out);
            writer.write_batches(&self.batches.iter().collect::<Vec<_>>())?;
            writer.finish()?;
        }
        out.push(b'}');
        Ok(out)
    }

    /// An Arrow IPC stream: the schema, then the batches.
    pub fn to_arrow(&self) -> Result<Vec<u8>, Error> {
        let mut writer = arrow::ipc::writer::StreamWriter::try_new(Vec::new(), &self.schema)?;
        for batch in &self.batches {
            writer.write(batch)?;
        }
        writer.finish()?;
        Ok(writer.into_inner()?)
    }
}

/// Runs queries against a node's view of the cluster; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    log: Log,
    limits: Arc<Limits>,
    turns: Arc<Semaphore>,
}

impl Engine {
    pub fn new(log: Log, limits: Limits) -> Engine {
        let turns = Arc::new(Semaphore::new(limits.concurrency.max(1)));
        Engine { log, limits: Arc::new(limits), turns }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub async fn query(&self, sql: &str) -> Result<Answer, Error> {
        let timeout = self.limits.timeout;
        tokio::time::timeout(timeout, async {
            let _turn = self.turns.acquire().await.map_err(|e| Error::Internal(e.to_string()))?;
            self.run(sql).await
        })
        .await
        .map_err(|_| {
            Error::Query(format!("the query ran longer than its limit of {}", humantime::format_duration(timeout)))
        })?
    }

    async fn run(&self, sql: &str) -> Result<Answer, Error> {
        let context = self.session()?;
        let frame = context.sql(sql).await?;
        let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
        let mut stream = frame.execute_stream().await?;
        let (mut batches, mut rows, mut bytes) = (Vec::new(), 0, 0);
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            rows += batch.num_rows();
            bytes += batch.get_array_memory_size();
            if rows > self.limits.max_rows {
                return Err(Error::Query(format!(
                    "the answer has more than {} rows, the limit of a query; narrow it with WHERE or LIMIT",
                    self.limits.max_rows
                )));
            }
            if bytes > self.limits.memory_bytes {
                return Err(Error::Query(format!(
                    "the answer takes more than {} bytes, the memory limit of a query; narrow it with WHERE or LIMIT",
                    self.limits.memory_bytes
                )));
            }
            batches.push(batch);
        }
        Ok(Answer { schema, batches })
    }

    /// A session with every table registered, under its own memory pool.
    fn session(&self) -> Result<SessionContext, Error> {
        let config = SessionConfig::new().with_information_schema(true).with_target_partitions(2);
        // Without a disk to spill to, the memory limit holds: an operator
        // that needs more fails the query.
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(self.limits.memory_bytes, 1.0)
            .with_disk_manager_builder(DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled))
            .build_arc()?;
        let context = SessionContext::new_with_config_rt(config, runtime);
        let partitions = self.log.partitions();
        for table in tables::partition_tables() {
            let name = table.name();
            context.register_table(name, Arc::new(scan::ScanTable::new(table.into(), self.log.clone(), partitions)))?;
        }
        let (mut services, mut deployments) = self.log.read_metadata(|m| (tables::services(m), tables::deployments(m)));
        for (name, rows) in [("sys_service", &mut services), ("sys_deployment", &mut deployments)] {
            let table = MemTable::try_new(rows.schema().clone(), vec![vec![rows.take()]])?;
            context.register_table(name, Arc::new(table))?;
        }
        Ok(context)
    }
}
