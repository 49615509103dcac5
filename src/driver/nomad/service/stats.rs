//! The `TaskStats` stream: QEMU's CPU and memory usage, one sample per collection interval.
//!
//! CPU figures follow Nomad v1.6.5's executor (`helper/stats/cpu.go`): `percent`, `user_mode`
//! and `system_mode` are CPU time deltas over wall time deltas between two samples, 100 being
//! one core, and the first sample reports 0. `total_ticks` is `percent / 100` times the
//! compute of one core in MHz.
//!
//! Guest-side figures (vCPU threads, block device I/O, balloon size) have no field in Nomad's
//! message, so they are logged at debug level with each sample.

use std::fs::File;
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime};

use futures::Stream;
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::driver::nomad::cgroup::{self, TaskCgroups};
use crate::driver::nomad::proto::base::{ClientTopology, NomadConfig};
use crate::driver::nomad::proto::drivers::{
    cpu_usage, memory_usage, CpuUsage, MemoryUsage, TaskResourceUsage, TaskStats, TaskStatsResponse,
};
use crate::driver::vm::{GuestStats, HostStats, Vm};

/// Collection interval used when the request carries none, the default of Nomad's
/// `telemetry.collection_interval`.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// Shortest collection interval honoured, so that a bad request cannot make a busy loop.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// Maximum collection interval: one day. Longer ones are clamped, because tokio's interval
/// timer panics when a period overflows its clock.
const MAX_INTERVAL: Duration = Duration::from_secs(24 * 60 * 60);

/// Stream type of the `TaskStats` RPC.
pub type TaskStatsStream = Pin<Box<dyn Stream<Item = Result<TaskStatsResponse, Status>> + Send>>;

/// Compute of one CPU core in MHz, which turns a CPU percentage into Nomad's `total_ticks`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CoreCompute {
    /// MHz of one core.
    pub mhz: f64,
}

impl CoreCompute {
    /// Returns the core compute from the client topology in the agent's `SetConfig`, else the
    /// estimate from `/proc/cpuinfo`.
    ///
    /// Nomad v1.6.5 sends no topology, so there the estimate is what its own executor uses:
    /// the highest `cpu MHz` of any CPU. Unlike the executor, it cannot see the agent's
    /// `cpu_total_compute` override.
    pub fn from_config(nomad: Option<&NomadConfig>) -> Self {
        let topology = nomad
            .and_then(|config| config.driver.as_ref())
            .and_then(|driver| driver.topology.as_ref());
        if let Some(compute) = topology.and_then(Self::from_topology) {
            return compute;
        }
        match std::fs::read_to_string("/proc/cpuinfo") {
            Ok(text) => Self::from_cpuinfo(&text).unwrap_or(Self { mhz: 0.0 }),
            Err(error) => {
                tracing::warn!(error = %error, "failed to read /proc/cpuinfo, total_ticks will be 0");
                Self { mhz: 0.0 }
            }
        }
    }

    /// Returns the total compute divided by the number of cores, as Nomad's client does: the
    /// total is `override_total_compute` if set, else the sum over the cores of the base
    /// speed, else the max speed, else the guessed speed.
    pub fn from_topology(topology: &ClientTopology) -> Option<Self> {
        let cores = topology.cores.len();
        if cores == 0 {
            return None;
        }
        let total = if topology.override_total_compute > 0 {
            topology.override_total_compute
        } else {
            topology
                .cores
                .iter()
                .map(|core| {
                    [core.base_speed, core.max_speed, core.guess_speed]
                        .into_iter()
                        .find(|&speed| speed > 0)
                        .unwrap_or(0)
                })
                .sum()
        };
        (total > 0).then(|| Self {
            mhz: total as f64 / cores as f64,
        })
    }

    /// Returns the highest `cpu MHz` in the text of `/proc/cpuinfo`.
    pub fn from_cpuinfo(text: &str) -> Option<Self> {
        text.lines()
            .filter_map(|line| line.split_once(':'))
            .filter(|(key, _)| key.trim() == "cpu MHz")
            .filter_map(|(_, value)| value.trim().parse::<f64>().ok())
            .reduce(f64::max)
            .map(|mhz| Self { mhz })
    }

    /// Returns the MHz consumed at `percent` (100 = one core).
    pub fn ticks(self, percent: f64) -> f64 {
        percent / 100.0 * self.mhz
    }
}

