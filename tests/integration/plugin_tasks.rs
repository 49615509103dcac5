//! Task RPCs of the built plugin binary, driven over gRPC as Nomad's client drives them, with a
//! real guest booted from `fixtures/guest/guest.qcow2` under TCG.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use nomad_driver_qemu::driver::nomad::config::TASK_OPTIONS;
use nomad_driver_qemu::driver::nomad::proto::base::{
    base_plugin_client::BasePluginClient, NomadConfig, SetConfigRequest,
};
use nomad_driver_qemu::driver::nomad::proto::drivers::{
    driver_client::DriverClient, AllocatedMemoryResources, AllocatedTaskResources,
    DestroyTaskRequest, DriverTaskEvent, RecoverTaskRequest, Resources, SignalTaskRequest,
    StartTaskRequest, StopTaskRequest, TaskConfig, TaskEventsRequest, TaskHandle, TaskStatsRequest,
    WaitTaskRequest, WaitTaskResponse,
};
use rmpv::Value;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use crate::support::plugin::{msgpack, plugin_config, PluginProcess, REPLY_LIMIT};
use crate::support::{self, READY_MARKER};

/// Upper bound for the guest to boot under TCG and print its ready marker.
const BOOT_LIMIT: Duration = Duration::from_secs(90);

/// The stop timeout sent as Nomad's `kill_timeout`.
const KILL_TIMEOUT: Duration = Duration::from_secs(30);

/// A plugin process started as Nomad starts it, logging to a file, and one connection to it.
struct Plugin {
    process: PluginProcess,
    channel: Channel,
}

impl Plugin {
    async fn start(log: &Path) -> Plugin {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(log)
            .expect("plugin log file");
        let process = PluginProcess::start(&[], log).await;
        let channel = process.connect().await;
        Plugin { process, channel }
    }

    fn driver(&self) -> DriverClient<Channel> {
        DriverClient::new(self.channel.clone())
    }

    /// Sends the plugin config with `image_paths`, as the agent does after the handshake.
    async fn configure(&self, image_dir: &Path) {
        BasePluginClient::new(self.channel.clone())
            .set_config(SetConfigRequest {
                msgpack_config: plugin_config(&[image_dir.to_str().expect("UTF-8 path")]),
                nomad_config: Some(NomadConfig::default()),
                plugin_api_version: "0.1.0".into(),
            })
            .await
            .expect("SetConfig accepts the config");
    }
}

/// One task's directories and config.
struct TaskFixture {
    _root: tempfile::TempDir,
    image_dir: PathBuf,
    alloc_dir: PathBuf,
    console: PathBuf,
    plugin_log: PathBuf,
}

impl TaskFixture {
    fn new() -> TaskFixture {
        let root = support::temp_dir();
        let image_dir = root.path().join("images");
        let alloc_dir = root.path().join("alloc");
        std::fs::create_dir_all(&image_dir).expect("image dir");
        std::fs::create_dir_all(alloc_dir.join("web")).expect("task dir");
        // QEMU writes to the image, so every test boots its own copy.
        std::fs::copy(
            support::guest_file("guest.qcow2"),
            image_dir.join("guest.qcow2"),
        )
        .expect("copy the guest image");
        TaskFixture {
            console: root.path().join("console.log"),
            plugin_log: root.path().join("plugin.log"),
            image_dir,
            alloc_dir,
            _root: root,
        }
    }

    /// Returns the TaskConfig Nomad sends for a task with these driver `config` entries.
    /// Every other option of the schema is nil, as Nomad sends it.
    fn task(&self, id_suffix: &str, entries: &[(&str, Value)]) -> TaskConfig {
        let map = TASK_OPTIONS
            .iter()
            .map(|key| {
                let value = entries
                    .iter()
                    .find(|(name, _)| name == key)
                    .map_or(Value::Nil, |(_, value)| value.clone());
                (Value::from(*key), value)
            })
            .collect();
        let alloc_id = format!("alloc-{}", std::process::id());
        TaskConfig {
            id: format!("{alloc_id}/web/{id_suffix}"),
            name: "web".into(),
            msgpack_driver_config: msgpack(&Value::Map(map)),
            resources: Some(Resources {
                allocated_resources: Some(AllocatedTaskResources {
                    memory: Some(AllocatedMemoryResources {
                        memory_mb: 256,
                        memory_max_mb: 0,
                    }),
                    ..AllocatedTaskResources::default()
                }),
                ..Resources::default()
            }),
            alloc_dir: self.alloc_dir.to_str().expect("UTF-8 path").into(),
            stdout_path: self.console.to_str().expect("UTF-8 path").into(),
            stderr_path: self.console.to_str().expect("UTF-8 path").into(),
            alloc_id,
            ..TaskConfig::default()
        }
    }

