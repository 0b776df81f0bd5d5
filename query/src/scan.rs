//! A [`PartitionTable`] as a DataFusion table: one stream per partition the
//! query's filters leave, each reading its partition a chunk at a time on
//! the blocking pool.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::common::ScalarValue;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{BinaryExpr, Expr, Operator, TableProviderFilterPushDown};
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::{PartitionStream, StreamingTableExec};
use datafusion::physical_plan::ExecutionPlan;
use ferry_partition::partitioner::partition_of;
use ferry_partition::{Log, LogReads, PartitionId};

use crate::rows::{self, Rows};
use crate::tables::{PartitionTable, Scope, ScopeColumns};

/// Rows a scan reads from a partition in one go.
const CHUNK_ROWS: usize = 4096;

pub struct ScanTable {
    table: Arc<dyn PartitionTable>,
    schema: SchemaRef,
    log: Log,
    partitions: u32,
}

impl fmt::Debug for ScanTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScanTable").field("table", &self.table.name()).finish()
    }
}

impl ScanTable {
    pub fn new(table: Arc<dyn PartitionTable>, log: Log, partitions: u32) -> ScanTable {
        ScanTable { schema: rows::schema(table.columns()), table, log, partitions }
    }
}

#[async_trait]
impl TableProvider for ScanTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    /// Every filter may narrow the scan ([`scope`]); DataFusion applies them
    /// all to what the scan returns.
    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let scope = Arc::new(scope(filters, self.table.scope_columns()));
        let partitions: BTreeSet<PartitionId> = match scope.keys() {
            Some(keys) => keys.into_iter().map(|k| partition_of(k, self.partitions)).collect(),
            None => (0..self.partitions).collect(),
        };
        if partitions.is_empty() {
            let schema = match projection {
                Some(p) => Arc::new(self.schema.project(p)?),
                None => self.schema.clone(),
            };
            return Ok(Arc::new(EmptyExec::new(schema)));
        }
        let streams = partitions
            .into_iter()
            .map(|partition| {
                Arc::new(PartitionScan {
                    table: self.table.clone(),
                    schema: self.schema.clone(),
                    log: self.log.clone(),
                    partition,
                    scope: scope.clone(),
                }) as Arc<dyn PartitionStream>
            })
            .collect();
        Ok(Arc::new(StreamingTableExec::try_new(self.schema.clone(), streams, projection, [], false, limit)?))
    }
}

struct PartitionScan {
    table: Arc<dyn PartitionTable>,
    schema: SchemaRef,
    log: Log,
    partition: PartitionId,
    scope: Arc<Scope>,
}

impl fmt::Debug for PartitionScan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PartitionScan").field("table", &self.table.name()).field("partition", &self.partition).finish()
    }
}

impl PartitionStream for PartitionScan {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _context: Arc<TaskContext>) -> SendableRecordBatchStream {
        let (table, log, partition, scope) = (self.table.clone(), self.log.clone(), self.partition, self.scope.clone());
        // The state is `Some(cursor)` while there is more to read.
        let batches = futures::stream::try_unfold(Some(None), move |state: Option<Option<Vec<u8>>>| {
            let (table, log, scope) = (table.clone(), log.clone(), scope.clone());
            async move {
                let Some(cursor) = state else { return Ok(None) };
                let (batch, next) = tokio::task::spawn_blocking(move || {
                    read_chunk(&*table, &log, partition, &scope, cursor.as_deref())
                })
                .await
                .map_err(|e| DataFusionError::External(Box::new(e)))??;
                Ok(Some((batch, next.map(Some))))
            }
        });
        Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), batches))
    }
}

fn read_chunk(
    table: &dyn PartitionTable,
    log: &Log,
    partition: PartitionId,
    scope: &Scope,
    cursor: Option<&[u8]>,
) -> Result<(RecordBatch, Option<Vec<u8>>)> {
    let mut rows = Rows::new(table.columns());
    let next = log
        .read_partition(partition, |view| table.read(view, scope, cursor, CHUNK_ROWS, &mut rows))
        .map_err(|e| DataFusionError::External(Box::new(e)))?;
    Ok((rows.take(), next))
}

/// What `filters` (conjuncts of the query's WHERE) narrow a scan to:
/// equalities and IN lists of literals on the table's [`ScopeColumns`] and
/// on `partition_key`.
pub fn scope(filters: &[Expr], columns: ScopeColumns) -> Scope {
    let mut scope = Scope::default();
    let (mut services, mut keys) = (None, None);
    for (column, values) in filters.iter().flat_map(equalities) {
        let strings = || values.iter().filter_map(string_of).collect::<BTreeSet<String>>();
        if Some(column.as_str()) == columns.id {
            narrow(&mut scope.ids, strings());
        } else if Some(column.as_str()) == columns.service {
            narrow(&mut services, strings());
        } else if Some(column.as_str()) == columns.key {
            narrow(&mut keys, strings());
        } else if column == "partition_key" {
            narrow(&mut scope.partition_keys, values.iter().filter_map(u64_of).collect());
        }
    }
    if let (Some(services), Some(keys)) = (services, keys) {
        if let (Some(service), Some(key), 1, 1) = (services.first(), keys.first(), services.len(), keys.len()) {
            scope.object = Some((service.clone(), key.clone()));
        }
    }
    scope
}

