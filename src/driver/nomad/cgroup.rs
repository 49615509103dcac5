//! Cgroup placement of a task's QEMU with Nomad's resource limits.
//!
//! QEMU joins its cgroups before `exec` (see [`crate::driver::vm::VmSpec::cgroups`]), so it never
//! runs outside them. What "the task's cgroups" are depends on the host, and follows what Nomad
//! v1.6.5's own executor does:
//!
//! * cgroup v2 (`/sys/fs/cgroup` is a `cgroup2` mount): Nomad's client creates the task's scope,
//!   `<cgroup_parent>/<alloc id>.<task>.scope`, writes its `cpuset.cpus`, passes its path as
//!   `linux_resources.cpuset_cgroup`, and removes it when the task ends. The driver joins it
//!   and writes `memory.max` and `cpu.weight`.
//! * cgroup v1 (also the hybrid layout, where v2 is only mounted at `/sys/fs/cgroup/unified`):
//!   `cpuset_cgroup` is the cpuset cgroup QEMU joins, usually the one all tasks without
//!   reserved cores share, `<cpuset>/nomad/shared`, so no limit is ever written there. The
//!   driver creates `nomad/<alloc id>-<task>` in the memory and cpu hierarchies, writes
//!   `memory.limit_in_bytes` and `cpu.shares` there, and removes both in [`cleanup`].
//!
//! The memory limit is guest RAM plus QEMU's own overhead (`memory_overhead`), so that the
//! kernel does not OOM-kill QEMU for memory it needs beside the guest's.
//!
//! A cgroup that cannot be created, joined or limited fails the start, as it does for Nomad's
//! built-in drivers: a task running without its limits would be worse than one that does not run.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::proto::drivers::TaskConfig;

/// Parent of the per-task cgroups in each v1 hierarchy, Nomad v1.6.5's default.
pub const DEFAULT_PARENT_V1: &str = "nomad";

/// Smallest `cpu.shares` value the kernel accepts.
const MIN_CPU_SHARES: u64 = 2;

/// Largest `cpu.shares` value the kernel accepts.
const MAX_CPU_SHARES: u64 = 262_144;

/// How long [`cleanup`] retries removing a cgroup the kernel still reports busy.
const REMOVE_RETRY_FOR: Duration = Duration::from_secs(2);

