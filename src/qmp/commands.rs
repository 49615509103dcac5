//! Typed QMP commands and replies for what the driver uses.
//!
//! Each command is a type that implements [`Command`]: `NAME` is the command name exactly as QEMU
//! spells it, the type's fields are the `arguments` object, and `Reply` is the `return` value.
//! Reply types keep fields they do not model in `extra`, so newer QEMU versions parse.
//!
//! Differences between QEMU 7.2 and 10.0 that show up here:
//!
//! * `query-status` has `singlestep` on 7.2 only, so [`StatusInfo::singlestep`] is optional.
//! * `query-stats` returns `[]` for the `vm` and `vcpu` targets under TCG on both versions, and
//!   neither has a `block` target: block I/O counters come from `query-blockstats`.
//! * Balloon guest statistics (`qom-get` of `guest-stats`, not modelled here) use
//!   18446744073709551615 (`u64::MAX`) for a statistic the guest does not report, and 10.0 adds
//!   six `stat-*` fields.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A QMP command with a typed reply.
pub trait Command: Serialize + Send + Sync {
    /// The command name as QEMU spells it, for example `query-status`.
    const NAME: &'static str;
    /// The type of the `return` member of the reply.
    type Reply: DeserializeOwned + Send;
}

qapi_enum! {
    /// The `class` of a QMP error reply: QAPI's `QapiErrorClass`.
    ErrorClass {
        GenericError => "GenericError",
        CommandNotFound => "CommandNotFound",
        DeviceNotActive => "DeviceNotActive",
        DeviceNotFound => "DeviceNotFound",
        KvmMissingCap => "KVMMissingCap",
    }
}

qapi_enum! {
    /// The VM's run state: QAPI's `RunState`.
    RunState {
        Debug => "debug",
        Inmigrate => "inmigrate",
        InternalError => "internal-error",
        IoError => "io-error",
        Paused => "paused",
        Postmigrate => "postmigrate",
        Prelaunch => "prelaunch",
        FinishMigrate => "finish-migrate",
        RestoreVm => "restore-vm",
        Running => "running",
        SaveVm => "save-vm",
        Shutdown => "shutdown",
        Suspended => "suspended",
        Watchdog => "watchdog",
        GuestPanicked => "guest-panicked",
        Colo => "colo",
    }
}

/// An empty `return` object, `{}`, as most action commands reply.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Empty {}

/// `qmp_capabilities`: leaves capabilities negotiation mode. The client sends it during
/// negotiation, so callers never need it.
///
/// ```text
/// -> {"execute": "qmp_capabilities", "id": 1}
/// <- {"return": {}, "id": 1}
/// ```
#[derive(Debug, Clone, Default, Serialize)]
pub struct QmpCapabilities {
    /// Capabilities to enable, such as `oob`. None are enabled when empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub enable: Vec<String>,
}

impl Command for QmpCapabilities {
    const NAME: &'static str = "qmp_capabilities";
    type Reply = Empty;
}

/// `query-version`: the QEMU version.
///
/// ```text
/// -> {"execute": "query-version", "id": 2}
/// <- {"return": {"qemu": {"major": 7, "minor": 2, "micro": 22},
///                "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "id": 2}
/// ```
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryVersion;

impl Command for QueryVersion {
    const NAME: &'static str = "query-version";
    type Reply = VersionInfo;
}

/// The reply to `query-version`, also part of the greeting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The upstream version numbers.
    pub qemu: VersionTriple,
    /// The distribution's package version, empty for upstream builds.
    #[serde(default)]
    pub package: String,
}

/// A QEMU version as three numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VersionTriple {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro (patch) version.
    pub micro: u32,
}

/// `query-status`: whether the vCPUs run, and the run state.
///
/// ```text
/// -> {"execute": "query-status", "id": 3}
/// <- {"return": {"status": "running", "singlestep": false, "running": true}, "id": 3}
/// ```
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryStatus;

impl Command for QueryStatus {
    const NAME: &'static str = "query-status";
    type Reply = StatusInfo;
}

/// The reply to `query-status`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct StatusInfo {
    /// Whether the vCPUs are running.
    pub running: bool,
    /// The run state.
    pub status: RunState,
    /// Only QEMU 7.2 and older send this field.
    pub singlestep: Option<bool>,
    /// Fields not modelled here.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `query-name`: the VM name given with `-name`.
