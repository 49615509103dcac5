//! Shared helpers for the integration tests: guest fixtures, the QEMU binary, temp dirs, a
//! limit on concurrent guest boots, checks that no QEMU is left behind, and the plugin process.

pub mod plugin;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nomad_driver_qemu::driver::vm::argv::{DirectKernel, Machine, Memory, Piece, QemuCommandLine};
use nomad_driver_qemu::driver::vm::{VmSpec, DEFAULT_START_TIMEOUT};
use rustix::process::{Pid, Signal};
use tokio::sync::{Semaphore, SemaphorePermit};

/// Serial console line the guest prints once its power button handler runs.
pub const READY_MARKER: &str = "QEMU-GUEST-READY";

/// Serial console line the poweroff guest prints when the power button is pressed.
pub const POWERBUTTON_MARKER: &str = "QEMU-GUEST-POWERBUTTON action=poweroff";

/// At most two guests boot at once across all tests of the binary: the CI host has 2 cores and
/// TCG guests slow each other down beyond that.
static GUEST_SLOTS: Semaphore = Semaphore::const_new(2);

/// Takes one of the guest slots; hold it while the guest runs.
pub async fn guest_slot() -> SemaphorePermit<'static> {
    GUEST_SLOTS
        .acquire()
        .await
        .expect("the guest semaphore is never closed")
}

/// Which test guest to boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guest {
    /// Powers off on the ACPI power button.
    Poweroff,
    /// Ignores the power button.
    Ignore,
}

/// Returns the path of a file in `fixtures/guest/`, failing with the build command if it is
/// missing.
pub fn guest_file(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/guest")
        .join(name);
    assert!(
        path.is_file(),
        "missing test guest {}: run fixtures/build-guests.sh",
        path.display()
    );
    path
}

/// Returns the QEMU binary, failing with the install command if it is missing.
pub fn qemu_binary() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("qemu-system-x86_64"))
            .find(|candidate| candidate.is_file())
    });
    found.expect(
        "qemu-system-x86_64 not found in PATH: run `apt-get update && apt-get install -y qemu-system-x86 qemu-utils`",
    )
}

/// Builds the direct-kernel-boot command line for `guest` (TCG, 128 MiB, no NIC).
pub fn guest_command(guest: Guest) -> QemuCommandLine {
    let initrd = match guest {
        Guest::Poweroff => "initramfs.cpio.gz",
        Guest::Ignore => "initramfs-ignore.cpio.gz",
    };
    QemuCommandLine::new(qemu_binary())
        .with(Machine {
            machine_type: "pc".into(),
            accelerator: "tcg".into(),
        })
        .with(Memory { mib: 128 })
        .with(Piece::NoGraphic)
        .with(Piece::NoReboot)
        .with(Piece::Extra(vec!["-nic".into(), "none".into()]))
        .with(DirectKernel {
            kernel: guest_file("vmlinuz"),
            initrd: Some(guest_file(initrd)),
            append: Some("console=ttyS0 quiet panic=-1".into()),
        })
}

/// Builds a spec for `guest` with its run directory `dir` and console output in `dir`.
pub fn guest_spec(name: &str, guest: Guest, dir: &Path) -> VmSpec {
    VmSpec {
        name: name.into(),
        command: guest_command(guest),
        dir: dir.to_path_buf(),
        work_dir: dir.to_path_buf(),
        stdout: dir.join("console.log"),
        stderr: dir.join("stderr.log"),
        user: None,
        netns: None,
        cgroups: Vec::new(),
        start_timeout: DEFAULT_START_TIMEOUT,
    }
}

/// Creates a temporary directory that is removed when dropped.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vm-test-")
        .tempdir()
        .expect("create a temp dir")
}

/// Waits until `file` contains `marker`, failing after `limit` with the file's content.
pub async fn wait_for_marker(file: &Path, marker: &str, limit: Duration) {
    let started = Instant::now();
    loop {
        let content = std::fs::read(file).unwrap_or_default();
        let text = String::from_utf8_lossy(&content);
        if text.contains(marker) {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "{marker:?} not seen in {} within {limit:?}; content:\n{text}",
            file.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Returns whether `file` contains `marker`.
pub fn contains_marker(file: &Path, marker: &str) -> bool {
    let content = std::fs::read(file).unwrap_or_default();
    String::from_utf8_lossy(&content).contains(marker)
}

/// Returns a VM name unique to this test run, so leftover checks find only this test's QEMU.
pub fn unique_name(test: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let count = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{test}-{}-{count}", std::process::id())
}

/// Asserts that no live QEMU runs with `-name guest=NAME`, so a test notices a QEMU it left
/// behind. Zombies count as gone.
pub fn assert_no_qemu_named(name: &str) {
    let left = qemu_pids_named(name);
    assert!(
        left.is_empty(),
        "QEMU processes left running for VM {name}: {left:?}"
    );
}

/// Lists the live processes whose command line contains `-name guest=NAME`.
fn qemu_pids_named(name: &str) -> Vec<u32> {
    // Arguments in /proc/PID/cmdline end with a NUL byte.
    let needle = format!("guest={name}\0");
    let needle = needle.as_bytes();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let mentions = cmdline.windows(needle.len()).any(|window| window == needle);
        if mentions && !is_zombie(pid) {
            found.push(pid);
        }
    }
    found
}

/// Kills, when dropped, every QEMU running with `-name guest=NAME` and its process group, so
/// that a failing test leaves no guest behind. QEMU runs in its own session, so killing the
/// process that started it does not end it.
pub struct QemuReaper {
    name: String,
}

impl QemuReaper {
    /// Creates a reaper for the VM named `name` (the task id under the plugin).
    pub fn new(name: &str) -> QemuReaper {
        QemuReaper {
            name: name.to_owned(),
        }
    }
}

impl Drop for QemuReaper {
    fn drop(&mut self) {
        for raw in qemu_pids_named(&self.name) {
            let Some(pid) = i32::try_from(raw).ok().and_then(Pid::from_raw) else {
                continue;
            };
            // The process may have ended since it was listed, so errors are expected.
            let _ = rustix::process::kill_process_group(pid, Signal::KILL);
            let _ = rustix::process::kill_process(pid, Signal::KILL);
            eprintln!("killed QEMU pid {raw} that VM {} left running", self.name);
        }
    }
}

fn is_zombie(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    stat.rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
}
