//! Spawning QEMU: the spec, stdio, the inherited QMP socket and the child-side setup.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use rustix::fs::OFlags;

use super::argv::{Piece, QemuCommandLine, QmpMonitor};
use super::error::VmError;
use super::sys::{self, ChildSetup, RunDir, UserIds, QMP_CHILD_FDS};

/// File name of the QMP socket inside the VM's run directory. The VM layer keeps the only
/// connection to it.
pub const QMP_SOCKET_NAME: &str = "qmp.sock";

/// File name of the second QMP socket, left free for operators (`nomad-driver-qemu qmp`),
/// because a QMP monitor serves one client at a time.
pub const OPERATOR_SOCKET_NAME: &str = "qmp-operator.sock";

/// Chardev ids of the two monitors, in the order of [`QMP_CHILD_FDS`].
const MONITOR_IDS: [&str; 2] = ["qmp0", "qmp1"];

/// Removes both QMP socket files from `dir`. QEMU never unlinks an inherited socket.
pub(crate) fn remove_sockets(dir: &RunDir) -> std::io::Result<()> {
    dir.remove(QMP_SOCKET_NAME)?;
    dir.remove(OPERATOR_SOCKET_NAME)
}

/// Default deadline for QEMU to send its QMP greeting and complete negotiation.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(10);

/// Number of stderr lines a start error carries.
const STDERR_TAIL_LINES: usize = 20;

/// Maximum bytes of stderr read back for a start error.
const STDERR_TAIL_BYTES: u64 = 8 * 1024;

/// Everything needed to start one VM.
///
/// QEMU's stdout and stderr go straight to the named files or FIFOs, never to this process's
/// own stdio, so QEMU keeps writing after this process exits. A start error carries the tail of
/// `stderr` only when it is a regular file, because what went into a FIFO cannot be read back.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// VM name, passed as `-name guest=NAME` and checked with `query-name` on reattach.
    pub name: String,
    /// Emulator and arguments. It must not contain a `Name` or `QmpMonitor` piece: the VM layer
    /// adds both.
    pub command: QemuCommandLine,
    /// Existing run directory that holds the QMP socket. Its path may be of any length.
    pub dir: PathBuf,
    /// QEMU's working directory, against which relative paths in its arguments resolve. Nomad
    /// tasks use the task dir, which `args_allowlist` checks relative paths against.
    pub work_dir: PathBuf,
    /// File or FIFO for QEMU's stdout (the serial console with `-nographic`). A regular file is
    /// created if missing and appended to.
    pub stdout: PathBuf,
    /// File or FIFO for QEMU's stderr, handled like `stdout`.
    pub stderr: PathBuf,
    /// User to run QEMU as; `None` keeps this process's user.
    pub user: Option<UserIds>,
    /// Network namespace file to run QEMU in, such as `/var/run/netns/NAME`.
    pub netns: Option<PathBuf>,
    /// cgroup directories to put QEMU in, one per hierarchy on cgroup v1 or a single one on
    /// cgroup v2. QEMU joins each by writing its pid to `cgroup.procs` before `exec`, so it
    /// never runs outside them.
    pub cgroups: Vec<PathBuf>,
    /// Deadline for the QMP greeting and negotiation after spawn.
    pub start_timeout: Duration,
}

impl VmSpec {
    fn validate(&self) -> Result<(), VmError> {
        if self.name.is_empty() {
            return Err(VmError::InvalidSpec(
                "the VM name is empty; set a non-empty name".into(),
            ));
        }
        let has_own_piece = self
            .command
            .pieces
            .iter()
            .any(|piece| matches!(piece, Piece::Name(_) | Piece::QmpMonitor(_)));
        if has_own_piece {
            return Err(VmError::InvalidSpec(
                "the command line contains a -name or QMP monitor piece; remove it, the VM layer adds both".into(),
            ));
        }
        if self.start_timeout.is_zero() {
            return Err(VmError::InvalidSpec(
                "start_timeout is zero; use a few seconds".into(),
            ));
        }
        Ok(())
    }
}

/// A spawned QEMU before its QMP session is up.
#[derive(Debug)]
pub(crate) struct Spawned {
    pub pid: u32,
    pub pidfd: OwnedFd,
    pub start_time: u64,
    pub dir: RunDir,
    pub stderr: StderrSource,
}

/// Where a start error reads QEMU's stderr back from.
#[derive(Debug)]
pub(crate) struct StderrSource {
    path: PathBuf,
    /// Length of the file when QEMU started, or `None` when it is not a regular file.
    offset: Option<u64>,
}

impl StderrSource {
    /// Returns the last lines QEMU wrote to stderr since it started.
    pub fn tail(&self) -> String {
        let Some(offset) = self.offset else {
            return format!(
                "(stderr goes to the FIFO {} and cannot be read back)",
                self.path.display()
            );
        };
        match read_tail(&self.path, offset) {
            Ok(text) if text.trim().is_empty() => "(QEMU wrote nothing to stderr)".into(),
            Ok(text) => text,
            Err(error) => format!("(failed to read {}: {error})", self.path.display()),
        }
    }
}

fn read_tail(path: &Path, offset: u64) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let end = file.metadata()?.len();
    let start = offset.max(end.saturating_sub(STDERR_TAIL_BYTES));
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    let first = lines.len().saturating_sub(STDERR_TAIL_LINES);
    Ok(lines[first..].join("\n"))
}

