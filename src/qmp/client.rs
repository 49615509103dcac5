//! The QMP session: negotiation, command routing by `id`, and event fan-out.
//!
//! [`Negotiating`] owns a fresh stream and can only subscribe to events and negotiate, so no
//! command can be sent before `qmp_capabilities` has succeeded. [`Negotiating::negotiate`]
//! returns a [`Client`]. From then on one reader task owns the read half: it routes each reply
//! to the waiting command by `id` and copies each event to every subscriber.
//!
//! Messages the session cannot use are logged at warn level, counted in [`SessionCounters`] and
//! skipped, and the session stays open. These are lines that are not a JSON object, replies
//! whose `id` no command waits for (such as a late reply to a command that timed out), and a
//! second greeting. QEMU sends none of these, and closing the session would look like a VM exit
//! to the layer above. A line longer than the maximum, an I/O error and a stream that ends in
//! the middle of a line close the session.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::Instrument;

use super::codec::{QmpCodec, Request, DEFAULT_MAX_LINE_LENGTH};
use super::commands::{Command, ErrorClass, QmpCapabilities, VersionInfo};
use super::error::{excerpt, Error};
use super::events::{self, Event, EventKind, EventSender, Events, Timestamp};

/// Default deadline for one command, from sending it to its reply.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings of one QMP session.
#[derive(Debug, Clone)]
pub struct Config {
    /// Deadline for commands sent with [`Client::call`] and [`Client::execute`].
    pub command_timeout: Duration,
    /// Maximum length of one incoming line in bytes. A longer line closes the session.
    pub max_line_length: usize,
    /// Capacity of each subscriber's queue for non-lifecycle events.
    pub event_queue_capacity: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            max_line_length: DEFAULT_MAX_LINE_LENGTH,
            event_queue_capacity: events::DEFAULT_EVENT_QUEUE_CAPACITY,
        }
    }
}

/// The greeting QEMU sends when a client connects.
///
/// ```text
/// <- {"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7},
///                         "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"},
///             "capabilities": ["oob"]}}
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Greeting {
    /// The QEMU version.
    pub version: VersionInfo,
    /// Capabilities the server offers, such as `oob`. The client enables none.
    pub capabilities: Vec<String>,
    /// Fields not modelled here.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The cause of a session's end.
#[derive(Debug, Clone)]
pub enum CloseReason {
    /// The peer closed the stream, or reset it (QEMU resets the socket when it exits with
    /// unread input, and on SIGKILL).
    Eof,
    /// The stream failed or sent something that ends the session, such as an oversized line.
    Failed(Arc<Error>),
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::Eof => f.write_str("end of stream"),
            CloseReason::Failed(error) => write!(f, "{error}"),
        }
    }
}

/// Counts of messages the session skipped. See the module documentation for the policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionCounters {
    /// Lines that were not a JSON object.
    pub invalid_lines: u64,
    /// Replies whose `id` matched no waiting command, and other messages that are neither
    /// replies nor events.
    pub unexpected_messages: u64,
}

/// A QMP session that has not negotiated capabilities yet.
///
/// ```text
/// <- {"QMP": {"version": {...}, "capabilities": ["oob"]}}
/// -> {"execute": "qmp_capabilities", "id": 0}
/// <- {"return": {}, "id": 0}
/// ```
pub struct Negotiating<R, W> {
    reader: FramedRead<R, QmpCodec>,
    writer: FramedWrite<W, QmpCodec>,
    config: Config,
    subscribers: Vec<EventSender>,
    counters: Counters,
}

impl<S> Negotiating<ReadHalf<S>, WriteHalf<S>>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    /// Starts a session on a connected stream, such as a `UnixStream`.
    pub fn new(stream: S, config: Config) -> Self {
        let (reader, writer) = tokio::io::split(stream);
        Self::from_parts(reader, writer, config)
    }
}

