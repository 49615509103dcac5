//! Lifecycle events of one VM, for the layer above to turn into Nomad task events.

use std::time::Duration;

use super::exit::VmExit;
use super::state::VmState;

/// One step or observation in a VM's life, sent on the VM's broadcast channel.
#[derive(Debug, Clone, PartialEq)]
pub enum VmEvent {
    /// The VM moved between states.
    StateChanged {
        /// The previous state.
        from: VmState,
        /// The new state.
        to: VmState,
    },
    /// `system_powerdown` was sent and QEMU acknowledged it.
    PowerdownSent,
    /// The guest shut itself down (QMP `SHUTDOWN` with `guest: true`).
    GuestPoweredOff,
    /// The guest did not power off within the stop timeout.
    TimedOut {
        /// The timeout that passed.
        after: Duration,
    },
    /// QMP `quit` was sent.
    QuitSent,
    /// A signal was sent to QEMU's process group.
    SignalSent(i32),
    /// A stop step failed and the stop moved on to the next one.
    StepFailed {
        /// The step, such as `system_powerdown`.
        step: &'static str,
        /// The error text.
        error: String,
    },
    /// The QMP connection ended (QEMU exits right after, or crashed).
    QmpClosed,
    /// The guest reported a panic.
    GuestPanicked,
    /// QEMU has ended. This is the last event.
    Exited(VmExit),
}
