//! Maps a validated task config and its Nomad context to a QEMU command line.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::IpAddr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::driver::vm::argv::{
    Drive, GuestAgent, HostForward, Machine, Memory, Piece, Protocol, QemuCommandLine, UserNetwork,
};

use super::error::ConfigError;
use super::validate::ValidatedTask;

/// Smallest task memory accepted, in MiB. SeaBIOS and a small Linux guest fit, less does not.
pub const MIN_MEMORY_MIB: u64 = 16;

/// File name of the guest agent socket in the task dir, the same as Nomad's built-in driver.
pub const GUEST_AGENT_SOCKET_NAME: &str = "qa.sock";

/// Drive id of the task's image, so QMP commands and `args` can refer to it.
pub const IMAGE_DRIVE_ID: &str = "image0";

/// Netdev id of the user-mode network, the same as Nomad's built-in driver.
pub const USER_NETDEV_ID: &str = "user.0";

/// Length limit of a unix socket path: `sun_path` is 108 bytes including the final NUL.
const MAX_SOCKET_PATH_LEN: usize = 107;

/// One port of the task, from the group `network` block or a legacy task-level network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskPort {
    /// The port's label.
    pub label: String,
    /// The host port.
    pub value: u16,
    /// The port inside the allocation's network namespace. `None` means the same as `value`.
    pub to: Option<u16>,
}

/// DNS settings of the group network.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsConfig {
    /// DNS servers. QEMU's user-mode network takes only the first.
    pub servers: Vec<String>,
    /// DNS search domains.
    pub searches: Vec<String>,
}

/// The parts of Nomad's `TaskConfig` and the host that shape the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskContext {
    /// Path of the emulator binary, resolved by the caller from
    /// [`ValidatedTask::emulator_binary`].
    pub emulator: PathBuf,
    /// The task dir, `<alloc_dir>/<task name>`.
    pub task_dir: PathBuf,
    /// The task's `resources.memory` in MB, which QEMU gets as MiB like the built-in driver.
    pub memory_mib: i64,
    /// Reserved cores (`cpuset_cpus`), empty when the task asked for `cpu` in MHz.
    pub reserved_cores: Vec<u32>,
    /// The task's ports.
    pub ports: Vec<TaskPort>,
    /// DNS settings, when the group network has a `dns` block.
    pub dns: Option<DnsConfig>,
    /// Whether QEMU runs in the allocation's network namespace. Forwards then listen on each
    /// port's `to`, because Nomad maps the host port to it.
    pub network_isolated: bool,
    /// The host's total memory in MiB, when known.
    pub host_memory_mib: Option<u64>,
}

/// Builds the QEMU command line for `task` in `context`, without the QMP monitor, which the VM
/// layer adds with the fd it binds.
///
/// The flags and their order follow Nomad's built-in qemu driver: `-machine`, `-name` (the
/// image's file name, as the built-in sets it; StartTask drops this piece, because the VM layer
/// names every VM with its task id so that recovery can check it), `-m`, `-drive`, `-nographic`, the guest agent, `args`, the user-mode
/// network, and with the `kvm` accelerator `-cpu host` and `-smp` with the reserved core count.
/// The network is added when there are forwards or DNS settings. The built-in adds it only for
/// legacy task-level networks, so `port_map` with group network ports works here and not there.
pub fn build_command_line(
    task: &ValidatedTask,
    context: &TaskContext,
) -> Result<QemuCommandLine, ConfigError> {
    let config = &task.config;
    let memory_mib = check_memory(
        context.memory_mib,
        config.memory_overhead_mib,
        context.host_memory_mib,
    )?;

    let mut command = QemuCommandLine::new(&context.emulator)
        .with(Machine {
            machine_type: config.machine_type.clone(),
            accelerator: config.accelerator.clone(),
        })
        .with(Piece::Name(vm_name(&config.image_path)))
        .with(Memory { mib: memory_mib })
        .with(Drive {
            id: Some(IMAGE_DRIVE_ID.to_owned()),
            ..Drive::new(&task.image, &config.drive_interface)
        })
        .with(Piece::NoGraphic);

    if config.guest_agent {
        let socket = context.task_dir.join(GUEST_AGENT_SOCKET_NAME);
        check_socket_path(&socket)?;
        command.push(GuestAgent { socket });
    }

    if !config.args.is_empty() {
        command.push(Piece::Extra(
            config.args.iter().map(OsString::from).collect(),
        ));
    }

    if let Some(network) = user_network(&config.port_map, context)? {
        command.push(network);
    }

    if uses_kvm(&config.accelerator) {
        command.push(Piece::Cpu("host".to_owned()));
        if let Ok(cores) = u32::try_from(context.reserved_cores.len()) {
            if cores > 0 {
                command.push(Piece::Smp(cores));
            }
        }
    }
    Ok(command)
}

/// Reports whether the accelerator's first choice is KVM, as in `kvm` or `kvm:tcg`.
pub fn uses_kvm(accelerator: &str) -> bool {
    accelerator.split(':').next() == Some("kvm")
}

fn check_memory(mib: i64, overhead_mib: u64, host_mib: Option<u64>) -> Result<u64, ConfigError> {
    let guest_mib = u64::try_from(mib)
        .ok()
        .filter(|guest_mib| *guest_mib >= MIN_MEMORY_MIB)
        .ok_or(ConfigError::MemoryTooSmall {
            mib,
            min: MIN_MEMORY_MIB,
        })?;
    if let Some(host_mib) = host_mib {
        if guest_mib.saturating_add(overhead_mib) > host_mib {
            return Err(ConfigError::MemoryTooLarge {
                mib: guest_mib,
                overhead_mib,
                host_mib,
            });
        }
    }
    Ok(guest_mib)
}

/// Returns the VM name, the image's file name like Nomad's built-in driver uses.
fn vm_name(image_path: &str) -> String {
    Path::new(image_path)
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| image_path.to_owned())
}

fn check_socket_path(path: &Path) -> Result<(), ConfigError> {
    let len = path.as_os_str().as_bytes().len();
    if len > MAX_SOCKET_PATH_LEN {
        return Err(ConfigError::SocketPathTooLong {
            path: path.to_owned(),
            len,
        });
    }
    Ok(())
}

fn user_network(
    port_map: &BTreeMap<String, u16>,
    context: &TaskContext,
) -> Result<Option<UserNetwork>, ConfigError> {
    let mut forwards = Vec::new();
    for (label, guest_port) in port_map {
        let port = context
            .ports
            .iter()
            .find(|port| &port.label == label)
            .ok_or_else(|| ConfigError::UnknownPortLabel {
                label: label.clone(),
                known: context
                    .ports
                    .iter()
                    .map(|port| port.label.clone())
                    .collect(),
            })?;
        let host_port = match port.to {
            Some(to) if context.network_isolated => to,
            _ => port.value,
        };
        for protocol in [Protocol::Udp, Protocol::Tcp] {
            forwards.push(HostForward {
                protocol,
                host_port,
                guest_port: *guest_port,
            });
        }
    }

    let dns = context.dns.clone().unwrap_or_default();
    let server = dns
        .servers
        .first()
        .map(|server| {
            server
                .parse::<IpAddr>()
                .map_err(|_| ConfigError::InvalidDnsServer {
                    value: server.clone(),
                })
        })
        .transpose()?;

    if forwards.is_empty() && server.is_none() && dns.searches.is_empty() {
        return Ok(None);
    }
    Ok(Some(UserNetwork {
        id: USER_NETDEV_ID.to_owned(),
        device_model: "virtio-net".to_owned(),
        dns: server,
        dns_search: dns.searches,
        forwards,
    }))
}