///
/// ```text
/// -> {"execute": "query-name", "id": 4}
/// <- {"return": {"name": "web-1"}, "id": 4}
/// ```
///
/// Without `-name`, the reply is `{"return": {}}`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryName;

impl Command for QueryName {
    const NAME: &'static str = "query-name";
    type Reply = NameInfo;
}

/// The reply to `query-name`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct NameInfo {
    /// The VM name, absent when QEMU runs without `-name`.
    pub name: Option<String>,
}

/// `query-kvm`: whether KVM is present and in use.
///
/// ```text
/// -> {"execute": "query-kvm", "id": 5}
/// <- {"return": {"enabled": false, "present": true}, "id": 5}
/// ```
///
/// `enabled` means that QEMU uses KVM, not that a guest can boot with it. On a host with nested
/// virtualization without hardware support (measured with a PVM host and QEMU 7.2), both fields
/// are `true` and a Linux guest still hangs early in boot.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryKvm;

impl Command for QueryKvm {
    const NAME: &'static str = "query-kvm";
    type Reply = KvmInfo;
}

/// The reply to `query-kvm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct KvmInfo {
    /// Whether this QEMU process uses KVM.
    pub enabled: bool,
    /// Whether KVM is available on the host.
    pub present: bool,
}

/// `query-cpus-fast`: the vCPUs and their host thread ids.
///
/// ```text
/// -> {"execute": "query-cpus-fast", "id": 6}
/// <- {"return": [{"thread-id": 4711, "props": {"core-id": 0, "thread-id": 0, "socket-id": 0},
///                 "qom-path": "/machine/unattached/device[0]", "cpu-index": 0,
///                 "target": "x86_64"}], "id": 6}
/// ```
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryCpusFast;

impl Command for QueryCpusFast {
    const NAME: &'static str = "query-cpus-fast";
    type Reply = Vec<CpuInfoFast>;
}

/// One vCPU in the reply to `query-cpus-fast`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CpuInfoFast {
    /// The vCPU index.
    pub cpu_index: i64,
    /// The vCPU object's QOM path.
    pub qom_path: String,
    /// The host thread id (TID) that runs this vCPU.
    pub thread_id: i64,
    /// The target architecture, for example `x86_64`.
    pub target: String,
    /// Fields not modelled here, such as `props`.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `query-blockstats`: I/O counters per block device.
///
/// ```text
/// -> {"execute": "query-blockstats", "id": 7}
/// <- {"return": [{"device": "", "qdev": "/machine/peripheral/data0/virtio-backend",
///                 "node-name": "#block123", "stats": {"rd_bytes": 4608, "wr_bytes": 0,
///                 "rd_operations": 9, "wr_operations": 0, ...}}], "id": 7}
/// ```
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryBlockstats {
    /// Whether to list every block node instead of only the devices' top nodes.
    #[serde(rename = "query-nodes", skip_serializing_if = "Option::is_none")]
    pub query_nodes: Option<bool>,
}

impl Command for QueryBlockstats {
    const NAME: &'static str = "query-blockstats";
    type Reply = Vec<BlockStats>;
}

/// One block device or node in the reply to `query-blockstats`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockStats {
    /// The drive id (empty for `-device` disks without a drive id).
    pub device: Option<String>,
    /// The device's QOM path.
    pub qdev: Option<String>,
    /// The block node name.
    pub node_name: Option<String>,
    /// The counters.
    pub stats: BlockDeviceStats,
    /// Fields not modelled here, such as `parent` and `backing`.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// I/O counters of one block device. Times are in nanoseconds.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BlockDeviceStats {
    /// Bytes read.
    pub rd_bytes: u64,
    /// Bytes written.
    pub wr_bytes: u64,
    /// Read requests.
    pub rd_operations: u64,
    /// Write requests.
    pub wr_operations: u64,
    /// Flush requests.
    #[serde(default)]
    pub flush_operations: u64,
    /// Total time spent on reads, in ns.
    #[serde(default)]
    pub rd_total_time_ns: u64,
    /// Total time spent on writes, in ns.
    #[serde(default)]
    pub wr_total_time_ns: u64,
    /// Total time spent on flushes, in ns.
    #[serde(default)]
    pub flush_total_time_ns: u64,
    /// Fields not modelled here.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `query-balloon`: the guest RAM size after the balloon. QEMU replies with a `DeviceNotActive`
