//! Process-table helpers: find the processes an agent left behind and end them.
//!
//! The agent (`-config`), its plugins (`plugin_dir`), Nomad's executors and log monitors
//! (alloc paths) mention the agent's temporary directory on their command line, even after
//! they were re-parented to init. Tasks are found through their alloc's cgroup and their
//! parents.

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
    all_pids()
        .into_iter()
        .filter(|&pid| u32::try_from(pid) != Ok(own_pid))
        // A process can exit between listing /proc and this read; it is then not listed.
        .filter_map(|pid| {
            Some(ProcessInfo {
                pid,
                argv: read_argv(pid)?,
            })
        })
        .filter(|process| process.argv.iter().any(|arg| arg.contains(needle)))
        .collect()
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

/// Lists the processes an agent with its temporary directory at `dir` started, directly or
/// not: those whose command line mentions `dir`, those in a cgroup named after one of its
/// allocations, and all their descendants. A raw_exec task, for example, runs in its own
/// session and its command line need not mention `dir`, but it runs below the executor that
/// started it and in the alloc's cgroup.
pub fn agent_processes(dir: &Path) -> Vec<ProcessInfo> {
    let alloc_ids: Vec<String> = std::fs::read_dir(dir.join("data").join("alloc"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    let own_pid = std::process::id();

    let mut parents = Vec::new();
    let mut found: Vec<ProcessInfo> = processes_mentioning(&dir.to_string_lossy());
    for pid in all_pids() {
        if u32::try_from(pid) == Ok(own_pid) {
            continue;
        }
        if let Some(parent) = parent_pid(pid) {
            parents.push((pid, parent));
        }
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let in_alloc_cgroup = alloc_ids.iter().any(|id| cgroup.contains(id.as_str()));
        if in_alloc_cgroup && !found.iter().any(|p| p.pid == pid) {
            found.push(ProcessInfo {
                pid,
                argv: read_argv(pid).unwrap_or_default(),
            });
        }
    }

    // Adds descendants until no new process turns up.
    loop {
        let children: Vec<i32> = parents
            .iter()
            .filter(|(pid, parent)| {
                found.iter().any(|p| p.pid == *parent) && !found.iter().any(|p| p.pid == *pid)
            })
            .map(|(pid, _)| *pid)
            .collect();
        if children.is_empty() {
            return found;
        }
        for pid in children {
            found.push(ProcessInfo {
                pid,
                argv: read_argv(pid).unwrap_or_default(),
            });
        }
    }
}

/// SIGKILLs every process of [`agent_processes`] and waits (at most 5 s) until they are gone.
/// Returns the processes it found, so a caller can report them.
pub fn kill_agent_processes(dir: &Path) -> Vec<ProcessInfo> {
    let found = agent_processes(dir);
    for process in &found {
        signal_process(process.pid, Signal::KILL);
    }

    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && found.iter().any(|p| is_alive(p.pid)) {
        thread::sleep(Duration::from_millis(20));
    }
    found
}

fn all_pids() -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect()
}

/// Reads the parent pid from `/proc/PID/stat`. The command name in that line is in
/// parentheses and may contain spaces, so the fields are counted after the last `)`.
fn parent_pid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

fn read_argv(pid: i32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|&byte| byte == 0)
            .filter(|part| !part.is_empty())
            .map(|part| String::from_utf8_lossy(part).into_owned())
            .collect(),
    )
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
