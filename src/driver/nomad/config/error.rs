//! Rejections of a task or plugin config. Each message names the value, the rule and the fix.

use std::fmt::Debug;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Maximum length of a value echoed in an error message, in characters. Longer values are cut, so that
/// an error stays readable and fits in a gRPC status header.
const ECHO_LIMIT: usize = 256;

/// Renders `value` quoted, as `{:?}` does, cut to [`ECHO_LIMIT`] characters with its length.
pub(crate) fn echo<T: Debug + ?Sized>(value: &T) -> String {
    let text = format!("{value:?}");
    let count = text.chars().count();
    if count <= ECHO_LIMIT {
        return text;
    }
    let head: String = text.chars().take(ECHO_LIMIT).collect();
    format!("{head}... ({count} characters, cut)")
}

/// A task or plugin config that breaks a rule.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `image_path` is unset or empty.
    #[error("image_path is missing: set it to the disk image to boot")]
    MissingImagePath,

    /// `image_path` contains a comma, which could add options to `-drive`.
    #[error("image_path {} contains a comma: rename the image or link it under a name without commas", echo(.path))]
    CommaInImagePath {
        /// The value as given.
        path: String,
    },

    /// `image_path` cannot be resolved.
    #[error("image_path {} (resolved to {}) cannot be opened: check that the image exists", echo(.path), echo(.resolved))]
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
        "image_path {} resolves to {}, which is outside the allowed dirs {}: \
         move the image into the allocation dir or add its dir to the plugin's image_paths", echo(.path), echo(.resolved), echo(.allowed))]
    ImagePathNotAllowed {
        /// The value as given.
        path: String,
        /// The path after resolving symlinks.
        resolved: PathBuf,
        /// The allowed dirs after resolving symlinks.
        allowed: Vec<PathBuf>,
    },

    /// An option that becomes part of a QEMU option list has characters outside `[A-Za-z0-9._:-]`.
    #[error("{option} {} is invalid: use only letters, digits, '.', '_', ':' and '-'", echo(.value))]
    InvalidName {
        /// Option name.
        option: &'static str,
        /// The value as given.
        value: String,
    },

    /// `drive_interface` is not one QEMU supports.
    #[error("drive_interface {} is not supported: use one of {}", echo(.value), echo(.allowed))]
    UnsupportedDriveInterface {
        /// The value as given.
        value: String,
        /// Supported interfaces.
        allowed: &'static [&'static str],
    },

    /// `emulator` is not in the plugin's `emulators_allowlist`.
    #[error(
        "emulator {} is not in the plugin's emulators_allowlist {}: \
         use one of those or ask the operator to allow it", echo(.emulator), echo(.allowlist))]
    EmulatorNotAllowed {
        /// The emulator target.
        emulator: String,
        /// The plugin's allowlist.
        allowlist: Vec<String>,
    },

    /// A flag in `args` is not in the plugin's `args_allowlist`.
    #[error(
        "args[{index}] {} is not in the plugin's args_allowlist {}: \
         remove it or ask the operator to allow it", echo(.arg), echo(.allowlist))]
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
        "args[{index}] {} is not the value of a flag, and QEMU would attach it as a disk: \
         with args_allowlist set, every value must directly follow its flag", echo(.arg))]
    PositionalArg {
        /// Position in `args`.
        index: usize,
        /// The token.
        arg: String,
    },

    /// A value in `args` names a host path outside the allowed dirs.
    #[error(
        "args[{index}] {} refers to {}, which is outside the allowed dirs {}: \
         move the file into the allocation dir or add its dir to the plugin's image_paths", echo(.arg), echo(.path), echo(.allowed))]
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

    /// `image_path` resolves to something QEMU cannot use as a disk, such as a directory or FIFO.
    #[error(
        "image_path {} resolves to {}, which is {kind}: point image_path at a disk image file \
         or a block device",
        echo(.path), echo(.resolved)
    )]
    ImageNotAFile {
        /// The value as given.
        path: String,
        /// The path after resolving symlinks.
        resolved: PathBuf,
        /// The file type found, like "a directory".
        kind: &'static str,
    },

    /// A file in the image's backing chain (a backing file or a qcow2 data file) lies outside
    /// the allowed dirs or cannot be resolved.
    #[error(
        "image_path {} refers to {} {} (resolved to {}), which is outside the allowed dirs {}: \
         move that file into the allocation dir, add its dir to the plugin's image_paths, \
         or make the image standalone with qemu-img convert",
        echo(.path), .key, echo(.file), echo(.resolved), echo(.allowed)
    )]
    BackingFileNotAllowed {
        /// The value as given.
        path: String,
        /// The `qemu-img info` key that names the file, like `backing-filename`.
        key: String,
        /// The file name as `qemu-img info` reported it.
        file: String,
        /// The path after resolving symlinks, or as far as it could be resolved.
        resolved: PathBuf,
        /// The allowed dirs after resolving symlinks.
        allowed: Vec<PathBuf>,
    },

    /// `qemu-img` is not installed, so the image's backing chain cannot be checked.
    #[error(
        "qemu-img is needed to check the backing files of image_path {}, but it cannot be run: \
         install it (Debian: apt-get install qemu-utils)",
        echo(.path)
    )]
    QemuImgMissing {
        /// The value as given.
        path: String,
        /// The error from running it.
        #[source]
        source: io::Error,
    },

    /// `qemu-img info` failed, timed out or printed something unexpected.
    #[error(
        "qemu-img info on image_path {} failed: {}: check that the image is a readable disk image",
        echo(.path), echo(.detail)
    )]
    QemuImgFailed {
        /// The value as given.
        path: String,
        /// What went wrong, with qemu-img's message when there is one.
        detail: String,
    },

    /// `qemu-img info` did not finish in time.
    #[error(
        "qemu-img info on image_path {} did not finish within {after:?} and was killed: \
         check that the image is a local file and not on a hung mount",
        echo(.path)
    )]
    QemuImgTimedOut {
        /// The value as given.
        path: String,
        /// The time limit.
        after: Duration,
    },

    /// A value in `args` uses QEMU's JSON syntax but does not parse, so its paths cannot be
    /// checked.
    #[error(
        "args[{index}] {} looks like JSON but does not parse: \
         fix its syntax, since with args_allowlist set every JSON value is checked for host paths",
        echo(.arg)
    )]
    ArgInvalidJson {
        /// Position in `args`.
        index: usize,
        /// The token.
        arg: String,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },

    /// A token in `args` is rejected even though its flag is allowlisted, because it can run host
    /// programs or load host code.
    #[error(
        "args[{index}] {} is rejected with args_allowlist set, because {reason}: remove it",
        echo(.arg)
    )]
    ArgDenied {
        /// Position in `args`.
        index: usize,
        /// The token.
        arg: String,
        /// Why it is rejected.
        reason: &'static str,
    },

    /// An `image_paths` entry in the plugin config is relative.
    #[error("plugin image_paths entry {} is relative: use an absolute path", echo(.dir))]
    RelativeImagePathsEntry {
        /// The entry as given.
        dir: PathBuf,
    },

    /// An `args_allowlist` entry in the plugin config is not a flag.
    #[error("plugin args_allowlist entry {} is not a flag: list flags with their leading '-', like \"-device\"", echo(.entry))]
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
        "port_map label {} is not a port of this task: use one of {}, \
         or add a port with that label to the group's network block", echo(.label), echo(.known))]
    UnknownPortLabel {
        /// The label.
        label: String,
        /// Labels the task has.
        known: Vec<String>,
    },

    /// A DNS server address from Nomad does not parse.
    #[error("DNS server {} is not an IP address: fix the group's network dns block", echo(.value))]
    InvalidDnsServer {
        /// The value as received.
        value: String,
    },

    /// A unix socket path is too long for `sun_path`.
    #[error(
        "socket path {} is {len} bytes long, but unix socket paths must be shorter than 108 bytes: \
         shorten the client's alloc_dir or the task name", echo(.path))]
    SocketPathTooLong {
        /// The socket path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
}