impl<R, W> Negotiating<R, W>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    /// Starts a session on separate read and write streams, such as a child's stdout and stdin
    /// for `-qmp stdio`.
    pub fn from_parts(reader: R, writer: W, config: Config) -> Self {
        let codec = QmpCodec::new(config.max_line_length);
        Self {
            reader: FramedRead::new(reader, codec.clone()),
            writer: FramedWrite::new(writer, codec),
            config,
            subscribers: Vec::new(),
            counters: Counters::default(),
        }
    }

    /// Subscribes to events from the start of the session, including events that QEMU sends
    /// before the greeting or during negotiation.
    pub fn subscribe(&mut self) -> Events {
        let (sender, events) = events::channel(self.config.event_queue_capacity);
        self.subscribers.push(sender);
        events
    }

    /// Reads the greeting, sends `qmp_capabilities` and returns the ready client.
    ///
    /// `timeout` bounds the whole exchange. On failure the stream is closed. QEMU accepts one
    /// client per QMP socket and sends no greeting to a second one, which then times out here.
    pub async fn negotiate(mut self, timeout: Duration) -> Result<Client, Error> {
        let greeting = match tokio::time::timeout(timeout, self.handshake()).await {
            Ok(result) => result?,
            Err(_) => return Err(Error::NegotiationTimedOut { after: timeout }),
        };
        tracing::debug!(
            qemu = %format_args!("{}.{}.{}", greeting.version.qemu.major, greeting.version.qemu.minor, greeting.version.qemu.micro),
            "QMP session negotiated"
        );

        let (closed_tx, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: HashMap::new(),
                subscribers: self.subscribers,
                closed: false,
            }),
            closed_tx,
            next_id: AtomicU64::new(1),
            counters: self.counters,
        });
        let reader = tokio::spawn(
            read_replies(self.reader, Arc::clone(&shared)).instrument(tracing::Span::current()),
        );
        let writer: Box<dyn AsyncWrite + Send + Unpin> = Box::new(self.writer.into_inner());
        let codec = QmpCodec::new(self.config.max_line_length);
        Ok(Client {
            inner: Arc::new(Inner {
                shared,
                writer: tokio::sync::Mutex::new(FramedWrite::new(writer, codec)),
                greeting,
                config: self.config,
                reader,
            }),
        })
    }

    async fn handshake(&mut self) -> Result<Greeting, Error> {
        let greeting = loop {
            match self.next_message().await? {
                Incoming::Event(event) => self.deliver(&event),
                Incoming::Greeting(body) => {
                    break Greeting::deserialize(&body).map_err(|error| {
                        Error::InvalidGreeting {
                            message: format!("{error} in {}", excerpt(&body.to_string())),
                        }
                    })?;
                }
                other => {
                    return Err(Error::InvalidGreeting {
                        message: other.describe(),
                    })
                }
            }
        };

        let request = serde_json::json!({"execute": QmpCapabilities::NAME, "id": 0});
        self.writer.send(&request).await?;
        loop {
            match self.next_message().await? {
                Incoming::Event(event) => self.deliver(&event),
                Incoming::Reply { id, result } if id == Some(Value::from(0)) => {
                    return match result {
                        Ok(_) => Ok(greeting),
                        Err(error) => Err(error.into_error(QmpCapabilities::NAME)),
                    };
                }
                other => {
                    return Err(Error::UnexpectedMessage {
                        message: other.describe(),
                    })
                }
            }
        }
    }

    /// Reads the next message, skipping lines that are not JSON objects.
    async fn next_message(&mut self) -> Result<Incoming, Error> {
        loop {
            let line = match self.reader.next().await {
                Some(line) => line?,
                None => return Err(Error::ConnectionClosed),
            };
            match Incoming::parse(&line, &self.counters) {
                Some(message) => return Ok(message),
                None => continue,
            }
        }
    }

    fn deliver(&mut self, event: &Event) {
        self.subscribers.retain(|subscriber| subscriber.send(event));
    }
}