    fn guest_task(&self, id_suffix: &str) -> TaskConfig {
        self.task(
            id_suffix,
            &[
                (
                    "image_path",
                    Value::from(
                        self.image_dir
                            .join("guest.qcow2")
                            .to_str()
                            .expect("UTF-8 path"),
                    ),
                ),
                ("accelerator", Value::from("tcg")),
                ("graceful_shutdown", Value::from(true)),
            ],
        )
    }
}

/// Returns QEMU's pid from the handle's JSON driver state.
fn handle_pid(handle: &TaskHandle) -> u32 {
    let state: serde_json::Value =
        serde_json::from_slice(&handle.driver_state).expect("driver_state is JSON");
    let pid = state["vm"]["pid"].as_u64().expect("vm.pid in driver_state");
    u32::try_from(pid).expect("pid fits u32")
}

fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.contains(") Z "))
        .unwrap_or(false)
}

async fn start(driver: &mut DriverClient<Channel>, task: &TaskConfig) -> TaskHandle {
    driver
        .start_task(StartTaskRequest {
            task: Some(task.clone()),
        })
        .await
        .expect("StartTask succeeds")
        .into_inner()
        .handle
        .expect("StartTask returns a handle")
}

async fn stop(driver: &mut DriverClient<Channel>, task_id: &str) {
    let started = Instant::now();
    driver
        .stop_task(StopTaskRequest {
            task_id: task_id.into(),
            timeout: Some(KILL_TIMEOUT.try_into().expect("valid duration")),
            signal: String::new(),
        })
        .await
        .expect("StopTask succeeds");
    assert!(
        started.elapsed() < KILL_TIMEOUT + Duration::from_secs(5),
        "StopTask took {:?}",
        started.elapsed()
    );
}

async fn wait(driver: &mut DriverClient<Channel>, task_id: &str) -> WaitTaskResponse {
    tokio::time::timeout(
        REPLY_LIMIT,
        driver.wait_task(WaitTaskRequest {
            task_id: task_id.into(),
        }),
    )
    .await
    .expect("WaitTask returns after the stop")
    .expect("WaitTask succeeds")
    .into_inner()
}

async fn destroy(driver: &mut DriverClient<Channel>, task_id: &str) {
    driver
        .destroy_task(DestroyTaskRequest {
            task_id: task_id.into(),
            force: true,
        })
        .await
        .expect("DestroyTask succeeds");
}

/// Collects the messages of events that arrive within `limit` of each other.
async fn drain_events(events: &mut Streaming<DriverTaskEvent>, limit: Duration) -> Vec<String> {
    let mut messages = Vec::new();
    while let Ok(Some(event)) = tokio::time::timeout(limit, events.next()).await {
        let event = event.expect("event stream healthy");
        assert_eq!(event.task_name, "web");
        assert!(event.timestamp.is_some(), "event {event:?} has a timestamp");
        messages.push(event.message);
    }
    messages
}

/// Reads two TaskStats samples at a 1 s interval and checks that each is complete and that the
/// second measured QEMU's memory and CPU. The first sample reports no CPU, since it has no
/// earlier sample to compare with.
async fn check_stats(driver: &mut DriverClient<Channel>, task_id: &str, pid: u32) {
    let mut stream = driver
        .task_stats(TaskStatsRequest {
            task_id: task_id.to_owned(),
            collection_interval: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
        })
        .await
        .expect("TaskStats opens")
        .into_inner();
    let mut last = None;
    for _ in 0..2 {
        let response = tokio::time::timeout(REPLY_LIMIT, stream.next())
            .await
            .expect("a sample within the limit")
            .expect("the stream stays open")
            .expect("a sample, not an error");
        let stats = response.stats.expect("every response carries stats");
        assert!(stats.timestamp.is_some(), "sample has a timestamp");
        let usage = stats.agg_resource_usage.expect("sample has an aggregate");
        assert!(
            stats.resource_usage_by_pid.contains_key(&pid.to_string()),
            "usage keyed by QEMU pid {pid}: {:?}",
            stats.resource_usage_by_pid.keys()
        );
        last = Some(usage);
    }
    let usage = last.expect("two samples");
    let memory = usage.memory.expect("memory usage");
    assert!(memory.rss > 0, "QEMU RSS measured: {memory:?}");
    let cpu = usage.cpu.expect("cpu usage");
    assert!(cpu.percent > 0.0, "QEMU CPU measured: {cpu:?}");
    assert!(cpu.total_ticks > 0.0, "QEMU CPU ticks measured: {cpu:?}");
}

