//! A real VM placed in per-task cgroup v1 cgroups, sampled for TaskStats, then cleaned up.
//!
//! The per-task parents are made inside this test process's own cgroups, not under the host's
//! `nomad/`, so QEMU stays within whatever limits the test runs under.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nomad_driver_qemu::driver::nomad::cgroup::{self, Hierarchy, TaskCgroups};
use nomad_driver_qemu::driver::nomad::proto::drivers::{
    memory_usage, AllocatedCpuResources, AllocatedTaskResources, LinuxResources, Resources,
    TaskConfig,
};
use nomad_driver_qemu::driver::nomad::service::stats::{CoreCompute, Sampler};
use nomad_driver_qemu::driver::vm::Vm;

use crate::support::{self, Guest, READY_MARKER};

const BOOT_LIMIT: Duration = Duration::from_secs(60);

const MEMORY_LIMIT_MIB: u64 = 256;

const CPU_SHARES: i64 = 300;

/// Returns this process's cgroup in the hierarchy of `controller`, relative to its root.
fn own_cgroup(controller: &str) -> String {
    cgroup_of(std::process::id(), controller)
        .trim_start_matches('/')
        .to_owned()
}

/// Returns the cgroup of `pid` in the hierarchy of `controller`, as `/proc/PID/cgroup` has it.
fn cgroup_of(pid: u32, controller: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("read cgroup");
    text.lines()
        .find_map(|line| {
            let mut fields = line.splitn(3, ':');
            let controllers = fields.nth(1)?;
            let path = fields.next()?;
            controllers
                .split(',')
                .any(|name| name == controller)
                .then(|| path.to_owned())
        })
        .unwrap_or_else(|| panic!("no {controller} line in /proc/{pid}/cgroup:\n{text}"))
}

/// Creates a cpuset cgroup standing in for Nomad's shared one, with the parent's CPUs and
/// memory nodes (a v1 cpuset cgroup accepts no process until both are set).
fn make_cpuset(mount: &Path, name: &str) -> PathBuf {
    let parent = mount.join(own_cgroup("cpuset"));
    let dir = parent.join(name);
    std::fs::create_dir(&dir).expect("create the test cpuset cgroup");
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let value = std::fs::read_to_string(parent.join(file)).expect("read parent cpuset");
        std::fs::write(dir.join(file), value.trim()).expect("write test cpuset");
    }
    dir
}

fn task(alloc_id: &str, cpuset: &Path) -> TaskConfig {
    TaskConfig {
        id: format!("{alloc_id}/web/00000000"),
        name: "web".into(),
        alloc_id: alloc_id.into(),
        resources: Some(Resources {
            allocated_resources: Some(AllocatedTaskResources {
                cpu: Some(AllocatedCpuResources {
                    cpu_shares: CPU_SHARES,
                }),
                ..AllocatedTaskResources::default()
            }),
            linux_resources: Some(LinuxResources {
                cpuset_cgroup: cpuset.to_str().expect("utf-8 path").into(),
                ..LinuxResources::default()
            }),
            ports: Vec::new(),
        }),
        ..TaskConfig::default()
    }
}

fn read_trimmed(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|error| panic!("read {}: {error}", path.display()))
        .trim()
        .to_owned()
}

async fn sample_twice(sampler: &mut Sampler) -> (u64, f64, Vec<i32>) {
    sampler
        .sample(Duration::from_millis(500))
        .await
        .expect("first sample");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stats = sampler
        .sample(Duration::from_millis(500))
        .await
        .expect("second sample");
    assert!(stats.timestamp.is_some());
    let usage = stats.agg_resource_usage.expect("aggregate usage");
    let memory = usage.memory.expect("memory usage");
    let cpu = usage.cpu.expect("cpu usage");
    assert_eq!(stats.resource_usage_by_pid.len(), 1);
    assert!(memory.rss > 0, "rss {}", memory.rss);
    (memory.usage, cpu.percent, memory.measured_fields)
}

