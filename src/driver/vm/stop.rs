//! The stop ladder: `system_powerdown`, wait for the guest, then `quit`, a signal and SIGKILL.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::exit::{ForceStep, VmExit};
use super::state::VmState;
use super::sys;
use super::{Shared, VmError, VmEvent};
use crate::qmp::commands;

/// Maximum wait for the reply to `system_powerdown` (the whole wait is also capped by the stop
/// timeout). QEMU replies in under a millisecond when it is healthy.
const POWERDOWN_REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// Time from sending QMP `quit` (reply included) until the next step. QEMU 7.2 and 10.0 exit
/// within about 10 ms of `quit`.
const QUIT_EXIT_WAIT: Duration = Duration::from_millis(1000);

/// Time after the chosen signal until SIGKILL.
const SIGNAL_EXIT_WAIT: Duration = Duration::from_millis(1000);

/// Time after SIGKILL until the stop gives up. A SIGKILL ends even a stopped (SIGSTOP) process.
pub(crate) const KILL_EXIT_WAIT: Duration = Duration::from_millis(1000);

/// Upper bound on how long a stop runs past its timeout: the `quit`, signal and SIGKILL steps
/// (3 s) plus reading the final QMP events (0.2 s) and the exit status of a QEMU that is not
/// our child (1 s).
pub const STOP_MARGIN: Duration = Duration::from_millis(4500);

/// Deadline used in place of one that `Instant` cannot represent: about 30 years from now.
const FAR_FUTURE: Duration = Duration::from_secs(30 * 365 * 24 * 60 * 60);

/// Coordinates concurrent stops of one VM: one runs the ladder, the others join it.
#[derive(Debug, Default)]
pub(crate) struct StopControl {
    /// Held by the stop that runs the ladder.
    ladder: tokio::sync::Mutex<()>,
    /// Cancelled when a joining stop reaches its own deadline (at once for a forced stop), so
    /// that the running ladder skips the rest of its graceful wait.
    escalate: CancellationToken,
}

/// Returns `start + wait`, or a deadline about 30 years after `start` when the sum overflows,
/// so that a huge timeout means "wait practically forever" instead of a panic.
pub(crate) fn deadline_after(start: Instant, wait: Duration) -> Instant {
    start
        .checked_add(wait)
        .or_else(|| start.checked_add(FAR_FUTURE))
        .unwrap_or(start)
}

/// Stops the VM. `timeout` is `None` for a forced stop, which skips the graceful step.
///
/// When another stop runs the ladder already, this call joins it: it waits for that stop until
/// its own `timeout` has passed (at once for a forced stop), then makes the running ladder skip
/// the rest of its graceful wait, and returns the same exit. Should the running stop fail, this
/// call runs the forced steps once more, so its error describes steps it took itself.
pub(crate) async fn stop(
    shared: &Shared,
    timeout: Option<Duration>,
    signal: i32,
) -> Result<VmExit, VmError> {
    let started = Instant::now();
    let ladder = match shared.stop.ladder.try_lock() {
        Ok(guard) => guard,
        Err(_) => {
            let guard = join(shared, started, timeout).await;
            if shared.process.is_gone() {
                return Ok(shared.wait().await);
            }
            tracing::warn!(parent: &shared.span, pid = shared.pid, "the stop in progress failed; running the forced steps again");
            return run_ladder(shared, started, None, signal, guard).await;
        }
    };
    run_ladder(shared, started, timeout, signal, ladder).await
}

/// Waits for the stop that holds the ladder until it ends or until this caller's own deadline,
/// when it escalates that stop, and returns the ladder once it is free.
async fn join<'a>(
    shared: &'a Shared,
    started: Instant,
    timeout: Option<Duration>,
) -> tokio::sync::MutexGuard<'a, ()> {
    let deadline = deadline_after(started, timeout.unwrap_or(Duration::ZERO));
    tokio::select! {
        guard = shared.stop.ladder.lock() => return guard,
        () = tokio::time::sleep_until(deadline) => {}
    }
    tracing::info!(parent: &shared.span, pid = shared.pid, ?timeout, "escalating the stop in progress");
    shared.stop.escalate.cancel();
    shared.stop.ladder.lock().await
}

