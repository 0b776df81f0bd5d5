//! Columns of a table and the batches its rows are appended to.

use std::sync::Arc;

use arrow::array::{
    ArrayBuilder, ArrayRef, BooleanBuilder, DurationMillisecondBuilder, LargeBinaryBuilder, LargeStringBuilder,
    ListBuilder, TimestampMillisecondBuilder, UInt32Builder, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;

/// The types a column of an introspection table has, as Restate's tables have them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    Str,
    U64,
    U32,
    Bool,
    /// Milliseconds since the epoch, in UTC.
    Time,
    /// Milliseconds.
    Duration,
    Bytes,
    StrList,
}

const UTC: &str = "+00:00";

impl Ty {
    fn data_type(self) -> DataType {
        match self {
            Ty::Str => DataType::LargeUtf8,
            Ty::U64 => DataType::UInt64,
            Ty::U32 => DataType::UInt32,
            Ty::Bool => DataType::Boolean,
            Ty::Time => DataType::Timestamp(TimeUnit::Millisecond, Some(UTC.into())),
            Ty::Duration => DataType::Duration(TimeUnit::Millisecond),
            Ty::Bytes => DataType::LargeBinary,
            Ty::StrList => DataType::List(Arc::new(Field::new("item", DataType::LargeUtf8, true))),
        }
    }
}

/// The schema of a table with these columns, every one nullable.
pub fn schema(columns: &[(&str, Ty)]) -> SchemaRef {
    Arc::new(Schema::new(columns.iter().map(|(name, ty)| Field::new(*name, ty.data_type(), true)).collect::<Vec<_>>()))
}

enum Column {
    Str(LargeStringBuilder),
    U64(UInt64Builder),
    U32(UInt32Builder),
    Bool(BooleanBuilder),
    Time(TimestampMillisecondBuilder),
    Duration(DurationMillisecondBuilder),
    Bytes(LargeBinaryBuilder),
    StrList(ListBuilder<LargeStringBuilder>),
}

impl Column {
    fn new(ty: Ty) -> Column {
        match ty {
            Ty::Str => Column::Str(LargeStringBuilder::new()),
            Ty::U64 => Column::U64(UInt64Builder::new()),
            Ty::U32 => Column::U32(UInt32Builder::new()),
            Ty::Bool => Column::Bool(BooleanBuilder::new()),
            Ty::Time => Column::Time(TimestampMillisecondBuilder::new().with_timezone(UTC)),
            Ty::Duration => Column::Duration(DurationMillisecondBuilder::new()),
            Ty::Bytes => Column::Bytes(LargeBinaryBuilder::new()),
            Ty::StrList => Column::StrList(ListBuilder::new(LargeStringBuilder::new())),
        }
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            Column::Str(b) => Arc::new(b.finish()),
            Column::U64(b) => Arc::new(b.finish()),
            Column::U32(b) => Arc::new(b.finish()),
            Column::Bool(b) => Arc::new(b.finish()),
            Column::Time(b) => Arc::new(b.finish()),
            Column::Duration(b) => Arc::new(b.finish()),
            Column::Bytes(b) => Arc::new(b.finish()),
            Column::StrList(b) => Arc::new(b.finish()),
        }
    }

    fn len(&self) -> usize {
        match self {
            Column::Str(b) => b.len(),
            Column::U64(b) => b.len(),
            Column::U32(b) => b.len(),
            Column::Bool(b) => b.len(),
            Column::Time(b) => b.len(),
            Column::Duration(b) => b.len(),
            Column::Bytes(b) => b.len(),
            Column::StrList(b) => b.len(),
        }
    }
}

/// Rows being appended to a batch: each row sets every column, in schema
/// order, with the setter of the column's type.
pub struct Rows {
    schema: SchemaRef,
    columns: Vec<Column>,
    /// The column the next value goes to.
    next: usize,
}

macro_rules! setter {
    ($name:ident, $variant:ident, $value:ty) => {
        pub fn $name(&mut self, value: Option<$value>) -> &mut Self {
            match &mut self.columns[self.next] {
                Column::$variant(b) => b.append_option(value),
                _ => self.mismatch(stringify!($variant)),
            }
            self.next += 1;
            self
        }
    };
}

impl Rows {
    pub fn new(columns: &[(&str, Ty)]) -> Rows {
        Rows { schema: schema(columns), columns: columns.iter().map(|(_, ty)| Column::new(*ty)).collect(), next: 0 }
    }

    setter!(str, Str, &str);
    setter!(u64, U64, u64);
    setter!(u32, U32, u32);
    setter!(bool, Bool, bool);
    setter!(bytes, Bytes, &[u8]);

    /// Milliseconds since the epoch.
    pub fn time(&mut self, ms: Option<u64>) -> &mut Self {
        match &mut self.columns[self.next] {
            Column::Time(b) => b.append_option(ms.map(|ms| ms as i64)),
            _ => self.mismatch("Time"),
        }
        self.next += 1;
        self
    }

    pub fn duration(&mut self, ms: Option<u64>) -> &mut Self {
        match &mut self.columns[self.next] {
            Column::Duration(b) => b.append_option(ms.map(|ms| ms as i64)),
            _ => self.mismatch("Duration"),
        }
        self.next += 1;
        self
    }

    pub fn str_list<'a>(&mut self, values: impl IntoIterator<Item = &'a str>) -> &mut Self {
        match &mut self.columns[self.next] {
            Column::StrList(b) => {
                for value in values {
                    b.values().append_value(value);
                }
                b.append(true);
            }
            _ => self.mismatch("StrList"),
        }
        self.next += 1;
        self
    }

    /// Ends a row; every column must have been set.
    pub fn end(&mut self) {
        assert_eq!(self.next, self.columns.len(), "a row of {:?} set only {} columns", self.schema, self.next);
        self.next = 0;
    }

    #[track_caller]
    fn mismatch(&self, setter: &str) -> ! {
        panic!("column {} of {:?} is not set with {setter}", self.schema.field(self.next).name(), self.schema)
    }

    /// Rows appended since the last [`Rows::take`].
    pub fn len(&self) -> usize {
        self.columns.first().map_or(0, Column::len)
    }

    /// The rows appended so far, as a batch; starts a new one.
    pub fn take(&mut self) -> RecordBatch {
        assert_eq!(self.next, 0, "a row was left unfinished");
        let columns = self.columns.iter_mut().map(Column::finish).collect();
        RecordBatch::try_new(self.schema.clone(), columns).expect("columns are built from the schema")
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_fill_every_column_in_order() {
        let mut rows = Rows::new(&[("name", Ty::Str), ("n", Ty::U64), ("at", Ty::Time), ("tags", Ty::StrList)]);
        rows.str(Some("a")).u64(Some(1)).time(Some(1_000)).str_list(["x", "y"]).end();
        rows.str(None).u64(None).time(None).str_list([]).end();
        assert_eq!(rows.len(), 2);
        let batch = rows.take();
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(batch.num_columns(), 4);
        assert_eq!(batch.column(1).null_count(), 1);
        assert_eq!(rows.len(), 0);
    }

    #[test]
    #[should_panic(expected = "is not set with U64")]
    fn a_value_of_the_wrong_type_is_a_bug() {
        Rows::new(&[("name", Ty::Str)]).u64(Some(1));
    }
}
