//! One VM under control: QEMU command line, process, QMP session and lifecycle.
//!
//! [`Vm`] is the façade for the Nomad adapter, which needs no QMP knowledge to use it:
//!
//! * [`Vm::start`] spawns QEMU from a [`VmSpec`] and returns once QMP is negotiated.
//! * [`Vm::saved`] returns the [`SavedVm`] from which [`Vm::reattach`] adopts the running VM
//!   after a plugin restart, without restarting it.
//! * [`Vm::stop`] powers the guest off gracefully and escalates after the timeout;
//!   [`Vm::kill`] skips the graceful step, and [`Vm::press_power_button`] only asks the
//!   guest. [`Vm::pause`] and [`Vm::resume`] stop and continue the vCPUs.
//! * [`Vm::wait`] returns why the VM ended, the same [`VmExit`] for every caller.
//! * [`Vm::stats`] samples host and guest statistics within a deadline.
//! * [`Vm::events`] subscribes to [`VmEvent`]s, and [`Vm::state`] returns the [`VmState`].
//!
//! QEMU runs in its own session and outlives this process. Exit detection works without being
//! QEMU's parent: a pidfd reports when the process ends, and QMP events report why.

pub mod argv;
mod error;
mod event;
mod exit;
mod monitor;
mod saved;
mod spawn;
pub mod state;
mod stats;
mod stop;
pub mod sys;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::qmp::{self, commands, Client, Negotiating};

pub use error::VmError;
pub use event::VmEvent;
pub use exit::{ExitReason, ForceStep, ProcessStatus, VmExit};
pub use saved::{SavedVm, DEFAULT_REATTACH_TIMEOUT};
pub use spawn::{VmSpec, DEFAULT_START_TIMEOUT, OPERATOR_SOCKET_NAME, QMP_SOCKET_NAME};
pub use state::VmState;
pub use stats::{BlockDeviceStats, GuestStats, HostStats, VcpuStats, VmStats};
pub(crate) use stop::deadline_after;
pub use stop::STOP_MARGIN;
pub use sys::UserIds;

use exit::ExitEvidence;
use monitor::ProcessWatch;
use sys::RunDir;

/// Capacity of the [`VmEvent`] broadcast channel. A subscriber that falls further behind
/// misses the oldest events (`RecvError::Lagged`).
const EVENT_CHANNEL_CAPACITY: usize = 64;

/// How long a failed start waits for QEMU to exit by itself before it kills it.
const START_EXIT_GRACE: Duration = Duration::from_millis(500);

/// A running (or ended) VM. Clones share the VM.
///
/// Dropping the last clone closes the QMP connection and leaves QEMU running, so another
/// controller can adopt it with [`Vm::reattach`].
#[derive(Clone)]
pub struct Vm {
    handle: Arc<Handle>,
}

struct Handle {
    shared: Arc<Shared>,
    /// Stops the monitor task when the last `Vm` clone is dropped.
    _monitor_guard: DropGuard,
}

