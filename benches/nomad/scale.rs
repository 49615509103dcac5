//! Scale of one plugin process: its memory and CPU while it manages 10, 100 and 1000 tasks
//! whose emulator is the QMP test double (`examples/qmp_double.rs`) instead of QEMU.
//!
//! The benchmark drives the plugin binary directly over its gRPC socket, as Nomad's client
//! does: SetConfig, then per task StartTask, a pending WaitTask call and a TaskStats stream
//! with a 1 s collection interval (what `publish_allocation_metrics` with
//! `collection_interval = "1s"` makes the client open). After each step up in the task count
//! it lets the plugin settle, then samples the plugin's RSS (`VmRSS`) and CPU time
//! (`utime + stime` from `/proc/PID/stat`) over a window. At the end every task is stopped
//! gracefully (`system_powerdown`, which the double answers by exiting) and destroyed.
//!
//! Output: a human-readable table on stderr and one JSON object per task count on stdout.
//!
//! Run: `cargo build --release --example qmp_double --example nomad_scale`, then
//! `target/release/examples/nomad_scale --plugin target/release/nomad-driver-qemu
//! --double target/release/examples/qmp_double`. `scripts/bench-nomad.sh` does both.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures::{stream, StreamExt};
use nomad_driver_qemu::driver::nomad::config::TASK_OPTIONS;
use nomad_driver_qemu::driver::nomad::plugin::{MAGIC_COOKIE_KEY, MAGIC_COOKIE_VALUE};
use nomad_driver_qemu::driver::nomad::proto::base::{
    base_plugin_client::BasePluginClient, NomadConfig, SetConfigRequest,
};
use nomad_driver_qemu::driver::nomad::proto::drivers::{
    driver_client::DriverClient, AllocatedMemoryResources, AllocatedTaskResources,
    DestroyTaskRequest, Resources, StartTaskRequest, StopTaskRequest, TaskConfig, TaskStatsRequest,
    WaitTaskRequest,
};
use rmpv::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::{Channel, Endpoint};

/// Task name inside each allocation, as in a job's `task "web"` block.
const TASK_NAME: &str = "web";

/// StartTask calls in flight at once. The double starts in about a millisecond, so this only
/// bounds the burst of forks.
const START_CONCURRENCY: usize = 16;

/// Wait after reaching a task count before the sampling window opens, so that start-up work
/// does not count as steady-state CPU.
const SETTLE: Duration = Duration::from_secs(3);

/// Command-line options.
#[derive(Debug, Parser)]
#[command(about = "Measure one plugin process managing many QMP test doubles")]
struct Options {
    /// Plugin binary to run.
    #[arg(long)]
    plugin: PathBuf,
    /// QMP test double binary (examples/qmp_double.rs).
    #[arg(long)]
    double: PathBuf,
    /// Task counts to step through, in increasing order.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    counts: Vec<usize>,
    /// Length of each sampling window, in seconds.
    #[arg(long, default_value_t = 20)]
    window: u64,
    /// Keep the temporary directory (plugin log, task dirs) and print its path.
    #[arg(long)]
    keep: bool,
}

/// Figures of one sampling window.
#[derive(Debug, serde::Serialize)]
struct Sample {
    tasks: usize,
    window_s: f64,
    plugin_rss_kib: u64,
    plugin_rss_per_task_kib: f64,
    plugin_cpu_percent: f64,
    stats_samples_per_s: f64,
    start_task_median_ms: f64,
    start_task_max_ms: f64,
}

/// The plugin process and its gRPC channel.
struct Plugin {
    child: Child,
    channel: Channel,
}

