//! Shared pieces of the end-to-end tests of this crate's driver: job files, a private image
//! dir, finding the VMs' QEMU processes and waiting for a booted guest.
//!
//! The plugin reports the driver name `qemu`, so a job with `driver = "qemu"` runs on it and
//! not on Nomad's built-in driver.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::process::Signal;
use serde_json::Value;
use tempfile::TempDir;

use super::agent::{is_alloc_stopped, task_events_of, AgentOptions, NomadAgent};
use super::process;
use crate::support;

/// Time for a task to reach `running` after `nomad job run`: scheduling plus StartTask.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Time for a guest to print its ready line once QEMU runs. A disk boot takes about 5 s under
/// TCG on an idle host, and the other tests of the binary may boot a second guest meanwhile.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// Time for the driver's replacement to come up after the plugin or the agent went away.
pub const RECOVER_TIMEOUT: Duration = Duration::from_secs(60);

/// Name of the logger under which the agent logs what this crate's plugin writes to stderr.
const PLUGIN_LOGGER: &str = "client.driver_mgr.nomad-driver-qemu";

/// A VM job with one task, `restart` and `reschedule` off so that a failure stays visible on
/// the first allocation.
#[derive(Debug, Clone)]
pub struct VmJob {
    pub job: String,
    pub task: String,
    pub image: String,
    pub kill_timeout: String,
    pub memory_mib: u64,
    /// Extra lines inside the task's `config { }` block.
    pub config_lines: Vec<String>,
    /// Extra blocks inside the `group { }` block, such as `network { }`.
    pub group_blocks: Vec<String>,
}

impl VmJob {
    /// Builds a job named `job` that boots `image` in task `task` with 128 MiB and a 30 s
    /// kill_timeout.
    pub fn new(job: &str, task: &str, image: &Path) -> VmJob {
        VmJob {
            job: job.to_owned(),
            task: task.to_owned(),
            image: image.to_string_lossy().into_owned(),
            kill_timeout: "30s".to_owned(),
            memory_mib: 128,
            config_lines: Vec::new(),
            group_blocks: Vec::new(),
        }
    }

    /// Renders the job as HCL.
    pub fn hcl(&self) -> String {
        let mut config = String::new();
        for line in &self.config_lines {
            let _ = writeln!(config, "        {line}");
        }
        let mut group = String::new();
        for block in &self.group_blocks {
            let _ = writeln!(group, "    {block}");
        }
        format!(
            r#"
job {job} {{
  datacenters = ["*"]
  type        = "service"

  group "g" {{
    restart {{
      attempts = 0
      mode     = "fail"
    }}

    reschedule {{
      attempts  = 0
      unlimited = false
    }}
{group}
    task {task} {{
      driver       = "qemu"
      kill_timeout = {kill_timeout}

      config {{
        image_path        = {image}
        accelerator       = "tcg"
        graceful_shutdown = true
{config}      }}

      resources {{
        cpu    = 500
        memory = {memory}
      }}
    }}
  }}
}}
"#,
            job = quoted(&self.job),
            task = quoted(&self.task),
            kill_timeout = quoted(&self.kill_timeout),
            image = quoted(&self.image),
            memory = self.memory_mib,
        )
    }
}

/// Quotes `value` as an HCL string literal.
pub fn quoted(value: &str) -> String {
    Value::String(value.to_owned()).to_string()
}

/// A directory for guest images that the plugin's `image_paths` lists, with symlinks
/// resolved so that it matches QEMU's command line, which carries the resolved image path.
pub struct ImageDir {
    /// Keeps the directory until the test ends.
    _dir: TempDir,
    path: PathBuf,
}

