//! Exit detection: a pidfd watcher for the process, and the monitor task that turns QMP events
//! and the process status into state changes and the final [`VmExit`].

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::exit::{ProcessStatus, ShutdownKind, VmExit};
use super::spawn::remove_sockets;
use super::state::VmState;
use super::sys;
use super::{Shared, VmEvent};
use crate::qmp::{self, EventKind, ShutdownCause};

/// How long to wait for the exit status of a QEMU that is not our child, after it ended, for
/// its real parent to reap it (Linux 6.15 and later report the status through the pidfd then).
const EXIT_STATUS_WAIT: Duration = Duration::from_secs(1);

/// How long to wait for the exit status once a `SHUTDOWN` event has given the reason. A child is
/// reaped at once; a non-child's status is rarely worth a longer wait.
const STATUS_WAIT_AFTER_SHUTDOWN: Duration = Duration::from_millis(50);

/// Poll interval while waiting for another parent to reap QEMU.
const EXIT_STATUS_POLL: Duration = Duration::from_millis(10);

/// Poll interval of the `/proc` fallback.
const PROC_POLL: Duration = Duration::from_millis(100);

/// How long the monitor keeps reading QMP events after the process ended, so that a
/// `SHUTDOWN` sent just before the exit is not missed.
const EVENT_DRAIN_WAIT: Duration = Duration::from_millis(200);

/// Process-side exit detection for one QEMU, through its pidfd. Works whether or not this
/// process is QEMU's parent, and reaps QEMU when it is.
#[derive(Debug, Clone)]
pub(crate) struct ProcessWatch {
    gone: watch::Receiver<bool>,
    status: watch::Receiver<Option<ProcessStatus>>,
}

impl ProcessWatch {
    /// Starts the watcher task. It runs until QEMU ends, also after every `Vm` handle is
    /// dropped, so that a child QEMU never stays a zombie.
    pub fn start(pidfd: OwnedFd, pid: u32, span: tracing::Span) -> Self {
        let (gone_tx, gone) = watch::channel(false);
        let (status_tx, status) = watch::channel(None);
        tokio::spawn(
            async move {
                let status = watch_pidfd(pidfd, pid, &gone_tx).await;
                // Receivers may all be gone; the status then has no reader.
                let _ = gone_tx.send(true);
                let _ = status_tx.send(Some(status));
            }
            .instrument(span),
        );
        Self { gone, status }
    }

    /// Waits until the process has ended.
    pub async fn gone(&self) {
        let mut gone = self.gone.clone();
        // An error means the watcher task ended, which it only does after the process ended.
        let _ = gone.wait_for(|gone| *gone).await;
    }

    /// Returns whether the process has ended.
    pub fn is_gone(&self) -> bool {
        *self.gone.borrow()
    }

    /// Waits up to `limit` for the process to end and its status to be known.
    pub async fn status_within(&self, limit: Duration) -> Option<ProcessStatus> {
        let mut status = self.status.clone();
        let result = match tokio::time::timeout(limit, status.wait_for(Option::is_some)).await {
            Ok(Ok(value)) => *value,
            _ => None,
        };
        result
    }

    /// Waits for the final status.
    pub async fn status(&self) -> ProcessStatus {
        let mut status = self.status.clone();
        let result = match status.wait_for(Option::is_some).await {
            Ok(value) => value.unwrap_or(ProcessStatus::Unknown),
            Err(_) => ProcessStatus::Unknown,
        };
        result
    }
}