/// Pause between two attempts to remove a busy cgroup.
const REMOVE_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Errors of placing a task in its cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// `/proc/self/mountinfo` could not be read.
    #[error("failed to read /proc/self/mountinfo to find the cgroup mounts")]
    Mountinfo(#[source] io::Error),

    /// A v1 controller the driver limits is not mounted.
    #[error(
        "the cgroup v1 {controller} controller is not mounted; mount it \
         (mount -t cgroup -o {controller} cgroup /sys/fs/cgroup/{controller}) or use cgroup v2"
    )]
    ControllerMissing {
        /// The controller name.
        controller: &'static str,
    },

    /// On cgroup v2 Nomad's client passes the task's scope; without it there is nothing to join.
    #[error(
        "linux_resources.cpuset_cgroup is empty on a cgroup v2 host; Nomad's client creates \
         the task's scope and passes its path, so run the task through a Nomad client agent"
    )]
    ScopeMissing,

    /// A value that becomes part of a cgroup path cannot be used as a directory name.
    #[error("task field {field} = {value:?} cannot name a cgroup: it must be non-empty and contain no '/', NUL or '..'")]
    BadName {
        /// The task field.
        field: &'static str,
        /// Its value.
        value: String,
    },

    /// `cpuset_cgroup` is not an absolute path.
    #[error("linux_resources.cpuset_cgroup {path:?} is not an absolute path")]
    RelativePath {
        /// The path Nomad passed.
        path: String,
    },

    /// A cgroup directory could not be created.
    #[error(
        "failed to create cgroup {path}; the plugin must run as root to place tasks in cgroups"
    )]
    Create {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// A cgroup Nomad passed does not exist.
    #[error("cgroup {path} passed by Nomad does not exist")]
    NotFound {
        /// The directory.
        path: PathBuf,
    },

    /// A limit could not be written.
    #[error("failed to write {value:?} to {path}")]
    Write {
        /// The control file.
        path: PathBuf,
        /// The value.
        value: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// The cgroup layout of the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// cgroup v2 only: Nomad's client creates each task's scope.
    Unified,
    /// cgroup v1: per-task cgroups are created inside these parent directories.
    Legacy {
        /// Parent in the memory hierarchy, like `/sys/fs/cgroup/memory/nomad`.
        memory: PathBuf,
        /// Parent in the cpu hierarchy, like `/sys/fs/cgroup/cpu/nomad`.
        cpu: PathBuf,
    },
}

impl Hierarchy {
    /// Detects this host's layout from `/proc/self/mountinfo`, with per-task cgroups under
    /// [`DEFAULT_PARENT_V1`] on cgroup v1.
    pub fn detect() -> Result<Self, CgroupError> {
        let text =
            std::fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::Mountinfo)?;
        Self::from_mountinfo(&text, DEFAULT_PARENT_V1)
    }

    /// Reads the layout from the text of a `mountinfo` file. Like Nomad v1.6.5, it counts as
    /// v2 only when `/sys/fs/cgroup` itself is a `cgroup2` mount.
    pub fn from_mountinfo(text: &str, parent_v1: &str) -> Result<Self, CgroupError> {
        let mounts: Vec<Mount<'_>> = text.lines().filter_map(Mount::parse).collect();
        if mounts
            .iter()
            .any(|mount| mount.fs_type == "cgroup2" && mount.point == "/sys/fs/cgroup")
        {
            return Ok(Self::Unified);
        }
        let parent_in = |controller: &'static str| {
            mounts
                .iter()
                .find(|mount| {
                    mount.fs_type == "cgroup"
                        && mount
                            .super_options
                            .split(',')
                            .any(|option| option == controller)
                })
                .map(|mount| Path::new(mount.point).join(parent_v1))
                .ok_or(CgroupError::ControllerMissing { controller })
        };
        Ok(Self::Legacy {
            memory: parent_in("memory")?,
            cpu: parent_in("cpu")?,
        })
    }
}

/// The fields of one `mountinfo` line that tell a cgroup mount apart.
struct Mount<'a> {
    point: &'a str,
    fs_type: &'a str,
    super_options: &'a str,
}

impl<'a> Mount<'a> {
    /// Parses `ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER_OPTIONS`.
    fn parse(line: &'a str) -> Option<Self> {
        let (before, after) = line.split_once(" - ")?;
        let point = before.split(' ').nth(4)?;
        let mut after = after.split(' ');
        let fs_type = after.next()?;
        let super_options = after.nth(1)?;
        Some(Self {
            point,
            fs_type,
            super_options,
        })
    }
}

/// The cgroups of one task: the ones QEMU joins, and the ones the driver created and removes.
///
/// Serialisable, so that it can be kept in the task's driver state and cleaned up by a plugin
/// process that recovered the task.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCgroups {
    dirs: Vec<PathBuf>,
    created: Vec<PathBuf>,
}

impl TaskCgroups {
    /// Returns the directories QEMU joins, for [`crate::driver::vm::VmSpec::cgroups`].
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Returns the directories the driver created, which [`cleanup`] removes.
    pub fn created(&self) -> &[PathBuf] {
        &self.created
    }

    /// Reads the memory the task's memory cgroup charges in bytes (`memory.current` on v2,
    /// `memory.usage_in_bytes` on v1, page cache included), or `None` without such a cgroup.
    pub fn memory_usage(&self) -> Option<u64> {
        read_counter(&self.open_memory_usage()?)
    }

