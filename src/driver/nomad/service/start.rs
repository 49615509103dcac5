//! StartTask: from Nomad's TaskConfig to a running VM and the task handle.

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tracing::Instrument;

use crate::driver::nomad::cgroup::{self, CgroupError};
use crate::driver::nomad::config::{
    build_command_line, uses_kvm, validate, ConfigError, DecodeError, DnsConfig, PluginConfig,
    TaskConfig as DriverConfig, TaskContext, TaskDirs, TaskPort,
};
use crate::driver::nomad::error::DriverError;
use crate::driver::nomad::handle::DriverState;
use crate::driver::nomad::proto::drivers::{StartTaskRequest, StartTaskResponse, TaskConfig};
use crate::driver::vm::argv::Piece;
use crate::driver::vm::{UserIds, Vm, VmError, VmSpec, QMP_SOCKET_NAME};
use crate::fingerprint::{find_emulator_binary, split_search_path, KvmStatus};

use super::events::EventTarget;
use super::task::Task;
use super::DriverService;

/// Target of QEMU's stdout and stderr when Nomad passes no log path.
const NULL_DEVICE: &str = "/dev/null";

/// How long a start error waits for logmon to write QEMU's last stderr lines to its file.
/// logmon flushes every 100 ms.
const LOGMON_FLUSH_WAIT: Duration = Duration::from_millis(300);

/// Interval at which logmon's file is checked while waiting for it.
const LOGMON_POLL: Duration = Duration::from_millis(50);

/// Number of stderr lines a start error carries.
const STDERR_TAIL_LINES: usize = 20;

/// Maximum bytes of logmon's file read back for a start error.
const STDERR_TAIL_BYTES: u64 = 4 * 1024;

/// The KVM device QEMU opens for `accelerator = "kvm"`.
const KVM_DEVICE: &str = "/dev/kvm";

