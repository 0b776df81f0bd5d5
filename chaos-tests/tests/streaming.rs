//! Attempts that stream: a deployment served over HTTP/2 in bidirectional
//! mode keeps its attempt open while each `ctx.run` result is committed and
//! answered, and while it waits for its call's result, instead of ending the
//! attempt after every step. The same handler gives the same result with
//! streaming turned off.

use anyhow::Result;
use ferry_chaos_tests::node_with_handlers;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_attempt_commits_each_step_without_a_new_request() -> Result<()> {
    let json = [("content-type", "application/json")];
    for streaming in [true, false] {
        // Long enough a wait for the call's result on any machine.
        let setting = [
            ("FERRY_INVOKER__STREAMING", if streaming { "true" } else { "false" }),
            ("FERRY_INVOKER__STREAM_INACTIVITY", "10s"),
        ];
        let (_broker, _handlers, _dir, node) = node_with_handlers(&setting).await?;
        // Three steps and a call to Sink/handle.
        let (status, body) = node.ingress("/Pipeline/run", Some(r#"{"seq": 4}"#), &json).await?;
        assert_eq!((status, body), (200, json!([40, 41, 42])), "streaming: {streaming}");
        let attempts = node.metric("ferry_invoker_attempts_total").await?;
        let checkpoints = node.metric("ferry_invoker_checkpoints_total").await?;
        let arrivals = node.metric("ferry_invoker_arrivals_streamed_total").await?;
        if streaming {
            // One attempt runs the steps and makes the call, checkpointing
            // each, and is told its result; one runs the callee.
            assert_eq!((attempts, checkpoints, arrivals), (2.0, 4.0, 1.0));
        } else {
            // An attempt per step, one for the call, one for its result; the callee's.
            assert_eq!((attempts, checkpoints, arrivals), (6.0, 0.0, 0.0));
        }
    }
    Ok(())
}
