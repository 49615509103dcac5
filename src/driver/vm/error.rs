//! Errors of the VM layer.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use super::state::VmState;

/// Errors from starting, adopting and controlling a VM.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmError {
    /// The spec is unusable; the message names the value and the fix.
    #[error("invalid VM spec: {0}")]
    InvalidSpec(String),

    /// The run directory could not be opened.
    #[error("failed to open VM run directory {path} (create it first)")]
    OpenRunDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// The QMP listening socket could not be created.
    #[error("failed to bind QMP socket {path}")]
    BindSocket {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// A file QEMU needs (stdout, stderr, network namespace, cgroup) could not be opened.
    #[error("failed to open {what} {path}")]
    OpenFile {
        /// What the file is for.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// The emulator could not be executed, or a pre-exec step failed in the child.
    #[error("failed to spawn QEMU {emulator}")]
    Spawn {
        /// The emulator path.
        emulator: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// QEMU exited before its QMP session was ready.
    #[error("QEMU exited during start ({status}); last stderr lines:\n{stderr_tail}")]
    ExitedDuringStart {
        /// How QEMU ended.
        status: super::exit::ProcessStatus,
        /// The end of QEMU's stderr, or a note on why it is not available.
        stderr_tail: String,
    },

    /// QEMU did not complete the QMP greeting and negotiation in time.
    #[error("QEMU did not become ready within {after:?}; it was killed. Last stderr lines:\n{stderr_tail}")]
    StartTimedOut {
        /// The start deadline.
        after: Duration,
        /// The end of QEMU's stderr, or a note on why it is not available.
        stderr_tail: String,
    },

    /// Connecting to or negotiating on the QMP socket failed.
    #[error("QMP connection to VM {vm} failed")]
    Qmp {
        /// VM name.
        vm: String,
        /// The cause.
        #[source]
        source: crate::qmp::Error,
    },

    /// The saved pid now belongs to a different process, or no longer exists.
    #[error("pid {pid} of VM {vm} is not the saved QEMU process: {detail}")]
    ProcessMismatch {
        /// VM name.
        vm: String,
        /// The saved pid.
        pid: u32,
        /// What did not match.
        detail: String,
    },

    /// The QEMU behind the socket reports another VM name than the saved one.
    #[error("QEMU at {socket} reports VM name {found:?}, expected {expected:?}")]
    NameMismatch {
        /// The socket path.
        socket: PathBuf,
        /// The saved name.
        expected: String,
        /// The name QEMU returned.
        found: Option<String>,
    },

    /// Adopting a running VM did not finish in time.
    #[error("reattaching to VM {vm} timed out after {after:?} (is another QMP client connected?)")]
    ReattachTimedOut {
        /// VM name.
        vm: String,
        /// The deadline.
        after: Duration,
    },

    /// The operation is not allowed in the VM's current state.
    #[error("cannot {operation} VM {vm} while it is {state}")]
    InvalidState {
        /// VM name.
        vm: String,
        /// The operation.
        operation: &'static str,
        /// The current state.
        state: VmState,
    },

    /// A QMP command of an operation failed.
    #[error("QMP command failed on VM {vm}")]
    Command {
        /// VM name.
        vm: String,
        /// The cause.
        #[source]
        source: crate::qmp::Error,
    },

    /// QEMU was still alive after every stop step, including SIGKILL.
    #[error("VM {vm} (pid {pid}) is still running after SIGKILL")]
    StopFailed {
        /// VM name.
        vm: String,
        /// QEMU's pid.
        pid: u32,
    },

    /// Sending a signal to QEMU failed.
    #[error("failed to signal QEMU pid {pid}")]
    Signal {
        /// QEMU's pid.
        pid: u32,
        /// The cause.
        #[source]
        source: io::Error,
    },
}