/// Errors of starting a task.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error(transparent)]
    Decode(#[from] DecodeError),

    #[error(transparent)]
    Config(#[from] ConfigError),

    #[error(
        "emulator qemu-system-{target} not found in PATH: install it \
         (Debian: apt-get install qemu-system-x86) or set the task's emulator to an installed one"
    )]
    EmulatorNotFound { target: String },

    #[error(
        "accelerator {accelerator:?} needs KVM, but {device} is missing: \
         use accelerator = \"tcg\", or \"kvm:tcg\" to fall back to it"
    )]
    KvmMissing {
        accelerator: String,
        device: &'static str,
    },

    #[error(
        "accelerator {accelerator:?} needs KVM, but KVM cannot run guests on this host \
         ({reason}): use accelerator = \"tcg\""
    )]
    KvmUnusable { accelerator: String, reason: String },

    #[error("user {user:?} does not exist on this host: create it or change the task's user")]
    UnknownUser { user: String },

    #[error("failed to look up user {user:?}")]
    UserLookup {
        user: String,
        #[source]
        source: nix::Error,
    },

    #[error(
        "linux_resources.cpuset_cpus {value:?} is invalid: expected core ids such as \"0,2-3\""
    )]
    InvalidCpuset { value: String },

    #[error("port {label:?} has the invalid value {value}: expected 1 to 65535")]
    InvalidPort { label: String, value: i32 },

    #[error("checking the task config stopped unexpectedly")]
    PrepareAborted(#[source] tokio::task::JoinError),

    #[error("failed to place QEMU in the task's cgroups")]
    Cgroup(#[from] CgroupError),

    #[error(transparent)]
    Vm(#[from] VmError),
}

impl StartError {
    /// Returns whether a later attempt may succeed. Config problems stay until the job or the
    /// host changes, so only failures of QEMU itself are retried.
    // NOTE: QEMU that exits during start because of a bad `args` entry counts as retryable,
    // since such an exit cannot be distinguished from a transient failure.
    fn recoverable(&self) -> bool {
        match self {
            StartError::Vm(error) => !matches!(error, VmError::InvalidSpec(_)),
            StartError::Cgroup(_) => true,
            _ => false,
        }
    }
}

/// Task ids whose StartTask is in progress, so that a repeated call cannot boot a second VM.
#[derive(Debug, Default)]
pub struct StartingTasks {
    ids: Mutex<HashSet<String>>,
}

impl StartingTasks {
    fn claim(self: &Arc<Self>, task_id: &str) -> Option<StartClaim> {
        let mut ids = self
            .ids
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        ids.insert(task_id.to_owned()).then(|| StartClaim {
            starting: Arc::clone(self),
            task_id: task_id.to_owned(),
        })
    }
}

/// Releases a task id from [`StartingTasks`] when dropped.
struct StartClaim {
    starting: Arc<StartingTasks>,
    task_id: String,
}

impl Drop for StartClaim {
    fn drop(&mut self) {
        let mut ids = self
            .starting
            .ids
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        ids.remove(&self.task_id);
    }
}

/// A task ready to boot: the VM spec and the state saved once it runs.
struct PreparedTask {
    spec: VmSpec,
    graceful_shutdown: bool,
    task_dir: PathBuf,
    emulator: PathBuf,
    accelerator: String,
    memory_mib: u64,
    memory_limit_mib: u64,
    reserved_cores: Vec<u32>,
}

impl DriverService {
    /// Starts the task's VM and returns its handle. A task id that is already running gets
    /// its existing handle.
    pub(super) async fn start_task(
        &self,
        request: StartTaskRequest,
    ) -> Result<StartTaskResponse, DriverError> {
        let config = request
            .task
            .ok_or(DriverError::MissingField { field: "task" })?;
        if config.id.is_empty() {
            return Err(DriverError::MissingField { field: "task.id" });
        }
        let span = tracing::info_span!(
            "start_task",
            task_id = %config.id,
            alloc_id = %config.alloc_id,
            task = %config.name,
            vm = %config.id,
        );
        self.start_task_in_span(config).instrument(span).await
    }

    async fn start_task_in_span(
        &self,
        config: TaskConfig,
    ) -> Result<StartTaskResponse, DriverError> {
        if let Some(existing) = self.tasks.get(&config.id) {
            tracing::info!("task already running, returning its handle");
            return Ok(response(&existing));
        }
        let Some(_claim) = self.starting.claim(&config.id) else {
            return Err(DriverError::TaskStarting {
                task_id: config.id.clone(),
            });
        };

        let failed = |error: StartError| DriverError::StartFailed {
            task_id: config.id.clone(),
            recoverable: error.recoverable(),
            source: Box::new(error),
        };
        let settings = self.state.settings();
        // Validation runs qemu-img on the image, which may take a few seconds.
        let (task_config, plugin, kvm) =
            (config.clone(), settings.plugin.clone(), self.kvm.current());
        let prepared = tokio::task::spawn_blocking(move || prepare(&task_config, &plugin, kvm))
            .await
            .map_err(|error| failed(StartError::PrepareAborted(error)))?
            .map_err(failed)?;

        let target = EventTarget::of(&config);
        self.events
            .publish_message(&target, "Starting VM".to_owned());
        tracing::info!(
            emulator = %prepared.emulator.display(),
            accelerator = %prepared.accelerator,
            memory_mib = prepared.memory_mib,
            "starting VM"
        );
        let cgroups = cgroup::prepare(&config, prepared.memory_limit_mib)
            .await
            .map_err(|error| failed(StartError::Cgroup(error)))?;
        let mut spec = prepared.spec;
        spec.cgroups = cgroups.dirs().to_vec();
        let qmp_socket = spec.dir.join(QMP_SOCKET_NAME);

        let started_at = SystemTime::now();
        let started = Instant::now();
        // The VM outlives this RPC, so its span must not sit under the StartTask span: later
        // stop and exit logs would carry `rpc=.../StartTask`. It gets a root span of its own,
        // linked to this one.
        let vm_span = tracing::info_span!(
            parent: None,
            "task",
            task_id = %config.id,
            alloc_id = %config.alloc_id,
            task = %config.name,
        );
        vm_span.follows_from(tracing::Span::current());
        let logmon = LogmonStderr::before_start(&config);
        let vm = match Vm::start(spec).instrument(vm_span).await {
            Ok(vm) => vm,
            Err(mut error) => {
                cgroup::cleanup(&cgroups).await;
                if let Some(logmon) = logmon {
                    logmon.fill_in(&mut error, &config).await;
                }
                return Err(failed(StartError::Vm(error)));
            }
        };
        let ready_ms = started.elapsed().as_millis();

        let state = DriverState {
            vm: vm.saved(),
            started_at,
            graceful_shutdown: prepared.graceful_shutdown,
            qmp_socket,
            task_dir: prepared.task_dir,
            emulator: prepared.emulator,
            accelerator: prepared.accelerator,
            memory_mib: prepared.memory_mib,
            memory_limit_mib: prepared.memory_limit_mib,
            reserved_cores: prepared.reserved_cores,
            cgroups,
        };
        let forwarder = self.events.forward(target.clone(), vm.events());
        let pid = vm.pid();
        let task = Arc::new(Task::running(config.clone(), state, vm, forwarder));
        if let Err(existing) = self.tasks.insert(&config.id, Arc::clone(&task)) {
            // Unreachable while the claim is held; stop the duplicate rather than leak it.
            tracing::warn!(
                pid,
                "task appeared while starting, killing the duplicate VM"
            );
            if let Some(vm) = task.vm() {
                if let Err(error) = vm.kill().await {
                    tracing::error!(pid, %error, "failed to kill the duplicate VM");
                }
            }
            return Ok(response(&existing));
        }

        self.events.publish_message(
            &target,
            format!("VM running (QEMU pid {pid}, QMP ready in {ready_ms} ms)"),
        );
        tracing::info!(pid, ready_ms, "VM running");
        Ok(response(&task))
    }
}

/// QEMU's stderr as Nomad's logmon stores it, for start errors. Nomad hands the driver a FIFO,
/// whose content cannot be read back, and logmon copies it to the rotated files
/// `<alloc_dir>/alloc/logs/<task>.stderr.<N>`.
struct LogmonStderr {
    dir: PathBuf,
    prefix: String,
    /// The newest file and its length before QEMU started, so that older lines are skipped.
    before: Option<(PathBuf, u64)>,
}

impl LogmonStderr {
    /// Notes where logmon's file ends now. `None` when the task's stderr is not a FIFO.
    fn before_start(config: &TaskConfig) -> Option<Self> {
        let meta = std::fs::metadata(&config.stderr_path).ok()?;
        if !meta.file_type().is_fifo() {
            return None;
        }
        let mut logmon = Self {
            dir: Path::new(&config.alloc_dir).join("alloc").join("logs"),
            prefix: format!("{}.stderr.", config.name),
            before: None,
        };
        logmon.before = logmon.newest().and_then(|path| {
            let len = std::fs::metadata(&path).ok()?.len();
            Some((path, len))
        });
        Some(logmon)
    }

    /// Replaces the "cannot be read back" note of a start error with the lines logmon wrote,
    /// or with the command that shows them.
    async fn fill_in(&self, error: &mut VmError, config: &TaskConfig) {
        let (VmError::ExitedDuringStart { stderr_tail, .. }
        | VmError::StartTimedOut { stderr_tail, .. }) = error
        else {
            return;
        };
        let deadline = Instant::now() + LOGMON_FLUSH_WAIT;
        loop {
            if let Some(text) = self.read_new().filter(|text| !text.trim().is_empty()) {
                *stderr_tail = text;
                return;
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(LOGMON_POLL).await;
        }
        *stderr_tail = format!(
            "(not found in {}; run: nomad alloc logs -stderr {} {})",
            self.dir.display(),
            config.alloc_id,
            config.name
        );
    }

    /// Returns the newest rotated file, the one with the highest index.
    fn newest(&self) -> Option<PathBuf> {
        std::fs::read_dir(&self.dir)
            .ok()?
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let name = entry.file_name();
                let index: u64 = name.to_str()?.strip_prefix(&self.prefix)?.parse().ok()?;
                Some((index, entry.path()))
            })
            .max_by_key(|(index, _)| *index)
            .map(|(_, path)| path)
    }

    /// Returns the last lines written since QEMU started.
    fn read_new(&self) -> Option<String> {
        let path = self.newest()?;
        let offset = match &self.before {
            Some((before, len)) if *before == path => *len,
            _ => 0,
        };
        let mut file = std::fs::File::open(&path).ok()?;
        let end = file.metadata().ok()?.len();
        let start = offset.max(end.saturating_sub(STDERR_TAIL_BYTES));
        file.seek(SeekFrom::Start(start)).ok()?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).ok()?;
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().collect();
        let first = lines.len().saturating_sub(STDERR_TAIL_LINES);
        Some(lines[first..].join("\n"))
    }
}

