//! The plugin process: what runs when a Nomad client agent starts the binary.
//!
//! Nomad (v1.6.5, through go-plugin) starts the binary without arguments, with
//! `NOMAD_PLUGIN_MAGIC_COOKIE` set, and reads one handshake line from stdout:
//! `1|2|unix|<socket path>|grpc|`. The plugin serves gRPC on that Unix socket until Nomad
//! calls `plugin.GRPCController/Shutdown` or sends SIGTERM; SIGINT is ignored, because Ctrl-C
//! on a foreground agent reaches the plugin too. Running VMs are never stopped on exit: the
//! next plugin process recovers them. Logs go to stderr as hclog JSON ([`super::logging`]).
//!
//! # Driver name
//!
//! The name reported to Nomad is the `driver` value jobs use. It is chosen in this order:
//!
//! 1. `--plugin-name NAME` or the `NOMAD_DRIVER_QEMU_NAME` environment variable;
//! 2. the binary's file name: `nomad-driver-qemu` gives `qemu`, `nomad-driver-X` gives `X`,
//!    and any other file name is used as it is.
//!
//! Under the default name `qemu` the plugin replaces Nomad's built-in qemu driver: an external
//! plugin wins over a built-in one of the same name unless its version is lower, and the
//! built-in reports 0.1.0. The agent's `plugin "qemu" { config { … } }` block and existing
//! `driver = "qemu"` jobs then reach this plugin. To run it next to the built-in driver,
//! install it under another file name, for example `nomad-driver-qemu-qmp` for the name
//! `qemu-qmp`, or pass `--plugin-name` through the plugin block's `args`.

use std::ffi::OsStr;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tempfile::TempPath;
use tokio::signal::unix::{signal, SignalKind};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use super::base::{BaseService, PluginState};
use super::go_plugin::{Broker, Controller, Stdio};
use super::logging;
use super::proto::base::base_plugin_server::BasePluginServer;
use super::proto::drivers::driver_server::DriverServer;
use super::proto::go_plugin::{
    grpc_broker_server::GrpcBrokerServer, grpc_controller_server::GrpcControllerServer,
    grpc_stdio_server::GrpcStdioServer,
};
use super::service::{DriverService, TaskEvents};

/// Environment variable go-plugin sets to tell a plugin that a host started it.
pub const MAGIC_COOKIE_KEY: &str = "NOMAD_PLUGIN_MAGIC_COOKIE";

/// Value of [`MAGIC_COOKIE_KEY`] for Nomad plugins (Nomad v1.6.5 `plugins/base/plugin.go`).
pub const MAGIC_COOKIE_VALUE: &str =
    "e4327c2e01eabfd75a8a67adb114fb34a757d57eee7728d857a8cec6e91a7255";

/// Name used when the binary's file name is `nomad-driver-qemu`.
pub const DEFAULT_NAME: &str = "qemu";

/// Directory for the socket, set by go-plugin hosts that want the socket somewhere specific.
const SOCKET_DIR_ENV: &str = "PLUGIN_UNIX_SOCKET_DIR";

/// Maximum socket path length: `sun_path` is 108 bytes on Linux, including the final NUL.
const MAX_SOCKET_PATH_BYTES: usize = 107;

/// Largest request accepted. tonic's default of 4 MiB is too small for a task with a large
/// environment; Nomad's client itself sends up to 2 GiB.
const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// Concurrent streams per connection. Nomad uses one connection, with one long WaitTask call
/// per task plus TaskStats, Fingerprint and TaskEvents streams, so the cap must stay far above
/// the number of tasks on a node.
const MAX_CONCURRENT_STREAMS: u32 = 16_384;

/// Time the server gets to finish open calls after a shutdown request. Nomad sends SIGKILL
/// 2 s after its Shutdown call.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1000);

