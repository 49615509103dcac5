//! A VM's life under this crate's driver in a real Nomad agent: boot, stats, a graceful stop,
//! a stop forced at `kill_timeout`, and a task dir path too long for a unix socket.
//!
//! Each test prints its time after the agent started and its stop duration (run with
//! `--nocapture` to see them).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::agent::NomadAgent;
use super::qemu_common::{
    events_text, image_paths_config, is_running, plugin_log_lines, plugin_options, run_vm,
    stop_gracefully, wait_no_qemu, wait_vm_ready, ImageDir, VmJob,
};
use crate::support;

const TASK: &str = "vm";

/// Job id of `examples/vm.nomad.hcl`, whose task is also named [`TASK`].
const EXAMPLE_JOB: &str = "vm";

/// Maximum wait for the first stats sample with both memory and CPU use.
const STATS_TIMEOUT: Duration = Duration::from_secs(20);

/// Bound on a stop of a guest that powers off on the power button. Such a stop took 0.3 s to
/// 1.5 s under TCG in these tests, far less than their kill_timeout of 20 s or 30 s, so a stop
/// that waits for the timeout fails.
const GRACEFUL_STOP_BOUND: Duration = Duration::from_secs(10);

/// Byte length of `sun_path` in `struct sockaddr_un` on Linux.
const SUN_PATH_LEN: usize = 108;

