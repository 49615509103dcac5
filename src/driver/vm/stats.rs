//! Resource statistics of one VM: host side from `/proc`, guest side over QMP.

use std::time::{Duration, SystemTime};

use super::sys;
use super::Shared;
use crate::qmp::{self, commands, ErrorClass};

/// QEMU's CPU time and memory, read from `/proc` on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostStats {
    /// CPU time in user mode, all threads.
    pub user_cpu: Duration,
    /// CPU time in kernel mode, all threads.
    pub system_cpu: Duration,
    /// Resident set size in bytes (guest RAM that was touched plus QEMU's own memory).
    pub rss_bytes: u64,
}

/// One vCPU, from `query-cpus-fast` and its host thread's `/proc` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuStats {
    /// vCPU index.
    pub index: i64,
    /// Host thread id that runs the vCPU.
    pub thread_id: i64,
    /// CPU time (user + system) of that thread, if its `/proc` entry could be read.
    pub cpu_time: Option<Duration>,
}

/// I/O counters of one block device, from `query-blockstats`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDeviceStats {
    /// Device name (`device`, else `qdev`, else `node-name`).
    pub device: String,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Read operations.
    pub read_operations: u64,
    /// Write operations.
    pub write_operations: u64,
}

/// Guest statistics that QEMU reports over QMP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestStats {
    /// vCPUs.
    pub vcpus: Vec<VcpuStats>,
    /// Block devices.
    pub block_devices: Vec<BlockDeviceStats>,
    /// Guest RAM in bytes after the balloon, or `None` without a balloon device.
    pub balloon_bytes: Option<u64>,
}

/// One statistics sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmStats {
    /// When the sample was taken.
    pub taken_at: SystemTime,
    /// Host side, or `None` when `/proc` could not be read (QEMU has exited).
    pub host: Option<HostStats>,
    /// Guest side, or `None` when the sample is stale.
    pub guest: Option<GuestStats>,
    /// Reason the guest side is missing: QEMU did not reply in time, or a query failed.
    pub stale: Option<String>,
}

impl VmStats {
    /// Returns whether the guest side is missing.
    pub fn is_stale(&self) -> bool {
        self.stale.is_some()
    }
}

pub(crate) async fn sample(shared: &Shared, deadline: Duration) -> VmStats {
    let taken_at = SystemTime::now();
    let host = host_stats(shared);
    let (guest, stale) = match tokio::time::timeout(deadline, guest_stats(shared)).await {
        Ok(Ok(guest)) => (Some(guest), None),
        Ok(Err(error)) => (None, Some(format!("QMP query failed: {error}"))),
        Err(_) => (
            None,
            Some(format!("QEMU did not reply within {deadline:?}")),
        ),
    };
    if let Some(reason) = &stale {
        tracing::debug!(parent: &shared.span, reason, "stats sample is stale");
    }
    VmStats {
        taken_at,
        host,
        guest,
        stale,
    }
}

pub(crate) fn host_stats(shared: &Shared) -> Option<HostStats> {
    let usage = shared.stat_file.as_ref()?.usage().ok()?;
    Some(HostStats {
        user_cpu: ticks_to_duration(usage.user_ticks),
        system_cpu: ticks_to_duration(usage.system_ticks),
        rss_bytes: usage.rss_bytes,
    })
}

fn ticks_to_duration(ticks: u64) -> Duration {
    let per_second = sys::clock_ticks_per_second();
    Duration::from_secs(ticks / per_second)
        + Duration::from_nanos((ticks % per_second) * 1_000_000_000 / per_second)
}

async fn guest_stats(shared: &Shared) -> Result<GuestStats, qmp::Error> {
    let blockstats = commands::QueryBlockstats::default();
    let (cpus, blocks, balloon) = tokio::join!(
        shared.qmp.call(&commands::QueryCpusFast),
        shared.qmp.call(&blockstats),
        shared.qmp.call(&commands::QueryBalloon),
    );
    let vcpus = cpus?
        .into_iter()
        .map(|cpu| VcpuStats {
            index: cpu.cpu_index,
            thread_id: cpu.thread_id,
            cpu_time: thread_cpu_time(shared.pid, cpu.thread_id),
        })
        .collect();
    let block_devices = blocks?
        .into_iter()
        .map(|block| BlockDeviceStats {
            device: block
                .device
                .filter(|name| !name.is_empty())
                .or(block.qdev)
                .or(block.node_name)
                .unwrap_or_default(),
            read_bytes: block.stats.rd_bytes,
            write_bytes: block.stats.wr_bytes,
            read_operations: block.stats.rd_operations,
            write_operations: block.stats.wr_operations,
        })
        .collect();
    let balloon_bytes = match balloon {
        Ok(info) => Some(info.actual),
        Err(qmp::Error::Qmp {
            class: ErrorClass::DeviceNotActive,
            ..
        }) => None,
        Err(error) => return Err(error),
    };
    Ok(GuestStats {
        vcpus,
        block_devices,
        balloon_bytes,
    })
}

fn thread_cpu_time(pid: u32, thread_id: i64) -> Option<Duration> {
    let usage = sys::thread_usage(pid, u32::try_from(thread_id).ok()?).ok()?;
    Some(ticks_to_duration(usage.user_ticks + usage.system_ticks))
}