#[tokio::test]
async fn cgroup_v1_places_vm() {
    let hierarchy = Hierarchy::detect().expect("detect the cgroup layout");
    let Hierarchy::Legacy { memory, cpu } = &hierarchy else {
        panic!("this test needs a cgroup v1 host (found cgroup v2); run it on a v1 or hybrid host")
    };
    let memory_mount = memory.parent().expect("memory mount").to_owned();
    let cpu_mount = cpu.parent().expect("cpu mount").to_owned();
    let cpuset_mount = Path::new("/sys/fs/cgroup/cpuset");
    let parent_name = format!("nomad-test-{}", std::process::id());
    let test_hierarchy = Hierarchy::Legacy {
        memory: memory_mount.join(own_cgroup("memory")).join(&parent_name),
        cpu: cpu_mount.join(own_cgroup("cpu")).join(&parent_name),
    };
    let Hierarchy::Legacy {
        memory: memory_parent,
        cpu: cpu_parent,
    } = &test_hierarchy
    else {
        unreachable!("built as Legacy above")
    };
    let cpuset = make_cpuset(cpuset_mount, &format!("{parent_name}-shared"));
    let alloc_id = support::unique_name("alloc");
    let task = task(&alloc_id, &cpuset);

    let cgroups: TaskCgroups = cgroup::prepare_in(&test_hierarchy, &task, MEMORY_LIMIT_MIB)
        .await
        .expect("prepare cgroups");
    let memory_dir = memory_parent.join(format!("{alloc_id}-web"));
    let cpu_dir = cpu_parent.join(format!("{alloc_id}-web"));
    assert_eq!(
        cgroups.dirs(),
        [cpuset.clone(), memory_dir.clone(), cpu_dir.clone()]
    );
    assert_eq!(
        read_trimmed(&memory_dir.join("memory.limit_in_bytes")),
        (MEMORY_LIMIT_MIB << 20).to_string()
    );
    assert_eq!(
        read_trimmed(&cpu_dir.join("cpu.shares")),
        CPU_SHARES.to_string()
    );

    let _slot = support::guest_slot().await;
    let dir = support::temp_dir();
    let name = support::unique_name("cgroup");
    let mut spec = support::guest_spec(&name, Guest::Poweroff, dir.path());
    spec.cgroups = cgroups.dirs().to_vec();
    let vm = Vm::start(spec).await.expect("start VM");
    let pid = vm.pid();

    let relative = |mount: &Path, dir: &Path| {
        format!(
            "/{}",
            dir.strip_prefix(mount).expect("under mount").display()
        )
    };
    assert_eq!(
        cgroup_of(pid, "memory"),
        relative(&memory_mount, &memory_dir)
    );
    assert_eq!(cgroup_of(pid, "cpu"), relative(&cpu_mount, &cpu_dir));
    assert_eq!(cgroup_of(pid, "cpuset"), relative(cpuset_mount, &cpuset));
    assert_eq!(
        read_trimmed(&memory_dir.join("cgroup.procs")),
        pid.to_string()
    );

    let mut sampler = Sampler::new(
        task.id.clone(),
        vm.clone(),
        Some(cgroups.clone()),
        CoreCompute { mhz: 2000.0 },
    );
    let (usage, percent, fields) = sample_twice(&mut sampler).await;
    assert!(usage > 0, "cgroup usage {usage}");
    assert!(fields.contains(&(memory_usage::Fields::Usage as i32)));
    // The guest boots under TCG during the second, which keeps a host CPU busy.
    assert!(percent > 0.0, "cpu percent {percent}");
    eprintln!("cgroup usage {usage} bytes, cpu {percent:.1} %");

    support::wait_for_marker(&dir.path().join("console.log"), READY_MARKER, BOOT_LIMIT).await;
    vm.kill().await.expect("kill VM");
    support::assert_no_qemu_named(&name);

    cgroup::cleanup(&cgroups).await;
    assert!(!memory_dir.exists(), "{} left", memory_dir.display());
    assert!(!cpu_dir.exists(), "{} left", cpu_dir.display());
    for dir in [memory_parent, cpu_parent, &cpuset] {
        std::fs::remove_dir(dir)
            .unwrap_or_else(|error| panic!("remove {}: {error}", dir.display()));
    }
}
