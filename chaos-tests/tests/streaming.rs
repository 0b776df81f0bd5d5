//! Attempts that stream: a deployment served over HTTP/2 in bidirectional
//! mode keeps its attempt open while each `ctx.run` result is committed and
//! answered, instead of ending the attempt after every step. The same
//! handler gives the same result with streaming turned off.

use anyhow::Result;
use ferry_chaos_tests::node_with_handlers;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_attempt_commits_each_step_without_a_new_request() -> Result<()> {
    let json = [("content-type", "application/json")];
    for streaming in [true, false] {
        let setting = [("FERRY_INVOKER__STREAMING", if streaming { "true" } else { "false" })];
        let (_broker, _handlers, _dir, node) = node_with_handlers(&setting).await?;
        // Three steps and a call to Sink/handle.
        let (status, body) = node.ingress("/Pipeline/run", Some(r#"{"seq": 4}"#), &json).await?;
        assert_eq!((status, body), (200, json!([40, 41, 42])), "streaming: {streaming}");
        let attempts = node.metric("ferry_invoker_attempts_total").await?;
        let checkpoints = node.metric("ferry_invoker_checkpoints_total").await?;
        if streaming {
            // One attempt runs the steps and makes the call, one more takes
            // its result; one runs the callee.
            assert_eq!((attempts, checkpoints), (3.0, 3.0));
        } else {
            // An attempt per step, one for the call, one for its result; the callee's.
            assert_eq!((attempts, checkpoints), (6.0, 0.0));
        }
    }
    Ok(())
}
