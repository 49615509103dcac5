//! Checks a task config against the plugin config and the host's file system.

use std::fs::File;
use std::io::{Read, Seek};
use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::args::check_args;
use super::error::ConfigError;
use super::plugin::PluginConfig;
use super::task::TaskConfig;
use super::{check_token, emulator_target};

/// Drive interfaces QEMU supports, the list of Nomad's built-in qemu driver.
pub const DRIVE_INTERFACES: &[&str] = &[
    "ide", "scsi", "sd", "mtd", "floppy", "pflash", "virtio", "none",
];

/// The task's directories on the host, as Nomad passes them in `TaskConfig`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskDirs {
    /// The allocation dir (`alloc_dir`).
    pub alloc_dir: PathBuf,
    /// The task dir, `<alloc_dir>/<task name>`. QEMU runs with it as its working directory
    /// ([`crate::driver::vm::VmSpec::work_dir`]), so relative paths resolve against it.
    pub task_dir: PathBuf,
}

/// A task config that passed every check, with its image path resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedTask {
    /// The config as decoded. `emulator` contains the bare target, like `x86_64`.
    pub config: TaskConfig,
    /// `image_path` with symlinks resolved. QEMU gets this path, so a symlink swapped after the
    /// check cannot redirect it.
    pub image: PathBuf,
}

impl ValidatedTask {
    /// Returns the emulator binary's file name, like `qemu-system-x86_64`.
    pub fn emulator_binary(&self) -> String {
        format!("qemu-system-{}", self.config.emulator)
    }

    /// Returns the memory limit for the task's cgroup in MiB: guest RAM plus `memory_overhead`.
    pub fn memory_limit_mib(&self, guest_mib: u64) -> u64 {
        guest_mib.saturating_add(self.config.memory_overhead_mib)
    }
}

/// Dirs a task may read host files from, with symlinks resolved: the allocation dir and the
/// plugin's `image_paths`. Entries that do not exist are left out, since nothing is inside them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct AllowedDirs {
    dirs: Vec<PathBuf>,
}

impl AllowedDirs {
    fn new(dirs: &TaskDirs, plugin: &PluginConfig) -> Self {
        let dirs = std::iter::once(&dirs.alloc_dir)
            .chain(&plugin.image_paths)
            .filter_map(|dir| dir.canonicalize().ok())
            .collect();
        Self { dirs }
    }

    pub(super) fn contains(&self, resolved: &Path) -> bool {
        self.dirs.iter().any(|dir| resolved.starts_with(dir))
    }

    pub(super) fn to_vec(&self) -> Vec<PathBuf> {
        self.dirs.clone()
    }
}

/// Time limit for `qemu-img info` on the task's image.
const QEMU_IMG_TIMEOUT: Duration = Duration::from_secs(5);

/// Interval at which a running `qemu-img` is polled for its exit.
const QEMU_IMG_POLL: Duration = Duration::from_millis(10);

/// Keys of `qemu-img info` output that name a file QEMU opens with the image.
const CHAIN_FILE_KEYS: &[&str] = &[
    "filename",
    "backing-filename",
    "full-backing-filename",
    "data-file",
];

/// Validates `config` for a task with directories `dirs` under plugin config `plugin`.
///
/// Rules beyond those of Nomad's built-in driver: the image path must not contain a comma, is
/// checked after symlinks are resolved, must be a regular file or block device, and every file
/// of its backing chain must lie in the allowed dirs too (this runs `qemu-img info`), names that go into QEMU option lists must be plain,
/// and with `args_allowlist` set the `args` must pass the rule in [`check_args`].
pub fn validate(
    mut config: TaskConfig,
    plugin: &PluginConfig,
    dirs: &TaskDirs,
) -> Result<ValidatedTask, ConfigError> {
    config.emulator = emulator_target(&config.emulator).to_owned();
    check_token("emulator", &config.emulator)?;
    let allowlist = &plugin.emulators_allowlist;
    if !allowlist.is_empty() && !allowlist.contains(&config.emulator) {
        return Err(ConfigError::EmulatorNotAllowed {
            emulator: config.emulator,
            allowlist: allowlist.clone(),
        });
    }

    check_token("machine_type", &config.machine_type)?;
    check_token("accelerator", &config.accelerator)?;
    if !DRIVE_INTERFACES.contains(&config.drive_interface.as_str()) {
        return Err(ConfigError::UnsupportedDriveInterface {
            value: config.drive_interface,
            allowed: DRIVE_INTERFACES,
        });
    }
    if config.boot_timeout.is_zero() {
        return Err(ConfigError::ZeroBootTimeout);
    }

    let allowed = AllowedDirs::new(dirs, plugin);
    let image = resolve_image(&config.image_path, &dirs.task_dir, &allowed)?;
    check_args(
        &config.args,
        &plugin.args_allowlist,
        &allowed,
        &dirs.task_dir,
    )?;

    Ok(ValidatedTask { config, image })
}