/// A negotiated QMP session. Clones share the session, and commands from many tasks may be in
/// flight at once.
///
/// The session closes when the last clone is dropped: the reader task stops and the stream is
/// closed, and subscribers see the end of their event stream.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    writer: tokio::sync::Mutex<FramedWrite<Box<dyn AsyncWrite + Send + Unpin>, QmpCodec>>,
    greeting: Greeting,
    config: Config,
    reader: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("greeting", &self.inner.greeting)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Sends a typed command and waits for its reply, within the session's default deadline.
    ///
    /// The command is serialized before this returns, so the future does not borrow it.
    pub fn call<C: Command>(
        &self,
        command: &C,
    ) -> impl Future<Output = Result<C::Reply, Error>> + Send + '_ {
        self.call_within(command, self.inner.config.command_timeout)
    }

    /// Sends a typed command and waits at most `timeout` for its reply.
    ///
    /// The command is serialized before this returns, so the future does not borrow it.
    pub fn call_within<C: Command>(
        &self,
        command: &C,
        timeout: Duration,
    ) -> impl Future<Output = Result<C::Reply, Error>> + Send + '_ {
        let arguments = serde_json::to_vec(command);
        async move {
            let arguments = arguments.map_err(|source| Error::Encode {
                command: C::NAME.to_owned(),
                source,
            })?;
            let arguments = has_content_bytes(&arguments).then_some(arguments);
            let reply = self.exchange(C::NAME, arguments, timeout).await?;
            reply.decode(C::NAME)
        }
    }

    /// Sends any command by name and returns the `return` value as JSON, within the session's
    /// default deadline. `arguments` that are `None`, JSON `null` or `{}` are left out.
    ///
    /// ```text
    /// -> {"execute": "query-qmp-schema", "id": 7}
    /// <- {"return": [...], "id": 7}
    /// ```
    pub async fn execute(&self, name: &str, arguments: Option<Value>) -> Result<Value, Error> {
        self.execute_within(name, arguments, self.inner.config.command_timeout)
            .await
    }

    /// Sends any command by name and waits at most `timeout` for its reply.
    ///
    /// If the deadline passes after the command was written, QEMU still runs it, and its late
    /// reply is counted as unexpected.
    pub async fn execute_within(
        &self,
        name: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, Error> {
        let arguments = match arguments.filter(has_content) {
            Some(arguments) => {
                Some(
                    serde_json::to_vec(&arguments).map_err(|source| Error::Encode {
                        command: name.to_owned(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        self.exchange(name, arguments, timeout).await?.decode(name)
    }

    /// Writes one request and waits at most `timeout` for the reply routed to it.
    async fn exchange(
        &self,
        name: &str,
        arguments: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Routed, Error> {
        let shared = &self.inner.shared;
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply_tx, reply_rx) = oneshot::channel();
        {
            let mut state = shared.lock();
            if state.closed {
                return Err(Error::ConnectionClosed);
            }
            state.pending.insert(id, reply_tx);
        }
        let _pending = PendingGuard { shared, id };

        let request = Request {
            name,
            arguments: arguments.as_deref(),
            id,
        };
        let exchange = async {
            let sent = self.inner.writer.lock().await.send(request).await;
            sent.map_err(|error| match error {
                Error::Io(io) if is_disconnect(&io) => Error::ConnectionClosed,
                other => other,
            })?;
            // `Routed::decode` turns an error reply into an error.
            reply_rx.await.map_err(|_| Error::ConnectionClosed)
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(Error::TimedOut {
                command: name.to_owned(),
                after: timeout,
            }),
        }
    }

    /// Subscribes to events from now on. See [`Events`] for the queue policy.
    ///
    /// After the session has ended, the returned stream is already at its end.
    pub fn subscribe(&self) -> Events {
        let (sender, events) = events::channel(self.inner.config.event_queue_capacity);
        let mut state = self.inner.shared.lock();
        if !state.closed {
            state.subscribers.push(sender);
        }
        events
    }

    /// Returns the greeting QEMU sent.
    pub fn greeting(&self) -> &Greeting {
        &self.inner.greeting
    }

    /// Waits until the session ends and returns why.
    pub async fn closed(&self) -> CloseReason {
        let mut closed = self.inner.shared.closed_tx.subscribe();
        let reason = match closed.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone(),
            // The sender lives in `Shared`, which `self` keeps alive.
            Err(_) => None,
        };
        reason.unwrap_or(CloseReason::Eof)
    }

    /// Returns why the session ended, or `None` while it is open.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.inner.shared.closed_tx.borrow().clone()
    }

    /// Tells whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.shared.lock().closed
    }

    /// Returns the counts of messages the session skipped.
    pub fn counters(&self) -> SessionCounters {
        self.inner.shared.counters.snapshot()
    }
}

fn has_content(arguments: &Value) -> bool {
    match arguments {
        Value::Null => false,
        Value::Object(map) => !map.is_empty(),
        _ => true,
    }
}

/// Tells whether serialized arguments carry anything, like [`has_content`]: a unit struct
/// serializes to `null` and a struct whose fields are all skipped to `{}`.
fn has_content_bytes(arguments: &[u8]) -> bool {
    arguments != b"null" && arguments != b"{}"
}

fn is_disconnect(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
    )
}

/// Removes a command's waiter when the command finishes, times out or is cancelled.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.id);
    }
}

