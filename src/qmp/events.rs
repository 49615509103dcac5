//! Typed QMP events and the per-subscriber queues that deliver them.
//!
//! On the wire an event is one line:
//!
//! ```text
//! <- {"timestamp": {"seconds": 1718000000, "microseconds": 4321}, "event": "SHUTDOWN",
//!     "data": {"guest": true, "reason": "guest-shutdown"}}
//! ```
//!
//! # Queue policy
//!
//! Every subscriber has its own queue. Lifecycle events (see [`EventKind::is_lifecycle`]) are
//! always queued and never dropped. Other events count against the queue's capacity: when a
//! subscriber already has that many unread non-lifecycle events, a new one is dropped for that
//! subscriber only and counted in [`Events::dropped`]. Order is kept for the events that are
//! queued.

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;

/// Default capacity of a subscriber's queue for non-lifecycle events.
pub const DEFAULT_EVENT_QUEUE_CAPACITY: usize = 256;

/// The time at which QEMU emitted an event, as QEMU's `timestamp` object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

impl Timestamp {
    /// Converts the timestamp to a [`SystemTime`], or `None` when it is negative (QEMU sends
    /// `-1` when it could not read the clock).
    pub fn to_system_time(self) -> Option<SystemTime> {
        let seconds = u64::try_from(self.seconds).ok()?;
        let micros = u64::try_from(self.microseconds).ok()?;
        UNIX_EPOCH.checked_add(Duration::from_secs(seconds) + Duration::from_micros(micros))
    }
}

qapi_enum! {
    /// Why the guest shut down or reset: QAPI's `ShutdownCause`.
    ShutdownCause {
        None => "none",
        HostError => "host-error",
        HostQmpQuit => "host-qmp-quit",
        HostQmpSystemReset => "host-qmp-system-reset",
        HostSignal => "host-signal",
        HostUi => "host-ui",
        GuestShutdown => "guest-shutdown",
        GuestReset => "guest-reset",
        GuestPanic => "guest-panic",
        SubsystemReset => "subsystem-reset",
        SnapshotLoad => "snapshot-load",
    }
}

qapi_enum! {
    /// QEMU's action after a guest panic: QAPI's `GuestPanicAction`.
    GuestPanicAction {
        Pause => "pause",
        Poweroff => "poweroff",
        Run => "run",
    }
}

/// A QMP event with QEMU's timestamp.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// When QEMU emitted the event.
    pub timestamp: Timestamp,
    /// The event and its data.
    pub kind: EventKind,
}

/// The events the driver acts on, plus a catch-all for every other event.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum EventKind {
    /// `SHUTDOWN`: the guest or the host shut the VM down. QEMU exits next unless it runs with
    /// `-no-shutdown`.
    Shutdown {
        /// Whether the guest caused it.
        guest: bool,
        /// Why.
        reason: ShutdownCause,
    },
    /// `POWERDOWN`: the ACPI power button was pressed (`system_powerdown`).
    Powerdown,
    /// `RESET`: the VM was reset.
    Reset {
        /// Whether the guest caused it.
        guest: bool,
        /// Why.
        reason: ShutdownCause,
    },
    /// `STOP`: the vCPUs stopped.
    Stop,
    /// `RESUME`: the vCPUs run again.
    Resume,
    /// `GUEST_PANICKED`: the guest reported a panic through a pvpanic or Hyper-V device.
    GuestPanicked {
        /// The action QEMU takes next.
        action: GuestPanicAction,
        /// Architecture-specific panic information, as QEMU sent it.
        info: Option<Value>,
    },
    /// `BALLOON_CHANGE`: the guest's balloon reached a new size.
    BalloonChange {
        /// Guest RAM in bytes, after the balloon.
        actual: u64,
    },
    /// Any other event, or a known event whose data did not have the expected shape.
    Other {
        /// The event name as QEMU spells it.
        name: String,
        /// The `data` member, if any.
        data: Option<Value>,
    },
}

#[derive(Deserialize)]
struct ShutdownData {
    guest: bool,
    reason: ShutdownCause,
}

