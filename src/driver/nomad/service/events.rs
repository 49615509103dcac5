//! The `TaskEvents` stream: driver messages shown as task events of type `Driver`.

use std::pin::Pin;

use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::driver::nomad::proto::drivers::DriverTaskEvent;

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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;

    use super::*;

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
