//! Host process and file-descriptor primitives for one QEMU process.
//!
//! This is the only module of the crate with `unsafe` code. It covers the `pre_exec` hook that
//! prepares the forked child before `exec` (namespace, cgroup, session, inherited QMP fd, user),
//! the `PIDFD_GET_INFO` ioctl that reads the exit status of a process that is not our child,
//! pidfd registration with tokio, and `sysconf`.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::fs::{Mode, OFlags};
use rustix::process::{Pid, PidfdFlags, WaitId, WaitIdOptions};

/// The fd numbers at which QEMU inherits the QMP listening sockets: the driver's own monitor
/// first, then the operators' monitor.
pub const QMP_CHILD_FDS: [RawFd; 2] = [3, 4];

/// Lowest fd number for the parent's copies of the listeners, above [`QMP_CHILD_FDS`], so that
/// moving one listener to its child fd never overwrites the other.
const LISTENER_MIN_FD: RawFd = 5;

/// A run directory held open as an `O_PATH` fd, so that files inside it can be reached through
/// the short alias `/proc/self/fd/<fd>/<name>` whatever the length of the real path.
///
/// A unix socket address is limited to 107 bytes, and Nomad allocation directories can be
/// longer. Binding and connecting through the alias sidesteps that limit.
#[derive(Debug)]
pub struct RunDir {
    fd: OwnedFd,
    path: PathBuf,
}

impl RunDir {
    /// Opens `path`, which must be an existing directory.
    pub fn open(path: &Path) -> io::Result<Self> {
        let fd = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Self {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// Returns the directory's real path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns the short alias of `name` inside this directory, valid in this process only.
    pub fn alias(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}/{name}", self.fd.as_raw_fd()))
    }

    /// Binds a listening unix socket at `name` in this directory, after removing a stale file
    /// left there by a QEMU that was killed (QEMU never unlinks an inherited socket).
    ///
    /// The listener is close-on-exec, like every fd this process opens.
    pub fn bind_listener(&self, name: &str) -> io::Result<UnixListener> {
        self.remove(name)?;
        UnixListener::bind(self.alias(name))
    }

    /// Removes `name` from this directory; a missing file is not an error.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        match rustix::fs::unlinkat(&self.fd, name, rustix::fs::AtFlags::empty()) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }
}

/// Unix user and group that QEMU runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserIds {
    /// User id.
    pub uid: u32,
    /// Primary group id. Supplementary groups are dropped.
    pub gid: u32,
}

/// What the forked child does before it executes QEMU, in this order: join the network
/// namespace, join the cgroups, start a new session, move the QMP sockets to [`QMP_CHILD_FDS`]
/// without close-on-exec, and switch user last (joining a namespace needs the privileges the
/// switch drops).
#[derive(Debug)]
pub struct ChildSetup {
    /// Listening QMP sockets that QEMU inherits, in the order of [`QMP_CHILD_FDS`]. Build them
    /// with [`ChildSetup::listeners`].
    pub qmp_listeners: [OwnedFd; 2],
    /// Network namespace to join, opened read-only.
    pub netns: Option<File>,
    /// `cgroup.procs` of each cgroup directory to join (v1 or v2), opened write-only.
    pub cgroup_procs: Vec<File>,
    /// User to run as.
    pub user: Option<UserIds>,
}

impl ChildSetup {
    /// Moves `listeners` to fd numbers of at least [`LISTENER_MIN_FD`], still close-on-exec,
    /// for [`ChildSetup::qmp_listeners`].
    pub fn listeners(listeners: [OwnedFd; 2]) -> io::Result<[OwnedFd; 2]> {
        let [driver, operator] = listeners;
        Ok([
            rustix::io::fcntl_dupfd_cloexec(&driver, LISTENER_MIN_FD)?,
            rustix::io::fcntl_dupfd_cloexec(&operator, LISTENER_MIN_FD)?,
        ])
    }

    /// Opens the network namespace file at `path` for [`ChildSetup::netns`].
    pub fn open_netns(path: &Path) -> io::Result<File> {
        File::open(path)
    }

