//! The built plugin binary started as Nomad's client starts it: with the magic cookie and a
//! socket dir in the environment, then its handshake line read from stdout.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nomad_driver_qemu::driver::nomad::config::PLUGIN_OPTIONS;
use nomad_driver_qemu::driver::nomad::plugin::{MAGIC_COOKIE_KEY, MAGIC_COOKIE_VALUE};
use rmpv::Value;
use rustix::process::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};
use tonic::transport::{Channel, Endpoint};

/// Upper bound for the plugin to print its handshake, reply to a quick call or exit.
pub const REPLY_LIMIT: Duration = Duration::from_secs(10);

/// A running plugin process, killed when dropped.
pub struct PluginProcess {
    child: Child,
    handshake: String,
    socket: PathBuf,
    stdout: Option<BufReader<ChildStdout>>,
    socket_dir: tempfile::TempDir,
}

impl PluginProcess {
    /// Starts the plugin binary with `args`, `RUST_LOG=debug` and its log on `stderr`, and
    /// reads its handshake line.
    pub async fn start(args: &[&str], stderr: impl Into<Stdio>) -> PluginProcess {
        let socket_dir = tempfile::tempdir().expect("temp dir for the socket");
        let mut child = Command::new(env!("CARGO_BIN_EXE_nomad-driver-qemu"))
            .args(args)
            .env(MAGIC_COOKIE_KEY, MAGIC_COOKIE_VALUE)
            .env("PLUGIN_UNIX_SOCKET_DIR", socket_dir.path())
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("plugin binary starts");

        let mut stdout = BufReader::new(child.stdout.take().expect("stdout piped"));
        let mut handshake = String::new();
        tokio::time::timeout(REPLY_LIMIT, stdout.read_line(&mut handshake))
            .await
            .expect("handshake line within the limit")
            .expect("stdout readable");
        let socket = handshake
            .trim_end()
            .split('|')
            .nth(3)
            .unwrap_or_else(|| panic!("socket path in handshake {handshake:?}"))
            .into();

        PluginProcess {
            child,
            handshake,
            socket,
            stdout: Some(stdout),
            socket_dir,
        }
    }

    /// Returns the handshake line as printed, with its newline.
    pub fn handshake(&self) -> &str {
        &self.handshake
    }

    /// Returns the Unix socket path from the handshake line.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Returns the directory passed in `PLUGIN_UNIX_SOCKET_DIR`.
    pub fn socket_dir(&self) -> &Path {
        self.socket_dir.path()
    }

    /// Takes the rest of stdout, after the handshake line.
    pub fn take_stdout(&mut self) -> BufReader<ChildStdout> {
        self.stdout.take().expect("stdout taken once")
    }

    /// Takes stderr, which exists only if the plugin was started with `Stdio::piped()` for it.
    pub fn take_stderr(&mut self) -> ChildStderr {
        self.child
            .stderr
            .take()
            .expect("stderr piped and taken once")
    }

    /// Opens a new gRPC connection to the plugin's socket.
    pub async fn connect(&self) -> Channel {
        Endpoint::try_from(format!("unix://{}", self.socket.display()))
            .expect("valid endpoint")
            .connect()
            .await
            .expect("plugin socket accepts connections")
    }

    pub fn pid(&self) -> Pid {
        let id = self.child.id().expect("plugin still running");
        Pid::from_raw(i32::try_from(id).expect("pid fits i32")).expect("non-zero pid")
    }

    /// Waits for the plugin to exit, failing after `REPLY_LIMIT`.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        tokio::time::timeout(REPLY_LIMIT, self.child.wait())
            .await
            .expect("plugin exits within the limit")
            .expect("plugin exit status")
    }

    /// Kills the plugin with SIGKILL, the way a crash ends it.
    pub async fn crash(mut self) {
        self.child.start_kill().expect("SIGKILL the plugin");
        self.child.wait().await.expect("plugin exit status");
    }
}

/// Encodes `value` as msgpack, the encoding of Nomad's config fields.
pub fn msgpack(value: &Value) -> Vec<u8> {
    let mut bytes = Vec::new();
    rmpv::encode::write_value(&mut bytes, value).expect("msgpack encodes");
    bytes
}

/// Encodes a plugin config as Nomad does: every schema key present, unset ones nil.
pub fn plugin_config(image_paths: &[&str]) -> Vec<u8> {
    let map = PLUGIN_OPTIONS
        .iter()
        .map(|&key| {
            let value = if key == "image_paths" {
                Value::Array(image_paths.iter().map(|&path| Value::from(path)).collect())
            } else {
                Value::Nil
            };
            (Value::from(key), value)
        })
        .collect();
    msgpack(&Value::Map(map))
}