#[tokio::main]
async fn main() -> Result<()> {
    let options = Options::parse();
    if options.counts.is_empty() || options.counts.windows(2).any(|pair| pair[0] >= pair[1]) {
        bail!(
            "--counts {:?} is invalid: expected increasing task counts such as 10,100,1000",
            options.counts
        );
    }
    let temp = tempfile::Builder::new()
        .prefix("nomad-scale-")
        .tempdir()
        .context("failed to create a temporary directory")?;
    let root = temp.path().to_path_buf();
    let _temp = if options.keep {
        eprintln!("keeping {}", root.display());
        let _kept = temp.keep();
        None
    } else {
        Some(temp)
    };
    let bin_dir = root.join("bin");
    std::fs::create_dir_all(&bin_dir)?;
    let double = std::fs::canonicalize(&options.double)
        .with_context(|| format!("QMP double {} not found", options.double.display()))?;
    std::os::unix::fs::symlink(&double, bin_dir.join("qemu-system-double"))?;
    let image_dir = root.join("images");
    std::fs::create_dir_all(&image_dir)?;
    std::fs::write(image_dir.join("disk.img"), b"")?;

    let plugin = Plugin::start(&options.plugin, &bin_dir, &root).await?;
    plugin.configure(&image_dir).await?;
    let pid = plugin.child.id().context("the plugin exited at start")?;

    let samples_received = Arc::new(AtomicU64::new(0));
    let mut started: Vec<String> = Vec::new();
    let mut results = Vec::new();
    for &count in &options.counts {
        let latencies = start_tasks(
            &plugin,
            &root,
            &image_dir,
            started.len()..count,
            &samples_received,
        )
        .await?;
        started.extend((started.len()..count).map(task_id));
        tokio::time::sleep(SETTLE).await;

        let sample = measure(
            pid,
            count,
            Duration::from_secs(options.window),
            &samples_received,
            latencies,
        )
        .await?;
        eprintln!(
            "{:>5} tasks: plugin RSS {:.1} MiB ({:.1} KiB per task), CPU {:.2} % of one core, \
             {:.0} stats samples/s, StartTask median {:.1} ms",
            sample.tasks,
            sample.plugin_rss_kib as f64 / 1024.0,
            sample.plugin_rss_per_task_kib,
            sample.plugin_cpu_percent,
            sample.stats_samples_per_s,
            sample.start_task_median_ms,
        );
        println!("{}", serde_json::to_string(&sample)?);
        results.push(sample);
    }

    let stop_started = Instant::now();
    stop_tasks(&plugin, &started).await?;
    eprintln!(
        "stopped and destroyed {} tasks in {:.1} s",
        started.len(),
        stop_started.elapsed().as_secs_f64()
    );
    plugin.shut_down().await;
    Ok(())
}