    /// Opens `<dir>/cgroup.procs` for [`ChildSetup::cgroup_procs`].
    pub fn open_cgroup_procs(dir: &Path) -> io::Result<File> {
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))
    }

    /// Installs the child-side steps as `command`'s `pre_exec` hook.
    ///
    /// `self` must stay alive until `command.spawn()` returns, because the hook uses its fds by
    /// number in the child.
    pub fn install(&self, command: &mut Command) {
        let qmp_fds = self.qmp_listeners.each_ref().map(AsRawFd::as_raw_fd);
        let netns_fd = self.netns.as_ref().map(|file| file.as_raw_fd());
        // Collected here, before the fork: the hook itself must not allocate.
        let cgroup_fds: Vec<RawFd> = self.cgroup_procs.iter().map(AsRawFd::as_raw_fd).collect();
        let user = self.user;

        let hook = move || -> io::Result<()> {
            if let Some(fd) = netns_fd {
                // SAFETY: `fd` is an open namespace file owned by the `ChildSetup` that outlives
                // the spawn, and setns only reads it.
                check(unsafe { libc::setns(fd, libc::CLONE_NEWNET) })?;
            }
            for &fd in &cgroup_fds {
                // Writing "0" to cgroup.procs moves the writing process, on v1 and v2 alike.
                let pid = b"0";
                // SAFETY: `fd` is an open, writable file owned by the `ChildSetup`, and the
                // buffer is a valid static slice of the given length.
                let written = unsafe { libc::write(fd, pid.as_ptr().cast(), pid.len()) };
                if written < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            // SAFETY: setsid takes no arguments and only changes this child's session.
            check(unsafe { libc::setsid() })?;
            for (&source, &target) in qmp_fds.iter().zip(QMP_CHILD_FDS.iter()) {
                // SAFETY: `source` is an open listener at or above LISTENER_MIN_FD, so it is
                // never one of the targets. dup2 replaces whatever the target fd was in this
                // child (the namespace and cgroup fds are no longer needed), and the copy it
                // makes has close-on-exec cleared.
                check(unsafe { libc::dup2(source, target) })?;
            }
            if let Some(user) = user {
                // SAFETY: a zero-length group list with a null pointer is valid for setgroups,
                // and the child has one thread, so the id changes apply to the whole process.
                check(unsafe { libc::setgroups(0, std::ptr::null()) })?;
                // SAFETY: as above, plain id arguments.
                check(unsafe { libc::setgid(user.gid) })?;
                // SAFETY: as above, plain id arguments.
                check(unsafe { libc::setuid(user.uid) })?;
            }
            Ok(())
        };

        // SAFETY: the hook runs in the forked child before exec and only makes async-signal-safe
        // system calls (setns, write, setsid, fcntl, dup2, setgroups, setgid, setuid) on
        // integers and fds captured by value; it reads the fd list built before the fork. It
        // allocates nothing and takes no locks.
        unsafe {
            command.pre_exec(hook);
        }
    }
}

fn check(result: libc::c_int) -> io::Result<()> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Opens a pidfd for `pid`, which stays valid (and refers to the same process) even after the
/// pid number is reused.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = to_pid(pid)?;
    Ok(rustix::process::pidfd_open(pid, PidfdFlags::NONBLOCK)?)
}

/// Registers a pidfd with the tokio runtime, to wait for it to become readable (the process
/// exited). On failure the pidfd is handed back with the error.
pub fn register_pidfd(
    pidfd: OwnedFd,
) -> Result<tokio::io::unix::AsyncFd<OwnedFd>, (OwnedFd, io::Error)> {
    // SAFETY: `OwnedFd` owns a valid, open fd. The `AsyncFd` takes ownership of it and nothing
    // else closes or replaces that fd while the `AsyncFd` is registered.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
    }
    .map_err(|error| error.into_parts())
}

fn to_pid(pid: u32) -> io::Result<Pid> {
    i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("invalid pid {pid}")))
}

/// How a process ended, as `wait` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStatus {
    /// Exited with this code.
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
}