/// Polls the allocation's stats until the task reports non-zero memory and CPU use, and
/// returns that sample, or the last response after [`STATS_TIMEOUT`].
async fn wait_task_stats(agent: &NomadAgent, alloc_id: &str, task: &str) -> Result<Value, String> {
    let path = format!("/v1/client/allocation/{alloc_id}/stats");
    let deadline = Instant::now() + STATS_TIMEOUT;
    loop {
        let output = agent.cli(&["operator", "api", &path]).await;
        let stats: Value = serde_json::from_str(&output.stdout).unwrap_or(Value::Null);
        let usage = &stats["Tasks"][task]["ResourceUsage"];
        let memory = ["RSS", "Usage"]
            .iter()
            .filter_map(|field| usage["MemoryStats"][field].as_u64())
            .max()
            .unwrap_or(0);
        let cpu = ["Percent", "TotalTicks"]
            .iter()
            .filter_map(|field| usage["CpuStats"][field].as_f64())
            .fold(0.0, f64::max);
        if memory > 0 && cpu > 0.0 {
            return Ok(stats);
        }

        if Instant::now() >= deadline {
            return Err(format!(
                "task {task} reported no memory and CPU use within {STATS_TIMEOUT:?}; \
                 last response: {} {}",
                output.stdout, output.stderr
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn qemu_job_runs_and_powers_off() {
    let images = ImageDir::new();
    let image = images.copy_guest("guest.qcow2", "poweroff.qcow2");
    let agent = NomadAgent::start(plugin_options(image_paths_config(images.path()))).await;
    let started = Instant::now();
    let _slot = support::guest_slot().await;

    // The job is the shipped example, so this test also checks that the example runs.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/vm.nomad.hcl");
    let submitted = Instant::now();
    agent
        .cli_ok(&[
            "job",
            "run",
            "-detach",
            "-var",
            &format!("image_path={}", image.display()),
            &example.to_string_lossy(),
        ])
        .await;
    let vm = wait_vm_ready(&agent, &images, EXAMPLE_JOB.to_owned(), TASK, submitted).await;
    println!(
        "qemu_job_runs_and_powers_off: job run to ready line {:?}",
        vm.boot
    );

    let log = agent.alloc_logs(&vm.alloc_id, TASK, false).await;
    assert!(
        log.contains(support::READY_MARKER),
        "nomad alloc logs lacks the ready line: {log:?}"
    );

    // A stats failure is reported after the stop, so that one run checks both.
    let stats = wait_task_stats(&agent, &vm.alloc_id, TASK).await;
    let stats_plugin_log = plugin_log_lines(&agent, 40);
    if let Ok(stats) = &stats {
        println!(
            "qemu_job_runs_and_powers_off: task stats {}",
            stats["Tasks"][TASK]["ResourceUsage"]
        );
    }

    let stop = stop_gracefully(&agent, &images, &vm, TASK, GRACEFUL_STOP_BOUND).await;
    println!(
        "qemu_job_runs_and_powers_off: graceful stop {stop:?} (kill_timeout 20s), time after agent start {:?}",
        started.elapsed()
    );
    if let Err(problem) = stats {
        panic!("{problem}\nplugin log:\n{stats_plugin_log}");
    }

    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn qemu_stop_forced_at_kill_timeout() {
    let images = ImageDir::new();
    let image = images.copy_guest("guest-ignore.qcow2", "ignore.qcow2");
    let agent = NomadAgent::start(plugin_options(image_paths_config(images.path()))).await;
    let started = Instant::now();
    let _slot = support::guest_slot().await;

    let mut job = VmJob::new("qemu-ignore", TASK, &image);
    job.kill_timeout = "5s".to_owned();
    let vm = run_vm(&agent, &images, &job).await;

    let (_, stop) = agent.stop_job(&vm.job_id, Duration::from_secs(60)).await;
    let events = agent.task_events(&vm.alloc_id, TASK).await;
    let text = events_text(&events);
    println!(
        "qemu_stop_forced_at_kill_timeout: stop {stop:?} (kill_timeout 5s), time after agent start {:?}\n{text}",
        started.elapsed()
    );
    assert!(
        stop >= Duration::from_millis(4500),
        "the stop ended after {stop:?}, before the 5 s kill_timeout passed; events:\n{text}"
    );
    assert!(
        stop < Duration::from_secs(8),
        "the stop took {stop:?}, more than kill_timeout 5 s plus 3 s; events:\n{text}\n\
         plugin log:\n{}",
        plugin_log_lines(&agent, 40)
    );

    // Each step of the stop ladder, in order, as alternative wordings of one event.
    let steps: [(&str, &[&str]); 3] = [
        (
            "power button pressed",
            &["system_powerdown", "power button"],
        ),
        (
            "guest did not power off in time",
            &["did not power off", "timed out"],
        ),
        ("VM forced off", &["quit", "forced off"]),
    ];
    let lowered: Vec<String> = events
        .iter()
        .map(|(_, message)| message.to_lowercase())
        .collect();
    let mut from = 0;
    for (step, wordings) in steps {
        let found = lowered[from..]
            .iter()
            .position(|message| wordings.iter().any(|wording| message.contains(wording)));
        let Some(offset) = found else {
            panic!(
                "no task event after event {from} shows the step {step:?} (one of {wordings:?}); \
                 events:\n{text}\nplugin log:\n{}",
                plugin_log_lines(&agent, 40)
            );
        };
        from += offset + 1;
    }

    let left = wait_no_qemu(&images, Duration::from_secs(5)).await;
    assert!(left.is_empty(), "QEMU still runs after the stop: {left:?}");

    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn qemu_long_task_dir_path() {
    let images = ImageDir::new();
    let image = images.copy_guest("guest.qcow2", "long-name.qcow2");
    let agent = NomadAgent::start(plugin_options(image_paths_config(images.path()))).await;
    let started = Instant::now();
    let _slot = support::guest_slot().await;

    let task = "vm-with-a-task-name-long-enough-to-push-its-dir-past-sun-path-limit";
    let job = VmJob::new("qemu-long-name", task, &image);
    let vm = run_vm(&agent, &images, &job).await;

    let task_dir = agent
        .dir()
        .join("data")
        .join("alloc")
        .join(&vm.alloc_id)
        .join(task);
    assert!(
        task_dir.is_dir(),
        "task dir {} does not exist",
        task_dir.display()
    );
    let length = task_dir.as_os_str().len();
    assert!(
        length > SUN_PATH_LEN,
        "task dir {} is {length} bytes, not longer than sun_path ({SUN_PATH_LEN}), \
         so this test checks nothing",
        task_dir.display()
    );

    let stop = stop_gracefully(&agent, &images, &vm, task, GRACEFUL_STOP_BOUND).await;
    println!(
        "qemu_long_task_dir_path: task dir {length} bytes, boot {:?}, graceful stop {stop:?}, \
         time after agent start {:?}",
        vm.boot,
        started.elapsed()
    );

    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn qemu_vm_killed_after_panic() {
    let images = Arc::new(ImageDir::new());
    let image = images.copy_guest("guest.qcow2", "panic.qcow2");
    let qemu_pid = Arc::new(Mutex::new(None::<i32>));

    // The test keeps its own reference to `images`, so only the agent's guard can end the VM.
    let test_images = Arc::clone(&images);
    let seen_pid = Arc::clone(&qemu_pid);
    let test = tokio::spawn(async move {
        let agent = NomadAgent::start(plugin_options(image_paths_config(test_images.path()))).await;
        let _slot = support::guest_slot().await;
        let vm = run_vm(
            &agent,
            &test_images,
            &VmJob::new("qemu-panic", TASK, &image),
        )
        .await;
        *seen_pid.lock().expect("lock is not poisoned") = Some(vm.qemu_pid);
        panic!("deliberate panic while the VM runs");
    });
    let outcome = test.await;
    assert!(outcome.is_err_and(|err| err.is_panic()));

    let pid = qemu_pid
        .lock()
        .expect("lock is not poisoned")
        .expect("the VM started before the panic");
    let left = wait_no_qemu(&images, Duration::from_secs(5)).await;
    assert!(left.is_empty(), "QEMU outlived the panic: {left:?}");
    assert!(!is_running(pid), "QEMU pid {pid} outlived the panic");
}
