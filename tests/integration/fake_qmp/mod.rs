//! A scripted QMP server on a temporary unix socket, for faults that real QEMU does not produce
//! on demand.
//!
//! The server accepts one connection and runs its [`Step`]s in order. Replies take the `id` of
//! the last request it read, so scripts need not know the client's ids. A script can also come
//! from a transcript recorded with real QEMU (`fixtures/transcripts/*.jsonl`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

/// The greeting of QEMU 7.2.22 as Debian bookworm ships it.
pub const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}"#;

/// One action of the scripted server.
#[derive(Debug, Clone)]
pub enum Step {
    /// Sends one line followed by `\r\n`.
    Line(String),
    /// Sends bytes exactly as given.
    Raw(Vec<u8>),
    /// Reads one request and checks that it executes this command.
    Expect(String),
    /// Sends `{"return": VALUE, "id": ID}` with the id of the last request.
    Reply(Value),
    /// Sends a reply with the given id.
    ReplyWithId(Value, Value),
    /// Waits this long.
    Sleep(Duration),
    /// Reads until the client closes the stream.
    WaitForClose,
}

/// Shorthand for an event line.
pub fn event(name: &str, data: Option<Value>) -> Step {
    let mut message =
        json!({"event": name, "timestamp": {"seconds": 1796417838, "microseconds": 417140}});
    if let Some(data) = data {
        message["data"] = data;
    }
    Step::Line(message.to_string())
}

/// Returns the steps every session starts with: greeting, then `qmp_capabilities` and its reply.
pub fn negotiation() -> Vec<Step> {
    vec![
        Step::Line(GREETING.to_owned()),
        Step::Expect("qmp_capabilities".to_owned()),
        Step::Reply(json!({})),
    ]
}

/// A running fake server. Dropping it removes the socket's directory.
pub struct FakeQmp {
    dir: tempfile::TempDir,
    task: JoinHandle<Result<(), String>>,
}

impl FakeQmp {
    /// Binds a socket in a new temporary directory and serves `script` to the first client.
    pub fn start(script: Vec<Step>) -> Self {
        let dir =
            tempfile::tempdir().expect("create a temporary directory for the fake QMP socket");
        let listener =
            UnixListener::bind(dir.path().join("qmp.sock")).expect("bind the fake QMP socket");
        let task = tokio::spawn(async move {
            let (stream, _) = listener
                .accept()
                .await
                .map_err(|e| format!("accept failed: {e}"))?;
            serve(stream, script).await
        });
        Self { dir, task }
    }

    /// Path of the socket.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("qmp.sock")
    }

    /// Waits for the script to end and returns its outcome: an error names the step that
    /// failed, such as a request for another command than expected.
    pub async fn finish(self) -> Result<(), String> {
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .map_err(|_| "fake QMP server did not finish within 10 s".to_owned())?
            .map_err(|e| format!("fake QMP server panicked: {e}"))?
    }
}

async fn serve(mut stream: UnixStream, script: Vec<Step>) -> Result<(), String> {
    let mut buf = Vec::new();
    let mut last_id = Value::Null;
    for (index, step) in script.into_iter().enumerate() {
        match step {
            Step::Line(line) => write(&mut stream, format!("{line}\r\n").as_bytes()).await?,
            Step::Raw(bytes) => write(&mut stream, &bytes).await?,
            Step::Expect(name) => {
                let request = read_request(&mut stream, &mut buf)
                    .await
                    .map_err(|e| format!("step {index}: {e}"))?;
                if request["execute"] != name {
                    return Err(format!("step {index}: expected `{name}`, got {request}"));
                }
                last_id = request.get("id").cloned().unwrap_or(Value::Null);
            }
            Step::Reply(value) => {
                let line = json!({"return": value, "id": last_id}).to_string();
                write(&mut stream, format!("{line}\r\n").as_bytes()).await?;
            }
            Step::ReplyWithId(id, value) => {
                let line = json!({"return": value, "id": id}).to_string();
                write(&mut stream, format!("{line}\r\n").as_bytes()).await?;
            }
            Step::Sleep(duration) => tokio::time::sleep(duration).await,
            Step::WaitForClose => {
                let mut chunk = [0u8; 4096];
                while stream.read(&mut chunk).await.map_err(|e| e.to_string())? > 0 {}
            }
        }
    }
    Ok(())
}

async fn write(stream: &mut UnixStream, bytes: &[u8]) -> Result<(), String> {
    stream
        .write_all(bytes)
        .await
        .map_err(|e| format!("write failed: {e}"))
}

/// Reads one request. Requests have no trailing newline, so this parses a JSON stream.
async fn read_request(stream: &mut UnixStream, buf: &mut Vec<u8>) -> Result<Value, String> {
    loop {
        let mut values = serde_json::Deserializer::from_slice(buf).into_iter::<Value>();
        match values.next() {
            Some(Ok(value)) => {
                let used = values.byte_offset();
                buf.drain(..used);
                return Ok(value);
            }
            Some(Err(error)) if !error.is_eof() => return Err(format!("invalid request: {error}")),
            _ => {}
        }
        let mut chunk = [0u8; 4096];
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read failed: {e}"))?;
        if n == 0 {
            return Err("client closed the stream before sending a request".to_owned());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Builds a script from a transcript recorded with real QEMU. Server lines are sent as recorded,
/// except that replies take the id of the client's request. Each client line becomes a
/// [`Step::Expect`] of the same command, and a recorded `close` ends the script.
pub fn script_from_transcript(path: &Path) -> Vec<Step> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read transcript {}: {e}", path.display()));
    let mut script = Vec::new();
    for (number, record) in text.lines().enumerate() {
        let record: Value = serde_json::from_str(record)
            .unwrap_or_else(|e| panic!("{}:{}: invalid JSON: {e}", path.display(), number + 1));
        let line = record["line"].as_str();
        match (record["dir"].as_str(), line) {
            (Some("c2s"), Some(line)) => {
                let request: Value = serde_json::from_str(line).expect("recorded request is JSON");
                let name = request["execute"]
                    .as_str()
                    .expect("recorded request has `execute`");
                script.push(Step::Expect(name.to_owned()));
            }
            (Some("s2c"), Some(line)) => {
                let message: Value = serde_json::from_str(line).expect("recorded message is JSON");
                match message.get("return") {
                    Some(value) if message.get("event").is_none() => {
                        script.push(Step::Reply(value.clone()))
                    }
                    _ => script.push(Step::Line(line.to_owned())),
                }
            }
            (Some("s2c"), None) if record.get("close").is_some() => break,
            _ => {}
        }
    }
    script
}
