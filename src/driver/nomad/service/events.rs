//! The `TaskEvents` stream: driver messages shown as task events of type `Driver`.

use std::collections::HashMap;
use std::pin::Pin;
use std::time::SystemTime;

use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio::task::AbortHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::driver::nomad::proto::drivers::{DriverTaskEvent, TaskConfig};
use crate::driver::vm::{sys, VmEvent, VmState};

/// Events buffered per subscriber before the oldest are dropped.
const EVENT_BUFFER: usize = 256;

/// Stream type of the `TaskEvents` RPC.
pub type TaskEventStream = Pin<Box<dyn Stream<Item = Result<DriverTaskEvent, Status>> + Send>>;

/// Fans task events out to every open `TaskEvents` stream.
///
/// Nomad routes an event by its `alloc_id` and `task_name` and drops it when nothing matches.
#[derive(Debug, Clone)]
pub struct TaskEvents {
    sender: broadcast::Sender<DriverTaskEvent>,
}

impl Default for TaskEvents {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(EVENT_BUFFER).0,
        }
    }
}

impl TaskEvents {
    /// Sends `event` to every open stream. Without a stream the event is dropped, which is
    /// what Nomad does with events it cannot route.
    pub fn publish(&self, event: DriverTaskEvent) {
        // An error only means that no stream is open.
        let _ = self.sender.send(event);
    }

    /// Opens a stream that forwards published events until the client goes away or
    /// `shutdown` is cancelled. It never ends on its own, because Nomad reopens an ended
    /// stream at once, in a busy loop.
    pub fn subscribe(&self, shutdown: CancellationToken) -> TaskEventStream {
        let mut events = self.sender.subscribe();
        let (sender, receiver) = mpsc::channel(EVENT_BUFFER);

        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = sender.closed() => break,
                    event = events.recv() => event,
                };
                match event {
                    Ok(event) => {
                        if sender.send(Ok(event)).await.is_err() {
                            break;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(skipped)) => {
                        tracing::warn!(skipped, "task event stream fell behind, events dropped");
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        });

        Box::pin(ReceiverStream::new(receiver))
    }
}

/// The task a VM's events belong to. Nomad routes by `alloc_id` and `task_name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventTarget {
    task_id: String,
    alloc_id: String,
    task_name: String,
}

impl EventTarget {
    /// Returns the target of the task started with `config`.
    pub fn of(config: &TaskConfig) -> Self {
        Self {
            task_id: config.id.clone(),
            alloc_id: config.alloc_id.clone(),
            task_name: config.name.clone(),
        }
    }

    /// Builds the task event with `message` and `annotations`, stamped now.
    pub fn event(&self, message: String, annotations: HashMap<String, String>) -> DriverTaskEvent {
        DriverTaskEvent {
            task_id: self.task_id.clone(),
            alloc_id: self.alloc_id.clone(),
            task_name: self.task_name.clone(),
            timestamp: Some(SystemTime::now().into()),
            message,
            annotations,
        }
    }
}

impl TaskEvents {
    /// Publishes `message` as a task event of `target`.
    pub fn publish_message(&self, target: &EventTarget, message: String) {
        self.publish(target.event(message, HashMap::new()));
    }