#[derive(Deserialize)]
struct PanicData {
    action: GuestPanicAction,
    info: Option<Value>,
}

#[derive(Deserialize)]
struct BalloonData {
    actual: u64,
}

impl EventKind {
    /// Builds the typed event from its wire name and `data` member. A known event whose data
    /// does not parse becomes [`EventKind::Other`], so no event is lost.
    pub fn from_wire(name: &str, data: Option<Value>) -> Self {
        let parsed = match name {
            "SHUTDOWN" => parse_data(&data).map(|d: ShutdownData| EventKind::Shutdown {
                guest: d.guest,
                reason: d.reason,
            }),
            "RESET" => parse_data(&data).map(|d: ShutdownData| EventKind::Reset {
                guest: d.guest,
                reason: d.reason,
            }),
            "GUEST_PANICKED" => parse_data(&data).map(|d: PanicData| EventKind::GuestPanicked {
                action: d.action,
                info: d.info,
            }),
            "BALLOON_CHANGE" => parse_data(&data)
                .map(|d: BalloonData| EventKind::BalloonChange { actual: d.actual }),
            "POWERDOWN" => Some(EventKind::Powerdown),
            "STOP" => Some(EventKind::Stop),
            "RESUME" => Some(EventKind::Resume),
            _ => None,
        };
        match parsed {
            Some(kind) => kind,
            None => {
                if is_lifecycle_name(name) || name == "BALLOON_CHANGE" {
                    tracing::warn!(event = name, data = ?data, "QMP event data has an unexpected shape; kept untyped");
                }
                EventKind::Other {
                    name: name.to_owned(),
                    data,
                }
            }
        }
    }

    /// Returns the event name as QEMU spells it.
    pub fn name(&self) -> &str {
        match self {
            EventKind::Shutdown { .. } => "SHUTDOWN",
            EventKind::Powerdown => "POWERDOWN",
            EventKind::Reset { .. } => "RESET",
            EventKind::Stop => "STOP",
            EventKind::Resume => "RESUME",
            EventKind::GuestPanicked { .. } => "GUEST_PANICKED",
            EventKind::BalloonChange { .. } => "BALLOON_CHANGE",
            EventKind::Other { name, .. } => name,
        }
    }

    /// Tells whether the event changes the VM's run state: SHUTDOWN, POWERDOWN, RESET, STOP,
    /// RESUME and GUEST_PANICKED. These are never dropped from a subscriber's queue.
    pub fn is_lifecycle(&self) -> bool {
        is_lifecycle_name(self.name())
    }
}

fn is_lifecycle_name(name: &str) -> bool {
    matches!(
        name,
        "SHUTDOWN" | "POWERDOWN" | "RESET" | "STOP" | "RESUME" | "GUEST_PANICKED"
    )
}

fn parse_data<T: for<'de> Deserialize<'de>>(data: &Option<Value>) -> Option<T> {
    T::deserialize(data.as_ref()?).ok()
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.name())
    }
}

/// State shared by one subscriber's sending and receiving ends.
#[derive(Debug)]
struct QueueCounters {
    capacity: usize,
    /// Non-lifecycle events queued and not yet received.
    queued: AtomicUsize,
    dropped: AtomicU64,
}

/// The sending end of one subscriber's queue, kept by the client's reader task.
#[derive(Debug)]
pub(crate) struct EventSender {
    tx: mpsc::UnboundedSender<Event>,
    counters: Arc<QueueCounters>,
}

impl EventSender {
    /// Queues `event` under the queue policy. Returns `false` once the subscriber is gone.
    pub(crate) fn send(&self, event: &Event) -> bool {
        if self.tx.is_closed() {
            return false;
        }
        if !event.kind.is_lifecycle() {
            let queued = self.counters.queued.load(Ordering::Acquire);
            if queued >= self.counters.capacity {
                let dropped = self.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::debug!(event = %event, dropped, "subscriber queue full; dropped a non-lifecycle QMP event");
                return true;
            }
            self.counters.queued.fetch_add(1, Ordering::AcqRel);
        }
        self.tx.send(event.clone()).is_ok()
    }
}

