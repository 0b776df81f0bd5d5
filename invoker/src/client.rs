//! One attempt of an invocation. In request-response mode Start and the whole
//! journal go out as the request body, then the deployment's messages are read
//! until the response ends; the caller appends what came back to the log and,
//! after a suspension, invokes again with the longer journal. A [`Stream`]
//! keeps the request open instead, so the caller can answer the handler as it
//! runs.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::Uri;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

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
///
/// Their connections are [`Fenced`]: once this process has been stopped for
/// longer than the stall limit (SIGSTOP, a paused VM, a starved host), every
/// connection it had refuses to write again. A request body that passed its
/// lease check just before the stop could otherwise sit in a connection's
/// buffer and reach its deployment after the lease, and after a newer leader
/// committed what that stale journal would run again.
#[derive(Clone)]
pub struct Client {
    http1: HyperClient<FencedConnector, GatedBody>,
    http2: HyperClient<FencedConnector, GatedBody>,
    timeout: Duration,
    watch: Arc<StallWatch>,
}

impl Client {
    /// `timeout` bounds a whole attempt; `stall_limit` is how long this
    /// process may stop running before its connections are fenced.
    pub fn new(timeout: Duration, stall_limit: Duration) -> Client {
        let watch = StallWatch::start(stall_limit);
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        let connector = FencedConnector { inner: http, watch: watch.clone() };
        let builder = || {
            let mut builder = HyperClient::builder(TokioExecutor::new());
            builder.pool_timer(TokioTimer::new()).timer(TokioTimer::new());
            builder
        };
        Client {
            http1: builder().build(connector.clone()),
            http2: builder().http2_only(true).build(connector),
            timeout,
            watch,
        }
    }