impl Plugin {
    /// Starts the plugin as Nomad does (magic cookie, socket dir) with `bin_dir` first on its
    /// `PATH`, and connects to the socket from its handshake line.
    async fn start(binary: &Path, bin_dir: &Path, root: &Path) -> Result<Plugin> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut search_path = vec![bin_dir.to_path_buf()];
        search_path.extend(std::env::split_paths(&path));
        let log = std::fs::File::create(root.join("plugin.log"))?;
        let mut child = Command::new(binary)
            .env(MAGIC_COOKIE_KEY, MAGIC_COOKIE_VALUE)
            .env("PLUGIN_UNIX_SOCKET_DIR", root)
            .env("PATH", std::env::join_paths(search_path)?)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("failed to start the plugin {}", binary.display()))?;

        let stdout = child.stdout.take().context("plugin stdout is not piped")?;
        let mut handshake = String::new();
        tokio::time::timeout(
            Duration::from_secs(10),
            BufReader::new(stdout).read_line(&mut handshake),
        )
        .await
        .context("the plugin printed no handshake line within 10 s")??;
        let socket = handshake
            .trim_end()
            .split('|')
            .nth(3)
            .with_context(|| format!("no socket path in the handshake line {handshake:?}"))?
            .to_owned();
        let channel = Endpoint::try_from(format!("unix://{socket}"))?
            .connect()
            .await
            .with_context(|| format!("failed to connect to the plugin socket {socket}"))?;
        Ok(Plugin { child, channel })
    }

    async fn configure(&self, image_dir: &Path) -> Result<()> {
        let config = Value::Map(vec![
            (
                Value::from("image_paths"),
                Value::Array(vec![Value::from(path_str(image_dir)?)]),
            ),
            (Value::from("args_allowlist"), Value::Nil),
            (Value::from("emulators_allowlist"), Value::Nil),
        ]);
        BasePluginClient::new(self.channel.clone())
            .set_config(SetConfigRequest {
                msgpack_config: encode(&config)?,
                nomad_config: Some(NomadConfig::default()),
                plugin_api_version: "0.1.0".into(),
            })
            .await
            .context("SetConfig failed")?;
        Ok(())
    }

    fn driver(&self) -> DriverClient<Channel> {
        DriverClient::new(self.channel.clone())
    }

    async fn shut_down(mut self) {
        // The plugin has no tasks left, so a kill loses nothing.
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

fn task_id(index: usize) -> String {
    format!("alloc-{index:05}/{TASK_NAME}/scale")
}

/// Starts tasks `indexes` with up to [`START_CONCURRENCY`] StartTask calls in flight. For each
/// task it opens WaitTask and TaskStats and counts the stats samples that arrive. Returns the
/// StartTask latencies.
async fn start_tasks(
    plugin: &Plugin,
    root: &Path,
    image_dir: &Path,
    indexes: std::ops::Range<usize>,
    samples_received: &Arc<AtomicU64>,
) -> Result<Vec<Duration>> {
    let tasks = indexes
        .map(|index| task_config(root, image_dir, index))
        .collect::<Result<Vec<_>>>()?;
    let results = stream::iter(tasks)
        .map(|task| {
            let mut driver = plugin.driver();
            let samples_received = Arc::clone(samples_received);
            async move {
                let task_id = task.id.clone();
                let began = Instant::now();
                driver
                    .start_task(StartTaskRequest { task: Some(task) })
                    .await
                    .with_context(|| format!("StartTask {task_id} failed"))?;
                let latency = began.elapsed();
                follow_task(driver, task_id, samples_received).await?;
                Ok::<_, anyhow::Error>(latency)
            }
        })
        .buffer_unordered(START_CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    results.into_iter().collect()
}

/// Opens the calls Nomad keeps open for a running task: WaitTask and a 1 s TaskStats stream.
async fn follow_task(
    mut driver: DriverClient<Channel>,
    task_id: String,
    samples_received: Arc<AtomicU64>,
) -> Result<()> {
    let mut waiter = driver.clone();
    let wait_id = task_id.clone();
    tokio::spawn(async move {
        // The result matters only to Nomad. Here the call exists to cost what it costs there.
        let _ = waiter.wait_task(WaitTaskRequest { task_id: wait_id }).await;
    });
    let mut stats = driver
        .task_stats(TaskStatsRequest {
            task_id: task_id.clone(),
            collection_interval: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
        })
        .await
        .with_context(|| format!("TaskStats {task_id} failed to open"))?
        .into_inner();
    tokio::spawn(async move {
        while let Some(Ok(_)) = stats.next().await {
            samples_received.fetch_add(1, Ordering::Relaxed);
        }
    });
    Ok(())
}

fn task_config(root: &Path, image_dir: &Path, index: usize) -> Result<TaskConfig> {
    let alloc_dir = root.join("allocs").join(format!("{index:05}"));
    std::fs::create_dir_all(alloc_dir.join(TASK_NAME))?;
    let console = alloc_dir.join("console.log");
    let entries = [
        (
            "image_path",
            Value::from(path_str(&image_dir.join("disk.img"))?),
        ),
        ("emulator", Value::from("double")),
        ("accelerator", Value::from("tcg")),
        ("graceful_shutdown", Value::from(true)),
    ];
    // Nomad sends every option of the schema, nil where the job leaves it out.
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
    let id = task_id(index);
    let alloc_id = id.split('/').next().unwrap_or_default().to_owned();
    Ok(TaskConfig {
        id,
        name: TASK_NAME.into(),
        msgpack_driver_config: encode(&Value::Map(map))?,
        resources: Some(Resources {
            allocated_resources: Some(AllocatedTaskResources {
                memory: Some(AllocatedMemoryResources {
                    memory_mb: 128,
                    memory_max_mb: 0,
                }),
                ..AllocatedTaskResources::default()
            }),
            ..Resources::default()
        }),
        alloc_dir: path_str(&alloc_dir)?.into(),
        stdout_path: path_str(&console)?.into(),
        stderr_path: path_str(&console)?.into(),
        alloc_id,
        ..TaskConfig::default()
    })
}

/// Samples the plugin's RSS and CPU time over `window`.
async fn measure(
    pid: u32,
    tasks: usize,
    window: Duration,
    samples_received: &AtomicU64,
    mut latencies: Vec<Duration>,
) -> Result<Sample> {
    let cpu_before = cpu_ticks(pid)?;
    let samples_before = samples_received.load(Ordering::Relaxed);
    let began = Instant::now();
    tokio::time::sleep(window).await;
    let elapsed = began.elapsed().as_secs_f64();
    let cpu_seconds = (cpu_ticks(pid)? - cpu_before) as f64 / clock_ticks_per_second();
    let samples = samples_received.load(Ordering::Relaxed) - samples_before;
    let rss_kib = rss_kib(pid)?;

    latencies.sort();
    let millis = |duration: Option<&Duration>| duration.map_or(0.0, |d| d.as_secs_f64() * 1e3);
    Ok(Sample {
        tasks,
        window_s: elapsed,
        plugin_rss_kib: rss_kib,
        plugin_rss_per_task_kib: rss_kib as f64 / tasks as f64,
        plugin_cpu_percent: 100.0 * cpu_seconds / elapsed,
        stats_samples_per_s: samples as f64 / elapsed,
        start_task_median_ms: millis(latencies.get(latencies.len() / 2)),
        start_task_max_ms: millis(latencies.last()),
    })
}

/// Stops every task gracefully and destroys it, 16 at a time.
async fn stop_tasks(plugin: &Plugin, task_ids: &[String]) -> Result<()> {
    let results = stream::iter(task_ids.iter().cloned())
        .map(|task_id| {
            let mut driver = plugin.driver();
            async move {
                driver
                    .stop_task(StopTaskRequest {
                        task_id: task_id.clone(),
                        timeout: Some(prost_types::Duration {
                            seconds: 5,
                            nanos: 0,
                        }),
                        signal: String::new(),
                    })
                    .await
                    .with_context(|| format!("StopTask {task_id} failed"))?;
                driver
                    .destroy_task(DestroyTaskRequest {
                        task_id: task_id.clone(),
                        force: true,
                    })
                    .await
                    .with_context(|| format!("DestroyTask {task_id} failed"))?;
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(START_CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    results.into_iter().collect()
}

/// Returns the process's `utime + stime` in clock ticks (fields 14 and 15 of `/proc/PID/stat`).
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("failed to read /proc/{pid}/stat: did the plugin exit?"))?;
    // The command name in brackets may contain spaces, so fields are counted after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |index: usize| -> Result<u64> {
        fields
            .get(index)
            .and_then(|value| value.parse().ok())
            .with_context(|| format!("invalid /proc/{pid}/stat: {stat:?}"))
    };
    // After the name, field 3 (state) has index 0, so utime (14) and stime (15) are 11 and 12.
    Ok(field(11)? + field(12)?)
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("failed to read /proc/{pid}/status: did the plugin exit?"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS line in /proc/{pid}/status"))
}

fn clock_ticks_per_second() -> f64 {
    nomad_driver_qemu::driver::vm::sys::clock_ticks_per_second() as f64
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("path {} is not UTF-8", path.display()))
}

fn encode(value: &Value) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    rmpv::encode::write_value(&mut bytes, value)?;
    Ok(bytes)
}