/// Reaps the exited process behind `pidfd` if it is our child.
///
/// Returns `Ok(None)` when it is not our child (ECHILD) or has not exited yet.
pub fn reap_child(pidfd: BorrowedFd<'_>) -> io::Result<Option<WaitStatus>> {
    let options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG;
    match rustix::process::waitid(WaitId::PidFd(pidfd), options) {
        Ok(Some(status)) => Ok(decode_waitid(&status)),
        Ok(None) => Ok(None),
        Err(rustix::io::Errno::CHILD) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

fn decode_waitid(status: &rustix::process::WaitIdStatus) -> Option<WaitStatus> {
    if let Some(signal) = status.terminating_signal() {
        return Some(WaitStatus::Signaled(signal));
    }
    status.exit_status().map(WaitStatus::Exited)
}

/// Reads the exit status of the process behind `pidfd` after its parent reaped it, from the
/// kernel's pidfd file system (`PIDFD_GET_INFO` with `PIDFD_INFO_EXIT`, Linux 6.15 and later).
///
/// Returns `Ok(None)` while the process is not reaped yet, and on kernels without the ioctl.
pub fn exit_status_from_pidfd(pidfd: BorrowedFd<'_>) -> io::Result<Option<WaitStatus>> {
    // SAFETY: pidfd_info is a plain C struct of integers, for which all-zero bytes are valid.
    let mut info: libc::pidfd_info = unsafe { std::mem::zeroed() };
    info.mask = u64::from(libc::PIDFD_INFO_EXIT);
    // SAFETY: `pidfd` is an open pidfd, and `info` is a writable pidfd_info whose size matches
    // the size encoded in PIDFD_GET_INFO. The kernel writes at most that many bytes.
    let result = unsafe {
        libc::ioctl(
            pidfd.as_raw_fd(),
            libc::PIDFD_GET_INFO,
            &mut info as *mut libc::pidfd_info,
        )
    };
    if result < 0 {
        let error = io::Error::last_os_error();
        return match error.raw_os_error() {
            // Kernels before 6.13 lack the ioctl, and some reject the EXIT flag.
            Some(libc::ENOTTY | libc::EINVAL) => Ok(None),
            // ESRCH: the process exited and was reaped, but exit info was not requested in time.
            Some(libc::ESRCH) => Ok(None),
            _ => Err(error),
        };
    }
    if info.mask & u64::from(libc::PIDFD_INFO_EXIT) == 0 {
        return Ok(None);
    }
    Ok(Some(decode_wait_status(info.exit_code)))
}

fn decode_wait_status(raw: i32) -> WaitStatus {
    if libc::WIFSIGNALED(raw) {
        WaitStatus::Signaled(libc::WTERMSIG(raw))
    } else {
        WaitStatus::Exited(libc::WEXITSTATUS(raw))
    }
}

/// Sends `signal` to the process group `pgid`. A group that no longer exists counts as done.
pub fn signal_process_group(pgid: u32, signal: i32) -> io::Result<()> {
    let pgid = to_pid(pgid)?;
    let Some(signal) = rustix::process::Signal::from_named_raw(signal) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid signal number {signal}"),
        ));
    };
    match rustix::process::kill_process_group(pgid, signal) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// Parses a signal name (`SIGTERM`, `TERM`, `sigint`) or number into a signal number.
pub fn parse_signal(name: &str) -> Option<i32> {
    if let Ok(number) = name.parse::<i32>() {
        return rustix::process::Signal::from_named_raw(number).map(|_| number);
    }
    let upper = name.to_ascii_uppercase();
    let short = upper.strip_prefix("SIG").unwrap_or(&upper);
    let number = match short {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        _ => return None,
    };
    Some(number)
}

/// Returns the conventional name of a signal number, such as `SIGKILL`.
pub fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => return format!("signal {signal}"),
    };
    name.to_string()
}

/// Reads the start time of process `pid` in clock ticks after boot (field 22 of
/// `/proc/PID/stat`), which tells a process apart from a later one with the same pid.
pub fn process_start_time(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read(format!("/proc/{pid}/stat"))?;
    parse_stat_field(&stat, 22).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unparsable /proc/{pid}/stat"),
        )
    })
}

/// CPU times and resident memory of one process, from `/proc/PID/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessUsage {
    /// User-mode CPU time in clock ticks.
    pub user_ticks: u64,
    /// Kernel-mode CPU time in clock ticks.
    pub system_ticks: u64,
    /// Resident set size in bytes.
    pub rss_bytes: u64,
}

/// Reads the CPU times and RSS of process `pid`.
pub fn process_usage(pid: u32) -> io::Result<ProcessUsage> {
    read_usage(&format!("/proc/{pid}/stat"))
}

/// Reads the CPU times of thread `tid` of process `pid`, such as a vCPU thread.
pub fn thread_usage(pid: u32, tid: u32) -> io::Result<ProcessUsage> {
    read_usage(&format!("/proc/{pid}/task/{tid}/stat"))
}

/// `/proc/PID/stat` of one process, held open so that each sample costs one `pread` rather than
/// a path lookup, an open and a close. Reads fail once the process has exited, and never reach
/// a later process that reuses the pid.
#[derive(Debug)]
pub struct StatFile {
    file: File,
    pid: u32,
}

impl StatFile {
    /// Opens `/proc/<pid>/stat`.
    pub fn open(pid: u32) -> io::Result<Self> {
        Ok(Self {
            file: File::open(format!("/proc/{pid}/stat"))?,
            pid,
        })
    }

    /// Reads the process's CPU times and RSS.
    pub fn usage(&self) -> io::Result<ProcessUsage> {
        use std::os::unix::fs::FileExt;

        // One line of at most 52 numeric fields and a 16-byte command name fits easily.
        let mut buffer = [0u8; 1024];
        let length = self.file.read_at(&mut buffer, 0)?;
        parse_usage(&buffer[..length], self.pid)
    }
}

fn read_usage(path: &str) -> io::Result<ProcessUsage> {
    let stat = std::fs::read(path)?;
    parse_usage(&stat, path)
}