fn narrow<T: Ord + Clone>(set: &mut Option<BTreeSet<T>>, these: BTreeSet<T>) {
    *set = Some(match set.take() {
        Some(set) => set.intersection(&these).cloned().collect(),
        None => these,
    });
}

/// `column = literal`, `literal = column` and `column IN (literals)`, within
/// conjunctions: the column and the values it must have.
fn equalities(expr: &Expr) -> Vec<(String, Vec<ScalarValue>)> {
    match expr {
        Expr::BinaryExpr(BinaryExpr { left, op: Operator::And, right }) => {
            let mut found = equalities(left);
            found.extend(equalities(right));
            found
        }
        Expr::BinaryExpr(BinaryExpr { left, op: Operator::Eq, right }) => {
            match (column_of(left), literal_of(right), column_of(right), literal_of(left)) {
                (Some(column), Some(value), _, _) | (_, _, Some(column), Some(value)) => vec![(column, vec![value])],
                _ => Vec::new(),
            }
        }
        Expr::InList(list) if !list.negated => {
            let (Some(column), Some(values)) =
                (column_of(&list.expr), list.list.iter().map(literal_of).collect::<Option<Vec<_>>>())
            else {
                return Vec::new();
            };
            vec![(column, values)]
        }
        _ => Vec::new(),
    }
}

fn column_of(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Column(column) => Some(column.name.clone()),
        Expr::Cast(cast) => column_of(&cast.expr),
        _ => None,
    }
}

fn literal_of(expr: &Expr) -> Option<ScalarValue> {
    match expr {
        Expr::Literal(value, _) => Some(value.clone()),
        Expr::Cast(cast) => literal_of(&cast.expr),
        _ => None,
    }
}

fn string_of(value: &ScalarValue) -> Option<String> {
    match value {
        ScalarValue::Utf8(Some(s)) | ScalarValue::LargeUtf8(Some(s)) | ScalarValue::Utf8View(Some(s)) => {
            Some(s.clone())
        }
        _ => None,
    }
}

fn u64_of(value: &ScalarValue) -> Option<u64> {
    match value {
        ScalarValue::UInt64(Some(n)) => Some(*n),
        ScalarValue::Int64(Some(n)) => u64::try_from(*n).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use datafusion::prelude::{col, lit};
    use ferry_partition::partitioner::key_hash;
    use ferry_partition::store::key;

    use super::*;

    const INVOCATIONS: ScopeColumns =
        ScopeColumns { id: Some("id"), service: Some("target_service_name"), key: Some("target_service_key") };

    #[test]
    fn an_id_or_an_object_key_narrows_a_scan_to_its_partition() {
        let (a, b) = (key::id(7, 1), key::id(9, 2));
        let by_id = scope(&[col("id").eq(lit(a.clone()))], INVOCATIONS);
        assert_eq!(by_id.ids, Some(BTreeSet::from([a.clone()])));
        assert_eq!(by_id.keys(), Some(BTreeSet::from([7])));

        let listed = scope(&[col("id").in_list(vec![lit(a.clone()), lit(b.clone())], false)], INVOCATIONS);
        assert_eq!(listed.keys(), Some(BTreeSet::from([7, 9])));
        // Both filters hold: only what both allow.
        let both =
            scope(&[col("id").in_list(vec![lit(a.clone()), lit(b)], false), lit(a.clone()).eq(col("id"))], INVOCATIONS);
        assert_eq!(both.ids, Some(BTreeSet::from([a])));

        let object = scope(
            &[col("target_service_name").eq(lit("Counter")).and(col("target_service_key").eq(lit("k")))],
            INVOCATIONS,
        );
        assert_eq!(object.object, Some(("Counter".to_owned(), "k".to_owned())));
        assert_eq!(object.keys(), Some(BTreeSet::from([key_hash("Counter", "k")])));

        let partition = scope(&[col("partition_key").eq(lit(5u64))], INVOCATIONS);
        assert_eq!(partition.keys(), Some(BTreeSet::from([5])));
    }

    #[test]
    fn other_filters_leave_the_scan_whole() {
        for filter in [
            col("status").eq(lit("completed")),
            col("id").not_eq(lit("x")),
            col("id").in_list(vec![lit("a")], true),
            col("id").eq(lit("a")).or(col("id").eq(lit("b"))),
            col("target_service_name").eq(lit("Counter")),
        ] {
            let scope = scope(std::slice::from_ref(&filter), INVOCATIONS);
            assert_eq!(scope.keys(), None, "{filter}");
            assert_eq!(scope.object, None, "{filter}");
        }
        // An id of another form names no partition: every one is read.
        assert_eq!(scope(&[col("id").eq(lit("inv_other"))], INVOCATIONS).keys(), None);
    }
}