fn resolve_image(
    image_path: &str,
    task_dir: &Path,
    allowed: &AllowedDirs,
) -> Result<PathBuf, ConfigError> {
    if image_path.is_empty() {
        return Err(ConfigError::MissingImagePath);
    }
    if image_path.contains(',') {
        return Err(ConfigError::CommaInImagePath {
            path: image_path.to_owned(),
        });
    }

    let joined = task_dir.join(image_path);
    let resolved = joined
        .canonicalize()
        .map_err(|source| ConfigError::ImagePathNotFound {
            path: image_path.to_owned(),
            resolved: joined.clone(),
            source,
        })?;
    if !allowed.contains(&resolved) {
        return Err(ConfigError::ImagePathNotAllowed {
            path: image_path.to_owned(),
            resolved,
            allowed: allowed.to_vec(),
        });
    }
    check_image_kind(image_path, &resolved)?;
    check_backing_chain(image_path, &resolved, task_dir, allowed)?;
    Ok(resolved)
}

/// Accepts a regular file or a block device. QEMU rejects a directory only after it started,
/// and opening a FIFO blocks until something writes to it.
fn check_image_kind(image_path: &str, resolved: &Path) -> Result<(), ConfigError> {
    let file_type = resolved
        .metadata()
        .map_err(|source| ConfigError::ImagePathNotFound {
            path: image_path.to_owned(),
            resolved: resolved.to_owned(),
            source,
        })?
        .file_type();
    let kind = if file_type.is_file() || file_type.is_block_device() {
        return Ok(());
    } else if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_char_device() {
        "a character device"
    } else {
        "not a regular file"
    };
    Err(ConfigError::ImageNotAFile {
        path: image_path.to_owned(),
        resolved: resolved.to_owned(),
        kind,
    })
}

/// Checks that every file QEMU would open with the image (backing files and qcow2 data files,
/// as `qemu-img info --backing-chain` reports them) lies in the allowed dirs.
fn check_backing_chain(
    image_path: &str,
    resolved: &Path,
    task_dir: &Path,
    allowed: &AllowedDirs,
) -> Result<(), ConfigError> {
    let chain = qemu_img_info(image_path, resolved, task_dir)?;
    let Value::Array(images) = &chain else {
        return Err(ConfigError::QemuImgFailed {
            path: image_path.to_owned(),
            detail: "its output is not a JSON list of images".to_owned(),
        });
    };
    for image in images {
        // A relative backing file name is relative to the image that names it.
        let own_dir = image
            .get("filename")
            .and_then(Value::as_str)
            .and_then(|name| task_dir.join(name).parent().map(Path::to_path_buf))
            .unwrap_or_else(|| task_dir.to_owned());
        let mut files = Vec::new();
        collect_chain_files(image, &mut files);
        for (key, file) in files {
            let base = if key == "backing-filename" {
                own_dir.as_path()
            } else {
                task_dir
            };
            let joined = base.join(file);
            match joined.canonicalize() {
                Ok(path) if allowed.contains(&path) => {}
                result => {
                    return Err(ConfigError::BackingFileNotAllowed {
                        path: image_path.to_owned(),
                        key: key.to_owned(),
                        file: file.to_owned(),
                        resolved: result.unwrap_or(joined),
                        allowed: allowed.to_vec(),
                    });
                }
            }
        }
    }
    Ok(())
}

