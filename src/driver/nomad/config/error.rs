//! Rejections of a task or plugin config. Each message names the value, the rule and the fix.

use std::io;
use std::path::PathBuf;

/// A task or plugin config that breaks a rule.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `image_path` is unset or empty.
    #[error("image_path is missing: set it to the disk image to boot")]
    MissingImagePath,

    /// `image_path` contains a comma, which could add options to `-drive`.
    #[error("image_path {path:?} contains a comma: rename the image or link it under a name without commas")]
    CommaInImagePath {
        /// The value as given.
        path: String,
    },

    /// `image_path` cannot be resolved.
    #[error("image_path {path:?} (resolved to {resolved:?}) cannot be opened: check that the image exists")]
    ImagePathNotFound {
        /// The value as given.
        path: String,
        /// The path after joining it to the task dir.
        resolved: PathBuf,
        /// The error from resolving symlinks.
        #[source]
        source: io::Error,
    },

    /// `image_path` resolves outside the allocation dir and the plugin's `image_paths`.
    #[error(
        "image_path {path:?} resolves to {resolved:?}, which is outside the allowed dirs {allowed:?}: \
         move the image into the allocation dir or add its dir to the plugin's image_paths"
    )]
    ImagePathNotAllowed {
        /// The value as given.
        path: String,
        /// The path after resolving symlinks.
        resolved: PathBuf,
        /// The allowed dirs after resolving symlinks.
        allowed: Vec<PathBuf>,
    },

    /// An option that becomes part of a QEMU option list has characters outside `[A-Za-z0-9._:-]`.
    #[error("{option} {value:?} is invalid: use only letters, digits, '.', '_', ':' and '-'")]
    InvalidName {
        /// Option name.
        option: &'static str,
        /// The value as given.
        value: String,
    },

    /// `drive_interface` is not one QEMU supports.
    #[error("drive_interface {value:?} is not supported: use one of {allowed:?}")]
    UnsupportedDriveInterface {
        /// The value as given.
        value: String,
        /// Supported interfaces.
        allowed: &'static [&'static str],
    },

    /// `emulator` is not in the plugin's `emulators_allowlist`.
    #[error(
        "emulator {emulator:?} is not in the plugin's emulators_allowlist {allowlist:?}: \
         use one of those or ask the operator to allow it"
    )]
    EmulatorNotAllowed {
        /// The emulator target.
        emulator: String,
        /// The plugin's allowlist.
        allowlist: Vec<String>,
    },

    /// A flag in `args` is not in the plugin's `args_allowlist`.
    #[error(
        "args[{index}] {arg:?} is not in the plugin's args_allowlist {allowlist:?}: \
         remove it or ask the operator to allow it"
    )]
    ArgNotAllowed {
        /// Position in `args`.
        index: usize,
        /// The flag.
        arg: String,
        /// The plugin's allowlist.
        allowlist: Vec<String>,
    },

    /// A non-flag token in `args` does not follow an allowed flag as its value. QEMU reads such a
    /// token as a disk image.
    #[error(
        "args[{index}] {arg:?} is not the value of a flag, and QEMU would attach it as a disk: \
         with args_allowlist set, every value must directly follow its flag"
    )]
    PositionalArg {
        /// Position in `args`.
        index: usize,
        /// The token.
        arg: String,
    },

    /// A value in `args` names a host path outside the allowed dirs.
    #[error(
        "args[{index}] {arg:?} refers to {path:?}, which is outside the allowed dirs {allowed:?}: \
         move the file into the allocation dir or add its dir to the plugin's image_paths"
    )]
    ArgPathNotAllowed {
        /// Position in `args`.
        index: usize,
        /// The token.
        arg: String,
        /// The path after resolving symlinks, or the part that did not resolve.
        path: PathBuf,
        /// The allowed dirs after resolving symlinks.
        allowed: Vec<PathBuf>,
    },

    /// An `image_paths` entry in the plugin config is relative.
    #[error("plugin image_paths entry {dir:?} is relative: use an absolute path")]
    RelativeImagePathsEntry {
        /// The entry as given.
        dir: PathBuf,
    },

    /// An `args_allowlist` entry in the plugin config is not a flag.
    #[error("plugin args_allowlist entry {entry:?} is not a flag: list flags with their leading '-', like \"-device\"")]
    AllowlistEntryNotFlag {
        /// The entry as given.
        entry: String,
    },

    /// `boot_timeout` is zero.
    #[error("boot_timeout is zero: set a positive duration, like \"30s\"")]
    ZeroBootTimeout,

    /// The task's memory is below what a guest can boot with.
    #[error("task memory {mib} MiB is below the minimum of {min} MiB: raise resources.memory")]
    MemoryTooSmall {
        /// The task's `resources.memory`.
        mib: i64,
        /// The minimum.
        min: u64,
    },

    /// Guest RAM plus QEMU's overhead exceeds the host's memory.
    #[error(
        "task memory {mib} MiB plus memory_overhead {overhead_mib} MiB exceeds the host's {host_mib} MiB: \
         lower resources.memory or memory_overhead"
    )]
    MemoryTooLarge {
        /// The task's `resources.memory`.
        mib: u64,
        /// The task's `memory_overhead`.
        overhead_mib: u64,
        /// The host's total memory.
        host_mib: u64,
    },

    /// A `port_map` label is not a port of the task's network.
    #[error(
        "port_map label {label:?} is not a port of this task: use one of {known:?}, \
         or add a port with that label to the group's network block"
    )]
    UnknownPortLabel {
        /// The label.
        label: String,
        /// Labels the task has.
        known: Vec<String>,
    },

    /// A DNS server address from Nomad does not parse.
    #[error("DNS server {value:?} is not an IP address: fix the group's network dns block")]
    InvalidDnsServer {
        /// The value as received.
        value: String,
    },

    /// A unix socket path is too long for `sun_path`.
    #[error(
        "socket path {path:?} is {len} bytes long, but unix socket paths must be shorter than 108 bytes: \
         shorten the client's alloc_dir or the task name"
    )]
    SocketPathTooLong {
        /// The socket path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
}