fn parse_usage(stat: &[u8], source: impl std::fmt::Display) -> io::Result<ProcessUsage> {
    let invalid = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unparsable stat of {source}"),
        )
    };
    let user_ticks = parse_stat_field(stat, 14).ok_or_else(invalid)?;
    let system_ticks = parse_stat_field(stat, 15).ok_or_else(invalid)?;
    let rss_pages = parse_stat_field(stat, 24).ok_or_else(invalid)?;
    Ok(ProcessUsage {
        user_ticks,
        system_ticks,
        rss_bytes: rss_pages.saturating_mul(page_size()),
    })
}

/// Clock ticks per second, the unit of `/proc/PID/stat` times.
pub fn clock_ticks_per_second() -> u64 {
    sysconf(libc::_SC_CLK_TCK).unwrap_or(100)
}

fn page_size() -> u64 {
    sysconf(libc::_SC_PAGESIZE).unwrap_or(4096)
}

fn sysconf(name: libc::c_int) -> Option<u64> {
    // SAFETY: sysconf reads a process-wide constant and has no memory arguments.
    let value = unsafe { libc::sysconf(name) };
    u64::try_from(value).ok().filter(|&value| value > 0)
}

/// Returns numbered field `field` (1-based, as in proc(5)) of a `/proc/PID/stat` line.
///
/// Field 2, the command name, may contain spaces and parentheses, so counting starts after its
/// last closing parenthesis.
fn parse_stat_field(stat: &[u8], field: usize) -> Option<u64> {
    let close = stat.iter().rposition(|&byte| byte == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    rest.split_ascii_whitespace()
        .nth(field.checked_sub(3)?)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn stat_field_after_parenthesised_name() {
        let stat = b"4242 (qemu (x) y) S 1 4242 4242 0 -1 4194560 10 0 0 0 7 3 0 0 20 0 5 0 987654 1000 50";
        assert_eq!(parse_stat_field(stat, 4), Some(1));
        assert_eq!(parse_stat_field(stat, 14), Some(7));
        assert_eq!(parse_stat_field(stat, 15), Some(3));
        assert_eq!(parse_stat_field(stat, 22), Some(987654));
        assert_eq!(parse_stat_field(stat, 24), Some(50));
    }

    #[test]
    fn start_time_of_self_is_stable() {
        let first = process_start_time(std::process::id()).expect("read own stat");
        let second = process_start_time(std::process::id()).expect("read own stat");
        assert_eq!(first, second);
    }

    #[test]
    fn signal_names_parse() {
        assert_eq!(parse_signal("SIGTERM"), Some(libc::SIGTERM));
        assert_eq!(parse_signal("int"), Some(libc::SIGINT));
        assert_eq!(parse_signal("9"), Some(libc::SIGKILL));
        assert_eq!(parse_signal("SIGNOPE"), None);
        assert_eq!(signal_name(libc::SIGKILL), "SIGKILL");
    }

    #[test]
    fn long_directory_binds_through_alias() {
        let base = tempfile::tempdir().expect("tempdir");
        let long = base.path().join("d".repeat(120)).join("e".repeat(100));
        std::fs::create_dir_all(&long).expect("create long dir");
        assert!(long.as_os_str().len() > 200);

        let dir = RunDir::open(&long).expect("open run dir");
        let listener = dir.bind_listener("qmp.sock").expect("bind");
        let _client = std::os::unix::net::UnixStream::connect(dir.alias("qmp.sock"))
            .expect("connect through alias");
        drop(listener);

        // A stale socket file is replaced, not an error.
        let _again = dir
            .bind_listener("qmp.sock")
            .expect("rebind over stale file");
        dir.remove("qmp.sock").expect("remove");
        assert!(!long.join("qmp.sock").exists());
    }

    #[test]
    fn exit_status_of_reaped_non_child() {
        // `sh` forks `sleep`, which is not our child, and reaps it.
        let mut shell = Command::new("sh")
            .args(["-c", "sleep 30 & echo $!; wait"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let mut line = String::new();
        io::BufRead::read_line(
            &mut io::BufReader::new(shell.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("read pid");
        let pid: u32 = line.trim().parse().expect("pid");
        let pidfd = pidfd_open(pid).expect("pidfd");
        assert_eq!(reap_child(pidfd.as_fd()).expect("waitid"), None);

        rustix::process::kill_process(to_pid(pid).expect("pid"), rustix::process::Signal::KILL)
            .expect("kill");
        shell.wait().expect("wait sh");
        assert_eq!(
            exit_status_from_pidfd(pidfd.as_fd()).expect("ioctl"),
            Some(WaitStatus::Signaled(libc::SIGKILL))
        );
    }
}