/// CPU percentages over the time between two samples; 100 is one core.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuPercent {
    /// User plus system.
    pub total: f64,
    /// User mode.
    pub user: f64,
    /// Kernel mode.
    pub system: f64,
}

impl CpuPercent {
    /// Computes the percentages from two host samples `elapsed` apart. A zero interval or a
    /// counter that went backwards gives 0, as in Nomad's executor.
    pub fn between(previous: &HostStats, current: &HostStats, elapsed: Duration) -> Self {
        let percent = |before: Duration, after: Duration| {
            if elapsed.is_zero() || after <= before {
                return 0.0;
            }
            (after - before).as_secs_f64() / elapsed.as_secs_f64() * 100.0
        };
        let user = percent(previous.user_cpu, current.user_cpu);
        let system = percent(previous.system_cpu, current.system_cpu);
        Self {
            total: percent(
                previous.user_cpu + previous.system_cpu,
                current.user_cpu + current.system_cpu,
            ),
            user,
            system,
        }
    }
}

/// Builds one task's samples, keeping the previous host reading for the CPU deltas.
pub struct Sampler {
    task_id: String,
    vm: Vm,
    compute: CoreCompute,
    previous: Option<(Instant, HostStats)>,
    /// The memory cgroup's usage file, held open so that each sample costs one read.
    memory_usage: Option<File>,
}

impl Sampler {
    /// Creates a sampler for `vm`, whose memory cgroup, if any, is among `cgroups`.
    pub fn new(
        task_id: String,
        vm: Vm,
        cgroups: Option<TaskCgroups>,
        compute: CoreCompute,
    ) -> Self {
        let memory_usage = cgroups.as_ref().and_then(TaskCgroups::open_memory_usage);
        Self {
            task_id,
            vm,
            compute,
            previous: None,
            memory_usage,
        }
    }

    /// Takes one sample within `deadline`. Returns `None` once QEMU's `/proc` entry is gone.
    ///
    /// Nomad's stats message has no place for guest figures (vCPUs, block I/O, balloon), so the
    /// guest side is queried over QMP only while debug logging is on, and only logged. Without
    /// it a sample costs no QMP round trip: in `benches/nomad/scale.rs` at 1000 VMs, dropping the
    /// three queries per sample took the plugin from 13.6 % to 7.4 % of a core.
    pub async fn sample(&mut self, deadline: Duration) -> Option<TaskStats> {
        let (taken_at, host) = if tracing::enabled!(tracing::Level::DEBUG) {
            let stats = self.vm.stats(deadline).await;
            match &stats.guest {
                Some(guest) => log_guest(&self.task_id, guest),
                None => {
                    tracing::debug!(task_id = %self.task_id, reason = stats.stale.as_deref().unwrap_or("unknown"), "guest statistics missing from sample");
                }
            }
            (stats.taken_at, stats.host?)
        } else {
            (SystemTime::now(), self.vm.host_stats()?)
        };
        let now = Instant::now();

        let percent = match self.previous.replace((now, host)) {
            Some((then, previous)) => CpuPercent::between(&previous, &host, now - then),
            None => CpuPercent {
                total: 0.0,
                user: 0.0,
                system: 0.0,
            },
        };
        let usage = resource_usage(
            percent,
            self.compute,
            host.rss_bytes,
            self.memory_usage.as_ref().and_then(cgroup::read_counter),
        );
        Some(TaskStats {
            id: self.task_id.clone(),
            timestamp: Some(taken_at.into()),
            agg_resource_usage: Some(usage.clone()),
            resource_usage_by_pid: [(self.vm.pid().to_string(), usage)].into(),
        })
    }
}

/// Builds the usage message, listing in `measured_fields` exactly the fields measured.
pub fn resource_usage(
    percent: CpuPercent,
    compute: CoreCompute,
    rss_bytes: u64,
    cgroup_usage: Option<u64>,
) -> TaskResourceUsage {
    let mut memory_fields = vec![memory_usage::Fields::Rss.into()];
    if cgroup_usage.is_some() {
        memory_fields.push(memory_usage::Fields::Usage.into());
    }
    TaskResourceUsage {
        cpu: Some(CpuUsage {
            system_mode: percent.system,
            user_mode: percent.user,
            total_ticks: compute.ticks(percent.total),
            percent: percent.total,
            measured_fields: vec![
                cpu_usage::Fields::SystemMode.into(),
                cpu_usage::Fields::UserMode.into(),
                cpu_usage::Fields::TotalTicks.into(),
                cpu_usage::Fields::Percent.into(),
            ],
            ..CpuUsage::default()
        }),
        memory: Some(MemoryUsage {
            rss: rss_bytes,
            usage: cgroup_usage.unwrap_or(0),
            measured_fields: memory_fields,
            ..MemoryUsage::default()
        }),
    }
}