/// error when the VM has no balloon device.
///
/// ```text
/// -> {"execute": "query-balloon", "id": 8}
/// <- {"return": {"actual": 134217728}, "id": 8}
/// ```
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryBalloon;

impl Command for QueryBalloon {
    const NAME: &'static str = "query-balloon";
    type Reply = BalloonInfo;
}

/// The reply to `query-balloon`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct BalloonInfo {
    /// Guest RAM in bytes.
    pub actual: u64,
}

qapi_enum! {
    /// The kind of object `query-stats` reports on: QAPI's `StatsTarget`.
    StatsTarget {
        Vm => "vm",
        Vcpu => "vcpu",
        Cryptodev => "cryptodev",
    }
}

/// `query-stats` (QEMU 7.1 and later): statistics from providers such as `kvm`.
///
/// ```text
/// -> {"execute": "query-stats", "arguments": {"target": "vm"}, "id": 9}
/// <- {"return": [{"provider": "kvm", "stats": [{"name": "max_mmu_page_hash_collisions",
///                 "value": 0}, ...]}], "id": 9}
/// ```
///
/// Under TCG the reply for `vm` and `vcpu` is `[]` on QEMU 7.2 and 10.0.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueryStats {
    /// The kind of object to report on.
    pub target: StatsTarget,
    /// Restricts the reply to these providers and statistic names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub providers: Option<Vec<StatsRequest>>,
}

/// A provider filter of `query-stats`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatsRequest {
    /// The provider, for example `kvm`.
    pub provider: String,
    /// Statistic names to report, or all when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub names: Option<Vec<String>>,
}

impl Command for QueryStats {
    const NAME: &'static str = "query-stats";
    type Reply = Vec<StatsResult>;
}

/// The statistics of one provider for one object, in the reply to `query-stats`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct StatsResult {
    /// The provider, for example `kvm`.
    pub provider: String,
    /// The object's QOM path, absent for the `vm` target.
    pub qom_path: Option<String>,
    /// The statistics.
    pub stats: Vec<Stat>,
}

/// One statistic: a number, a boolean or a histogram (a list of numbers).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Stat {
    /// The statistic's name.
    pub name: String,
    /// The value as QEMU sent it.
    pub value: Value,
}

/// `system_powerdown`: presses the ACPI power button. The guest decides whether to shut down.
///
/// ```text
/// -> {"execute": "system_powerdown", "id": 10}
/// <- {"timestamp": {...}, "event": "POWERDOWN"}
/// <- {"return": {}, "id": 10}
/// ```
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct SystemPowerdown;

impl Command for SystemPowerdown {
    const NAME: &'static str = "system_powerdown";
    type Reply = Empty;
}

/// `system_reset`: resets the VM as the reset button would.
///
/// ```text
/// -> {"execute": "system_reset", "id": 11}
/// <- {"return": {}, "id": 11}
/// <- {"timestamp": {...}, "event": "RESET", "data": {"guest": false, "reason": "host-qmp-system-reset"}}
/// ```
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct SystemReset;

impl Command for SystemReset {
    const NAME: &'static str = "system_reset";
    type Reply = Empty;
}

/// `quit`: makes QEMU exit at once. The connection closes right after the reply, sometimes
/// before the reply arrives.
///
/// ```text
/// -> {"execute": "quit", "id": 12}
/// <- {"timestamp": {...}, "event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}}
/// <- {"return": {}, "id": 12}
/// ```
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Quit;

impl Command for Quit {
    const NAME: &'static str = "quit";
    type Reply = Empty;
}

/// `stop`: pauses the vCPUs.
///
/// ```text
/// -> {"execute": "stop", "id": 13}
/// <- {"timestamp": {...}, "event": "STOP"}
/// <- {"return": {}, "id": 13}
/// ```
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Stop;

impl Command for Stop {
    const NAME: &'static str = "stop";
    type Reply = Empty;
}

/// `cont`: resumes the vCPUs.
///
/// ```text
/// -> {"execute": "cont", "id": 14}
/// <- {"timestamp": {...}, "event": "RESUME"}
/// <- {"return": {}, "id": 14}
/// ```
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Cont;

impl Command for Cont {
    const NAME: &'static str = "cont";
    type Reply = Empty;
}
