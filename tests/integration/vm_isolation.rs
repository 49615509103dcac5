//! The isolation options of `VmSpec` against real QEMU: a network namespace, as Nomad's group
//! networks pass one, and a task user. QEMU runs `-machine none`, which needs no guest.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nomad_driver_qemu::driver::vm::argv::{Machine, Piece, QemuCommandLine};
use nomad_driver_qemu::driver::vm::{UserIds, Vm, VmSpec, DEFAULT_START_TIMEOUT};

use crate::support;

/// Upper bound for a stop of a QEMU without a guest.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The uid and gid of `nobody` on Debian.
const NOBODY: UserIds = UserIds {
    uid: 65534,
    gid: 65534,
};

/// A named network namespace made with `ip netns add`, bind-mounted at `/run/netns/<name>` the
/// way Nomad's client creates one per allocation. Deleted when dropped.
struct NetNs {
    name: String,
}

impl NetNs {
    fn create(name: &str) -> NetNs {
        let status = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .expect("run `ip netns add` (Debian package iproute2)");
        assert!(status.success(), "ip netns add {name}: {status}");
        NetNs {
            name: name.to_owned(),
        }
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// Builds a spec for a QEMU with no machine, with its run dir `dir`.
fn machine_none_spec(name: &str, dir: &Path) -> VmSpec {
    VmSpec {
        name: name.into(),
        command: QemuCommandLine::new(support::qemu_binary())
            .with(Machine {
                machine_type: "none".into(),
                accelerator: "tcg".into(),
            })
            .with(Piece::NoDefaults)
            .with(Piece::Extra(vec!["-display".into(), "none".into()])),
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

/// Returns the inode of a namespace file, which identifies the namespace.
fn namespace_inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .unwrap_or_else(|error| panic!("stat {}: {error}", path.display()))
        .ino()
}

/// Returns the real, effective, saved and file-system ids of one `Uid:` or `Gid:` line of
/// `/proc/<pid>/status`.
fn status_ids(pid: u32, key: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let line = status
        .lines()
        .find(|line| line.starts_with(key))
        .unwrap_or_else(|| panic!("no {key} line in /proc/{pid}/status"));
    line[key.len()..]
        .split_whitespace()
        .map(|id| id.parse().expect("numeric id"))
        .collect()
}

async fn stop(vm: &Vm, name: &str) {
    vm.stop(STOP_TIMEOUT, libc::SIGTERM).await.expect("stop");
    support::assert_no_qemu_named(name);
}

#[tokio::test]
async fn vm_joins_network_namespace() {
    let dir = support::temp_dir();
    let name = support::unique_name("netns");
    let netns = NetNs::create(&name);
    let mut spec = machine_none_spec(&name, dir.path());
    spec.netns = Some(netns.path());

    let vm = Vm::start(spec).await.expect("start in the namespace");
    let qemu_netns = namespace_inode(&PathBuf::from(format!("/proc/{}/ns/net", vm.pid())));

    assert_eq!(qemu_netns, namespace_inode(&netns.path()));
    assert_ne!(
        qemu_netns,
        namespace_inode(Path::new("/proc/self/ns/net")),
        "QEMU left this process's network namespace"
    );
    stop(&vm, &name).await;
}

#[tokio::test]
async fn vm_runs_as_task_user() {
    let dir = support::temp_dir();
    // The run dir must be reachable for QEMU once it dropped to the task user.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("open the run dir to the task user");
    let name = support::unique_name("user");
    let mut spec = machine_none_spec(&name, dir.path());
    spec.user = Some(NOBODY);

    let vm = Vm::start(spec).await.expect("start as nobody");

    assert_eq!(status_ids(vm.pid(), "Uid:"), vec![NOBODY.uid; 4]);
    assert_eq!(status_ids(vm.pid(), "Gid:"), vec![NOBODY.gid; 4]);
    stop(&vm, &name).await;
}

#[tokio::test]
async fn missing_namespace_fails_start() {
    let dir = support::temp_dir();
    let name = support::unique_name("nonetns");
    let mut spec = machine_none_spec(&name, dir.path());
    spec.netns = Some(PathBuf::from("/run/netns/no-such-namespace-here"));

    let error = Vm::start(spec).await.unwrap_err();

    assert!(
        error.to_string().contains("network namespace"),
        "error names the namespace: {error}"
    );
    support::assert_no_qemu_named(&name);
}