fn log_guest(task_id: &str, guest: &GuestStats) {
    let read_bytes: u64 = guest
        .block_devices
        .iter()
        .map(|device| device.read_bytes)
        .sum();
    let write_bytes: u64 = guest
        .block_devices
        .iter()
        .map(|device| device.write_bytes)
        .sum();
    tracing::debug!(
        task_id,
        vcpus = guest.vcpus.len(),
        block_devices = guest.block_devices.len(),
        read_bytes,
        write_bytes,
        balloon_bytes = guest.balloon_bytes,
        "guest statistics"
    );
}

/// Converts the request's `collection_interval`, falling back to [`DEFAULT_INTERVAL`] when it
/// is absent or invalid, and clamped to [`MIN_INTERVAL`]..=[`MAX_INTERVAL`].
pub fn interval_from(request: Option<&prost_types::Duration>) -> Duration {
    request
        .and_then(|duration| Duration::try_from(*duration).ok())
        .filter(|duration| !duration.is_zero())
        .unwrap_or(DEFAULT_INTERVAL)
        .clamp(MIN_INTERVAL, MAX_INTERVAL)
}

/// Opens the stream of `task_id`: one response per `interval`, each sample taken with a
/// deadline of half the interval, until the client cancels or `shutdown` is cancelled.
///
/// Without a VM (an unknown task id) the stream stays open and sends nothing: an error makes
/// Nomad's client log an error and reopen the stream every interval.
pub fn open(
    task_id: String,
    vm: Option<Vm>,
    cgroups: Option<TaskCgroups>,
    interval: Duration,
    compute: CoreCompute,
    shutdown: CancellationToken,
) -> TaskStatsStream {
    let (sender, receiver) = mpsc::channel(1);
    tokio::spawn(async move {
        let Some(vm) = vm else {
            tracing::debug!(task_id = %task_id, "stats requested for an unknown task, sending none");
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = sender.closed() => {}
            }
            return;
        };
        let mut sampler = Sampler::new(task_id, vm, cgroups, compute);
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = sender.closed() => break,
                _ = ticks.tick() => {}
            }
            let Some(stats) = sampler.sample(interval / 2).await else {
                tracing::debug!(task_id = %sampler.task_id, "QEMU has exited, no statistics to send");
                continue;
            };
            let response = TaskStatsResponse { stats: Some(stats) };
            if sender.send(Ok(response)).await.is_err() {
                break;
            }
        }
    });
    Box::pin(ReceiverStream::new(receiver))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::nomad::proto::base::{ClientTopologyCore, NomadDriverConfig};

    fn host(user_ms: u64, system_ms: u64) -> HostStats {
        HostStats {
            user_cpu: Duration::from_millis(user_ms),
            system_cpu: Duration::from_millis(system_ms),
            rss_bytes: 0,
        }
    }

    fn core(base_speed: u64, max_speed: u64, guess_speed: u64) -> ClientTopologyCore {
        ClientTopologyCore {
            base_speed,
            max_speed,
            guess_speed,
            ..ClientTopologyCore::default()
        }
    }

    #[test]
    fn percent_from_deltas() {
        let percent =
            CpuPercent::between(&host(1000, 500), &host(2500, 1000), Duration::from_secs(1));
        assert!((percent.user - 150.0).abs() < 1e-9, "{percent:?}");
        assert!((percent.system - 50.0).abs() < 1e-9, "{percent:?}");
        assert!((percent.total - 200.0).abs() < 1e-9, "{percent:?}");
    }

    #[test]
    fn percent_zero_interval_or_backwards() {
        let zero = CpuPercent::between(&host(0, 0), &host(100, 100), Duration::ZERO);
        assert_eq!(zero.total, 0.0);
        let backwards =
            CpuPercent::between(&host(500, 500), &host(100, 100), Duration::from_secs(1));
        assert_eq!(backwards.total, 0.0);
        assert_eq!(backwards.user, 0.0);
    }

    #[test]
    fn ticks_from_topology() {
        let topology = ClientTopology {
            cores: vec![
                core(2000, 3000, 0),
                core(0, 3000, 0),
                core(0, 0, 1000),
                core(0, 0, 0),
            ],
            ..ClientTopology::default()
        };
        let compute = CoreCompute::from_topology(&topology).expect("compute");
        // (2000 + 3000 + 1000 + 0) / 4 cores.
        assert_eq!(compute.mhz, 1500.0);
        assert_eq!(compute.ticks(200.0), 3000.0);
    }

    #[test]
    fn ticks_from_override() {
        let topology = ClientTopology {
            cores: vec![core(2000, 0, 0), core(2000, 0, 0)],
            override_total_compute: 10_000,
            ..ClientTopology::default()
        };
        let compute = CoreCompute::from_topology(&topology).expect("compute");
        assert_eq!(compute.mhz, 5000.0);
    }

    #[test]
    fn ticks_without_cores() {
        assert_eq!(CoreCompute::from_topology(&ClientTopology::default()), None);
    }

    #[test]
    fn config_topology_wins() {
        let config = NomadConfig {
            driver: Some(NomadDriverConfig {
                topology: Some(ClientTopology {
                    cores: vec![core(1234, 0, 0)],
                    ..ClientTopology::default()
                }),
                ..NomadDriverConfig::default()
            }),
        };
        assert_eq!(CoreCompute::from_config(Some(&config)).mhz, 1234.0);
    }

    #[test]
    fn cpuinfo_max_mhz() {
        let text = "processor\t: 0\ncpu MHz\t\t: 2596.148\nprocessor\t: 1\ncpu MHz\t\t: 3100.5\nflags\t\t: fpu\n";
        assert_eq!(
            CoreCompute::from_cpuinfo(text),
            Some(CoreCompute { mhz: 3100.5 })
        );
        assert_eq!(CoreCompute::from_cpuinfo("processor : 0\n"), None);
    }

    #[test]
    fn usage_lists_measured_fields() {
        let percent = CpuPercent {
            total: 50.0,
            user: 30.0,
            system: 20.0,
        };
        let compute = CoreCompute { mhz: 2000.0 };
        let usage = resource_usage(percent, compute, 4096, None);
        let cpu = usage.cpu.expect("cpu");
        assert_eq!(cpu.percent, 50.0);
        assert_eq!(cpu.user_mode, 30.0);
        assert_eq!(cpu.system_mode, 20.0);
        assert_eq!(cpu.total_ticks, 1000.0);
        assert_eq!(cpu.measured_fields, [0, 1, 2, 5]);
        let memory = usage.memory.expect("memory");
        assert_eq!(memory.rss, 4096);
        assert_eq!(memory.measured_fields, [memory_usage::Fields::Rss as i32]);

        let with_cgroup = resource_usage(percent, compute, 4096, Some(8192));
        let memory = with_cgroup.memory.expect("memory");
        assert_eq!(memory.usage, 8192);
        assert_eq!(
            memory.measured_fields,
            [
                memory_usage::Fields::Rss as i32,
                memory_usage::Fields::Usage as i32
            ]
        );
    }

    #[test]
    fn interval_defaults_and_floor() {
        assert_eq!(interval_from(None), DEFAULT_INTERVAL);
        let zero = prost_types::Duration {
            seconds: 0,
            nanos: 0,
        };
        assert_eq!(interval_from(Some(&zero)), DEFAULT_INTERVAL);
        let negative = prost_types::Duration {
            seconds: -1,
            nanos: 0,
        };
        assert_eq!(interval_from(Some(&negative)), DEFAULT_INTERVAL);
        let tiny = prost_types::Duration {
            seconds: 0,
            nanos: 1000,
        };
        assert_eq!(interval_from(Some(&tiny)), MIN_INTERVAL);
        let huge = prost_types::Duration {
            seconds: i64::MAX,
            nanos: 0,
        };
        assert_eq!(interval_from(Some(&huge)), MAX_INTERVAL);
        let five = prost_types::Duration {
            seconds: 5,
            nanos: 0,
        };
        assert_eq!(interval_from(Some(&five)), Duration::from_secs(5));
    }

    #[tokio::test]
    async fn unknown_task_stays_silent() {
        use futures::StreamExt;

        let shutdown = CancellationToken::new();
        let mut stream = open(
            "a/web/00".into(),
            None,
            None,
            Duration::from_millis(100),
            CoreCompute { mhz: 1000.0 },
            shutdown.clone(),
        );
        let silent = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
        assert!(silent.is_err(), "the stream sent or ended: {silent:?}");
        shutdown.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(1), stream.next()).await;
        assert!(matches!(ended, Ok(None)), "{ended:?}");
    }
}