fn response(task: &Task) -> StartTaskResponse {
    StartTaskResponse {
        handle: Some(task.handle()),
        ..StartTaskResponse::default()
    }
}

/// Rejects `accelerator = "kvm"` when `/dev/kvm` is missing or the fingerprint's probe saw
/// that KVM cannot run a guest. A start while the probe still runs goes ahead.
fn check_kvm(
    accelerator: String,
    device_present: bool,
    kvm: Option<KvmStatus>,
) -> Result<(), StartError> {
    if !device_present {
        return Err(StartError::KvmMissing {
            accelerator,
            device: KVM_DEVICE,
        });
    }
    match kvm {
        Some(status) if !status.usable => Err(StartError::KvmUnusable {
            accelerator,
            reason: status.reason,
        }),
        Some(_) => Ok(()),
        None => {
            tracing::warn!(%accelerator, "KVM probe has not finished; starting without its result");
            Ok(())
        }
    }
}

/// Decodes and validates the task's driver config and builds the VM spec. `kvm` is the
/// fingerprint's KVM probe result, `None` while the probe runs.
fn prepare(
    config: &TaskConfig,
    plugin: &PluginConfig,
    kvm: Option<KvmStatus>,
) -> Result<PreparedTask, StartError> {
    let decoded = DriverConfig::decode(&config.msgpack_driver_config)?;
    let alloc_dir = PathBuf::from(&config.alloc_dir);
    let task_dir = alloc_dir.join(&config.name);
    let task = validate(
        decoded,
        plugin,
        &TaskDirs {
            alloc_dir,
            task_dir: task_dir.clone(),
        },
    )?;

    let accelerator = task.config.accelerator.clone();
    if uses_kvm(&accelerator) && !accelerator.contains(':') {
        check_kvm(accelerator, Path::new(KVM_DEVICE).exists(), kvm)?;
    }

    let search_path = split_search_path(&std::env::var_os("PATH").unwrap_or_default());
    let emulator = find_emulator_binary(&search_path, &task.config.emulator).ok_or_else(|| {
        StartError::EmulatorNotFound {
            target: task.config.emulator.clone(),
        }
    })?;

    let resources = config.resources.as_ref();
    let allocated = resources.and_then(|resources| resources.allocated_resources.as_ref());
    let memory_mb = allocated
        .and_then(|allocated| allocated.memory.as_ref())
        .map_or(0, |memory| memory.memory_mb);
    let cpuset = resources
        .and_then(|resources| resources.linux_resources.as_ref())
        .map_or("", |linux| linux.cpuset_cpus.as_str());
    let reserved_cores = parse_cpuset(cpuset)?;
    let network = config.network_isolation_spec.as_ref();

    let context = TaskContext {
        emulator: emulator.clone(),
        task_dir: task_dir.clone(),
        memory_mib: memory_mb,
        reserved_cores: reserved_cores.clone(),
        ports: task_ports(config)?,
        dns: config.dns.as_ref().map(|dns| DnsConfig {
            servers: dns.servers.clone(),
            searches: dns.searches.clone(),
        }),
        network_isolated: network.is_some(),
        host_memory_mib: host_memory_mib(),
    };
    let mut command = build_command_line(&task, &context)?;
    // The VM layer names the VM itself, with the task id, so that recovery can check it.
    command
        .pieces
        .retain(|piece| !matches!(piece, Piece::Name(_)));

    let memory_mib = u64::try_from(memory_mb).unwrap_or(0);
    let log_path = |path: &str| PathBuf::from(if path.is_empty() { NULL_DEVICE } else { path });
    let spec = VmSpec {
        name: config.id.clone(),
        command,
        dir: task_dir.clone(),
        work_dir: task_dir.clone(),
        stdout: log_path(&config.stdout_path),
        stderr: log_path(&config.stderr_path),
        user: resolve_user(&config.user)?,
        netns: network
            .filter(|spec| !spec.path.is_empty())
            .map(|spec| PathBuf::from(&spec.path)),
        // Filled in by StartTask once the cgroups exist.
        cgroups: Vec::new(),
        start_timeout: task.config.boot_timeout,
    };
    Ok(PreparedTask {
        spec,
        graceful_shutdown: task.config.graceful_shutdown,
        task_dir,
        emulator,
        accelerator: task.config.accelerator.clone(),
        memory_mib,
        memory_limit_mib: task.memory_limit_mib(memory_mib),
        reserved_cores,
    })
}