/// State shared by the `Vm` handles and the VM's monitor task.
struct Shared {
    name: String,
    pid: u32,
    start_time: u64,
    dir: RunDir,
    qmp: Client,
    state: Mutex<VmState>,
    evidence: Mutex<ExitEvidence>,
    events: broadcast::Sender<VmEvent>,
    process: ProcessWatch,
    /// QEMU's `/proc/PID/stat`, opened once for the host side of stats. `None` when it could not
    /// be opened, for example because QEMU already exited.
    stat_file: Option<sys::StatFile>,
    exit: watch::Receiver<Option<VmExit>>,
    stop: stop::StopControl,
    span: tracing::Span,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shared = &self.handle.shared;
        formatter
            .debug_struct("Vm")
            .field("name", &shared.name)
            .field("pid", &shared.pid)
            .field("state", &shared.current_state())
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Spawns QEMU and waits until its QMP session is negotiated.
    ///
    /// The greeting and negotiation share one deadline, `spec.start_timeout`, raced against
    /// QEMU exiting. On failure QEMU's process group is killed, the socket file is removed, and
    /// the error carries the last lines of QEMU's stderr when it is a regular file.
    pub async fn start(spec: VmSpec) -> Result<Vm, VmError> {
        let span = tracing::info_span!("vm", vm = %spec.name);
        let spawned = {
            let _entered = span.enter();
            spawn::spawn(&spec)?
        };
        let pid = spawned.pid;
        let process = ProcessWatch::start(spawned.pidfd, pid, span.clone());

        let alias = spawned.dir.alias(QMP_SOCKET_NAME);
        let connect = async {
            let stream = UnixStream::connect(&alias).await.map_err(qmp::Error::Io)?;
            let mut session = Negotiating::new(stream, qmp::Config::default());
            let events = session.subscribe();
            let client = session.negotiate(spec.start_timeout).await?;
            Ok::<_, qmp::Error>((client, events))
        };

        let outcome = tokio::select! {
            result = tokio::time::timeout(spec.start_timeout, connect) => Some(result),
            _ = process.gone() => None,
        };
        let qmp_error = match outcome {
            Some(Ok(Ok((client, events)))) => {
                let saved = SavedVm {
                    name: spec.name.clone(),
                    pid,
                    start_time: spawned.start_time,
                    dir: spec.dir.clone(),
                };
                return Vm::assemble(saved, spawned.dir, client, events, process, span).await;
            }
            Some(Ok(Err(error))) => Some(error),
            Some(Err(_)) | None => None,
        };

        // QEMU exited, timed out or broke the QMP handshake: leave nothing behind. A QMP error
        // usually means QEMU is exiting, so give it a moment to report its own status.
        let own_exit = process.status_within(START_EXIT_GRACE).await;
        if own_exit.is_none() {
            if let Err(error) = sys::signal_process_group(pid, libc::SIGKILL) {
                tracing::warn!(parent: &span, pid, %error, "failed to kill QEMU after a failed start");
            }
            process.status_within(stop::KILL_EXIT_WAIT).await;
        }
        if let Err(error) = spawn::remove_sockets(&spawned.dir) {
            tracing::warn!(parent: &span, %error, "failed to remove QMP sockets after a failed start");
        }
        let stderr_tail = spawned.stderr.tail();
        let error = match (own_exit, qmp_error) {
            (Some(status), _) => VmError::ExitedDuringStart {
                status,
                stderr_tail,
            },
            (None, Some(qmp::Error::NegotiationTimedOut { .. })) | (None, None) => {
                VmError::StartTimedOut {
                    after: spec.start_timeout,
                    stderr_tail,
                }
            }
            (None, Some(source)) => VmError::Qmp {
                vm: spec.name.clone(),
                source,
            },
        };
        // The caller handles the error and logs it, so it is logged only once.
        tracing::debug!(parent: &span, pid, error = %error, "VM start failed");
        Err(error)
    }

    /// Adopts a running VM from `saved` without restarting it.
    ///
    /// Checks that the pid still belongs to the same process (start time) and that QEMU reports
    /// the saved name, all within `timeout`. QMP accepts one client at a time, so this times out
    /// while another controller is connected to the VM's socket.
    pub async fn reattach(saved: &SavedVm, timeout: Duration) -> Result<Vm, VmError> {
        saved::reattach(saved, timeout).await
    }