/// Collects the values of [`CHAIN_FILE_KEYS`] anywhere in `json`, with their keys.
fn collect_chain_files<'a>(json: &'a Value, files: &mut Vec<(&'a str, &'a str)>) {
    match json {
        Value::Object(entries) => {
            for (key, value) in entries {
                match value.as_str() {
                    Some(file) if CHAIN_FILE_KEYS.contains(&key.as_str()) => {
                        files.push((key, file));
                    }
                    _ => collect_chain_files(value, files),
                }
            }
        }
        Value::Array(items) => items
            .iter()
            .for_each(|item| collect_chain_files(item, files)),
        _ => {}
    }
}

/// Runs `qemu-img info --backing-chain` on the image and parses its JSON output. Output goes
/// to temp files, so a long chain cannot fill a pipe while this waits.
fn qemu_img_info(image_path: &str, resolved: &Path, task_dir: &Path) -> Result<Value, ConfigError> {
    let failed = |detail: String| ConfigError::QemuImgFailed {
        path: image_path.to_owned(),
        detail,
    };
    let temp = |what: &str| {
        tempfile::tempfile()
            .map_err(|error| failed(format!("cannot create a temp file for its {what}: {error}")))
    };
    let (mut stdout, mut stderr) = (temp("output")?, temp("errors")?);
    let clone = |file: &File| {
        file.try_clone()
            .map_err(|error| failed(format!("cannot share a temp file: {error}")))
    };
    let mut child = Command::new("qemu-img")
        .args(["info", "--backing-chain", "--output=json", "--force-share"])
        .arg(resolved)
        .current_dir(task_dir)
        .stdin(Stdio::null())
        .stdout(clone(&stdout)?)
        .stderr(clone(&stderr)?)
        .spawn()
        .map_err(|source| ConfigError::QemuImgMissing {
            path: image_path.to_owned(),
            source,
        })?;

    let deadline = Instant::now() + QEMU_IMG_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(QEMU_IMG_POLL),
            Ok(None) => {
                // Not yet reaped, so the pid is still ours to kill.
                if let Err(error) = child.kill() {
                    tracing::warn!(%error, "failed to kill a hung qemu-img");
                }
                if let Err(error) = child.wait() {
                    tracing::warn!(%error, "failed to reap a killed qemu-img");
                }
                return Err(ConfigError::QemuImgTimedOut {
                    path: image_path.to_owned(),
                    after: QEMU_IMG_TIMEOUT,
                });
            }
            Err(error) => return Err(failed(format!("cannot wait for it: {error}"))),
        }
    };

    let read = |file: &mut File| -> std::io::Result<String> {
        let mut text = String::new();
        file.rewind()?;
        file.read_to_string(&mut text)?;
        Ok(text)
    };
    if !status.success() {
        let message = read(&mut stderr).unwrap_or_default();
        return Err(failed(format!("{status}: {}", message.trim())));
    }
    let output =
        read(&mut stdout).map_err(|error| failed(format!("cannot read its output: {error}")))?;
    serde_json::from_str(&output)
        .map_err(|error| failed(format!("its output is not JSON: {error}")))
}

/// Resolves `path` against `base` the way the kernel would, also when its tail does not exist
/// yet: symlinks in the longest existing prefix are resolved and the rest is appended.
///
/// Returns `Err` with the unresolved path when the missing tail contains `..`, because whether
/// that escapes depends on entries that could be created later.
pub(super) fn resolve_lexically(base: &Path, path: &Path) -> Result<PathBuf, PathBuf> {
    let joined = base.join(path);
    let mut existing = joined.as_path();
    let mut tail = Vec::new();
    loop {
        if let Ok(resolved) = existing.canonicalize() {
            let mut result = resolved;
            for component in tail.iter().rev() {
                result.push(component);
            }
            return Ok(result);
        }
        let (Some(parent), Some(name)) = (existing.parent(), existing.components().next_back())
        else {
            return Err(joined);
        };
        match name {
            Component::Normal(name) => tail.push(name.to_owned()),
            Component::CurDir => {}
            _ => return Err(joined),
        }
        existing = parent;
    }
}