#[tokio::test]
async fn tasks_start_stop_graceful() {
    let _slot = support::guest_slot().await;
    let fixture = TaskFixture::new();
    let plugin = Plugin::start(&fixture.plugin_log).await;
    plugin.configure(&fixture.image_dir).await;
    let mut driver = plugin.driver();
    let mut events = driver
        .task_events(TaskEventsRequest {})
        .await
        .expect("TaskEvents opens")
        .into_inner();

    let task = fixture.guest_task("0a1b2c3d");
    let _reaper = support::QemuReaper::new(&task.id);
    let handle = start(&mut driver, &task).await;
    assert_eq!(handle.version, 2);
    assert_eq!(
        handle.config.as_ref(),
        Some(&task),
        "handle echoes the TaskConfig"
    );
    let pid = handle_pid(&handle);
    assert!(process_alive(pid), "QEMU pid {pid} runs");

    let again = start(&mut driver, &task).await;
    assert_eq!(
        handle_pid(&again),
        pid,
        "a repeated StartTask returns the same VM"
    );

    let mut waiter = driver.clone();
    let task_id = task.id.clone();
    let pending = tokio::spawn(async move {
        waiter
            .wait_task(WaitTaskRequest { task_id })
            .await
            .expect("WaitTask succeeds")
            .into_inner()
    });
    // Sampled while the guest boots, when QEMU keeps a core busy: an idle TCG guest can use
    // less CPU than one clock tick per second.
    check_stats(&mut driver, &task.id, pid).await;
    support::wait_for_marker(&fixture.console, READY_MARKER, BOOT_LIMIT).await;
    assert!(
        !pending.is_finished(),
        "WaitTask is pending while the VM runs"
    );

    stop(&mut driver, &task.id).await;
    let exit = tokio::time::timeout(REPLY_LIMIT, pending)
        .await
        .expect("pending WaitTask returns after the stop")
        .expect("wait task joins");
    let result = exit.result.expect("exit result");
    assert_eq!(result.exit_code, 0);
    assert_eq!(result.signal, 0);
    assert_eq!(exit.err, "");
    let again = wait(&mut driver, &task.id).await;
    assert_eq!(again, exit, "every WaitTask returns the same result");

    let messages = drain_events(&mut events, Duration::from_secs(1)).await;
    assert_eq!(
        messages.first().map(String::as_str),
        Some("Starting VM"),
        "{messages:?}"
    );
    let running = format!("VM running (QEMU pid {pid}, QMP ready in");
    assert!(
        messages.iter().any(|m| m.starts_with(&running)),
        "{messages:?}"
    );
    assert!(
        messages.contains(&"Sent ACPI power button (system_powerdown)".to_owned()),
        "{messages:?}"
    );
    assert!(
        messages.contains(&"VM exited: guest powered off".to_owned()),
        "{messages:?}"
    );

    destroy(&mut driver, &task.id).await;
    destroy(&mut driver, &task.id).await;
    let after = driver
        .wait_task(WaitTaskRequest {
            task_id: task.id.clone(),
        })
        .await
        .expect_err("WaitTask after DestroyTask fails");
    assert_eq!(after.code(), Code::NotFound);
    assert!(
        !fixture.alloc_dir.join("web/qmp.sock").exists(),
        "DestroyTask removes the QMP socket"
    );
    support::assert_no_qemu_named(&task.id);
}

