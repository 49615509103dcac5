//! `nomad-driver-qemu qmp`: one QMP command to a running VM.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

use crate::driver::vm::sys::RunDir;
use crate::qmp::{self, Negotiating};

/// Options of `qmp`.
#[derive(Debug, clap::Args)]
pub struct QmpArgs {
    /// Path of the VM's QMP socket. For a VM that the driver or `run` controls, use the
    /// operators' socket `<run dir>/qmp-operator.sock`: the driver holds `qmp.sock`. Any length
    /// works.
    #[arg(long)]
    pub socket: PathBuf,

    /// Seconds to wait for the QMP greeting, and again for the reply.
    #[arg(long, default_value_t = 5)]
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

    let client = match Negotiating::new(stream, qmp::Config::default())
        .negotiate(timeout)
        .await
    {
        Ok(client) => client,
        Err(qmp::Error::NegotiationTimedOut { after }) => bail!(
            "no QMP greeting from {} within {after:?}: QEMU serves one QMP client at a time, so \
             the driver (or another client) probably holds this socket; use {} in the same \
             directory, which the driver leaves free for operators",
            args.socket.display(),
            crate::driver::vm::OPERATOR_SOCKET_NAME
        ),
        Err(error) => {
            return Err(error)
                .with_context(|| format!("QMP negotiation on {} failed", args.socket.display()))
        }
    };
    client
        .execute_within(&args.command, arguments, timeout)
        .await
        .with_context(|| format!("QMP command {:?} failed", args.command))
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