/// Collects the group network's ports (with `to`) and the legacy task-level network ports.
fn task_ports(config: &TaskConfig) -> Result<Vec<TaskPort>, StartError> {
    let port_number = |label: &str, value: i32| {
        u16::try_from(value)
            .ok()
            .filter(|port| *port > 0)
            .ok_or_else(|| StartError::InvalidPort {
                label: label.to_owned(),
                value,
            })
    };
    let Some(resources) = config.resources.as_ref() else {
        return Ok(Vec::new());
    };

    let mut ports = Vec::new();
    for mapping in &resources.ports {
        ports.push(TaskPort {
            label: mapping.label.clone(),
            value: port_number(&mapping.label, mapping.value)?,
            to: if mapping.to > 0 {
                Some(port_number(&mapping.label, mapping.to)?)
            } else {
                None
            },
        });
    }
    let networks = resources
        .allocated_resources
        .iter()
        .flat_map(|allocated| &allocated.networks);
    for network in networks {
        for port in network.reserved_ports.iter().chain(&network.dynamic_ports) {
            ports.push(TaskPort {
                label: port.label.clone(),
                value: port_number(&port.label, port.value)?,
                to: None,
            });
        }
    }
    Ok(ports)
}

/// Parses a cpuset list such as `0,2-3` into core ids. An empty list has no cores.
fn parse_cpuset(value: &str) -> Result<Vec<u32>, StartError> {
    let invalid = || StartError::InvalidCpuset {
        value: value.to_owned(),
    };
    let mut cores = Vec::new();
    for part in value
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
    {
        match part.split_once('-') {
            Some((first, last)) => {
                let first: u32 = first.trim().parse().map_err(|_| invalid())?;
                let last: u32 = last.trim().parse().map_err(|_| invalid())?;
                if first > last {
                    return Err(invalid());
                }
                cores.extend(first..=last);
            }
            None => cores.push(part.parse().map_err(|_| invalid())?),
        }
    }
    Ok(cores)
}