#[tokio::test]
async fn tasks_recover_after_crash() {
    let _slot = support::guest_slot().await;
    let fixture = TaskFixture::new();
    let first = Plugin::start(&fixture.plugin_log).await;
    first.configure(&fixture.image_dir).await;
    let task = fixture.guest_task("1b2c3d4e");
    let _reaper = support::QemuReaper::new(&task.id);
    let handle = start(&mut first.driver(), &task).await;
    let pid = handle_pid(&handle);
    support::wait_for_marker(&fixture.console, READY_MARKER, BOOT_LIMIT).await;
    first.process.crash().await;
    assert!(process_alive(pid), "QEMU outlives the plugin");

    let second = Plugin::start(&fixture.plugin_log).await;
    second.configure(&fixture.image_dir).await;
    let mut driver = second.driver();
    let mut events = driver
        .task_events(TaskEventsRequest {})
        .await
        .expect("TaskEvents opens")
        .into_inner();
    // Nomad's client leaves task_id empty and clears the driver config after a restart.
    let mut stored = handle.clone();
    if let Some(config) = stored.config.as_mut() {
        config.msgpack_driver_config.clear();
    }
    driver
        .recover_task(RecoverTaskRequest {
            task_id: String::new(),
            handle: Some(stored.clone()),
        })
        .await
        .expect("RecoverTask succeeds");
    driver
        .recover_task(RecoverTaskRequest {
            task_id: String::new(),
            handle: Some(stored),
        })
        .await
        .expect("a repeated RecoverTask succeeds");
    assert!(process_alive(pid), "recovery keeps the same QEMU");

    for signal in ["SIGSTOP", "SIGCONT"] {
        driver
            .signal_task(SignalTaskRequest {
                task_id: task.id.clone(),
                signal: signal.into(),
            })
            .await
            .unwrap_or_else(|status| panic!("SignalTask {signal}: {status}"));
    }
    let rejected = driver
        .signal_task(SignalTaskRequest {
            task_id: task.id.clone(),
            signal: "SIGHUP".into(),
        })
        .await
        .expect_err("SIGHUP is rejected");
    assert_eq!(rejected.code(), Code::InvalidArgument);
    assert!(
        rejected.message().contains("SIGSTOP"),
        "{}",
        rejected.message()
    );

    stop(&mut driver, &task.id).await;
    let exit = wait(&mut driver, &task.id).await;
    assert_eq!(
        exit.err, "",
        "a recovered guest that powered off is a success"
    );
    assert_eq!(exit.result.expect("exit result").exit_code, 0);

    let messages = drain_events(&mut events, Duration::from_secs(1)).await;
    assert!(
        messages.contains(&"VM paused (vCPUs stopped)".to_owned()),
        "{messages:?}"
    );
    assert!(
        messages.contains(&"VM resumed (vCPUs continued)".to_owned()),
        "{messages:?}"
    );
    destroy(&mut driver, &task.id).await;
    support::assert_no_qemu_named(&task.id);
}

#[tokio::test]
async fn tasks_bad_config_rejected() {
    let fixture = TaskFixture::new();
    let plugin = Plugin::start(&fixture.plugin_log).await;
    plugin.configure(&fixture.image_dir).await;
    let mut driver = plugin.driver();

    let outside = fixture.task(
        "2c3d4e5f",
        &[(
            "image_path",
            Value::from(
                support::guest_file("guest.qcow2")
                    .to_str()
                    .expect("UTF-8 path"),
            ),
        )],
    );
    let missing = fixture.task("3d4e5f60", &[]);
    let bad_type = fixture.task(
        "4e5f6071",
        &[
            ("image_path", Value::from("guest.qcow2")),
            ("graceful_shutdown", Value::from("maybe")),
        ],
    );
    let cases = [
        (outside, "image_paths"),
        (missing, "image_path is missing"),
        (bad_type, "graceful_shutdown"),
    ];
    for (task, expected) in cases {
        let _reaper = support::QemuReaper::new(&task.id);
        let status = driver
            .start_task(StartTaskRequest {
                task: Some(task.clone()),
            })
            .await
            .expect_err("StartTask rejects the config");
        assert_eq!(
            status.code(),
            Code::FailedPrecondition,
            "{}",
            status.message()
        );
        assert!(status.message().contains(expected), "{}", status.message());
        support::assert_no_qemu_named(&task.id);
    }

    for (rpc, result) in [
        (
            "StopTask",
            driver
                .stop_task(StopTaskRequest {
                    task_id: "x/y/z".into(),
                    ..StopTaskRequest::default()
                })
                .await
                .map(|_| ()),
        ),
        (
            "DestroyTask",
            driver
                .destroy_task(DestroyTaskRequest {
                    task_id: "x/y/z".into(),
                    force: true,
                })
                .await
                .map(|_| ()),
        ),
    ] {
        assert!(result.is_ok(), "{rpc} on an unknown id: {result:?}");
    }
    let old_handle = driver
        .recover_task(RecoverTaskRequest {
            task_id: String::new(),
            handle: Some(TaskHandle {
                version: 1,
                config: Some(fixture.task("5f607182", &[])),
                ..TaskHandle::default()
            }),
        })
        .await
        .expect_err("a built-in driver handle is rejected");
    assert!(
        old_handle.message().contains("built-in qemu driver"),
        "{}",
        old_handle.message()
    );
}

#[tokio::test]
async fn set_config_warns_missing_dir() {
    let fixture = TaskFixture::new();
    let plugin = Plugin::start(&fixture.plugin_log).await;
    let missing = fixture.image_dir.join("not-created");
    plugin.configure(&missing).await;

    let log = std::fs::read_to_string(&fixture.plugin_log).expect("read the plugin log");
    let warning = log
        .lines()
        .find(|line| line.contains("image_paths entry is not an existing directory"))
        .unwrap_or_else(|| panic!("no warning for the missing dir in the plugin log:\n{log}"));
    assert!(warning.contains(r#""@level":"warn""#), "{warning}");
    assert!(
        warning.contains(missing.to_str().expect("UTF-8 path")),
        "{warning}"
    );
}