async fn watch_pidfd(pidfd: OwnedFd, pid: u32, gone: &watch::Sender<bool>) -> ProcessStatus {
    let pidfd = match sys::register_pidfd(pidfd) {
        Ok(pidfd) => pidfd,
        Err((pidfd, error)) => {
            tracing::error!(%error, pid, "failed to register the QEMU pidfd; polling instead");
            return poll_exit(pidfd, pid).await;
        }
    };
    // A pidfd becomes readable once the process has exited, and stays readable.
    if let Err(error) = pidfd.readable().await {
        tracing::warn!(%error, "waiting on the QEMU pidfd failed");
    }
    let _ = gone.send(true);

    match sys::reap_child(pidfd.get_ref().as_fd()) {
        Ok(Some(status)) => return Some(status).into(),
        Ok(None) => {}
        Err(error) => tracing::warn!(%error, "failed to reap QEMU"),
    }
    // Not our child: its parent reaps it, after which the kernel may report the status.
    let deadline = tokio::time::Instant::now() + EXIT_STATUS_WAIT;
    loop {
        match sys::exit_status_from_pidfd(pidfd.get_ref().as_fd()) {
            Ok(Some(status)) => return Some(status).into(),
            Ok(None) => {}
            Err(error) => {
                tracing::debug!(%error, "reading the exit status from the pidfd failed");
                return ProcessStatus::Unknown;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return ProcessStatus::Unknown;
        }
        tokio::time::sleep(EXIT_STATUS_POLL).await;
    }
}

/// Waits for process `pid` to end by polling, the fallback when the pidfd cannot be registered
/// with the runtime. Reaps a child; the status of a non-child seen this way is not known.
async fn poll_exit(pidfd: OwnedFd, pid: u32) -> ProcessStatus {
    let started = sys::process_start_time(pid).ok();
    loop {
        if let Ok(Some(status)) = sys::reap_child(pidfd.as_fd()) {
            return Some(status).into();
        }
        if started.is_none() || sys::process_start_time(pid).ok() != started {
            return ProcessStatus::Unknown;
        }
        tokio::time::sleep(PROC_POLL).await;
    }
}

/// Starts the monitor task of one VM.
pub(crate) fn spawn(
    shared: Arc<Shared>,
    events: qmp::Events,
    exit_tx: watch::Sender<Option<VmExit>>,
    cancel: CancellationToken,
) {
    let span = shared.span.clone();
    tokio::spawn(
        async move {
            tokio::select! {
                _ = cancel.cancelled() => {
                    tracing::debug!("VM handle dropped; QMP connection closed, QEMU left running");
                }
                _ = run(&shared, events, &exit_tx) => {}
            }
        }
        .instrument(span),
    );
}

async fn run(shared: &Shared, mut events: qmp::Events, exit_tx: &watch::Sender<Option<VmExit>>) {
    let mut qmp_open = true;
    loop {
        tokio::select! {
            event = events.recv(), if qmp_open => match event {
                Some(event) => on_event(shared, event.kind),
                None => {
                    qmp_open = false;
                    tracing::debug!("QMP connection closed");
                    shared.emit(VmEvent::QmpClosed);
                }
            },
            _ = shared.process.gone() => break,
        }
    }

    if qmp_open {
        let drain = async {
            while let Some(event) = events.recv().await {
                on_event(shared, event.kind);
            }
        };
        let _ = tokio::time::timeout(EVENT_DRAIN_WAIT, drain).await;
    }

    // After a SHUTDOWN event the reason is known, and the status only adds the exit code. For a
    // QEMU that is not our child the status needs another parent to reap it, which can take long,
    // so it is awaited briefly. Without the event the status is the only evidence.
    let shutdown_seen = shared.lock_evidence().shutdown.is_some();
    let status = if shutdown_seen {
        shared
            .process
            .status_within(STATUS_WAIT_AFTER_SHUTDOWN)
            .await
            .unwrap_or(ProcessStatus::Unknown)
    } else {
        shared.process.status().await
    };
    let reason = shared.lock_evidence().reason(status);
    let exit = VmExit { reason, status };
    if let Err(error) = remove_sockets(&shared.dir) {
        tracing::warn!(%error, "failed to remove the QMP sockets of an ended VM");
    }
    tracing::info!(pid = shared.pid, reason = %exit.reason, status = %exit.status, "VM exited");
    let _ = shared.set_state(VmState::Exited);
    let _ = exit_tx.send(Some(exit));
    shared.emit(VmEvent::Exited(exit));
}

fn on_event(shared: &Shared, event: EventKind) {
    match event {
        EventKind::Shutdown { guest, reason } => {
            tracing::info!(guest, reason = %reason, "QMP SHUTDOWN event");
            let kind = shutdown_kind(&reason);
            shared.lock_evidence().shutdown = Some((guest, kind));
            if guest && kind == ShutdownKind::GuestShutdown {
                shared.emit(VmEvent::GuestPoweredOff);
            }
        }
        EventKind::GuestPanicked { action, .. } => {
            tracing::warn!(action = %action, "guest panicked");
            shared.lock_evidence().panicked = true;
            shared.emit(VmEvent::GuestPanicked);
        }
        EventKind::Stop => {
            if shared.current_state() == VmState::Running {
                let _ = shared.set_state(VmState::Paused);
            }
        }
        EventKind::Resume => {
            if shared.current_state() == VmState::Paused {
                let _ = shared.set_state(VmState::Running);
            }
        }
        other => tracing::debug!(event = other.name(), "QMP event"),
    }
}

fn shutdown_kind(reason: &ShutdownCause) -> ShutdownKind {
    match reason {
        ShutdownCause::GuestShutdown => ShutdownKind::GuestShutdown,
        ShutdownCause::GuestReset => ShutdownKind::GuestReset,
        ShutdownCause::GuestPanic => ShutdownKind::GuestPanic,
        ShutdownCause::HostQmpQuit => ShutdownKind::HostQmpQuit,
        ShutdownCause::HostSignal => ShutdownKind::HostSignal,
        _ => ShutdownKind::Other,
    }
}
