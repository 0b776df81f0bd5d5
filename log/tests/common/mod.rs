//! Helpers of the log's integration tests.

use std::time::Duration;

use bytes::Bytes;
use ferry_partition::wire::v1::{Dedup, HandlerType, Invoke, Retention, ServiceType, Source, Target};

/// openraft's tasks release their storage handles shortly after `shutdown`
/// returns; an in-process reopen waits for sled's file lock to be free.
pub async fn when_unlocked<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    mut open: impl FnMut() -> F,
) -> Result<T, E> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match open().await {
            Err(e) if e.to_string().contains("could not acquire lock") && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => return other,
        }
    }
}

/// Invocation `i` of a Service, from producer 42 with sequence number `i`.
pub fn invoke(i: u64) -> Invoke {
    Invoke {
        id: format!("inv_{i:032x}"),
        target: Target {
            service: "S".to_owned(),
            handler: "h".to_owned(),
            key: None,
            service_ty: ServiceType::Service,
            handler_ty: HandlerType::Shared,
        },
        payload: Bytes::from(format!("payload-{i}")),
        headers: vec![],
        source: Source::Ingress,
        dedup: Some(Dedup { producer: 42, seq: i }),
        created_at_ms: 1,
        failure: None,
        not_before_ms: None,
        trace: None,
        retention: Retention::FOREVER,
        reply: None,
        idempotency_key: None,
    }
}