    /// This client, with attempts bounded by `timeout` instead.
    pub fn with_timeout(&self, timeout: Duration) -> Client {
        Client { timeout, ..self.clone() }
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
    /// meanwhile from running a step that a newer leader has journaled. An
    /// attempt whose connection was fenced after a stall of this process
    /// ends with [`Error::Stalled`].
    pub async fn attempt_encoded(
        &self,
        endpoint: &Endpoint<'_>,
        body: Bytes,
        traceparent: Option<&str>,
        may_send: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Result<Attempt, Error> {
        let uri = endpoint.uri;
        let stalls = self.watch.stalls();
        let outcome = tokio::time::timeout(self.timeout, self.exchange(endpoint, body, traceparent, may_send)).await;
        let transport = |reason: String| {
            if self.watch.stalls() != stalls {
                Error::Stalled { uri: uri.to_owned() }
            } else {
                Error::Unreachable { uri: uri.to_owned(), reason }
            }
        };
        let bytes = match outcome {
            Err(_) => return Err(transport(format!("the attempt timed out after {:?}", self.timeout))),
            Ok(Err(Exchange::Transport(reason))) => return Err(transport(reason)),
            Ok(Err(Exchange::Failed(e))) => return Err(e),
            Ok(Ok(bytes)) => bytes,
        };
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

    /// Sends the request and reads the whole response body.
    async fn exchange(
        &self,
        endpoint: &Endpoint<'_>,
        body: Bytes,
        traceparent: Option<&str>,
        may_send: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Result<Bytes, Exchange> {
        let uri = endpoint.uri;
        let (response, _) = self.open(endpoint, body, None, traceparent, may_send).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await.map_err(|e| Exchange::Transport(error_chain(&e)))?.to_bytes();
        if !status.is_success() {
            let body = String::from_utf8_lossy(&bytes).into_owned();
            return Err(Exchange::Failed(Error::BadStatus { uri: uri.to_owned(), status: status.as_u16(), body }));
        }
        Ok(bytes)
    }

    /// Sends the request, its body `body` then what comes through `more`
    /// until that closes, and answers the response once its head is in.
    async fn open(
        &self,
        endpoint: &Endpoint<'_>,
        body: Bytes,
        more: Option<mpsc::UnboundedReceiver<Bytes>>,
        traceparent: Option<&str>,
        may_send: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Result<(http::Response<hyper::body::Incoming>, Arc<AtomicBool>), Exchange> {
        let uri = endpoint.uri;
        let url = format!("{}/invoke/{}/{}", uri.trim_end_matches('/'), endpoint.service, endpoint.handler);
        let content_type = endpoint.version.content_type();
        let refused = Arc::new(AtomicBool::new(false));
        let body = GatedBody { data: Some(body), more, may_send: Box::new(may_send), refused: refused.clone() };
        let invalid = |reason: String| Exchange::Failed(Error::InvalidUri { uri: uri.to_owned(), reason });
        let mut request = http::Request::post(url)
            .header(http::header::CONTENT_TYPE, content_type)
            .header(http::header::ACCEPT, content_type);
        for (name, value) in endpoint.headers {
            request = request.header(name, value);
        }
        if let Some(traceparent) = traceparent {
            request = request.header("traceparent", traceparent);
        }
        let request = request.body(body).map_err(|e| invalid(e.to_string()))?;
        let client = if endpoint.http2 { &self.http2 } else { &self.http1 };
        match client.request(request).await {
            Err(_) if refused.load(Ordering::Acquire) => Err(Exchange::Failed(Error::NotSent { uri: uri.to_owned() })),
            Err(e) => Err(Exchange::Transport(error_chain(&e))),
            Ok(response) => Ok((response, refused)),
        }
    }

    /// Opens an attempt that streams (HTTP/2, a deployment in bidirectional
    /// mode): its request body starts with `body`, Start and the journal,
    /// and stays open for what the runtime tells the handler as it runs.
    /// Every chunk asks `may_send` first, as [`Client::attempt_encoded`]'s
    /// body does.
    pub async fn stream(
        &self,
        endpoint: &Endpoint<'_>,
        body: Bytes,
        traceparent: Option<&str>,
        may_send: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Result<Stream, Error> {
        let uri = endpoint.uri.to_owned();
        let stalls = self.watch.stalls();
        let deadline = tokio::time::Instant::now() + self.timeout;
        let (input, more) = mpsc::unbounded_channel();
        let opened = tokio::time::timeout_at(deadline, self.open(endpoint, body, Some(more), traceparent, may_send));
        let mut stream = Stream {
            uri,
            input: Some(input),
            body: None,
            decoder: Decoder::new(),
            timeout: self.timeout,
            deadline,
            watch: self.watch.clone(),
            stalls,
            refused: Arc::new(AtomicBool::new(false)),
            ending: None,
        };
        let (response, refused) = match opened.await {
            Err(_) => return Err(stream.transport(format!("the attempt timed out after {:?}", self.timeout))),
            Ok(Err(Exchange::Transport(reason))) => return Err(stream.transport(reason)),
            Ok(Err(Exchange::Failed(e))) => return Err(e),
            Ok(Ok(opened)) => opened,
        };
        stream.refused = refused;
        let status = response.status();
        if !status.is_success() {
            let bytes = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let body = String::from_utf8_lossy(&bytes).into_owned();
            return Err(Error::BadStatus { uri: stream.uri, status: status.as_u16(), body });
        }
        stream.body = Some(response.into_body());
        Ok(stream)
    }
}

/// An attempt whose request stays open: the handler's messages are read as
/// they come, and answers are sent while it runs.
pub struct Stream {
    uri: String,
    /// The rest of the request body; `None` once it is closed.
    input: Option<mpsc::UnboundedSender<Bytes>>,
    body: Option<hyper::body::Incoming>,
    decoder: Decoder,
    /// How long the handler may go without a message once the request is
    /// closed.
    timeout: Duration,
    deadline: tokio::time::Instant,
    watch: Arc<StallWatch>,
    stalls: u64,
    refused: Arc<AtomicBool>,
    /// How the handler ended, from the last message it sent.
    ending: Option<Ending>,
}

/// What came next on a [`Stream`].
#[derive(Debug)]
pub enum Next {
    /// The messages of one piece of the response, in order.
    Messages(Vec<Message>),
    /// Nothing came for the quiet period asked.
    Quiet,
    /// The response ended after the handler's last message.
    Ended(Ending),
}

impl Stream {
    /// Waits for the handler's next messages, or for `quiet` to pass
    /// without any; without `quiet`, a handler silent for the client's
    /// timeout fails the attempt.
    pub async fn next(&mut self, quiet: Option<Duration>) -> Result<Next, Error> {
        let protocol = |uri: &str, source| Error::Protocol { uri: uri.to_owned(), source };
        loop {
            let until = match quiet {
                Some(quiet) => tokio::time::Instant::now() + quiet,
                None => self.deadline,
            };
            let Some(body) = self.body.as_mut() else { return Err(self.transport("the stream is over".to_owned())) };
            let frame = match tokio::time::timeout_at(until, body.frame()).await {
                Err(_) if quiet.is_some() => return Ok(Next::Quiet),
                Err(_) => {
                    let reason = format!("the attempt timed out: the handler sent nothing for {:?}", self.timeout);
                    return Err(self.transport(reason));
                }
                Ok(frame) => frame,
            };
            match frame {
                None => {
                    self.body = None;
                    self.decoder.finish().map_err(|e| protocol(&self.uri, e))?;
                    return match self.ending {
                        Some(ending) => Ok(Next::Ended(ending)),
                        None => Err(Error::Unreachable {
                            uri: self.uri.clone(),
                            reason: "the response ended without End, Suspension or Error".to_owned(),
                        }),
                    };
                }
                Some(Err(e)) => return Err(self.transport(error_chain(&e))),
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else { continue };
                    self.decoder.push(&data);
                    let mut messages = Vec::new();
                    while let Some(message) = self.decoder.try_next().map_err(|e| protocol(&self.uri, e))? {
                        messages.push(message);
                    }
                    if let Some(last) = messages.last() {
                        self.deadline = tokio::time::Instant::now() + self.timeout;
                        self.ending = match last {
                            Message::End(_) => Some(Ending::End),
                            Message::Suspension(_) => Some(Ending::Suspended),
                            Message::Error(_) => Some(Ending::Failed),
                            _ => None,
                        };
                        // The handler is done: it may hold its response open
                        // until the request ends.
                        if self.ending.is_some() {
                            self.close();
                        }
                        return Ok(Next::Messages(messages));
                    }
                }
            }
        }
    }

    /// Sends `messages` to the handler, unless the request is closed.
    pub fn send(&mut self, messages: &[Message]) {
        if messages.is_empty() {
            return;
        }
        let mut body = BytesMut::new();
        for message in messages {
            encode(message, &mut body);
        }
        self.send_encoded(body.freeze());
    }

    /// Sends messages encoded already, unless the request is closed.
    pub fn send_encoded(&mut self, body: Bytes) {
        if let Some(input) = &self.input {
            // A closed receiver means the request is over: the response says why.
            let _ = input.send(body);
        }
    }

    /// Ends the request body: the handler gets nothing more, and suspends
    /// when it needs something.
    pub fn close(&mut self) {
        if self.input.take().is_some() {
            self.deadline = tokio::time::Instant::now() + self.timeout;
        }
    }

    pub fn is_open(&self) -> bool {
        self.input.is_some()
    }

    fn transport(&self, reason: String) -> Error {
        if self.refused.load(Ordering::Acquire) {
            Error::NotSent { uri: self.uri.clone() }
        } else if self.watch.stalls() != self.stalls {
            Error::Stalled { uri: self.uri.clone() }
        } else {
            Error::Unreachable { uri: self.uri.clone(), reason }
        }
    }
}

/// How an exchange with a deployment failed.
enum Exchange {
    /// The connection failed: an unreachable deployment, or a fenced one.
    Transport(String),
    Failed(Error),
}

pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

/// Notices when this process has stopped running for longer than `limit`:
/// a thread of its own wakes every quarter of it, and a wake that comes late
/// counts a stall. Connections ask it before each write, so they also notice
/// a stall that this thread has not woken up to yet.
struct StallWatch {
    origin: Instant,
    limit_us: u64,
    /// Microseconds since `origin` at the thread's last wake.
    woke_us: AtomicU64,
    /// Stalls noticed so far.
    stalls: AtomicU64,
}

impl StallWatch {
    fn start(limit: Duration) -> Arc<StallWatch> {
        let watch = Arc::new(StallWatch {
            origin: Instant::now(),
            limit_us: limit.as_micros().max(1) as u64,
            woke_us: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
        });
        let period = (limit / 4).max(Duration::from_millis(1));
        let weak = Arc::downgrade(&watch);
        std::thread::Builder::new()
            .name("ferry-stall-watch".to_owned())
            .spawn(move || loop {
                std::thread::sleep(period);
                let Some(watch) = weak.upgrade() else { return };
                let now = watch.now_us();
                if now.saturating_sub(watch.woke_us.load(Ordering::Relaxed)) > watch.limit_us {
                    watch.stall();
                }
                // After the count, so a connection that sees this wake sees
                // the stall before it too.
                watch.woke_us.store(now, Ordering::Release);
            })
            .expect("a thread to watch for stalls");
        watch
    }

    fn now_us(&self) -> u64 {
        self.origin.elapsed().as_micros() as u64
    }

    fn stall(&self) {
        metrics::counter!("ferry_invoker_stalls_total").increment(1);
        self.stalls.fetch_add(1, Ordering::AcqRel);
    }

    fn stalls(&self) -> u64 {
        self.stalls.load(Ordering::Acquire)
    }

    /// Whether no stall happened since `stalls` were counted, counting the
    /// one under way (the watch thread has not woken since it began).
    fn steady_since(&self, stalls: u64) -> bool {
        let woke = self.woke_us.load(Ordering::Acquire);
        if self.now_us().saturating_sub(woke) > self.limit_us {
            self.stall();
            return false;
        }
        self.stalls() == stalls
    }
}

/// Opens TCP connections that are [`Fenced`] by one [`StallWatch`].
#[derive(Clone)]
struct FencedConnector {
    inner: HttpConnector,
    watch: Arc<StallWatch>,
}

impl tower_service::Service<Uri> for FencedConnector {
    type Response = Fenced<TokioIo<TcpStream>>;
    type Error = <HttpConnector as tower_service::Service<Uri>>::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let watch = self.watch.clone();
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            let io = connecting.await?;
            let stalls = watch.stalls();
            Ok(Fenced { io, watch, stalls })
        })
    }
}

/// A connection that refuses every write once its process has stalled
/// since it was opened, which closes it and fails the requests on it.
struct Fenced<T> {
    io: T,
    watch: Arc<StallWatch>,
    stalls: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("this node stalled, so the connection may carry requests it may no longer send")]
struct Stalled;

impl<T> Fenced<T> {
    fn check(&self) -> io::Result<()> {
        if self.watch.steady_since(self.stalls) {
            Ok(())
        } else {
            Err(io::Error::other(Stalled))
        }
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for Fenced<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for Fenced<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<T: Connection> Connection for Fenced<T> {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

/// A request body that asks `may_send` before it gives each chunk to the
/// connection, and fails the request if the answer is no: one chunk, or for
/// a stream, the first and then those sent through `more` until it closes.
struct GatedBody {
    data: Option<Bytes>,
    more: Option<mpsc::UnboundedReceiver<Bytes>>,
    may_send: Box<dyn Fn() -> bool + Send + Sync>,
    refused: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
#[error("the attempt may no longer be sent")]
struct Refused;

impl http_body::Body for GatedBody {
    type Data = Bytes;
    type Error = Refused;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Refused>>> {
        let data = match self.data.take() {
            Some(data) => data,
            None => match self.more.as_mut() {
                None => return Poll::Ready(None),
                Some(more) => match more.poll_recv(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some(data)) => data,
                    Poll::Ready(None) => {
                        self.more = None;
                        return Poll::Ready(None);
                    }
                },
            },
        };
        if !(self.may_send)() {
            self.refused.store(true, Ordering::Release);
            return Poll::Ready(Some(Err(Refused)));
        }
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.more.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let first = self.data.as_ref().map_or(0, |d| d.len() as u64);
        match self.more {
            None => SizeHint::with_exact(first),
            Some(_) => {
                let mut hint = SizeHint::new();
                hint.set_lower(first);
                hint
            }
        }
    }
}