/// Resolves the task's `user`. Nomad's dynamic workload users (`nomad-<N>`) have no passwd
/// entry and use N as both uid and gid.
fn resolve_user(user: &str) -> Result<Option<UserIds>, StartError> {
    if user.is_empty() {
        return Ok(None);
    }
    let found = nix::unistd::User::from_name(user).map_err(|source| StartError::UserLookup {
        user: user.to_owned(),
        source,
    })?;
    if let Some(found) = found {
        return Ok(Some(UserIds {
            uid: found.uid.as_raw(),
            gid: found.gid.as_raw(),
        }));
    }
    user.strip_prefix("nomad-")
        .and_then(|id| id.parse::<u32>().ok())
        .map(|id| Some(UserIds { uid: id, gid: id }))
        .ok_or_else(|| StartError::UnknownUser {
            user: user.to_owned(),
        })
}

/// Returns the host's total memory in MiB from `/proc/meminfo`, if readable.
fn host_memory_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use crate::driver::nomad::proto::drivers::{
        AllocatedTaskResources, NetworkPort, NetworkResource, PortMapping, Resources,
    };

    use super::*;

    #[test]
    fn cpuset_lists_and_ranges() {
        assert_eq!(parse_cpuset("").expect("empty"), Vec::<u32>::new());
        assert_eq!(parse_cpuset("0,2-3").expect("valid"), vec![0, 2, 3]);
        assert_eq!(parse_cpuset("5").expect("valid"), vec![5]);
    }

    #[test]
    fn cpuset_rejects_garbage() {
        for value in ["a", "3-1", "1-", "0,,x"] {
            let error = parse_cpuset(value).unwrap_err();
            assert!(error.to_string().contains(value), "{error}");
        }
    }

    #[test]
    fn ports_group_and_legacy() {
        let config = TaskConfig {
            resources: Some(Resources {
                ports: vec![
                    PortMapping {
                        label: "http".into(),
                        value: 25000,
                        to: 8080,
                        host_ip: "127.0.0.1".into(),
                    },
                    PortMapping {
                        label: "ssh".into(),
                        value: 25001,
                        to: 0,
                        host_ip: String::new(),
                    },
                ],
                allocated_resources: Some(AllocatedTaskResources {
                    networks: vec![NetworkResource {
                        reserved_ports: vec![NetworkPort {
                            label: "admin".into(),
                            value: 9000,
                        }],
                        dynamic_ports: vec![NetworkPort {
                            label: "metrics".into(),
                            value: 25002,
                        }],
                        ..NetworkResource::default()
                    }],
                    ..AllocatedTaskResources::default()
                }),
                ..Resources::default()
            }),
            ..TaskConfig::default()
        };
        let ports = task_ports(&config).expect("valid ports");
        let summary: Vec<_> = ports
            .iter()
            .map(|port| (port.label.as_str(), port.value, port.to))
            .collect();
        assert_eq!(
            summary,
            [
                ("http", 25000, Some(8080)),
                ("ssh", 25001, None),
                ("admin", 9000, None),
                ("metrics", 25002, None),
            ]
        );
    }

    #[test]
    fn ports_reject_out_of_range() {
        let config = TaskConfig {
            resources: Some(Resources {
                ports: vec![PortMapping {
                    label: "http".into(),
                    value: 70000,
                    ..PortMapping::default()
                }],
                ..Resources::default()
            }),
            ..TaskConfig::default()
        };
        let error = task_ports(&config).unwrap_err();
        assert!(error.to_string().contains("70000"), "{error}");
    }

    #[test]
    fn user_dynamic_and_unknown() {
        assert_eq!(resolve_user("").expect("empty"), None);
        assert_eq!(
            resolve_user("nomad-81234").expect("dynamic user"),
            Some(UserIds {
                uid: 81234,
                gid: 81234
            })
        );
        assert_eq!(
            resolve_user("root").expect("root exists"),
            Some(UserIds { uid: 0, gid: 0 })
        );
        let error = resolve_user("no-such-user-here").unwrap_err();
        assert!(error.to_string().contains("no-such-user-here"), "{error}");
    }

    #[test]
    fn start_errors_recoverable() {
        let timed_out = StartError::Vm(VmError::StartTimedOut {
            after: std::time::Duration::from_secs(1),
            stderr_tail: String::new(),
        });
        assert!(timed_out.recoverable());
        assert!(!StartError::Config(ConfigError::MissingImagePath).recoverable());
        assert!(!StartError::UnknownUser { user: "x".into() }.recoverable());
    }

    fn timed_out() -> VmError {
        VmError::StartTimedOut {
            after: std::time::Duration::from_secs(1),
            stderr_tail: "(stderr goes to the FIFO)".into(),
        }
    }

    #[tokio::test]
    async fn logmon_tail_after_start() {
        let root = tempfile::tempdir().expect("create temp dir");
        let logs = root.path().join("alloc/logs");
        std::fs::create_dir_all(&logs).expect("create logs dir");
        let fifo = logs.join(".t.stderr.fifo");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("run mkfifo");
        assert!(status.success(), "mkfifo: {status}");
        std::fs::write(logs.join("t.stderr.0"), "old run\n").expect("write log");
        let config = TaskConfig {
            name: "t".into(),
            alloc_id: "a1".into(),
            alloc_dir: root.path().to_str().expect("UTF-8").into(),
            stderr_path: fifo.to_str().expect("UTF-8").into(),
            ..TaskConfig::default()
        };

        let logmon = LogmonStderr::before_start(&config).expect("stderr is a FIFO");
        let mut error = timed_out();
        logmon.fill_in(&mut error, &config).await;
        assert!(
            error.to_string().contains("nomad alloc logs -stderr a1 t"),
            "{error}"
        );

        std::fs::write(logs.join("t.stderr.0"), "old run\nbad smp\n").expect("write log");
        std::fs::write(logs.join("t.stderr.1"), "qemu: invalid -smp abc\n").expect("write log");
        let mut error = timed_out();
        logmon.fill_in(&mut error, &config).await;
        let VmError::StartTimedOut { stderr_tail, .. } = &error else {
            panic!("wrong error: {error}");
        };
        assert_eq!(stderr_tail, "qemu: invalid -smp abc");

        std::fs::remove_file(logs.join("t.stderr.1")).expect("remove log");
        let mut error = timed_out();
        logmon.fill_in(&mut error, &config).await;
        let VmError::StartTimedOut { stderr_tail, .. } = &error else {
            panic!("wrong error: {error}");
        };
        assert_eq!(stderr_tail, "bad smp");
    }

    #[test]
    fn kvm_check_cases() {
        let unusable = KvmStatus {
            usable: false,
            reason: "probe guest did not finish within 2s".into(),
        };
        let error = check_kvm("kvm".into(), true, Some(unusable.clone())).unwrap_err();
        assert!(matches!(error, StartError::KvmUnusable { .. }), "{error}");
        assert!(
            error.to_string().contains("did not finish within 2s"),
            "{error}"
        );
        assert!(
            error.to_string().contains("accelerator = \"tcg\""),
            "{error}"
        );

        let error = check_kvm("kvm".into(), false, Some(unusable)).unwrap_err();
        assert!(matches!(error, StartError::KvmMissing { .. }), "{error}");

        let usable = KvmStatus {
            usable: true,
            reason: "probe finished in 40ms".into(),
        };
        check_kvm("kvm".into(), true, Some(usable)).expect("usable KVM");
        check_kvm("kvm".into(), true, None).expect("probe still running");
    }
}