impl ImageDir {
    pub fn new() -> ImageDir {
        let dir = tempfile::Builder::new()
            .prefix("nomad-e2e-images-")
            .tempdir()
            .expect("creating the image directory");
        let path = dir
            .path()
            .canonicalize()
            .expect("resolving the image directory");
        ImageDir { _dir: dir, path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Copies fixture `guest` (like `guest.qcow2`) to `name` in this dir and returns the copy.
    /// Each VM gets a copy, because QEMU locks its disk image and other tests boot the fixture.
    pub fn copy_guest(&self, guest: &str, name: &str) -> PathBuf {
        let target = self.path.join(name);
        std::fs::copy(support::guest_file(guest), &target)
            .unwrap_or_else(|err| panic!("copying {guest} to {} failed: {err}", target.display()));
        target
    }

    /// Lists the QEMU processes whose command line mentions this dir, that is the VMs booted
    /// from an image in it, wherever their parent is now.
    pub fn qemu_pids(&self) -> Vec<i32> {
        process::processes_mentioning(&self.path.to_string_lossy())
            .into_iter()
            .filter(process::ProcessInfo::is_qemu)
            .map(|process| process.pid)
            .filter(|&pid| is_running(pid))
            .collect()
    }
}

/// SIGKILLs any QEMU still booting from this dir, so that a failed test leaves no VM behind
/// even when the harness cannot tell that the VM belongs to its agent.
impl Drop for ImageDir {
    fn drop(&mut self) {
        for pid in self.qemu_pids() {
            tracing::warn!(pid, dir = %self.path.display(), "killing a QEMU left by the test");
            process::signal_process(pid, Signal::KILL);
        }
    }
}

/// Returns agent options with this crate's plugin configured by `plugin_config` (the body of its
/// `config { }` block) and healthy before the agent counts as started.
pub fn plugin_options(plugin_config: String) -> AgentOptions {
    AgentOptions {
        qemu_plugin_config: Some(plugin_config),
        wait_for_drivers: vec!["qemu".to_owned()],
        ..AgentOptions::default()
    }
}

/// Returns the plugin config body that allows images from `images`.
pub fn image_paths_config(images: &Path) -> String {
    format!("    image_paths = [{}]", quoted(&images.to_string_lossy()))
}

/// Returns true while `pid` runs. Unlike [`process::is_alive`], a zombie counts as ended: a
/// QEMU whose plugin died is re-parented, and its new parent may reap it late.
pub fn is_running(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|end| stat[end + 1..].split_whitespace().next());
    !matches!(state, Some("Z" | "X"))
}

/// Polls until no QEMU process boots from `images` any more, at most `timeout`, and returns
/// the ones left.
pub async fn wait_no_qemu(images: &ImageDir, timeout: Duration) -> Vec<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = images.qemu_pids();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A VM job that runs and whose guest printed its ready line.
pub struct RunningVm {
    pub job_id: String,
    pub alloc_id: String,
    pub qemu_pid: i32,
    /// Time from `nomad job run` to the ready line in `nomad alloc logs`.
    pub boot: Duration,
}

/// Submits `job`, waits until its task runs and its guest is ready, and checks that exactly
/// one QEMU boots from `images`.
pub async fn run_vm(agent: &NomadAgent, images: &ImageDir, job: &VmJob) -> RunningVm {
    let started = Instant::now();
    let job_id = agent.run_job(&job.hcl()).await;
    wait_vm_ready(agent, images, job_id, &job.task, started).await
}

/// Waits until task `task` of the submitted job `job_id` runs and its guest is ready, and
/// checks that exactly one QEMU boots from `images`. `submitted` is when the job was submitted.
pub async fn wait_vm_ready(
    agent: &NomadAgent,
    images: &ImageDir,
    job_id: String,
    task: &str,
    submitted: Instant,
) -> RunningVm {
    let alloc = agent
        .wait_alloc(&job_id, "the task to run", START_TIMEOUT, |alloc| {
            alloc["TaskStates"][task]["State"] == "running" || is_alloc_stopped(alloc)
        })
        .await;
    assert_eq!(
        alloc["TaskStates"][task]["State"],
        "running",
        "task {task} did not start; events:\n{}\nplugin log:\n{}",
        events_text(&task_events_of(&alloc, task)),
        plugin_log_lines(agent, 40)
    );
    let alloc_id = alloc["ID"]
        .as_str()
        .expect("allocation has an ID")
        .to_owned();
    agent
        .wait_log_contains(&alloc_id, task, support::READY_MARKER, BOOT_TIMEOUT)
        .await;
    let boot = submitted.elapsed();

    let pids = images.qemu_pids();
    assert_eq!(
        pids.len(),
        1,
        "expected one QEMU process booting from {}, found {pids:?}",
        images.path().display()
    );
    RunningVm {
        job_id,
        alloc_id,
        qemu_pid: pids[0],
        boot,
    }
}

/// Returns the messages of every task event of `task`, with their types, one per line, for
/// checks and failure output.
pub fn events_text(events: &[(String, String)]) -> String {
    events
        .iter()
        .map(|(kind, message)| format!("{kind}: {message}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Returns the lines of the agent's log that this crate's plugin wrote, for failure messages.
pub fn plugin_log_lines(agent: &NomadAgent, max: usize) -> String {
    let text = std::fs::read_to_string(agent.dir().join("agent.log")).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| line.contains(PLUGIN_LOGGER))
        .collect();
    lines[lines.len().saturating_sub(max)..].join("\n")
}

/// Stops the job, then checks that the guest ran its power-off (the POWERBUTTON line is in
/// the task's log), that the task events carry the reason "guest powered off", that the stop
/// ended within `bound`, and that no QEMU is left. Returns the stop duration.
pub async fn stop_gracefully(
    agent: &NomadAgent,
    images: &ImageDir,
    vm: &RunningVm,
    task: &str,
    bound: Duration,
) -> Duration {
    let (_, elapsed) = agent.stop_job(&vm.job_id, bound + RECOVER_TIMEOUT).await;

    let log = agent.alloc_logs(&vm.alloc_id, task, false).await;
    let events = agent.task_events(&vm.alloc_id, task).await;
    let text = events_text(&events);
    assert!(
        log.contains(support::POWERBUTTON_MARKER),
        "the guest did not log {:?} on stop; events:\n{text}\nplugin log:\n{}",
        support::POWERBUTTON_MARKER,
        plugin_log_lines(agent, 40)
    );
    assert!(
        text.contains("guest powered off"),
        "no task event names the reason \"guest powered off\"; events:\n{text}\nplugin log:\n{}",
        plugin_log_lines(agent, 40)
    );
    assert!(
        elapsed < bound,
        "the graceful stop took {elapsed:?}, more than {bound:?}; events:\n{text}"
    );

    let left = wait_no_qemu(images, Duration::from_secs(5)).await;
    assert!(left.is_empty(), "QEMU still runs after the stop: {left:?}");
    assert!(
        !is_running(vm.qemu_pid),
        "QEMU pid {} still runs after the stop",
        vm.qemu_pid
    );
    elapsed
}
