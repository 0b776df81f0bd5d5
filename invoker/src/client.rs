//! One attempt of an invocation in request-response mode: Start and the whole
//! journal go out as the request body, then the deployment's messages are read
//! until the response ends. The caller appends what came back to the log and,
//! after a suspension, invokes again with the longer journal.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};

use crate::codec::{encode, Decoder, Message, ProtocolVersion};
use crate::Error;

/// How to reach one handler.
#[derive(Debug, Clone)]
pub struct Endpoint<'a> {
    /// The deployment's base uri.
    pub uri: &'a str,
    /// HTTP/2 with prior knowledge, else HTTP/1.1.
    pub http2: bool,
    pub headers: &'a BTreeMap<String, String>,
    pub version: ProtocolVersion,
    pub service: &'a str,
    pub handler: &'a str,
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// `End`: the invocation is done (its output is among the messages).
    End,
    /// `Suspension`: invoke again once what it waits for is in the journal.
    Suspended,
    /// `Error`: the attempt failed and may be retried.
    Failed,
}

/// The messages a deployment sent in one attempt, and how it ended.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub messages: Vec<Message>,
    pub ending: Ending,
}

/// The HTTP clients of the invoker; cheap to clone.
#[derive(Clone)]
pub struct Client {
    http1: reqwest::Client,
    http2: reqwest::Client,
}

impl Client {
    /// `timeout` bounds a whole attempt.
    pub fn new(timeout: Duration) -> Client {
        let builder = || reqwest::Client::builder().timeout(timeout).no_proxy().tcp_nodelay(true);
        Client {
            http1: builder().http1_only().build().expect("http client"),
            http2: builder().http2_prior_knowledge().build().expect("http client"),
        }
    }

    /// Runs one attempt: `journal` starts with the Start message.
    pub async fn attempt(&self, endpoint: &Endpoint<'_>, journal: &[Message]) -> Result<Attempt, Error> {
        let mut body = BytesMut::new();
        for message in journal {
            encode(message, &mut body);
        }
        self.attempt_encoded(endpoint, body.freeze(), None, || true).await
    }

    /// Runs one attempt whose request body, Start and journal, is encoded
    /// already; `traceparent` names the attempt's span to the handler.
    ///
    /// `may_send` is asked at the last moment before the body is written to
    /// the connection: once the request headers are out and the connection
    /// wants the body. If it says no, the body is never sent, the handler
    /// never sees the journal (so it runs nothing) and the attempt ends with
    /// [`Error::NotSent`]. An attempt may wait long between being started and
    /// being written (a busy runtime, a connection still opening, a process
    /// stopped and continued); this keeps a node that lost its partition
    /// meanwhile from running a step that a newer leader has journaled.
    pub async fn attempt_encoded(
        &self,
        endpoint: &Endpoint<'_>,
        body: Bytes,
        traceparent: Option<&str>,
        may_send: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Result<Attempt, Error> {
        let uri = endpoint.uri;
        let url = format!("{}/invoke/{}/{}", uri.trim_end_matches('/'), endpoint.service, endpoint.handler);
        let client = if endpoint.http2 { &self.http2 } else { &self.http1 };
        let content_type = endpoint.version.content_type();
        let refused = Arc::new(AtomicBool::new(false));
        let body = GatedBody { data: Some(body), may_send: Box::new(may_send), refused: refused.clone() };
        let mut request = client
            .post(url)
            .header("content-type", content_type)
            .header("accept", content_type)
            .body(reqwest::Body::wrap(body));
        for (name, value) in endpoint.headers {
            request = request.header(name, value);
        }
        if let Some(traceparent) = traceparent {
            request = request.header("traceparent", traceparent);
        }
        let unreachable = |e: reqwest::Error| {
            let reason = if e.is_timeout() { format!("the attempt timed out ({e})") } else { e.to_string() };
            Error::Unreachable { uri: uri.to_owned(), reason }
        };
        let response = match request.send().await {
            Err(_) if refused.load(Ordering::Acquire) => return Err(Error::NotSent { uri: uri.to_owned() }),
            sent => sent.map_err(unreachable)?,
        };
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(Error::BadStatus { uri: uri.to_owned(), status: status.as_u16(), body: text });
        }
        let bytes = response.bytes().await.map_err(unreachable)?;
        let protocol = |source| Error::Protocol { uri: uri.to_owned(), source };
        let mut decoder = Decoder::new();
        decoder.push(&bytes);
        let mut messages = Vec::new();
        while let Some(message) = decoder.try_next().map_err(protocol)? {
            messages.push(message);
        }
        decoder.finish().map_err(protocol)?;
        let ending = match messages.last() {
            Some(Message::End(_)) => Ending::End,
            Some(Message::Suspension(_)) => Ending::Suspended,
            Some(Message::Error(_)) => Ending::Failed,
            _ => {
                return Err(Error::Unreachable {
                    uri: uri.to_owned(),
                    reason: "the response ended without End, Suspension or Error".to_owned(),
                })
            }
        };
        Ok(Attempt { messages, ending })
    }
}

/// A request body of one chunk that asks `may_send` before it gives the
/// chunk to the connection, and fails the request if the answer is no.
struct GatedBody {
    data: Option<Bytes>,
    may_send: Box<dyn Fn() -> bool + Send + Sync>,
    refused: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
#[error("the attempt may no longer be sent")]
struct Refused;

impl http_body::Body for GatedBody {
    type Data = Bytes;
    type Error = Refused;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Refused>>> {
        let Some(data) = self.data.take() else {
            return Poll::Ready(None);
        };
        if !(self.may_send)() {
            self.refused.store(true, Ordering::Release);
            return Poll::Ready(Some(Err(Refused)));
        }
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}
