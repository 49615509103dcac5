//! The state saved for a running VM, and adopting the VM from it after a restart.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;

use super::error::VmError;
use super::monitor::ProcessWatch;
use super::spawn::QMP_SOCKET_NAME;
use super::sys::{self, RunDir};
use super::Vm;
use crate::qmp::{self, commands, Negotiating};

/// Default bound on [`Vm::reattach`].
pub const DEFAULT_REATTACH_TIMEOUT: Duration = Duration::from_secs(5);

/// What a new controller needs to adopt a running VM. Serialize it with the task handle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedVm {
    /// VM name, which QEMU must report through `query-name`.
    pub name: String,
    /// QEMU's pid, also its process group id.
    pub pid: u32,
    /// QEMU's start time in clock ticks after boot (`/proc/PID/stat` field 22), which tells
    /// QEMU apart from a later process that reuses its pid.
    pub start_time: u64,
    /// Run directory that holds the QMP socket.
    pub dir: PathBuf,
}

pub(crate) async fn reattach(saved: &SavedVm, timeout: Duration) -> Result<Vm, VmError> {
    let span = tracing::info_span!("vm", vm = %saved.name);
    let attempt = async {
        let pidfd = open_checked_pidfd(saved)?;
        let dir = RunDir::open(&saved.dir).map_err(|source| VmError::OpenRunDir {
            path: saved.dir.clone(),
            source,
        })?;
        let process = ProcessWatch::start(pidfd, saved.pid, span.clone());

        let qmp_error = |source| VmError::Qmp {
            vm: saved.name.clone(),
            source,
        };
        let stream = UnixStream::connect(dir.alias(QMP_SOCKET_NAME))
            .await
            .map_err(|error| qmp_error(qmp::Error::Io(error)))?;
        let mut session = Negotiating::new(stream, qmp::Config::default());
        let events = session.subscribe();
        let client = session.negotiate(timeout).await.map_err(qmp_error)?;

        let name = client
            .call(&commands::QueryName)
            .await
            .map_err(|source| VmError::Command {
                vm: saved.name.clone(),
                source,
            })?;
        if name.name.as_deref() != Some(saved.name.as_str()) {
            return Err(VmError::NameMismatch {
                socket: saved.dir.join(QMP_SOCKET_NAME),
                expected: saved.name.clone(),
                found: name.name,
            });
        }
        Vm::assemble(saved.clone(), dir, client, events, process, span.clone()).await
    };

    let result = match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(VmError::ReattachTimedOut {
            vm: saved.name.clone(),
            after: timeout,
        }),
    };
    match &result {
        Ok(_) => tracing::info!(parent: &span, pid = saved.pid, "VM reattached"),
        Err(error) => tracing::warn!(parent: &span, pid = saved.pid, %error, "VM reattach failed"),
    }
    result
}

/// Opens a pidfd for the saved pid and checks, after opening it, that the process is still the
/// one that was saved. A check after the open closes the window in which the pid could be
/// reused between the check and the open.
fn open_checked_pidfd(saved: &SavedVm) -> Result<std::os::fd::OwnedFd, VmError> {
    let mismatch = |detail: String| VmError::ProcessMismatch {
        vm: saved.name.clone(),
        pid: saved.pid,
        detail,
    };
    let pidfd = sys::pidfd_open(saved.pid)
        .map_err(|error| mismatch(format!("the process is gone ({error})")))?;
    match sys::process_start_time(saved.pid) {
        Ok(start_time) if start_time == saved.start_time => Ok(pidfd),
        Ok(start_time) => Err(mismatch(format!(
            "its start time is {start_time}, the saved QEMU started at {}",
            saved.start_time
        ))),
        Err(error) => Err(mismatch(format!("the process is gone ({error})"))),
    }
}
