//! Whether KVM is usable: guest code must be seen to run under KVM within a deadline.
//!
//! An openable `/dev/kvm` and `query-kvm` reporting `enabled` are not proof. On a host whose
//! KVM is PVM (nested virtualization without hardware support), both look fine, but a stock
//! Debian guest kernel printed nothing after its bzImage decompressor started and did not reach
//! user space within 60 s. The probe therefore boots a tiny guest (`kvm_probe.S`) with
//! `-machine pc,accel=kvm` through firmware, protected mode, long mode with paging, a page
//! fault handled through the IDT and PIT timer interrupts, which a Linux boot all needs. The
//! guest reports success through the `isa-debug-exit` device.
//!
//! On the PVM host this was written on (QEMU 7.2, 2 vCPUs), every step passes but only at
//! emulation speed: the probe ended after 3.1 to 7.4 s with `accel=kvm`, against 0.15 s with
//! `accel=tcg`. The deadline is what turns that into "unusable", so a KVM that works at software
//! speed is reported as unusable, as is one that fails a step.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::process::Command;

use crate::driver::vm::argv::{DirectKernel, Machine, Memory, Piece, QemuCommandLine};
use crate::report::error_chain;

/// Default time the probe guest gets, from spawn to exit.
///
/// NOTE: an estimate. On a host with hardware KVM the probe is expected to end well within it,
/// because it ends in 0.15 s under TCG, but no such host was at hand to measure.
pub const KVM_PROBE_DEADLINE: Duration = Duration::from_secs(2);

/// Time kept back from the deadline to kill and reap a guest that did not finish.
const KILL_MARGIN: Duration = Duration::from_millis(100);

/// The assembled `kvm_probe.S`, a multiboot kernel.
const PROBE_IMAGE: &[u8] = include_bytes!("kvm_probe.bin");

/// QEMU's exit status when the guest writes 0x2a to `isa-debug-exit`: `(0x2a << 1) | 1`.
const PROBE_SUCCESS_STATUS: i32 = 85;

/// Largest part of QEMU's stderr kept for the error message, in bytes.
const MAX_STDERR: u64 = 4096;

/// The result of the KVM probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmStatus {
    /// Whether tasks can use `accelerator = "kvm"`.
    pub usable: bool,
    /// The reason KVM is unusable, or the probe's duration when it is usable.
    pub reason: String,
}

/// Errors of one run of the probe guest.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The deadline is too short to leave time to kill QEMU.
    #[error("probe deadline {deadline:?} is too short: use at least {KILL_MARGIN:?}")]
    DeadlineTooShort {
        /// The requested deadline.
        deadline: Duration,
    },
    /// The probe image could not be written to a temporary dir.
    #[error("failed to write the probe image to a temporary dir")]
    WriteImage(#[source] std::io::Error),
    /// QEMU could not be started.
    #[error("failed to start {emulator:?}")]
    Spawn {
        /// The emulator binary.
        emulator: PathBuf,
        /// The spawn error.
        #[source]
        source: std::io::Error,
    },
    /// Waiting for QEMU failed.
    #[error("failed to wait for QEMU")]
    Wait(#[source] std::io::Error),
    /// The guest did not report success in time, so QEMU was killed.
    #[error("the probe guest did not finish within {deadline:?}, so guest code does not run at hardware speed")]
    TimedOut {
        /// The deadline.
        deadline: Duration,
    },
    /// QEMU exited without the guest's success status.
    #[error("QEMU exited with {status} instead of status {PROBE_SUCCESS_STATUS}: {stderr}")]
    Failed {
        /// QEMU's exit status.
        status: ExitStatus,
        /// The start of QEMU's stderr.
        stderr: String,
    },
}

/// Probes whether KVM is usable with `emulator` (a `qemu-system-x86_64`), failing early when
/// `dev_kvm` cannot be opened for reading and writing. Takes at most `deadline`.
pub async fn probe_kvm(emulator: &Path, dev_kvm: &Path, deadline: Duration) -> KvmStatus {
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev_kvm);
    if let Err(error) = opened {
        return KvmStatus {
            usable: false,
            reason: format!("cannot open {}: {error}", dev_kvm.display()),
        };
    }

    match run_probe_guest(emulator, "kvm", deadline).await {
        Ok(elapsed) => KvmStatus {
            usable: true,
            reason: format!("probe guest finished under KVM in {elapsed:?}"),
        },
        Err(error) => KvmStatus {
            usable: false,
            reason: error_chain(&error),
        },
    }
}

