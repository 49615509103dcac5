//! A real Nomad agent (server and client in one process) for end-to-end tests.
//!
//! Each agent gets a temporary directory with its own data dir, plugin dir and generated
//! configuration, and free loopback ports chosen at start, so it never collides with another
//! agent on the host. Only one agent runs at a time: [`NomadAgent::start`] holds a process-wide
//! async mutex until the agent is dropped. Dropping the agent, including during a panic,
//! SIGKILLs the agent's process group and every process whose command line mentions the
//! temporary directory (plugins, executors, VMs).
//!
//! The agent is not started with `-dev`: dev mode keeps the server state in memory, so jobs
//! would not survive [`NomadAgent::restart`].

use std::fmt::Write as _;
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use rustix::process::Signal;
use serde_json::Value;
use tempfile::TempDir;
use tokio::process::{Child, Command};
use tokio::sync::{Mutex, MutexGuard};

use super::process::{self, ProcessInfo};

/// The Nomad release these tests pin (the last one under the MPL-2.0).
pub const NOMAD_VERSION: &str = "1.6.5";

/// File name of this crate's plugin in `plugin_dir`; the agent's `plugin` block uses it too.
pub const PLUGIN_FILE_NAME: &str = "nomad-driver-qemu";

const POLL_INTERVAL: Duration = Duration::from_millis(100);
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
const AGENT_EXIT_TIMEOUT: Duration = Duration::from_secs(30);

static AGENT_LOCK: Mutex<()> = Mutex::const_new(());

/// What the generated agent configuration enables.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// Body of the `config { }` block for this crate's plugin. `None` leaves the plugin out
    /// of `plugin_dir` and the configuration entirely.
    pub qemu_plugin_config: Option<String>,
    /// Enables Nomad's built-in `raw_exec` driver.
    pub raw_exec: bool,
    /// Body of the `config { }` block for Nomad's built-in `qemu` driver.
    pub builtin_qemu_config: Option<String>,
    /// Extra `client { options { } }` entries.
    pub client_options: Vec<(String, String)>,
    /// Drivers that must be detected and healthy before `start` returns.
    pub wait_for_drivers: Vec<String>,
}

/// Loopback ports of one agent.
#[derive(Debug, Clone, Copy)]
pub struct AgentPorts {
    pub http: u16,
    pub rpc: u16,
    pub serf: u16,
}

/// A running Nomad agent and everything it started.
pub struct NomadAgent {
    nomad_bin: PathBuf,
    dir: TempDir,
    ports: AgentPorts,
    options: AgentOptions,
    child: Option<Child>,
    _lock: MutexGuard<'static, ()>,
}

/// Output of one `nomad` CLI call.
#[derive(Debug)]
pub struct CliOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl NomadAgent {
    /// Starts an agent and waits until its node is ready with every driver in
    /// `options.wait_for_drivers` healthy.
    pub async fn start(options: AgentOptions) -> NomadAgent {
        let lock = AGENT_LOCK.lock().await;
        let nomad_bin = nomad_binary().await;
        let dir = tempfile::Builder::new()
            .prefix("nomad-e2e-")
            .tempdir()
            .expect("creating a temporary directory for the agent");
        let ports = AgentPorts {
            http: free_port(),
            rpc: free_port(),
            serf: free_port(),
        };

        let mut agent = NomadAgent {
            nomad_bin,
            dir,
            ports,
            options,
            child: None,
            _lock: lock,
        };
        agent.write_config();
        agent.spawn();
        agent.wait_node_ready(Duration::from_secs(90)).await;
        agent
    }