    /// Opens the file that [`TaskCgroups::memory_usage`] reads, so that a caller sampling it
    /// repeatedly pays the path lookup once and reads it with [`read_counter`].
    pub fn open_memory_usage(&self) -> Option<File> {
        self.dirs.iter().find_map(|dir| {
            ["memory.current", "memory.usage_in_bytes"]
                .iter()
                .find_map(|file| File::open(dir.join(file)).ok())
        })
    }
}

/// Reads a cgroup file that contains one number, such as `memory.current`, from its start.
pub fn read_counter(file: &File) -> Option<u64> {
    use std::os::unix::fs::FileExt;

    let mut buffer = [0u8; 32];
    let length = file.read_at(&mut buffer, 0).ok()?;
    std::str::from_utf8(&buffer[..length])
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Prepares the cgroups of `task` on this host with a memory limit of `memory_limit_mib`
/// (guest RAM plus QEMU's overhead).
///
/// On error, every cgroup this call created is removed again.
pub async fn prepare(task: &TaskConfig, memory_limit_mib: u64) -> Result<TaskCgroups, CgroupError> {
    prepare_in(&Hierarchy::detect()?, task, memory_limit_mib).await
}

/// Prepares the cgroups of `task` in `hierarchy`; see [`prepare`].
pub async fn prepare_in(
    hierarchy: &Hierarchy,
    task: &TaskConfig,
    memory_limit_mib: u64,
) -> Result<TaskCgroups, CgroupError> {
    let linux = task
        .resources
        .as_ref()
        .and_then(|resources| resources.linux_resources.as_ref());
    let nomad_cgroup = linux
        .map(|linux| linux.cpuset_cgroup.as_str())
        .filter(|path| !path.is_empty());
    let nomad_cgroup = match nomad_cgroup {
        Some(path) if !path.starts_with('/') => {
            return Err(CgroupError::RelativePath {
                path: path.to_owned(),
            })
        }
        Some(path) => {
            let path = PathBuf::from(path);
            if !path.is_dir() {
                return Err(CgroupError::NotFound { path });
            }
            Some(path)
        }
        None => None,
    };
    let memory_bytes = memory_limit_mib.saturating_mul(1024 * 1024);
    let cpu_shares = cpu_shares(task);

    match hierarchy {
        Hierarchy::Unified => {
            let scope = nomad_cgroup.ok_or(CgroupError::ScopeMissing)?;
            write(&scope, "memory.max", memory_bytes.to_string())?;
            write(
                &scope,
                "cpu.weight",
                cpu_weight_from_shares(cpu_shares).to_string(),
            )?;
            Ok(TaskCgroups {
                dirs: vec![scope],
                created: Vec::new(),
            })
        }
        Hierarchy::Legacy { memory, cpu } => {
            let name = format!(
                "{}-{}",
                checked_name("alloc_id", &task.alloc_id)?,
                checked_name("name", &task.name)?
            );
            let mut cgroups = TaskCgroups {
                dirs: nomad_cgroup.into_iter().collect(),
                created: Vec::new(),
            };
            let result = create_v1(&mut cgroups, memory, cpu, &name, memory_bytes, cpu_shares);
            if let Err(error) = result {
                cleanup(&cgroups).await;
                return Err(error);
            }
            Ok(cgroups)
        }
    }
}

fn create_v1(
    cgroups: &mut TaskCgroups,
    memory_parent: &Path,
    cpu_parent: &Path,
    name: &str,
    memory_bytes: u64,
    cpu_shares: u64,
) -> Result<(), CgroupError> {
    let memory = create_dir(cgroups, memory_parent, name)?;
    write(&memory, "memory.limit_in_bytes", memory_bytes.to_string())?;
    // Nomad's executor turns swapping off where the kernel lets it; a kernel without swap
    // accounting rejects the write, which changes nothing for the limit.
    if let Err(error) = write(&memory, "memory.swappiness", "0".to_owned()) {
        tracing::debug!(error = %error, "left memory.swappiness unchanged");
    }
    let cpu = create_dir(cgroups, cpu_parent, name)?;
    write(&cpu, "cpu.shares", cpu_shares.to_string())?;
    Ok(())
}

/// Creates `<parent>/<name>` (and `parent` if missing) and records it in `cgroups`. A
/// directory that already exists, left by an earlier attempt to start the same task, is reused.
fn create_dir(
    cgroups: &mut TaskCgroups,
    parent: &Path,
    name: &str,
) -> Result<PathBuf, CgroupError> {
    let dir = parent.join(name);
    let created = std::fs::create_dir_all(parent).and_then(|()| match std::fs::create_dir(&dir) {
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    });
    created.map_err(|source| CgroupError::Create {
        path: dir.clone(),
        source,
    })?;
    cgroups.dirs.push(dir.clone());
    cgroups.created.push(dir.clone());
    Ok(dir)
}

fn write(dir: &Path, file: &str, value: String) -> Result<(), CgroupError> {
    let path = dir.join(file);
    std::fs::write(&path, &value).map_err(|source| CgroupError::Write {
        path,
        value,
        source,
    })
}

fn checked_name<'a>(field: &'static str, value: &'a str) -> Result<&'a str, CgroupError> {
    let bad = value.is_empty() || value.contains(['/', '\0']) || value == "." || value == "..";
    if bad {
        return Err(CgroupError::BadName {
            field,
            value: value.to_owned(),
        });
    }
    Ok(value)
}

/// Returns the task's CPU shares (its `cpu` in MHz), within the range the kernel accepts.
fn cpu_shares(task: &TaskConfig) -> u64 {
    let shares = task
        .resources
        .as_ref()
        .and_then(|resources| resources.allocated_resources.as_ref())
        .and_then(|allocated| allocated.cpu.as_ref())
        .map_or(0, |cpu| cpu.cpu_shares);
    u64::try_from(shares)
        .unwrap_or(0)
        .clamp(MIN_CPU_SHARES, MAX_CPU_SHARES)
}

/// Converts cgroup v1 `cpu.shares` (2 to 262144) to cgroup v2 `cpu.weight` (1 to 10000) with
/// the linear mapping of runc v1.1, which Nomad v1.6.5's executor uses.
pub fn cpu_weight_from_shares(shares: u64) -> u64 {
    if shares == 0 {
        return 0;
    }
    let shares = shares.clamp(MIN_CPU_SHARES, MAX_CPU_SHARES);
    1 + (shares - MIN_CPU_SHARES) * 9999 / (MAX_CPU_SHARES - MIN_CPU_SHARES)
}

/// Removes the cgroups the driver created for a task. Call it after QEMU has exited.
///
/// A cgroup still busy (its last process not yet fully gone) is retried for a short while;
/// one that is already gone counts as removed. Failures are logged and not returned, because a
/// stale empty cgroup costs nothing and the task is over either way.
pub async fn cleanup(cgroups: &TaskCgroups) {
    for dir in cgroups.created.iter().rev() {
        remove_dir(dir).await;
    }
}

async fn remove_dir(dir: &Path) {
    let started = tokio::time::Instant::now();
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => {
                tracing::debug!(cgroup = %dir.display(), "removed cgroup");
                return;
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => return,
            Err(error)
                if error.raw_os_error() == Some(libc::EBUSY)
                    && started.elapsed() < REMOVE_RETRY_FOR =>
            {
                tokio::time::sleep(REMOVE_RETRY_PAUSE).await;
            }
            Err(error) => {
                tracing::warn!(cgroup = %dir.display(), error = %error, "failed to remove cgroup");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::nomad::proto::drivers::{
        AllocatedCpuResources, AllocatedTaskResources, LinuxResources, Resources,
    };

    const HYBRID: &str = "\
25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw
27 25 0:24 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:11 - cgroup cgroup rw,cpu,cpuacct
28 25 0:25 / /sys/fs/cgroup/memory rw,relatime shared:12 - cgroup cgroup rw,memory
29 25 0:26 / /sys/fs/cgroup/cpuset rw,relatime shared:13 - cgroup cgroup rw,cpuset
";

    const UNIFIED: &str = "\
35 30 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
";

    fn task(cpuset_cgroup: &str, cpu_shares: i64) -> TaskConfig {
        TaskConfig {
            id: "a1/web/0f0f0f0f".into(),
            name: "web".into(),
            alloc_id: "a1".into(),
            resources: Some(Resources {
                allocated_resources: Some(AllocatedTaskResources {
                    cpu: Some(AllocatedCpuResources { cpu_shares }),
                    ..AllocatedTaskResources::default()
                }),
                linux_resources: Some(LinuxResources {
                    cpuset_cgroup: cpuset_cgroup.into(),
                    ..LinuxResources::default()
                }),
                ports: Vec::new(),
            }),
            ..TaskConfig::default()
        }
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).expect("read control file")
    }

    #[test]
    fn mountinfo_hybrid_is_legacy() {
        let hierarchy = Hierarchy::from_mountinfo(HYBRID, "nomad").expect("layout");
        assert_eq!(
            hierarchy,
            Hierarchy::Legacy {
                memory: PathBuf::from("/sys/fs/cgroup/memory/nomad"),
                cpu: PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/nomad"),
            }
        );
    }

    #[test]
    fn mountinfo_unified() {
        assert_eq!(
            Hierarchy::from_mountinfo(UNIFIED, "nomad").expect("layout"),
            Hierarchy::Unified
        );
    }

    #[test]
    fn mountinfo_without_memory_controller() {
        let text: String = HYBRID
            .lines()
            .filter(|line| !line.contains("memory"))
            .collect::<Vec<_>>()
            .join("\n");
        let error = Hierarchy::from_mountinfo(&text, "nomad").unwrap_err();
        assert!(
            matches!(
                error,
                CgroupError::ControllerMissing {
                    controller: "memory"
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn cpu_weight_conversion() {
        assert_eq!(cpu_weight_from_shares(0), 0);
        assert_eq!(cpu_weight_from_shares(2), 1);
        assert_eq!(cpu_weight_from_shares(1024), 39);
        assert_eq!(cpu_weight_from_shares(262_144), 10_000);
        assert_eq!(cpu_weight_from_shares(1 << 30), 10_000);
    }

    #[tokio::test]
    async fn legacy_creates_limits_and_cleans_up() {
        let root = tempfile::tempdir().expect("temp dir");
        let shared = root.path().join("cpuset/nomad/shared");
        std::fs::create_dir_all(&shared).expect("cpuset dir");
        let hierarchy = Hierarchy::Legacy {
            memory: root.path().join("memory/nomad"),
            cpu: root.path().join("cpu/nomad"),
        };
        let task = task(shared.to_str().expect("utf-8"), 500);

        let cgroups = prepare_in(&hierarchy, &task, 640).await.expect("prepare");
        let memory = root.path().join("memory/nomad/a1-web");
        let cpu = root.path().join("cpu/nomad/a1-web");
        assert_eq!(
            cgroups.dirs(),
            [shared.clone(), memory.clone(), cpu.clone()]
        );
        assert_eq!(cgroups.created(), [memory.clone(), cpu.clone()]);
        assert_eq!(
            read(&memory.join("memory.limit_in_bytes")),
            (640u64 << 20).to_string()
        );
        assert_eq!(read(&cpu.join("cpu.shares")), "500");
        assert!(!shared.join("memory.limit_in_bytes").exists());
        assert_eq!(cgroups.memory_usage(), None);
        std::fs::write(memory.join("memory.usage_in_bytes"), "4096\n").expect("usage file");
        assert_eq!(cgroups.memory_usage(), Some(4096));
        std::fs::remove_file(memory.join("memory.usage_in_bytes")).expect("remove file");

        // Again for the same task, as after a plugin crash in the middle of StartTask.
        let again = prepare_in(&hierarchy, &task, 640)
            .await
            .expect("prepare again");
        assert_eq!(again, cgroups);

        // A real cgroup directory is empty once its processes are gone; a temp dir is not.
        std::fs::remove_file(memory.join("memory.limit_in_bytes")).expect("remove file");
        std::fs::remove_file(memory.join("memory.swappiness")).expect("remove file");
        std::fs::remove_file(cpu.join("cpu.shares")).expect("remove file");
        cleanup(&cgroups).await;
        assert!(!memory.exists());
        assert!(!cpu.exists());
        assert!(shared.exists());
    }

    #[tokio::test]
    async fn legacy_clamps_shares() {
        let root = tempfile::tempdir().expect("temp dir");
        let hierarchy = Hierarchy::Legacy {
            memory: root.path().join("memory"),
            cpu: root.path().join("cpu"),
        };
        let cgroups = prepare_in(&hierarchy, &task("", 0), 64)
            .await
            .expect("prepare");
        assert_eq!(cgroups.dirs().len(), 2);
        assert_eq!(read(&root.path().join("cpu/a1-web/cpu.shares")), "2");
    }

    #[tokio::test]
    async fn legacy_rejects_bad_names() {
        let root = tempfile::tempdir().expect("temp dir");
        let hierarchy = Hierarchy::Legacy {
            memory: root.path().join("memory"),
            cpu: root.path().join("cpu"),
        };
        let mut bad = task("", 100);
        bad.name = "../escape".into();
        let error = prepare_in(&hierarchy, &bad, 64).await.unwrap_err();
        assert!(
            matches!(error, CgroupError::BadName { field: "name", .. }),
            "{error}"
        );
        assert!(!root.path().join("memory").exists());
    }

    #[tokio::test]
    async fn legacy_reports_create_failure() {
        let root = tempfile::tempdir().expect("temp dir");
        // The cpu parent is a file, so creating the cpu cgroup fails after the memory one.
        std::fs::write(root.path().join("cpu"), "").expect("blocker file");
        let hierarchy = Hierarchy::Legacy {
            memory: root.path().join("memory"),
            cpu: root.path().join("cpu"),
        };
        let error = prepare_in(&hierarchy, &task("", 100), 64)
            .await
            .unwrap_err();
        match error {
            CgroupError::Create { path, .. } => assert_eq!(path, root.path().join("cpu/a1-web")),
            other => panic!("unexpected error: {other}"),
        }
    }

    #[tokio::test]
    async fn unified_writes_scope() {
        let root = tempfile::tempdir().expect("temp dir");
        let scope = root.path().join("nomad.slice/a1.web.scope");
        std::fs::create_dir_all(&scope).expect("scope dir");
        let task = task(scope.to_str().expect("utf-8"), 1024);

        let cgroups = prepare_in(&Hierarchy::Unified, &task, 256)
            .await
            .expect("prepare");
        assert_eq!(cgroups.dirs(), std::slice::from_ref(&scope));
        assert!(cgroups.created().is_empty());
        assert_eq!(read(&scope.join("memory.max")), (256u64 << 20).to_string());
        assert_eq!(read(&scope.join("cpu.weight")), "39");
    }

    #[tokio::test]
    async fn unified_needs_scope() {
        let error = prepare_in(&Hierarchy::Unified, &task("", 100), 64)
            .await
            .unwrap_err();
        assert!(matches!(error, CgroupError::ScopeMissing), "{error}");
        let error = prepare_in(&Hierarchy::Unified, &task("relative/x", 100), 64)
            .await
            .unwrap_err();
        assert!(matches!(error, CgroupError::RelativePath { .. }), "{error}");
        let error = prepare_in(&Hierarchy::Unified, &task("/nonexistent/x.scope", 100), 64)
            .await
            .unwrap_err();
        assert!(matches!(error, CgroupError::NotFound { .. }), "{error}");
    }
}