/// Runs the stop ladder while holding `_ladder`.
async fn run_ladder(
    shared: &Shared,
    started: Instant,
    timeout: Option<Duration>,
    signal: i32,
    _ladder: tokio::sync::MutexGuard<'_, ()>,
) -> Result<VmExit, VmError> {
    let operation = if timeout.is_some() { "stop" } else { "kill" };
    match shared.set_state(VmState::Stopping) {
        Ok(_) => {}
        Err(VmState::Exited) => return Ok(shared.wait().await),
        Err(state) => {
            return Err(VmError::InvalidState {
                vm: shared.name.clone(),
                operation,
                state,
            })
        }
    }
    tracing::info!(parent: &shared.span, pid = shared.pid, ?timeout, signal = %sys::signal_name(signal), "stopping VM");

    if let Some(timeout) = timeout {
        let deadline = deadline_after(started, timeout);
        let graceful = async {
            powerdown(shared, deadline).await;
            wait_until(shared, deadline).await
        };
        tokio::select! {
            powered_off = graceful => {
                if powered_off {
                    return Ok(shared.wait().await);
                }
                tracing::warn!(parent: &shared.span, ?timeout, "guest did not power off within the stop timeout");
                shared.emit(VmEvent::TimedOut { after: timeout });
            }
            () = shared.stop.escalate.cancelled() => {
                tracing::info!(parent: &shared.span, "a forced stop cut the graceful wait short");
            }
        }
    }

    shared.lock_evidence().forced = Some(ForceStep::Quit);
    let quit_deadline = deadline_after(Instant::now(), QUIT_EXIT_WAIT);
    match tokio::time::timeout_at(quit_deadline, shared.qmp.call(&commands::Quit)).await {
        Ok(Ok(_)) => shared.emit(VmEvent::QuitSent),
        Ok(Err(error)) => step_failed(shared, "quit", error.to_string()),
        Err(_) => step_failed(shared, "quit", "no reply before the deadline".into()),
    }
    if wait_until(shared, quit_deadline).await {
        return Ok(shared.wait().await);
    }

    for (signal, wait) in [(signal, SIGNAL_EXIT_WAIT), (libc::SIGKILL, KILL_EXIT_WAIT)] {
        shared.lock_evidence().forced = Some(ForceStep::Signal(signal));
        send_signal(shared, signal)?;
        if wait_until(shared, deadline_after(Instant::now(), wait)).await {
            return Ok(shared.wait().await);
        }
    }

    let error = VmError::StopFailed {
        vm: shared.name.clone(),
        pid: shared.pid,
    };
    tracing::error!(parent: &shared.span, error = %error, "stop failed");
    Err(error)
}

/// Sends `system_powerdown` and requires its reply, within the stop deadline.
///
/// ```text
/// -> {"execute": "system_powerdown", "id": 4}
/// <- {"timestamp": {...}, "event": "POWERDOWN"}
/// <- {"return": {}, "id": 4}
/// ```
async fn powerdown(shared: &Shared, deadline: Instant) {
    let reply_deadline = deadline.min(deadline_after(Instant::now(), POWERDOWN_REPLY_TIMEOUT));
    let call = shared.qmp.call(&commands::SystemPowerdown);
    match tokio::time::timeout_at(reply_deadline, call).await {
        Ok(Ok(_)) => {
            tracing::info!(parent: &shared.span, "system_powerdown sent");
            shared.emit(VmEvent::PowerdownSent);
        }
        Ok(Err(error)) => step_failed(shared, "system_powerdown", error.to_string()),
        Err(_) => step_failed(
            shared,
            "system_powerdown",
            "no reply before the deadline".into(),
        ),
    }
}

fn step_failed(shared: &Shared, step: &'static str, error: String) {
    tracing::warn!(parent: &shared.span, step, %error, "stop step failed; moving on");
    shared.emit(VmEvent::StepFailed { step, error });
}

/// Sends `signal` to QEMU's process group, unless QEMU has already ended (so a reused pid is
/// never signalled). SIGCONT follows, so that a stopped QEMU handles the signal now.
fn send_signal(shared: &Shared, signal: i32) -> Result<(), VmError> {
    if shared.process.is_gone() {
        return Ok(());
    }
    let name = sys::signal_name(signal);
    tracing::warn!(parent: &shared.span, pid = shared.pid, signal = %name, "signalling QEMU");
    sys::signal_process_group(shared.pid, signal).map_err(|source| VmError::Signal {
        pid: shared.pid,
        source,
    })?;
    shared.emit(VmEvent::SignalSent(signal));
    if signal != libc::SIGKILL && signal != libc::SIGCONT {
        sys::signal_process_group(shared.pid, libc::SIGCONT).map_err(|source| VmError::Signal {
            pid: shared.pid,
            source,
        })?;
    }
    Ok(())
}

/// Waits until QEMU has ended or `deadline` passes; returns whether it ended.
async fn wait_until(shared: &Shared, deadline: Instant) -> bool {
    tokio::time::timeout_at(deadline, shared.process.gone())
        .await
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_huge_timeout() {
        let start = Instant::now();
        let deadline = deadline_after(start, Duration::MAX);
        assert_eq!(deadline, start + FAR_FUTURE);
    }

    #[test]
    fn deadline_normal_timeout() {
        let start = Instant::now();
        let deadline = deadline_after(start, Duration::from_secs(5));
        assert_eq!(deadline - start, Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_huge_timeout_sleeps() {
        let deadline = deadline_after(Instant::now(), Duration::MAX);
        let slept = tokio::time::timeout(
            Duration::from_secs(3600),
            tokio::time::sleep_until(deadline),
        )
        .await;
        assert!(slept.is_err(), "a huge timeout ended within an hour");
    }
}