    /// The temporary directory that contains the config, data dir, plugin dir and agent log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The HTTP API address, for `-address` and for `NOMAD_ADDR`.
    pub fn address(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.http)
    }

    /// Process id of the agent, while it runs.
    pub fn pid(&self) -> Option<i32> {
        let pid = self.child.as_ref()?.id()?;
        i32::try_from(pid).ok()
    }

    fn config_path(&self) -> PathBuf {
        self.dir().join("agent.hcl")
    }

    fn plugin_dir(&self) -> PathBuf {
        self.dir().join("plugins")
    }

    fn log_path(&self) -> PathBuf {
        self.dir().join("agent.log")
    }

    /// Path of this crate's plugin inside `plugin_dir`.
    pub fn plugin_path(&self) -> PathBuf {
        self.plugin_dir().join(PLUGIN_FILE_NAME)
    }

    fn write_config(&self) {
        let data_dir = self.dir().join("data");
        let plugin_dir = self.plugin_dir();
        std::fs::create_dir_all(&plugin_dir).expect("creating plugin_dir");

        let AgentPorts { http, rpc, serf } = self.ports;
        let mut hcl = String::new();
        let _ = writeln!(
            hcl,
            "data_dir = {}",
            hcl_string(&data_dir.to_string_lossy())
        );
        let _ = writeln!(
            hcl,
            "plugin_dir = {}",
            hcl_string(&plugin_dir.to_string_lossy())
        );
        hcl.push_str(
            r#"bind_addr = "127.0.0.1"
log_level = "DEBUG"
disable_update_check = true
advertise {
  http = "127.0.0.1"
  rpc  = "127.0.0.1"
  serf = "127.0.0.1"
}
"#,
        );
        let _ = writeln!(
            hcl,
            "ports {{\n  http = {http}\n  rpc  = {rpc}\n  serf = {serf}\n}}"
        );
        hcl.push_str(
            r#"server {
  enabled          = true
  bootstrap_expect = 1
}
consul {
  auto_advertise   = false
  server_auto_join = false
  client_auto_join = false
}
telemetry {
  publish_allocation_metrics = true
  publish_node_metrics       = true
  collection_interval        = "1s"
}
"#,
        );

        // The cloud fingerprinters query link-local metadata addresses, and Consul's polls
        // 127.0.0.1:8500. Tests reach nothing beyond their own loopback ports.
        let mut client_options = vec![(
            "fingerprint.denylist".to_string(),
            "env_aws,env_gce,env_azure,env_digitalocean,consul".to_string(),
        )];
        client_options.extend(self.options.client_options.iter().cloned());
        hcl.push_str("client {\n  enabled = true\n  network_interface = \"lo\"\n  options {\n");
        for (key, value) in &client_options {
            let _ = writeln!(hcl, "    {} = {}", hcl_string(key), hcl_string(value));
        }
        hcl.push_str("  }\n}\n");

        if self.options.raw_exec {
            hcl.push_str("plugin \"raw_exec\" {\n  config {\n    enabled = true\n  }\n}\n");
        }
        if let Some(config) = &self.options.builtin_qemu_config {
            let _ = writeln!(hcl, "plugin \"qemu\" {{\n  config {{\n{config}\n  }}\n}}");
        }
        if let Some(config) = &self.options.qemu_plugin_config {
            let plugin = plugin_binary();
            std::os::unix::fs::symlink(&plugin, self.plugin_path()).unwrap_or_else(|err| {
                panic!("linking {} into plugin_dir failed: {err}", plugin.display())
            });
            let _ = writeln!(
                hcl,
                "plugin {} {{\n  config {{\n{config}\n  }}\n}}",
                hcl_string(PLUGIN_FILE_NAME)
            );
        }

        std::fs::write(self.config_path(), hcl).expect("writing the agent configuration");
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("opening the agent log");
        let log_err = log.try_clone().expect("duplicating the agent log handle");

        // A process group of its own lets the harness signal the agent and the plugins it
        // started in one call.
        let child = Command::new(&self.nomad_bin)
            .arg("agent")
            .arg("-config")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|err| panic!("starting {} failed: {err}", self.nomad_bin.display()));
        tracing::info!(pid = child.id(), dir = %self.dir().display(), "started Nomad agent");
        self.child = Some(child);
    }

    /// The last `lines` lines of the agent's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Runs `nomad <args>` against this agent. Panics if the command cannot be run or runs
    /// longer than 30 s; a non-zero exit is returned, not a panic.
    pub async fn cli(&self, args: &[&str]) -> CliOutput {
        let mut command = Command::new(&self.nomad_bin);
        command
            .args(args)
            .env("NOMAD_ADDR", self.address())
            .env_remove("NOMAD_TOKEN")
            .env_remove("NOMAD_NAMESPACE")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(CLI_TIMEOUT, command.output())
            .await
            .unwrap_or_else(|_| {
                panic!("`nomad {}` timed out after {CLI_TIMEOUT:?}", args.join(" "))
            })
            .unwrap_or_else(|err| panic!("running `nomad {}` failed: {err}", args.join(" ")));
        CliOutput {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Runs `nomad <args>` and panics unless it exits 0.
    pub async fn cli_ok(&self, args: &[&str]) -> String {
        let output = self.cli(args).await;
        assert!(
            output.success,
            "`nomad {}` failed\nstdout: {}\nstderr: {}\nagent log tail:\n{}",
            args.join(" "),
            output.stdout,
            output.stderr,
            self.log_tail(40)
        );
        output.stdout
    }

    /// Runs `nomad <args>` and parses its stdout as JSON.
    pub async fn cli_json(&self, args: &[&str]) -> Value {
        let stdout = self.cli_ok(args).await;
        serde_json::from_str(&stdout).unwrap_or_else(|err| {
            panic!(
                "`nomad {}` printed invalid JSON ({err}): {stdout}",
                args.join(" ")
            )
        })
    }

    /// Returns this agent's node (`nomad node status -self -json`), or `None` while the
    /// agent does not respond yet.
    pub async fn node(&self) -> Option<Value> {
        let output = self.cli(&["node", "status", "-self", "-json"]).await;
        if !output.success {
            return None;
        }
        serde_json::from_str(&output.stdout).ok()
    }

    /// Returns the node's entry for `driver` (`Detected`, `Healthy`, `HealthDescription`,
    /// `Attributes`), if the node reports one.
    pub async fn driver_info(&self, driver: &str) -> Option<Value> {
        let node = self.node().await?;
        node.get("Drivers")?.get(driver).cloned()
    }

    async fn wait_node_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last_state = String::from("the agent did not answer yet");
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "the Nomad agent exited with {status} before its node was ready\nagent log tail:\n{}",
                    self.log_tail(60)
                );
            }

            if let Some(node) = self.node().await {
                let status = node["Status"].as_str().unwrap_or("").to_string();
                let unhealthy: Vec<String> = self
                    .options
                    .wait_for_drivers
                    .iter()
                    .filter(|name| {
                        let driver = &node["Drivers"][name.as_str()];
                        !(driver["Detected"] == Value::Bool(true)
                            && driver["Healthy"] == Value::Bool(true))
                    })
                    .map(|name| {
                        let description = node["Drivers"][name.as_str()]["HealthDescription"]
                            .as_str()
                            .unwrap_or("not reported");
                        format!("{name} ({description})")
                    })
                    .collect();
                if status == "ready" && unhealthy.is_empty() {
                    tracing::info!(address = %self.address(), "Nomad node is ready");
                    return;
                }
                last_state = format!("node status {status:?}, drivers not healthy: {unhealthy:?}");
            }

            assert!(
                Instant::now() < deadline,
                "the Nomad node was not ready within {timeout:?}: {last_state}\nagent log tail:\n{}",
                self.log_tail(60)
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Submits a job from an HCL string and returns its job id.
    pub async fn run_job(&self, hcl: &str) -> String {
        let jobs_dir = self.dir().join("jobs");
        std::fs::create_dir_all(&jobs_dir).expect("creating the jobs directory");
        let count = std::fs::read_dir(&jobs_dir).map(|d| d.count()).unwrap_or(0);
        let path = jobs_dir.join(format!("job-{count}.nomad.hcl"));
        std::fs::write(&path, hcl).expect("writing the job file");
        let path = path.to_string_lossy().into_owned();

        let parsed = self.cli_json(&["job", "run", "-output", &path]).await;
        let job_id = parsed["Job"]["ID"]
            .as_str()
            .unwrap_or_else(|| panic!("`nomad job run -output` printed no Job.ID: {parsed}"))
            .to_string();

        self.cli_ok(&["job", "run", "-detach", &path]).await;
        tracing::info!(job = %job_id, "submitted job");
        job_id
    }

    /// Lists the job's allocations (`nomad job allocs -json`), newest first.
    pub async fn job_allocs(&self, job_id: &str) -> Vec<Value> {
        let allocs = self.cli_json(&["job", "allocs", "-json", job_id]).await;
        let mut allocs = allocs.as_array().cloned().unwrap_or_default();
        allocs.sort_by_key(|alloc| std::cmp::Reverse(alloc["CreateIndex"].as_u64().unwrap_or(0)));
        allocs
    }

    /// Polls the job's newest allocation until `accept` returns true for it and returns it.
    /// Panics with `description`, the last allocation seen and the agent log after `timeout`.
    pub async fn wait_alloc(
        &self,
        job_id: &str,
        description: &str,
        timeout: Duration,
        accept: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let newest = self.job_allocs(job_id).await.into_iter().next();
            if let Some(alloc) = &newest {
                if accept(alloc) {
                    return alloc.clone();
                }
            }

            if Instant::now() >= deadline {
                let seen = match &newest {
                    Some(alloc) => summarize_alloc(alloc),
                    None => "no allocation".to_string(),
                };
                panic!(
                    "job {job_id}: timed out after {timeout:?} waiting for {description}; last seen: {seen}\nagent log tail:\n{}",
                    self.log_tail(60)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits until `task` of the job's newest allocation is in `state` ("pending",
    /// "running" or "dead") and returns the allocation.
    pub async fn wait_task_state(
        &self,
        job_id: &str,
        task: &str,
        state: &str,
        timeout: Duration,
    ) -> Value {
        let description = format!("task {task} to be {state}");
        self.wait_alloc(job_id, &description, timeout, |alloc| {
            alloc["TaskStates"][task]["State"].as_str() == Some(state)
        })
        .await
    }

    /// Returns the full allocation (`nomad alloc status -json`).
    pub async fn alloc_status(&self, alloc_id: &str) -> Value {
        self.cli_json(&["alloc", "status", "-json", alloc_id]).await
    }

    /// Returns the allocation's resource usage as the client's HTTP API reports it
    /// (`/v1/client/allocation/:id/stats`). `nomad alloc status -stats` prints text only.
    pub async fn alloc_stats(&self, alloc_id: &str) -> Value {
        let path = format!("/v1/client/allocation/{alloc_id}/stats");
        self.cli_json(&["operator", "api", &path]).await
    }

    /// Returns the task's events as (type, display message) pairs, oldest first.
    pub async fn task_events(&self, alloc_id: &str, task: &str) -> Vec<(String, String)> {
        let alloc = self.alloc_status(alloc_id).await;
        task_events_of(&alloc, task)
    }

    /// Returns the task's stdout (`stderr = false`) or stderr log.
    pub async fn alloc_logs(&self, alloc_id: &str, task: &str, stderr: bool) -> String {
        let mut args = vec!["alloc", "logs", "-task", task];
        if stderr {
            args.push("-stderr");
        }
        args.push(alloc_id);
        self.cli_ok(&args).await
    }

    /// Polls the task's log until it contains `needle` and returns the log.
    pub async fn wait_log_contains(
        &self,
        alloc_id: &str,
        task: &str,
        needle: &str,
        timeout: Duration,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let output = self.cli(&["alloc", "logs", "-task", task, alloc_id]).await;
            if output.stdout.contains(needle) {
                return output.stdout;
            }
            assert!(
                Instant::now() < deadline,
                "alloc {alloc_id} task {task}: {needle:?} not in the log within {timeout:?}; log: {:?}; stderr: {:?}",
                output.stdout,
                output.stderr
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Stops the job and waits until its newest allocation is terminal on the client, then
    /// returns the allocation and the time from the stop request to that point.
    pub async fn stop_job(&self, job_id: &str, timeout: Duration) -> (Value, Duration) {
        let started = Instant::now();
        self.cli_ok(&["job", "stop", "-detach", job_id]).await;
        let alloc = self
            .wait_alloc(job_id, "the allocation to stop", timeout, is_alloc_stopped)
            .await;
        let elapsed = started.elapsed();
        tracing::info!(job = %job_id, elapsed_ms = elapsed.as_millis() as u64, "stopped job");
        (alloc, elapsed)
    }

    /// Lists the processes of this crate's plugin (matched by their path in `plugin_dir`).
    /// After an agent restart the old instance is re-parented, so more than one can exist.
    pub fn plugin_processes(&self) -> Vec<ProcessInfo> {
        let plugin_path = self.plugin_path().to_string_lossy().into_owned();
        process::processes_mentioning(&plugin_path)
            .into_iter()
            .filter(|p| p.argv.first() == Some(&plugin_path))
            .collect()
    }

    /// Lists the QEMU processes this agent started, directly or through a plugin.
    pub fn qemu_processes(&self) -> Vec<ProcessInfo> {
        process::agent_processes(self.dir())
            .into_iter()
            .filter(ProcessInfo::is_qemu)
            .collect()
    }

    /// Interrupts the agent (SIGINT), waits until it exits, then SIGKILLs what remains of its
    /// process group. Tasks keep running: a Nomad client leaves them for the next agent.
    pub async fn stop_agent(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) else {
            return;
        };

        process::signal_process(pid, Signal::INT);
        match tokio::time::timeout(AGENT_EXIT_TIMEOUT, child.wait()).await {
            Ok(Ok(status)) => tracing::info!(pid, %status, "Nomad agent exited"),
            Ok(Err(err)) => tracing::warn!(pid, error = %err, "waiting for the Nomad agent failed"),
            Err(_) => {
                tracing::warn!(pid, "Nomad agent ignored SIGINT for 30 s; killing it");
                process::signal_group(pid, Signal::KILL);
                let _ = child.wait().await;
            }
        }
        process::signal_group(pid, Signal::KILL);
    }

    /// Kills only the agent process with SIGKILL, as a crash or the OOM killer would, so that
    /// its plugin processes survive. Then starts the agent again with the same configuration
    /// and data dir and waits until the node is ready.
    pub async fn crash_and_restart(&mut self) {
        let mut child = self.child.take().expect("the agent runs");
        let pid = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .expect("the agent has a pid");
        process::signal_process(pid, Signal::KILL);
        let _ = child.wait().await;
        self.spawn();
        self.wait_node_ready(Duration::from_secs(90)).await;
    }

    /// Stops the agent and starts it again with the same configuration and data dir, then
    /// waits until the node is ready.
    pub async fn restart(&mut self) {
        self.stop_agent().await;
        self.spawn();
        self.wait_node_ready(Duration::from_secs(90)).await;
    }

    /// Stops every job, stops the agent and checks that nothing it started is left.
    /// Panics if a process the agent started outlives it; it kills such processes first.
    pub async fn shutdown(mut self) {
        // `nomad job status` has no -json flag in v1.6, so this reads the HTTP API.
        let jobs = self.cli_json(&["operator", "api", "/v1/jobs"]).await;
        for job in jobs.as_array().into_iter().flatten() {
            let Some(job_id) = job["ID"].as_str() else {
                continue;
            };
            if job["Status"].as_str() != Some("dead") {
                self.stop_job(job_id, Duration::from_secs(60)).await;
            }
        }

        self.stop_agent().await;

        let left = process::kill_agent_processes(self.dir());
        process::unmount_under(self.dir());
        assert!(
            left.is_empty(),
            "processes were left running after the agent stopped (now killed): {left:#?}"
        );
    }
}

impl Drop for NomadAgent {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
                process::signal_group(pid, Signal::KILL);
            }
            let _ = child.start_kill();
        }
        let left = process::kill_agent_processes(self.dir());
        if !left.is_empty() {
            tracing::warn!(count = left.len(), "killed processes the agent left behind");
        }
        process::unmount_under(self.dir());
    }
}

/// Returns true once the allocation and all its tasks are finished on the client.
pub fn is_alloc_stopped(alloc: &Value) -> bool {
    let terminal = matches!(
        alloc["ClientStatus"].as_str(),
        Some("complete" | "failed" | "lost")
    );
    let tasks_dead = alloc["TaskStates"]
        .as_object()
        .is_none_or(|tasks| tasks.values().all(|t| t["State"].as_str() == Some("dead")));
    terminal && tasks_dead
}

/// Returns the events of `task` in an allocation as (type, display message) pairs.
pub fn task_events_of(alloc: &Value, task: &str) -> Vec<(String, String)> {
    alloc["TaskStates"][task]["Events"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|event| {
            (
                event["Type"].as_str().unwrap_or("").to_string(),
                event["DisplayMessage"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn summarize_alloc(alloc: &Value) -> String {
    let mut summary = format!(
        "alloc {} client status {}",
        alloc["ID"].as_str().unwrap_or("?"),
        alloc["ClientStatus"].as_str().unwrap_or("?")
    );
    if let Some(tasks) = alloc["TaskStates"].as_object() {
        for (name, state) in tasks {
            let events: Vec<String> = task_events_of(alloc, name)
                .into_iter()
                .map(|(kind, message)| format!("{kind}: {message}"))
                .collect();
            let _ = write!(
                summary,
                "; task {name} {} events {events:?}",
                state["State"].as_str().unwrap_or("?")
            );
        }
    }
    summary
}

/// Quotes `value` as an HCL string literal.
fn hcl_string(value: &str) -> String {
    serde_json::Value::String(value.to_string()).to_string()
}

/// Returns a loopback port that is free for both TCP and UDP right now (Serf needs both).
fn free_port() -> u16 {
    for _ in 0..100 {
        let tcp = TcpListener::bind("127.0.0.1:0").expect("binding a loopback TCP port");
        let port = tcp.local_addr().expect("reading the bound port").port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("found no loopback port free for both TCP and UDP in 100 tries");
}

/// Path of the cached Nomad build that `scripts/install-nomad.sh` produces.
fn cached_nomad_path() -> PathBuf {
    let cache_root = match std::env::var_os("NOMAD_DRIVER_QEMU_CACHE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let base = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
                .expect("neither XDG_CACHE_HOME nor HOME is set");
            base.join("nomad-driver-qemu")
        }
    };
    cache_root
        .join(format!("nomad-v{NOMAD_VERSION}"))
        .join("bin")
        .join("nomad")
}

/// Finds the Nomad binary (`NOMAD_BIN`, else the install script's cache) and checks that it
/// is the pinned version.
async fn nomad_binary() -> PathBuf {
    let path = std::env::var_os("NOMAD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(cached_nomad_path);
    let output = Command::new(&path)
        .arg("version")
        .output()
        .await
        .unwrap_or_else(|err| {
            panic!(
                "Nomad v{NOMAD_VERSION} is missing ({}: {err}); run scripts/install-nomad.sh \
                 or set NOMAD_BIN to a Nomad v{NOMAD_VERSION} binary",
                path.display()
            )
        });
    let version = String::from_utf8_lossy(&output.stdout);
    assert!(
        version.starts_with(&format!("Nomad v{NOMAD_VERSION}")),
        "{} reports {:?}, expected Nomad v{NOMAD_VERSION}; set NOMAD_BIN to a v{NOMAD_VERSION} binary",
        path.display(),
        version.lines().next().unwrap_or("")
    );
    path
}

/// This crate's plugin binary: `NOMAD_DRIVER_QEMU_BIN` (set it to test a release build),
/// else the binary Cargo built for this test run.
fn plugin_binary() -> PathBuf {
    let path = std::env::var_os("NOMAD_DRIVER_QEMU_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_nomad-driver-qemu")));
    assert!(
        path.is_file(),
        "plugin binary {} not found; run `cargo build --release` or fix NOMAD_DRIVER_QEMU_BIN",
        path.display()
    );
    path
}