/// The `error` member of a QMP reply.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    class: ErrorClass,
    desc: String,
}

impl ErrorBody {
    fn into_error(self, command: &str) -> Error {
        Error::Qmp {
            command: command.to_owned(),
            class: self.class,
            desc: self.desc,
        }
    }
}

type Reply = Result<Value, ErrorBody>;

/// A reply as the reader task hands it to the waiting command.
enum Routed {
    /// The whole line of a successful reply. The command parses its `return` member straight
    /// into its reply type, so no JSON tree is built for it.
    Line(Bytes),
    /// A successful reply that the reader has parsed already.
    Parsed(Value),
    /// An error reply.
    Failed(ErrorBody),
}

/// The `return` member of a reply line; other members are skipped.
#[derive(Deserialize)]
struct ReturnMember<T> {
    #[serde(rename = "return")]
    value: T,
}

impl Routed {
    /// Deserializes the `return` value as `T`, or turns an error reply into [`Error::Qmp`].
    fn decode<T: DeserializeOwned>(self, command: &str) -> Result<T, Error> {
        let decoded = match self {
            Routed::Line(line) => {
                serde_json::from_slice::<ReturnMember<T>>(&line).map(|member| member.value)
            }
            Routed::Parsed(value) => T::deserialize(value),
            Routed::Failed(error) => return Err(error.into_error(command)),
        };
        decoded.map_err(|source| Error::InvalidReply {
            command: command.to_owned(),
            source,
        })
    }
}

/// The members of a line that decide whether it is a successful reply, without the values.
#[derive(Deserialize)]
struct ReplyHead {
    id: Option<u64>,
    #[serde(rename = "return")]
    value: Option<IgnoredAny>,
    event: Option<IgnoredAny>,
}

#[derive(Default)]
struct Counters {
    invalid_lines: AtomicU64,
    unexpected_messages: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> SessionCounters {
        SessionCounters {
            invalid_lines: self.invalid_lines.load(Ordering::Relaxed),
            unexpected_messages: self.unexpected_messages.load(Ordering::Relaxed),
        }
    }
}

/// State shared by the clients and the reader task.
struct Shared {
    state: Mutex<State>,
    closed_tx: watch::Sender<Option<CloseReason>>,
    next_id: AtomicU64,
    counters: Counters,
}

struct State {
    pending: HashMap<u64, oneshot::Sender<Routed>>,
    subscribers: Vec<EventSender>,
    closed: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves the map consistent, so the poison is ignored.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn dispatch(&self, message: Incoming) {
        match message {
            Incoming::Event(event) => {
                tracing::trace!(event = %event, "QMP event");
                self.lock()
                    .subscribers
                    .retain(|subscriber| subscriber.send(&event));
            }
            Incoming::Reply { id, result } => {
                let waiter = id
                    .as_ref()
                    .and_then(Value::as_u64)
                    .and_then(|id| self.lock().pending.remove(&id));
                match waiter {
                    // The command may have timed out in the meantime, which is fine.
                    Some(waiter) => {
                        let routed = match result {
                            Ok(value) => Routed::Parsed(value),
                            Err(error) => Routed::Failed(error),
                        };
                        drop(waiter.send(routed));
                    }
                    None => self.skip(&Incoming::Reply { id, result }),
                }
            }
            other => self.skip(&other),
        }
    }

    /// Hands a successful reply line to its waiting command without parsing the `return`
    /// value. Returns `false` for every other line, and for a reply that no command waits for,
    /// which then take the full path through [`Incoming::parse`].
    fn route_reply(&self, line: &Bytes) -> bool {
        let Ok(head) = serde_json::from_slice::<ReplyHead>(line) else {
            return false;
        };
        let (Some(id), Some(_), None) = (head.id, head.value, head.event) else {
            return false;
        };
        let Some(waiter) = self.lock().pending.remove(&id) else {
            return false;
        };
        // The command may have timed out in the meantime, which is fine.
        drop(waiter.send(Routed::Line(line.clone())));
        true
    }