/// Failure of the plugin process.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The driver name is empty or contains characters Nomad cannot use.
    #[error(
        "invalid driver name {name:?}: use letters, digits, '-', '_' or '.', \
         set with --plugin-name or NOMAD_DRIVER_QEMU_NAME"
    )]
    InvalidName {
        /// The rejected name.
        name: String,
    },

    /// The socket path would exceed the `sun_path` limit.
    #[error(
        "socket directory {dir:?} is too long for a Unix socket path (max {MAX_SOCKET_PATH_BYTES} bytes): \
         set {SOCKET_DIR_ENV} or TMPDIR to a shorter directory"
    )]
    SocketDirTooLong {
        /// The directory the socket would be created in.
        dir: PathBuf,
    },

    /// Creating or configuring the socket failed.
    #[error("failed to create the plugin socket in {dir:?}")]
    Socket {
        /// The directory the socket was created in.
        dir: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },

    /// Writing the handshake line to stdout failed.
    #[error("failed to write the handshake line to stdout")]
    Handshake(#[source] io::Error),

    /// Installing a signal handler failed.
    #[error("failed to install the {signal} handler")]
    Signal {
        /// The signal name.
        signal: &'static str,
        /// What failed.
        #[source]
        source: io::Error,
    },

    /// The gRPC server failed.
    #[error("the gRPC server failed")]
    Serve(#[source] tonic::transport::Error),

    /// The async runtime could not be built.
    #[error("failed to start the async runtime")]
    Runtime(#[source] io::Error),

    /// The log subscriber could not be installed.
    #[error(transparent)]
    Logging(#[from] logging::LoggingError),
}

/// Serves the Nomad driver plugin protocol until Nomad shuts the plugin down.
///
/// Without the magic cookie in the environment this prints how to use the binary and exits
/// with status 1, as go-plugin plugins do.
pub fn run_plugin(name_override: Option<String>) -> anyhow::Result<()> {
    if std::env::var_os(MAGIC_COOKIE_KEY).as_deref() != Some(OsStr::new(MAGIC_COOKIE_VALUE)) {
        print_not_started_by_nomad();
        std::process::exit(1);
    }

    let program = std::env::args_os().next();
    let name = resolve_name(name_override, program.as_deref().map(Path::new))?;
    logging::install()?;
    raise_open_file_limit();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(PluginError::Runtime)?;
    let result = runtime.block_on(serve(name));
    // Streams and calls still open after the grace period are abandoned, not awaited.
    runtime.shutdown_timeout(SHUTDOWN_GRACE);

    if let Err(error) = result {
        // Logged rather than returned, so that Nomad shows it as an hclog error record.
        tracing::error!(
            error = format!("{:#}", anyhow::Error::from(error)),
            "plugin failed"
        );
        std::process::exit(1);
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard limit, as Go programs (Nomad's own plugins
/// among them) do at start-up. Each VM keeps about five fds open (QMP socket, run dir, pidfd,
/// `/proc` stat file, memory cgroup file), so a common soft limit of 1024 would cap the plugin at
/// about 200 VMs.
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};

    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return;
    }
    let raised = rustix::process::Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            tracing::debug!(from = ?limit.current, to = ?limit.maximum, "raised the open file limit")
        }
        Err(error) => {
            tracing::warn!(%error, current = ?limit.current, "failed to raise the open file limit")
        }
    }
}

fn print_not_started_by_nomad() {
    let message = "\
This binary is a Nomad task driver plugin: a Nomad client agent starts it, it is not meant
to be run by hand. Copy it into the agent's plugin_dir and add a plugin block, for example
plugin \"nomad-driver-qemu\" {}, to the agent configuration.

To boot or control a VM without Nomad, use the subcommands:
  nomad-driver-qemu run ...    boot one VM in the foreground
  nomad-driver-qemu qmp ...    send one QMP command to a running VM
  nomad-driver-qemu --help     list every option
";
    // Nothing else can report a failed write to stderr.
    let _ = io::stderr().write_all(message.as_bytes());
}

/// Returns the driver name: `name_override` if set, else derived from `program`, the path the
/// binary was started as.
pub fn resolve_name(
    name_override: Option<String>,
    program: Option<&Path>,
) -> Result<String, PluginError> {
    let name = match name_override {
        Some(name) => name,
        None => {
            let file_name = program
                .and_then(Path::file_name)
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default();
            name_from_file_name(&file_name)
        }
    };

    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || !name.chars().all(valid) {
        return Err(PluginError::InvalidName { name });
    }
    Ok(name)
}

fn name_from_file_name(file_name: &str) -> String {
    match file_name.strip_prefix("nomad-driver-") {
        Some(rest) if !rest.is_empty() => rest.to_owned(),
        _ => file_name.to_owned(),
    }
}

/// Returns the directory for the socket: `PLUGIN_UNIX_SOCKET_DIR`, else `TMPDIR`, else `/tmp`.
fn socket_dir() -> PathBuf {
    match std::env::var_os(SOCKET_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => std::env::temp_dir(),
    }
}

/// Binds a Unix socket named `plugin<random>` in `dir`, readable and writable by the owner
/// only. The socket file is removed when the returned path is dropped.
fn bind_socket(dir: &Path) -> Result<(tokio::net::UnixListener, TempPath), PluginError> {
    // "plugin" plus 6 random characters, as tempfile names it.
    let longest_path = dir.join("plugin000000");
    if longest_path.as_os_str().len() > MAX_SOCKET_PATH_BYTES {
        return Err(PluginError::SocketDirTooLong {
            dir: dir.to_owned(),
        });
    }

    let socket_error = |source| PluginError::Socket {
        dir: dir.to_owned(),
        source,
    };
    let (listener, path) = tempfile::Builder::new()
        .prefix("plugin")
        .make_in(dir, |path| std::os::unix::net::UnixListener::bind(path))
        .map_err(socket_error)?
        .into_parts();

    // Connecting needs write permission on the socket; the umask already kept others out
    // between bind and this call unless it grants group or world write.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(socket_error)?;
    listener.set_nonblocking(true).map_err(socket_error)?;
    let listener = tokio::net::UnixListener::from_std(listener).map_err(socket_error)?;
    Ok((listener, path))
}

async fn serve(name: String) -> Result<(), PluginError> {
    let mut signals = Signals::install()?;
    let dir = socket_dir();
    let (listener, socket_path) = bind_socket(&dir)?;
    let shutdown = CancellationToken::new();

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status("plugin", tonic_health::ServingStatus::Serving)
        .await;

    let state = Arc::new(PluginState::new(name.clone()));
    let driver = DriverService::new(Arc::clone(&state), TaskEvents::default(), shutdown.clone());

    let router = Server::builder()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .trace_fn(|request| tracing::info_span!("rpc", rpc = %request.uri().path()))
        .add_service(
            BasePluginServer::new(BaseService::new(state))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(DriverServer::new(driver).max_decoding_message_size(MAX_MESSAGE_BYTES))
        .add_service(GrpcControllerServer::new(Controller::new(shutdown.clone())))
        .add_service(GrpcStdioServer::new(Stdio::new(shutdown.clone())))
        .add_service(GrpcBrokerServer::new(Broker::new(shutdown.clone())))
        .add_service(health_service);

    let server = tokio::spawn(router.serve_with_incoming_shutdown(
        UnixListenerStream::new(listener),
        shutdown.clone().cancelled_owned(),
    ));

    write_handshake(&socket_path)?;
    tracing::info!(
        plugin_name = %name,
        version = env!("CARGO_PKG_VERSION"),
        socket = %socket_path.display(),
        "plugin serving"
    );

    signals.wait_for_shutdown(&shutdown).await;
    shutdown.cancel();

    let result = match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(Ok(result)) => result.map_err(PluginError::Serve),
        Ok(Err(join_error)) => {
            tracing::error!(error = %join_error, "gRPC server task failed");
            Ok(())
        }
        Err(_) => {
            tracing::warn!(
                grace_ms = SHUTDOWN_GRACE.as_millis() as u64,
                "open calls did not finish in time, exiting anyway"
            );
            Ok(())
        }
    };

    drop(socket_path);
    tracing::info!(plugin_name = %name, "plugin stopped");
    result
}

/// Writes go-plugin's handshake line: core protocol 1, app protocol 2, the socket, gRPC, and
/// an empty certificate field (Nomad does not use TLS for plugins).
fn write_handshake(socket_path: &Path) -> Result<(), PluginError> {
    let line = format!("1|2|unix|{}|grpc|\n", socket_path.display());
    let mut stdout = io::stdout().lock();
    stdout
        .write_all(line.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(PluginError::Handshake)
}

/// SIGINT and SIGTERM streams. Creating them replaces the default action (exit) of both
/// signals, so they must exist before the handshake makes the plugin visible.
struct Signals {
    interrupts: tokio::signal::unix::Signal,
    terminations: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, PluginError> {
        let signal_error = |signal| move |source| PluginError::Signal { signal, source };
        Ok(Self {
            interrupts: signal(SignalKind::interrupt()).map_err(signal_error("SIGINT"))?,
            terminations: signal(SignalKind::terminate()).map_err(signal_error("SIGTERM"))?,
        })
    }

    /// Returns when Nomad requests a shutdown or SIGTERM arrives. SIGINT is logged and
    /// ignored.
    async fn wait_for_shutdown(&mut self, shutdown: &CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = self.terminations.recv() => {
                    tracing::info!("SIGTERM received, stopping the plugin, VMs are left running");
                    return;
                }
                _ = self.interrupts.recv() => {
                    tracing::info!("SIGINT ignored: the plugin stops when Nomad asks it to");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_from_binary_file_name() {
        let cases = [
            ("/opt/nomad/plugins/nomad-driver-qemu", "qemu"),
            ("nomad-driver-qemu-qmp", "qemu-qmp"),
            ("/usr/local/bin/nomad-driver-vm", "vm"),
            ("/usr/local/bin/qemu-qmp", "qemu-qmp"),
            ("./nomad-driver-", "nomad-driver-"),
        ];
        for (program, expected) in cases {
            let name = resolve_name(None, Some(Path::new(program))).expect(program);
            assert_eq!(name, expected, "name for {program}");
        }
    }

    #[test]
    fn name_override_wins() {
        let name = resolve_name(Some("qemu2".into()), Some(Path::new("nomad-driver-qemu")))
            .expect("valid override");
        assert_eq!(name, "qemu2");
    }

    #[test]
    fn name_invalid_rejected() {
        for bad in ["", "qemu vm", "qemu/x", "émulateur"] {
            let error = resolve_name(Some(bad.into()), None).unwrap_err();
            assert!(
                matches!(&error, PluginError::InvalidName { name } if name == bad),
                "{bad:?} gave {error}"
            );
        }
        let error = resolve_name(None, None).unwrap_err();
        assert!(matches!(error, PluginError::InvalidName { .. }), "{error}");
    }

    #[tokio::test]
    async fn socket_is_private_and_removed() {
        let dir = tempfile::tempdir().expect("temp dir");

        let (_listener, path) = bind_socket(dir.path()).expect("socket bound");
        let file_name = path
            .file_name()
            .and_then(OsStr::to_str)
            .expect("UTF-8 name");
        assert!(file_name.starts_with("plugin"), "{file_name}");
        let mode = std::fs::metadata(&path)
            .expect("socket exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let kept = path.to_path_buf();
        drop(path);
        assert!(!kept.exists(), "{} still exists", kept.display());
    }

    #[test]
    fn socket_dir_too_long_rejected() {
        let dir = PathBuf::from(format!("/tmp/{}", "d".repeat(100)));

        let error = bind_socket(&dir).unwrap_err();
        assert!(
            matches!(error, PluginError::SocketDirTooLong { .. }),
            "{error}"
        );
    }
}