/// Spawns QEMU for `spec` with the QMP socket bound in the run directory.
///
/// On error nothing is left running and the socket file is removed.
pub(crate) fn spawn(spec: &VmSpec) -> Result<Spawned, VmError> {
    spec.validate()?;
    let dir = RunDir::open(&spec.dir).map_err(|source| VmError::OpenRunDir {
        path: spec.dir.clone(),
        source,
    })?;
    let bind = |name: &str| {
        dir.bind_listener(name)
            .map(OwnedFd::from)
            .map_err(|source| VmError::BindSocket {
                path: spec.dir.join(name),
                source,
            })
    };
    let result = bind(QMP_SOCKET_NAME)
        .and_then(|driver| Ok([driver, bind(OPERATOR_SOCKET_NAME)?]))
        .and_then(|listeners| spawn_with_listeners(spec, listeners));
    match result {
        Ok((pid, pidfd, start_time, stderr)) => Ok(Spawned {
            pid,
            pidfd,
            start_time,
            dir,
            stderr,
        }),
        Err(error) => {
            if let Err(remove_error) = remove_sockets(&dir) {
                tracing::warn!(vm = %spec.name, error = %remove_error, "failed to remove QMP socket after a failed spawn");
            }
            Err(error)
        }
    }
}

fn spawn_with_listeners(
    spec: &VmSpec,
    listeners: [OwnedFd; 2],
) -> Result<(u32, OwnedFd, u64, StderrSource), VmError> {
    let stdout = open_output(&spec.stdout, "stdout file")?;
    let stderr = open_output(&spec.stderr, "stderr file")?;
    let stderr_source = StderrSource {
        path: spec.stderr.clone(),
        offset: stderr
            .metadata()
            .ok()
            .filter(|meta| meta.is_file())
            .map(|meta| meta.len()),
    };

    let netns = match &spec.netns {
        Some(path) => Some(
            ChildSetup::open_netns(path).map_err(|source| VmError::OpenFile {
                what: "network namespace",
                path: path.clone(),
                source,
            })?,
        ),
        None => None,
    };
    let cgroup_procs = spec
        .cgroups
        .iter()
        .map(|dir| {
            ChildSetup::open_cgroup_procs(dir).map_err(|source| VmError::OpenFile {
                what: "cgroup.procs of",
                path: dir.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let qmp_listeners = ChildSetup::listeners(listeners).map_err(|source| VmError::BindSocket {
        path: spec.dir.join(QMP_SOCKET_NAME),
        source,
    })?;
    let setup = ChildSetup {
        qmp_listeners,
        netns,
        cgroup_procs,
        user: spec.user,
    };

    let mut command_line = spec.command.clone().with(Piece::Name(spec.name.clone()));
    for (id, fd) in MONITOR_IDS.into_iter().zip(QMP_CHILD_FDS) {
        command_line.push(QmpMonitor { id, fd });
    }
    let mut command = Command::new(&command_line.emulator);
    command
        .args(command_line.args())
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .current_dir(&spec.work_dir);
    setup.install(&mut command);

    let child = command.spawn().map_err(|source| VmError::Spawn {
        emulator: command_line.emulator.clone(),
        source,
    })?;
    // Close this process's copies of the listening sockets now: while they are open, a client
    // can still connect after QEMU died, and a dead VM looks alive.
    drop(setup);
    let pid = child.id();
    // Dropping a std Child neither kills nor waits; the exit watcher reaps QEMU through its pidfd.
    drop(child);

    let pidfd = match sys::pidfd_open(pid) {
        Ok(pidfd) => pidfd,
        Err(source) => {
            kill_unwatched(pid);
            return Err(VmError::Spawn {
                emulator: command_line.emulator,
                source,
            });
        }
    };
    let start_time = match sys::process_start_time(pid) {
        Ok(start_time) => start_time,
        Err(source) => {
            kill_unwatched(pid);
            return Err(VmError::Spawn {
                emulator: command_line.emulator,
                source,
            });
        }
    };
    tracing::info!(vm = %spec.name, pid, "QEMU spawned");
    Ok((pid, pidfd, start_time, stderr_source))
}

/// Kills and reaps a child that has no exit watcher yet. Our own child's pid cannot be reused
/// before we reap it, so signalling it by pid is safe here.
fn kill_unwatched(pid: u32) {
    if let Err(error) = sys::signal_process_group(pid, libc::SIGKILL) {
        tracing::warn!(pid, %error, "failed to kill QEMU after a failed spawn");
    }
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    if let Err(error) = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty()) {
        tracing::warn!(%error, "failed to reap QEMU after a failed spawn");
    }
}

/// Opens a stdout or stderr target write-only. A FIFO without a reader fails at once (ENXIO)
/// instead of blocking, and the fd QEMU gets is blocking again.
fn open_output(path: &Path, what: &'static str) -> Result<File, VmError> {
    let open = || -> std::io::Result<File> {
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        let flags = rustix::fs::fcntl_getfl(&file)?;
        rustix::fs::fcntl_setfl(&file, flags - OFlags::NONBLOCK)?;
        Ok(file)
    };
    open().map_err(|source| VmError::OpenFile {
        what,
        path: path.to_path_buf(),
        source,
    })
}