    fn skip(&self, message: &Incoming) {
        self.counters
            .unexpected_messages
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(message = %message.describe(), "skipped a QMP message that no command waits for");
    }

    fn close(&self, reason: CloseReason) {
        {
            let mut state = self.lock();
            state.closed = true;
            // Dropping the senders fails every waiting command and ends every event stream.
            state.pending.clear();
            state.subscribers.clear();
        }
        self.closed_tx.send_replace(Some(reason));
    }
}

/// Routes incoming messages until the stream ends, then closes the session. This is the
/// reader task.
async fn read_replies<R>(mut reader: FramedRead<R, QmpCodec>, shared: Arc<Shared>)
where
    R: AsyncRead + Unpin,
{
    let reason = loop {
        match reader.next().await {
            None => break CloseReason::Eof,
            Some(Err(Error::Io(error))) if error.kind() == std::io::ErrorKind::ConnectionReset => {
                break CloseReason::Eof
            }
            Some(Err(error)) => break CloseReason::Failed(Arc::new(error)),
            Some(Ok(line)) => {
                if shared.route_reply(&line) {
                    continue;
                }
                if let Some(message) = Incoming::parse(&line, &shared.counters) {
                    shared.dispatch(message);
                }
            }
        }
    };
    match &reason {
        CloseReason::Eof => tracing::debug!("QMP session ended by the peer"),
        CloseReason::Failed(error) => tracing::warn!(error = %error, "QMP session closed"),
    }
    shared.close(reason);
}

/// One decoded message.
enum Incoming {
    Event(Event),
    Reply { id: Option<Value>, result: Reply },
    Greeting(Value),
    Other(Map<String, Value>),
}

