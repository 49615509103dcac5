//! Process-table helpers: find the processes an agent left behind and end them.
//!
//! Every process the harness is responsible for mentions the agent's temporary directory on
//! its command line: the agent (`-config`), its plugins (`plugin_dir`), Nomad's executors and
//! log monitors (alloc paths) and the VMs (disk and socket paths under the alloc dir). That
//! makes the directory a reliable tag even after a process was re-parented to init.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use rustix::process::{kill_process, kill_process_group, test_kill_process, Pid, Signal};

/// One process found in `/proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: i32,
    pub argv: Vec<String>,
}

impl ProcessInfo {
    /// Returns true if the executable's file name starts with `qemu-system`.
    pub fn is_qemu(&self) -> bool {
        self.argv
            .first()
            .and_then(|arg0| Path::new(arg0).file_name())
            .is_some_and(|name| name.to_string_lossy().starts_with("qemu-system"))
    }
}

/// Lists the processes (other than this one) whose command line contains `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<ProcessInfo> {
    let own_pid = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };

    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if u32::try_from(pid) == Ok(own_pid) {
            continue;
        }

        // A process can exit between read_dir and this read; it is then simply not listed.
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let argv: Vec<String> = raw
            .split(|&byte| byte == 0)
            .filter(|part| !part.is_empty())
            .map(|part| String::from_utf8_lossy(part).into_owned())
            .collect();
        if argv.iter().any(|arg| arg.contains(needle)) {
            found.push(ProcessInfo { pid, argv });
        }
    }
    found
}

/// Returns true while `pid` exists (a zombie still counts until its parent reaps it).
pub fn is_alive(pid: i32) -> bool {
    Pid::from_raw(pid).is_some_and(|pid| test_kill_process(pid).is_ok())
}

/// Sends `signal` to one process, ignoring a process that is already gone.
pub fn signal_process(pid: i32, signal: Signal) {
    if let Some(pid) = Pid::from_raw(pid) {
        let _ = kill_process(pid, signal);
    }
}

/// Sends `signal` to a whole process group, ignoring a group that is already gone.
pub fn signal_group(pgid: i32, signal: Signal) {
    if let Some(pgid) = Pid::from_raw(pgid) {
        let _ = kill_process_group(pgid, signal);
    }
}

/// SIGKILLs every process whose command line contains `needle` and waits (at most 5 s) until
/// they are gone. Returns the processes it found, so a caller can report them.
pub fn kill_mentioning(needle: &str) -> Vec<ProcessInfo> {
    let found = processes_mentioning(needle);
    for process in &found {
        signal_process(process.pid, Signal::KILL);
    }

    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && found.iter().any(|p| is_alive(p.pid)) {
        thread::sleep(Duration::from_millis(20));
    }
    found
}

/// Lazily unmounts every mount point under `dir`, deepest first. A Nomad client mounts a
/// tmpfs on each task's `secrets` and `private` dirs and removes them only when it garbage
/// collects the allocation. A stopped test agent never does that, and `TempDir` cannot delete
/// a directory that still has mounts in it.
pub fn unmount_under(dir: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|line| line.split(' ').nth(1))
        .filter(|point| Path::new(point).starts_with(dir))
        .collect();
    points.sort_by_key(|point| std::cmp::Reverse(point.len()));

    for point in points {
        let status = std::process::Command::new("umount")
            .arg("--lazy")
            .arg(point)
            .status();
        if !matches!(status, Ok(status) if status.success()) {
            tracing::warn!(
                mount = point,
                ?status,
                "unmounting a Nomad task mount failed"
            );
        }
    }
}
