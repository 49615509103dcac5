//! `nomad-driver-qemu qmp`: one QMP command to a running VM.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;
use tokio_util::io::InspectReader;

use crate::driver::vm::sys::RunDir;
use crate::qmp::{self, CloseReason, Negotiating};

/// Time to wait for the QMP reader to record why the session closed, after a command failed
/// because it did.
const CLOSE_REASON_WAIT: Duration = Duration::from_millis(500);

/// Options of `qmp`.
#[derive(Debug, clap::Args)]
pub struct QmpArgs {
    /// Path of the VM's QMP socket. For a VM that the driver or `run` controls, use the
    /// operators' socket `<run dir>/qmp-operator.sock`: the driver holds `qmp.sock`. Any length
    /// works.
    #[arg(long)]
    pub socket: PathBuf,

    /// Seconds to wait for the QMP greeting, and again for the reply (1 to 3600).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout: u64,

    /// QMP command name as QEMU spells it, such as `query-status`.
    pub command: String,

    /// Command arguments as a JSON object, such as '{"device": "ide0-hd0"}'.
    pub arguments: Option<String>,
}

/// Runs `qmp`: connects, negotiates, sends the command and prints the `return` value as JSON.
pub fn main(args: QmpArgs) -> anyhow::Result<()> {
    let arguments = match &args.arguments {
        Some(text) => {
            let value: Value = serde_json::from_str(text).with_context(|| {
                format!("invalid JSON arguments {text:?}; pass an object such as '{{\"device\": \"ide0-hd0\"}}'")
            })?;
            if !value.is_object() {
                bail!("invalid JSON arguments {text:?}: expected a JSON object");
            }
            Some(value)
        }
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to build the tokio runtime")?;
    let reply = runtime.block_on(send(&args, arguments))?;
    println!("{}", serde_json::to_string_pretty(&reply)?);
    Ok(())
}

async fn send(args: &QmpArgs, arguments: Option<Value>) -> anyhow::Result<Value> {
    let timeout = Duration::from_secs(args.timeout);
    let (dir, name) = split_socket_path(args)?;
    let dir = RunDir::open(&dir)
        .with_context(|| format!("failed to open the directory of {}", args.socket.display()))?;
    let stream = tokio::net::UnixStream::connect(dir.alias(&name))
        .await
        .with_context(|| format!("failed to connect to QMP socket {}", args.socket.display()))?;

    // Counts the bytes read, so that a timeout can tell a silent socket from one that sends
    // something other than a QMP greeting.
    let received = Arc::new(AtomicUsize::new(0));
    let (reader, writer) = stream.into_split();
    let counter = Arc::clone(&received);
    let reader = InspectReader::new(reader, move |bytes: &[u8]| {
        counter.fetch_add(bytes.len(), Ordering::Relaxed);
    });

    let client = match Negotiating::from_parts(reader, writer, qmp::Config::default())
        .negotiate(timeout)
        .await
    {
        Ok(client) => client,
        Err(qmp::Error::NegotiationTimedOut { after }) => {
            let bytes = received.load(Ordering::Relaxed);
            if bytes > 0 {
                bail!(
                    "received data that is not QMP from {} ({bytes} bytes, no QMP greeting \
                     within {after:?}); check that the path is a QEMU QMP socket",
                    args.socket.display()
                );
            }
            bail!(
                "no QMP greeting from {} within {after:?}: QEMU serves one QMP client at a time, \
                 so the driver (or another client) probably holds this socket; use {} in the \
                 same directory, which the driver leaves free for operators",
                args.socket.display(),
                crate::driver::vm::OPERATOR_SOCKET_NAME
            )
        }
        Err(error) => {
            return Err(error)
                .with_context(|| format!("QMP negotiation on {} failed", args.socket.display()))
        }
    };
    match client
        .execute_within(&args.command, arguments, timeout)
        .await
    {
        Ok(reply) => Ok(reply),
        Err(qmp::Error::ConnectionClosed) => {
            // The reader records the cause, such as an oversized reply, right after it fails
            // the waiting command.
            let cause = match tokio::time::timeout(CLOSE_REASON_WAIT, client.closed()).await {
                Ok(CloseReason::Failed(error)) => error.to_string(),
                Ok(CloseReason::Eof) | Err(_) => "QEMU closed the connection".to_owned(),
            };
            bail!(
                "QMP command {:?} failed: the QMP session ended: {cause}",
                args.command
            )
        }
        Err(error) => Err(error).with_context(|| format!("QMP command {:?} failed", args.command)),
    }
}

fn split_socket_path(args: &QmpArgs) -> anyhow::Result<(PathBuf, String)> {
    let name = args
        .socket
        .file_name()
        .and_then(|name| name.to_str())
        .with_context(|| format!("invalid socket path {}", args.socket.display()))?;
    let dir = match args.socket.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((dir, name.to_string()))
}