impl Incoming {
    /// Parses one line. Returns `None` for a line that is not a JSON object, after logging and
    /// counting it.
    fn parse(line: &[u8], counters: &Counters) -> Option<Self> {
        let object = match serde_json::from_slice::<Value>(line) {
            Ok(Value::Object(object)) => object,
            Ok(_) | Err(_) => {
                counters.invalid_lines.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    line = %excerpt(&String::from_utf8_lossy(line)),
                    "skipped a QMP line that is not a JSON object"
                );
                return None;
            }
        };
        Some(Self::classify(object))
    }

    fn classify(mut object: Map<String, Value>) -> Self {
        if let Some(Value::String(name)) = object.remove("event") {
            let timestamp = object
                .get("timestamp")
                .and_then(|t| Timestamp::deserialize(t).ok())
                .unwrap_or(Timestamp {
                    seconds: -1,
                    microseconds: -1,
                });
            let kind = EventKind::from_wire(&name, object.remove("data"));
            return Incoming::Event(Event { timestamp, kind });
        }
        if let Some(value) = object.remove("return") {
            return Incoming::Reply {
                id: object.remove("id"),
                result: Ok(value),
            };
        }
        if let Some(error) = object.get("error") {
            if let Ok(body) = ErrorBody::deserialize(error) {
                return Incoming::Reply {
                    id: object.remove("id"),
                    result: Err(body),
                };
            }
        }
        if let Some(body) = object.remove("QMP") {
            return Incoming::Greeting(body);
        }
        Incoming::Other(object)
    }

    /// Describes the message for an error or a log line.
    fn describe(&self) -> String {
        match self {
            Incoming::Event(event) => format!("event {event}"),
            Incoming::Reply { id, result } => {
                let id = id
                    .as_ref()
                    .map_or_else(|| "none".to_owned(), Value::to_string);
                match result {
                    Ok(value) => format!("reply with id {id}: {}", excerpt(&value.to_string())),
                    Err(error) => {
                        format!("error reply with id {id}: {}: {}", error.class, error.desc)
                    }
                }
            }
            Incoming::Greeting(body) => format!("greeting {}", excerpt(&body.to_string())),
            Incoming::Other(object) => excerpt(&Value::Object(object.clone()).to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "test"}, "capabilities": ["oob"]}}"#;

    /// The server end of an in-memory QMP session.
    struct Peer {
        stream: DuplexStream,
        buf: Vec<u8>,
    }

    impl Peer {
        async fn send(&mut self, line: &str) {
            self.stream.write_all(line.as_bytes()).await.unwrap();
            self.stream.write_all(b"\r\n").await.unwrap();
        }

        /// Reads one request. Requests carry no newline, so this parses a JSON stream.
        async fn request(&mut self) -> Value {
            loop {
                let mut values =
                    serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
                if let Some(Ok(value)) = values.next() {
                    let used = values.byte_offset();
                    self.buf.drain(..used);
                    return value;
                }
                let mut chunk = [0u8; 4096];
                let n = self.stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "client closed the stream");
                self.buf.extend_from_slice(&chunk[..n]);
            }
        }

        async fn reply(&mut self, id: &Value, value: Value) {
            self.send(&json!({"return": value, "id": id}).to_string())
                .await;
        }
    }

    fn pair() -> (
        Negotiating<ReadHalf<DuplexStream>, WriteHalf<DuplexStream>>,
        Peer,
    ) {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let config = Config {
            event_queue_capacity: 2,
            ..Config::default()
        };
        (
            Negotiating::new(ours, config),
            Peer {
                stream: theirs,
                buf: Vec::new(),
            },
        )
    }

    async fn connected() -> (Client, Peer) {
        let (session, mut peer) = pair();
        let negotiation = tokio::spawn(session.negotiate(Duration::from_secs(5)));
        peer.send(GREETING).await;
        let request = peer.request().await;
        assert_eq!(request, json!({"execute": "qmp_capabilities", "id": 0}));
        peer.reply(&request["id"], json!({})).await;
        (negotiation.await.unwrap().unwrap(), peer)
    }

    fn event(name: &str) -> String {
        json!({"event": name, "timestamp": {"seconds": 1, "microseconds": 2}}).to_string()
    }

    #[tokio::test]
    async fn negotiate_keeps_greeting() {
        let (client, _peer) = connected().await;
        assert_eq!(client.greeting().version.qemu.major, 10);
        assert_eq!(client.greeting().capabilities, vec!["oob".to_owned()]);
    }

    #[tokio::test]
    async fn negotiate_delivers_early_events() {
        let (mut session, mut peer) = pair();
        let mut events = session.subscribe();
        let negotiation = tokio::spawn(session.negotiate(Duration::from_secs(5)));
        peer.send(&event("RESUME")).await;
        peer.send(GREETING).await;
        let request = peer.request().await;
        peer.send(&event("STOP")).await;
        peer.reply(&request["id"], json!({})).await;
        let _client = negotiation.await.unwrap().unwrap();
        assert_eq!(events.recv().await.unwrap().kind, EventKind::Resume);
        assert_eq!(events.recv().await.unwrap().kind, EventKind::Stop);
    }

    #[tokio::test]
    async fn negotiate_rejects_reply_as_greeting() {
        let (session, mut peer) = pair();
        let negotiation = tokio::spawn(session.negotiate(Duration::from_secs(5)));
        peer.send(r#"{"return": {}}"#).await;
        let error = negotiation.await.unwrap().unwrap_err();
        assert!(matches!(error, Error::InvalidGreeting { .. }), "{error:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn negotiate_timeout() {
        let (session, _peer) = pair();
        let error = session.negotiate(Duration::from_secs(3)).await.unwrap_err();
        assert!(
            matches!(error, Error::NegotiationTimedOut { after } if after == Duration::from_secs(3)),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn replies_routed_by_id() {
        let (client, mut peer) = connected().await;
        let first = tokio::spawn({
            let client = client.clone();
            async move { client.execute("first", None).await }
        });
        let first_request = peer.request().await;
        let second = tokio::spawn({
            let client = client.clone();
            async move { client.execute("second", Some(json!({"x": 1}))).await }
        });
        let second_request = peer.request().await;
        assert_eq!(second_request["arguments"], json!({"x": 1}));
        assert!(first_request.get("arguments").is_none());

        peer.reply(&second_request["id"], json!("two")).await;
        peer.reply(&first_request["id"], json!("one")).await;
        assert_eq!(first.await.unwrap().unwrap(), json!("one"));
        assert_eq!(second.await.unwrap().unwrap(), json!("two"));
    }

    #[tokio::test]
    async fn qmp_error_typed() {
        let (client, mut peer) = connected().await;
        let call = tokio::spawn(async move { client.execute("nope", None).await });
        let request = peer.request().await;
        peer.send(&json!({"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": request["id"]}).to_string()).await;
        let error = call.await.unwrap().unwrap_err();
        match error {
            Error::Qmp {
                command,
                class,
                desc,
            } => {
                assert_eq!(command, "nope");
                assert_eq!(class, ErrorClass::CommandNotFound);
                assert_eq!(desc, "The command nope has not been found");
            }
            other => panic!("expected a QMP error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn unknown_id_and_invalid_line_skipped() {
        let (client, mut peer) = connected().await;
        let caller = client.clone();
        let call = tokio::spawn(async move { caller.execute("query-status", None).await });
        let request = peer.request().await;
        peer.reply(&json!(999), json!("stray")).await;
        peer.send("this is not JSON").await;
        peer.send("[1, 2]").await;
        peer.reply(&request["id"], json!("ok")).await;
        assert_eq!(call.await.unwrap().unwrap(), json!("ok"));
        assert_eq!(
            client.counters(),
            SessionCounters {
                invalid_lines: 2,
                unexpected_messages: 1
            }
        );
        assert!(!client.is_closed());
    }

    #[tokio::test(start_paused = true)]
    async fn command_timeout() {
        let (client, mut peer) = connected().await;
        let caller = client.clone();
        let call = tokio::spawn(async move {
            caller
                .call_within(
                    &super::super::commands::QueryStatus,
                    Duration::from_millis(1500),
                )
                .await
        });
        let request = peer.request().await;
        let error = call.await.unwrap().unwrap_err();
        assert!(
            matches!(&error, Error::TimedOut { command, after } if command == "query-status" && *after == Duration::from_millis(1500)),
            "{error:?}"
        );
        // The late reply is skipped, and the session keeps working.
        peer.reply(
            &request["id"],
            json!({"status": "running", "running": true}),
        )
        .await;
        let caller = client.clone();
        let call = tokio::spawn(async move { caller.execute("cont", None).await });
        let request = peer.request().await;
        peer.reply(&request["id"], json!({})).await;
        assert_eq!(call.await.unwrap().unwrap(), json!({}));
        assert_eq!(client.counters().unexpected_messages, 1);
    }

    #[tokio::test]
    async fn close_fails_pending_and_new() {
        let (client, mut peer) = connected().await;
        let mut events = client.subscribe();
        let caller = client.clone();
        let call = tokio::spawn(async move { caller.execute("quit", None).await });
        peer.request().await;
        drop(peer);
        let error = call.await.unwrap().unwrap_err();
        assert!(matches!(error, Error::ConnectionClosed), "{error:?}");
        assert!(matches!(client.closed().await, CloseReason::Eof));
        let error = client.execute("query-status", None).await.unwrap_err();
        assert!(matches!(error, Error::ConnectionClosed), "{error:?}");
        assert_eq!(events.recv().await, None);
        assert!(client.subscribe().recv().await.is_none());
    }

    #[tokio::test]
    async fn close_on_truncated_line() {
        let (client, mut peer) = connected().await;
        peer.stream.write_all(br#"{"return": "#).await.unwrap();
        drop(peer);
        match client.closed().await {
            CloseReason::Failed(error) => {
                assert!(
                    matches!(*error, Error::TruncatedLine { len: 11 }),
                    "{error:?}"
                );
            }
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn queue_keeps_lifecycle_events() {
        let (client, mut peer) = connected().await;
        let mut events = client.subscribe();
        for name in ["BALLOON_CHANGE", "X1", "X2", "STOP", "X3", "RESUME"] {
            peer.send(&event(name)).await;
        }
        drop(peer);
        client.closed().await;

        let mut names = Vec::new();
        while let Some(event) = events.recv().await {
            names.push(event.kind.name().to_owned());
        }
        // Capacity 2: BALLOON_CHANGE lacks its data and stays untyped, X1 fills the queue,
        // X2 and X3 are dropped, and the lifecycle events always pass.
        assert_eq!(names, ["BALLOON_CHANGE", "X1", "STOP", "RESUME"]);
        assert_eq!(events.dropped(), 2);
    }

    #[tokio::test]
    async fn drop_client_closes_stream() {
        let (client, mut peer) = connected().await;
        drop(client);
        let mut chunk = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), peer.stream.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0);
    }
}