    /// Forwards the VM events from `events` as task events of `target` until the VM exits or
    /// its event channel closes. Returns the handle that stops the forwarding.
    pub fn forward(
        &self,
        target: EventTarget,
        mut events: broadcast::Receiver<VmEvent>,
    ) -> AbortHandle {
        let sink = self.clone();
        let forwarder = tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(event) => {
                        if let Some((message, annotations)) = describe(&event) {
                            sink.publish(target.event(message, annotations));
                        }
                        if matches!(event, VmEvent::Exited(_)) {
                            break;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(skipped)) => {
                        tracing::warn!(task_id = %target.task_id, skipped, "VM events dropped before they became task events");
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        forwarder.abort_handle()
    }
}

/// Returns the task event text and annotations of a VM event, or `None` for events that are
/// not worth showing to the user.
pub fn describe(event: &VmEvent) -> Option<(String, HashMap<String, String>)> {
    let plain = |message: String| Some((message, HashMap::new()));
    match event {
        VmEvent::StateChanged {
            to: VmState::Paused,
            ..
        } => plain("VM paused (vCPUs stopped)".to_owned()),
        VmEvent::StateChanged {
            from: VmState::Paused,
            to: VmState::Running,
        } => plain("VM resumed (vCPUs continued)".to_owned()),
        VmEvent::StateChanged { .. } | VmEvent::QmpClosed => None,
        VmEvent::PowerdownSent => plain("Sent ACPI power button (system_powerdown)".to_owned()),
        VmEvent::GuestPoweredOff => plain("Guest powered off".to_owned()),
        VmEvent::TimedOut { after } => plain(format!(
            "Guest did not power off within {}",
            humantime::format_duration(*after)
        )),
        VmEvent::QuitSent => plain("Sent QMP quit".to_owned()),
        VmEvent::SignalSent(signal) => plain(format!("Sent {} to QEMU", sys::signal_name(*signal))),
        VmEvent::StepFailed { step, error } => Some((
            format!("Stop step {step} failed, moving on: {error}"),
            HashMap::from([
                ("step".to_owned(), (*step).to_owned()),
                ("error".to_owned(), error.clone()),
            ]),
        )),
        VmEvent::GuestPanicked => plain("Guest panicked".to_owned()),
        VmEvent::Exited(exit) => Some((
            format!("VM exited: {}", exit.reason),
            HashMap::from([("status".to_owned(), exit.status.to_string())]),
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;

    use super::*;
    use crate::driver::vm::{ExitReason, ForceStep, ProcessStatus, VmExit};

    fn event(message: &str) -> DriverTaskEvent {
        DriverTaskEvent {
            task_id: "a/web/01".into(),
            alloc_id: "a".into(),
            task_name: "web".into(),
            message: message.into(),
            ..DriverTaskEvent::default()
        }
    }

    #[tokio::test]
    async fn events_reach_every_stream() {
        let events = TaskEvents::default();
        let shutdown = CancellationToken::new();
        let mut first = events.subscribe(shutdown.clone());
        let mut second = events.subscribe(shutdown.clone());

        events.publish(event("creating disk overlay"));

        for stream in [&mut first, &mut second] {
            let received = stream.next().await.expect("stream open").expect("no error");
            assert_eq!(received.message, "creating disk overlay");
        }
    }

    #[test]
    fn describe_stop_steps() {
        let cases = [
            (
                VmEvent::PowerdownSent,
                "Sent ACPI power button (system_powerdown)",
            ),
            (
                VmEvent::TimedOut {
                    after: Duration::from_secs(5),
                },
                "Guest did not power off within 5s",
            ),
            (VmEvent::QuitSent, "Sent QMP quit"),
            (VmEvent::SignalSent(libc::SIGTERM), "Sent SIGTERM to QEMU"),
            (
                VmEvent::Exited(VmExit {
                    reason: ExitReason::GuestPoweredOff,
                    status: ProcessStatus::Exited(0),
                }),
                "VM exited: guest powered off",
            ),
        ];
        for (event, expected) in cases {
            let (message, _) = describe(&event).expect("event is shown");
            assert_eq!(message, expected);
        }
    }

    #[test]
    fn describe_skips_internal_states() {
        let starting = VmEvent::StateChanged {
            from: VmState::Starting,
            to: VmState::Running,
        };
        assert!(describe(&starting).is_none());
        assert!(describe(&VmEvent::QmpClosed).is_none());
    }

    #[tokio::test]
    async fn forward_publishes_until_exit() {
        let events = TaskEvents::default();
        let shutdown = CancellationToken::new();
        let mut stream = events.subscribe(shutdown.clone());
        let (vm_events, receiver) = broadcast::channel(8);
        let config = TaskConfig {
            id: "a/web/01".into(),
            alloc_id: "a".into(),
            name: "web".into(),
            ..TaskConfig::default()
        };
        let forwarder = events.forward(EventTarget::of(&config), receiver);

        vm_events.send(VmEvent::QuitSent).expect("receiver open");
        vm_events
            .send(VmEvent::Exited(VmExit {
                reason: ExitReason::Forced(ForceStep::Quit),
                status: ProcessStatus::Exited(0),
            }))
            .expect("receiver open");

        let first = stream.next().await.expect("open").expect("no error");
        assert_eq!(first.message, "Sent QMP quit");
        assert_eq!(first.alloc_id, "a");
        assert_eq!(first.task_name, "web");
        assert!(first.timestamp.is_some());
        let second = stream.next().await.expect("open").expect("no error");
        assert!(
            second.message.starts_with("VM exited"),
            "{}",
            second.message
        );
        assert_eq!(second.annotations["status"], "exit code 0");

        tokio::time::timeout(Duration::from_secs(5), async {
            while !forwarder.is_finished() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("forwarder ends after the exit event");
    }

    #[tokio::test(start_paused = true)]
    async fn events_stream_stays_open() {
        let events = TaskEvents::default();
        let shutdown = CancellationToken::new();
        let mut stream = events.subscribe(shutdown.clone());

        let idle = tokio::time::timeout(Duration::from_secs(3600), stream.next()).await;
        assert!(idle.is_err(), "stream yielded {idle:?} without an event");

        shutdown.cancel();
        assert!(stream.next().await.is_none(), "stream ends on shutdown");
    }
}