/// Boots the probe guest with `accelerator` and returns how long it took to report success.
/// QEMU is killed and reaped when it has not exited `deadline` after the start.
pub async fn run_probe_guest(
    emulator: &Path,
    accelerator: &str,
    deadline: Duration,
) -> Result<Duration, ProbeError> {
    let started = Instant::now();
    let wait_limit = deadline
        .checked_sub(KILL_MARGIN)
        .ok_or(ProbeError::DeadlineTooShort { deadline })?;

    let dir = tempfile::Builder::new()
        .prefix("qemu-kvm-probe-")
        .tempdir()
        .map_err(ProbeError::WriteImage)?;
    let image = dir.path().join("probe.bin");
    std::fs::write(&image, PROBE_IMAGE).map_err(ProbeError::WriteImage)?;

    let command_line = probe_command_line(emulator, accelerator, &image);
    let mut child = Command::new(&command_line.emulator)
        .args(command_line.args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ProbeError::Spawn {
            emulator: emulator.to_owned(),
            source,
        })?;
    let stderr = child.stderr.take();

    let finished = tokio::time::timeout_at((started + wait_limit).into(), async {
        let mut text = Vec::new();
        if let Some(stderr) = stderr {
            // A read error only shortens the message.
            let _ = stderr.take(MAX_STDERR).read_to_end(&mut text).await;
        }
        (child.wait().await, text)
    })
    .await;

    match finished {
        Ok((Ok(status), _)) if status.code() == Some(PROBE_SUCCESS_STATUS) => Ok(started.elapsed()),
        Ok((Ok(status), stderr)) => Err(ProbeError::Failed {
            status,
            stderr: String::from_utf8_lossy(&stderr).trim().to_owned(),
        }),
        Ok((Err(error), _)) => Err(ProbeError::Wait(error)),
        Err(_elapsed) => {
            // `kill` sends SIGKILL and reaps the process. The probe_timeout_kills_guest test checks it.
            if let Err(error) = child.kill().await {
                tracing::warn!(pid = child.id(), %error, "failed to kill the KVM probe's QEMU");
            }
            Err(ProbeError::TimedOut { deadline })
        }
    }
}

fn probe_command_line(emulator: &Path, accelerator: &str, image: &Path) -> QemuCommandLine {
    QemuCommandLine::new(emulator)
        .with(Machine {
            machine_type: "pc".to_owned(),
            accelerator: accelerator.to_owned(),
        })
        .with(Memory { mib: 16 })
        .with(Piece::NoDefaults)
        .with(Piece::Extra(vec!["-display".into(), "none".into()]))
        .with(Piece::NoReboot)
        .with(Piece::Extra(vec![
            "-device".into(),
            "isa-debug-exit,iobase=0xf4,iosize=0x04".into(),
        ]))
        .with(DirectKernel {
            kernel: image.to_owned(),
            initrd: None,
            append: None,
        })
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_image_matches_source() {
        let dir = tempfile::tempdir().expect("temp dir");
        let source = concat!(env!("CARGO_MANIFEST_DIR"), "/src/fingerprint/kvm_probe.S");
        let object = dir.path().join("probe.o");
        let binary = dir.path().join("probe.bin");
        let assemble = std::process::Command::new("as")
            .args(["--64", "-o"])
            .arg(&object)
            .arg(source)
            .status()
            .expect("run `as`; install it with `apt-get install binutils`");
        assert!(assemble.success(), "as failed: {assemble}");
        let link = std::process::Command::new("ld")
            .args([
                "-m",
                "elf_x86_64",
                "-Ttext=0x100000",
                "--oformat",
                "binary",
                "-o",
            ])
            .arg(&binary)
            .arg(&object)
            .status()
            .expect("run `ld`; install it with `apt-get install binutils`");
        assert!(link.success(), "ld failed: {link}");
        assert_eq!(std::fs::read(&binary).expect("read probe"), PROBE_IMAGE);
    }

    #[test]
    fn probe_image_has_multiboot_header() {
        let magic = u32::from_le_bytes(PROBE_IMAGE[0..4].try_into().expect("4 bytes"));
        let flags = u32::from_le_bytes(PROBE_IMAGE[4..8].try_into().expect("4 bytes"));
        let checksum = u32::from_le_bytes(PROBE_IMAGE[8..12].try_into().expect("4 bytes"));
        assert_eq!(magic, 0x1BAD_B002);
        assert_eq!(magic.wrapping_add(flags).wrapping_add(checksum), 0);
    }

    #[test]
    fn probe_command_line_renders() {
        let args = probe_command_line(Path::new("qemu"), "kvm", Path::new("/tmp/p.bin")).args();
        let args: Vec<_> = args.iter().map(|arg| arg.to_string_lossy()).collect();
        assert_eq!(
            args,
            [
                "-machine",
                "type=pc,accel=kvm",
                "-m",
                "16M",
                "-nodefaults",
                "-display",
                "none",
                "-no-reboot",
                "-device",
                "isa-debug-exit,iobase=0xf4,iosize=0x04",
                "-kernel",
                "/tmp/p.bin"
            ]
        );
    }

    #[tokio::test]
    async fn probe_kvm_without_device() {
        let status = probe_kvm(
            Path::new("qemu-system-x86_64"),
            Path::new("/nonexistent/kvm"),
            KVM_PROBE_DEADLINE,
        )
        .await;
        assert!(!status.usable);
        assert!(
            status.reason.contains("/nonexistent/kvm"),
            "{}",
            status.reason
        );
    }

    #[tokio::test]
    async fn probe_rejects_short_deadline() {
        let result = run_probe_guest(Path::new("qemu"), "tcg", Duration::from_millis(10)).await;
        assert!(
            matches!(result, Err(ProbeError::DeadlineTooShort { .. })),
            "{result:?}"
        );
    }
}
