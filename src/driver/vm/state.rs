//! The lifecycle states of one VM and the one rule for moving between them.

use std::fmt;

/// Lifecycle state of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmState {
    /// QEMU is spawned and the QMP session is being set up.
    Starting,
    /// The guest's vCPUs run.
    Running,
    /// The vCPUs are stopped by QMP `stop`; QEMU is alive.
    Paused,
    /// A graceful or forced stop is in progress.
    Stopping,
    /// QEMU has ended. Final: nothing leaves this state.
    Exited,
}

impl VmState {
    /// Returns whether a VM in `self` may move to `next`.
    ///
    /// QEMU can exit on its own from every live state (guest power-off, crash, outside signal),
    /// so every state except `Exited` may move to `Exited`.
    pub fn can_transition_to(self, next: VmState) -> bool {
        use VmState::*;
        match (self, next) {
            (Exited, _) => false,
            (_, Exited) => true,
            (Starting, Running | Paused | Stopping) => true,
            (Running, Paused | Stopping) => true,
            (Paused, Running | Stopping) => true,
            _ => false,
        }
    }

    /// Returns whether QEMU is (or may still be) alive in this state.
    pub fn is_live(self) -> bool {
        self != VmState::Exited
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Exited => "exited",
        };
        formatter.write_str(name)
    }
}

#[cfg(test)]
mod tests {
    use super::VmState::{self, *};

    const ALL: [VmState; 5] = [Starting, Running, Paused, Stopping, Exited];

    #[test]
    fn transition_every_pair() {
        let allowed = [
            (Starting, Running),
            (Starting, Paused),
            (Starting, Stopping),
            (Starting, Exited),
            (Running, Paused),
            (Running, Stopping),
            (Running, Exited),
            (Paused, Running),
            (Paused, Stopping),
            (Paused, Exited),
            (Stopping, Exited),
        ];
        for from in ALL {
            for to in ALL {
                let expected = allowed.contains(&(from, to));
                assert_eq!(
                    from.can_transition_to(to),
                    expected,
                    "{from} -> {to} should be {}",
                    if expected { "allowed" } else { "rejected" }
                );
            }
        }
    }

    #[test]
    fn exited_is_final() {
        assert!(!Exited.is_live());
        assert!(ALL.iter().all(|&to| !Exited.can_transition_to(to)));
    }
}
