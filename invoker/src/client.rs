//! One attempt of an invocation in request-response mode: Start and the whole
//! journal go out as the request body, then the deployment's messages are read
//! until the response ends. The caller appends what came back to the log and,
//! after a suspension, invokes again with the longer journal.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

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
        self.attempt_encoded(endpoint, body.freeze(), None).await
    }

    /// Runs one attempt whose request body, Start and journal, is encoded
    /// already; `traceparent` names the attempt's span to the handler.
    pub async fn attempt_encoded(
        &self,
        endpoint: &Endpoint<'_>,
        body: Bytes,
        traceparent: Option<&str>,
    ) -> Result<Attempt, Error> {
        let uri = endpoint.uri;
        let url = format!("{}/invoke/{}/{}", uri.trim_end_matches('/'), endpoint.service, endpoint.handler);
        let client = if endpoint.http2 { &self.http2 } else { &self.http1 };
        let content_type = endpoint.version.content_type();
        let mut request =
            client.post(url).header("content-type", content_type).header("accept", content_type).body(body);
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
        let response = request.send().await.map_err(unreachable)?;
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