/// A subscription to the events of one QMP session.
///
/// [`Events::recv`] returns `None` once the session has ended and every queued event has been
/// received. It also implements [`futures::Stream`].
///
/// NOTE: lifecycle events are queued without bound, so a subscriber that stops reading keeps
/// them in memory until it is dropped. A guest that resets in a loop (a panic without
/// `-no-reboot`) sends an endless series of RESET events.
#[derive(Debug)]
pub struct Events {
    rx: mpsc::UnboundedReceiver<Event>,
    counters: Arc<QueueCounters>,
}

impl Events {
    /// Waits for the next event, or `None` once the session has ended and the queue is empty.
    pub async fn recv(&mut self) -> Option<Event> {
        let event = self.rx.recv().await?;
        self.on_received(&event);
        Some(event)
    }

    /// Returns how many non-lifecycle events were dropped because this queue was full.
    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }

    fn on_received(&self, event: &Event) {
        if !event.kind.is_lifecycle() {
            self.counters.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl futures::Stream for Events {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        let polled = self.rx.poll_recv(cx);
        if let Poll::Ready(Some(event)) = &polled {
            self.on_received(event);
        }
        polled
    }
}

/// Creates one subscriber queue with room for `capacity` non-lifecycle events.
pub(crate) fn channel(capacity: usize) -> (EventSender, Events) {
    let (tx, rx) = mpsc::unbounded_channel();
    let counters = Arc::new(QueueCounters {
        capacity,
        queued: AtomicUsize::new(0),
        dropped: AtomicU64::new(0),
    });
    (
        EventSender {
            tx,
            counters: Arc::clone(&counters),
        },
        Events { rx, counters },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn from_wire_typed() {
        let shutdown = EventKind::from_wire(
            "SHUTDOWN",
            Some(json!({"guest": true, "reason": "guest-shutdown"})),
        );
        assert_eq!(
            shutdown,
            EventKind::Shutdown {
                guest: true,
                reason: ShutdownCause::GuestShutdown
            }
        );
        let balloon = EventKind::from_wire("BALLOON_CHANGE", Some(json!({"actual": 100663296})));
        assert_eq!(balloon, EventKind::BalloonChange { actual: 100663296 });
        let panicked = EventKind::from_wire("GUEST_PANICKED", Some(json!({"action": "pause"})));
        assert_eq!(
            panicked,
            EventKind::GuestPanicked {
                action: GuestPanicAction::Pause,
                info: None
            }
        );
    }

    #[test]
    fn from_wire_unknown_reason() {
        let reset = EventKind::from_wire(
            "RESET",
            Some(json!({"guest": false, "reason": "new-cause"})),
        );
        assert_eq!(
            reset,
            EventKind::Reset {
                guest: false,
                reason: ShutdownCause::Other("new-cause".into())
            }
        );
    }

    #[test]
    fn from_wire_catch_all() {
        let data = json!({"device": "data0"});
        let kind = EventKind::from_wire("DEVICE_DELETED", Some(data.clone()));
        assert_eq!(
            kind,
            EventKind::Other {
                name: "DEVICE_DELETED".into(),
                data: Some(data)
            }
        );
        assert!(!kind.is_lifecycle());
    }

    #[test]
    fn from_wire_bad_data_kept() {
        let kind = EventKind::from_wire("SHUTDOWN", Some(json!({"guest": "yes"})));
        assert_eq!(kind.name(), "SHUTDOWN");
        assert!(matches!(kind, EventKind::Other { .. }), "{kind:?}");
        assert!(kind.is_lifecycle());
    }

    #[test]
    fn timestamp_to_system_time() {
        let timestamp = Timestamp {
            seconds: 10,
            microseconds: 5,
        };
        let expected = UNIX_EPOCH + Duration::from_micros(10_000_005);
        assert_eq!(timestamp.to_system_time(), Some(expected));
        let missing = Timestamp {
            seconds: -1,
            microseconds: -1,
        };
        assert_eq!(missing.to_system_time(), None);
    }
}