    /// Builds the handle around a negotiated session and starts the monitor task.
    async fn assemble(
        saved: SavedVm,
        dir: RunDir,
        qmp: Client,
        qmp_events: qmp::Events,
        process: ProcessWatch,
        span: tracing::Span,
    ) -> Result<Vm, VmError> {
        let initial = match qmp
            .call_within(&commands::QueryStatus, qmp::DEFAULT_COMMAND_TIMEOUT)
            .await
        {
            Ok(status) if !status.running => VmState::Paused,
            Ok(_) => VmState::Running,
            Err(source) => {
                return Err(VmError::Command {
                    vm: saved.name.clone(),
                    source,
                })
            }
        };

        let (events, _) = broadcast::channel(EVENT_CHANNEL_CAPACITY);
        let (exit_tx, exit) = watch::channel(None);
        let shared = Arc::new(Shared {
            name: saved.name,
            pid: saved.pid,
            start_time: saved.start_time,
            dir,
            qmp,
            state: Mutex::new(VmState::Starting),
            evidence: Mutex::new(ExitEvidence::default()),
            events,
            process,
            stat_file: sys::StatFile::open(saved.pid).ok(),
            exit,
            stop: stop::StopControl::default(),
            span,
        });
        let cancel = CancellationToken::new();
        monitor::spawn(Arc::clone(&shared), qmp_events, exit_tx, cancel.clone());
        if let Err(state) = shared.set_state(initial) {
            tracing::debug!(parent: &shared.span, %state, "VM ended before it was reported ready");
        }
        tracing::info!(parent: &shared.span, pid = shared.pid, state = %initial, "VM ready");
        Ok(Vm {
            handle: Arc::new(Handle {
                shared,
                _monitor_guard: cancel.drop_guard(),
            }),
        })
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// Returns the VM name.
    pub fn name(&self) -> &str {
        &self.shared().name
    }

    /// Returns QEMU's pid, which is also its process group and session id.
    pub fn pid(&self) -> u32 {
        self.shared().pid
    }

    /// Returns the state a new controller needs to adopt this VM with [`Vm::reattach`].
    pub fn saved(&self) -> SavedVm {
        let shared = self.shared();
        SavedVm {
            name: shared.name.clone(),
            pid: shared.pid,
            start_time: shared.start_time,
            dir: shared.dir.path().to_path_buf(),
        }
    }

    /// Returns the current lifecycle state.
    pub fn state(&self) -> VmState {
        self.shared().current_state()
    }

    /// Subscribes to this VM's events from now on.
    pub fn events(&self) -> broadcast::Receiver<VmEvent> {
        self.shared().events.subscribe()
    }

    /// Waits until QEMU has ended and returns why. Every caller gets the same result.
    pub async fn wait(&self) -> VmExit {
        self.shared().wait().await
    }

    /// Returns the exit result if QEMU has ended, without waiting.
    pub fn try_exit(&self) -> Option<VmExit> {
        *self.shared().exit.borrow()
    }

    /// Stops the VM gracefully: `system_powerdown`, then waits up to `timeout` for the guest to
    /// power off, then QMP `quit`, then `signal` (Nomad's `kill_signal`), then SIGKILL, each to
    /// QEMU's process group.
    ///
    /// Returns within `timeout` + [`STOP_MARGIN`]. Each step is sent as a [`VmEvent`]. A call
    /// made while another stop runs joins that stop: at its own `timeout` it cuts the running
    /// stop's graceful wait short, and both return the same exit.
    pub async fn stop(&self, timeout: Duration, signal: i32) -> Result<VmExit, VmError> {
        stop::stop(self.shared(), Some(timeout), signal).await
    }

    /// Stops the VM without asking the guest: QMP `quit`, then SIGTERM, then SIGKILL.
    ///
    /// While a graceful [`Vm::stop`] runs, this cuts its wait for the guest short, so the
    /// forced steps start at once, and returns the same exit as that stop.
    pub async fn kill(&self) -> Result<VmExit, VmError> {
        stop::stop(self.shared(), None, libc::SIGTERM).await
    }

    /// Presses the guest's ACPI power button once (QMP `system_powerdown`) and returns. Unlike
    /// [`Vm::stop`] it neither waits for the guest nor escalates: the guest may ignore it.
    pub async fn press_power_button(&self) -> Result<(), VmError> {
        let shared = self.shared();
        let state = shared.current_state();
        if !matches!(state, VmState::Running | VmState::Paused) {
            return Err(VmError::InvalidState {
                vm: shared.name.clone(),
                operation: "press the power button of",
                state,
            });
        }
        shared
            .qmp
            .call(&commands::SystemPowerdown)
            .await
            .map_err(|source| VmError::Command {
                vm: shared.name.clone(),
                source,
            })?;
        tracing::info!(parent: &shared.span, "system_powerdown sent");
        shared.emit(VmEvent::PowerdownSent);
        Ok(())
    }

    /// Stops the guest's vCPUs (QMP `stop`).
    pub async fn pause(&self) -> Result<(), VmError> {
        self.shared()
            .run_command("pause", VmState::Paused, &commands::Stop)
            .await
    }

    /// Continues the guest's vCPUs (QMP `cont`).
    pub async fn resume(&self) -> Result<(), VmError> {
        self.shared()
            .run_command("resume", VmState::Running, &commands::Cont)
            .await
    }

    /// Samples host statistics from `/proc` and guest statistics over QMP.
    ///
    /// Returns within `deadline`. When QEMU does not reply in time, the sample is marked stale
    /// and carries only the host side.
    pub async fn stats(&self, deadline: Duration) -> VmStats {
        stats::sample(self.shared(), deadline).await
    }

    /// Samples only the host side: QEMU's CPU time and RSS from `/proc`, without QMP. Returns
    /// `None` once QEMU's `/proc` entry is gone.
    pub fn host_stats(&self) -> Option<HostStats> {
        stats::host_stats(self.shared())
    }
}

impl Shared {
    fn lock_state(&self) -> MutexGuard<'_, VmState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_evidence(&self) -> MutexGuard<'_, ExitEvidence> {
        self.evidence
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn current_state(&self) -> VmState {
        *self.lock_state()
    }

    /// Moves to `next` if the transition is allowed, and sends `StateChanged`. Returns the
    /// previous state, or the current one as the error when the move is not allowed. Moving to
    /// the current state is a no-op that succeeds.
    fn set_state(&self, next: VmState) -> Result<VmState, VmState> {
        let previous = {
            let mut state = self.lock_state();
            let previous = *state;
            if previous == next {
                return Ok(previous);
            }
            if !previous.can_transition_to(next) {
                return Err(previous);
            }
            *state = next;
            previous
        };
        tracing::info!(parent: &self.span, from = %previous, to = %next, "VM state changed");
        self.emit(VmEvent::StateChanged {
            from: previous,
            to: next,
        });
        Ok(previous)
    }

    fn emit(&self, event: VmEvent) {
        // Sending without subscribers is not an error.
        let _ = self.events.send(event);
    }

    async fn wait(&self) -> VmExit {
        let mut exit = self.exit.clone();
        loop {
            if let Some(result) = *exit.borrow_and_update() {
                return result;
            }
            if exit.changed().await.is_err() {
                // The monitor ended without a result: it only does that when cancelled, which
                // needs every handle dropped, so a caller here cannot see it. Report a crash
                // rather than hang.
                return VmExit {
                    reason: ExitReason::Crashed,
                    status: ProcessStatus::Unknown,
                };
            }
        }
    }

    /// Checks that `target` is reachable, runs `command`, then sets `target`.
    async fn run_command<C: qmp::Command>(
        &self,
        operation: &'static str,
        target: VmState,
        command: &C,
    ) -> Result<(), VmError> {
        let current = self.current_state();
        if current != target && !current.can_transition_to(target) {
            return Err(VmError::InvalidState {
                vm: self.name.clone(),
                operation,
                state: current,
            });
        }
        if let Err(source) = self.qmp.call(command).await {
            let error = VmError::Command {
                vm: self.name.clone(),
                source,
            };
            return Err(error);
        }
        self.set_state(target)
            .map_err(|state| VmError::InvalidState {
                vm: self.name.clone(),
                operation,
                state,
            })?;
        Ok(())
    }
}
