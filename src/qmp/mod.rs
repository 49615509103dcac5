//! Async QMP client: line codec, session set-up, command routing and typed events.
//!
//! QMP is newline-delimited JSON over a stream. After the greeting, the client leaves
//! negotiation mode with `qmp_capabilities`, then sends commands with an `id` that QEMU echoes
//! in the reply. Events can arrive at any time, also before the greeting:
//!
//! ```text
//! <- {"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "..."},
//!             "capabilities": ["oob"]}}
//! -> {"execute": "qmp_capabilities", "id": 0}
//! <- {"return": {}, "id": 0}
//! -> {"execute": "stop", "id": 1}
//! <- {"timestamp": {"seconds": 1718000000, "microseconds": 52114}, "event": "STOP"}
//! <- {"return": {}, "id": 1}
//! ```
//!
//! The layers are [`codec`] (framing with a maximum line length), [`client`] (negotiation as a
//! typed step, one reader task, replies routed by `id`, a deadline on every command) and
//! [`events`] (typed events, per-subscriber queues). [`commands`] contains the typed commands.
//!
//! ```no_run
//! use std::time::Duration;
//! use nomad_driver_qemu::qmp::{commands, Config, EventKind, Negotiating};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let stream = tokio::net::UnixStream::connect("qmp.sock").await?;
//! let mut session = Negotiating::new(stream, Config::default());
//! let mut events = session.subscribe();
//! let client = session.negotiate(Duration::from_secs(5)).await?;
//!
//! let status = client.call(&commands::QueryStatus).await?;
//! println!("QEMU {:?} is {}", client.greeting().version.qemu, status.status);
//!
//! client.call_within(&commands::SystemPowerdown, Duration::from_secs(1)).await?;
//! while let Some(event) = events.recv().await {
//!     if let EventKind::Shutdown { reason, .. } = event.kind {
//!         println!("shut down: {reason}");
//!     }
//! }
//! println!("session ended: {}", client.closed().await);
//! # Ok(())
//! # }
//! ```

/// Defines a QAPI string enum: one variant per known value, spelled as QEMU spells it, and
/// `Other` for values added by newer QEMU versions.
macro_rules! qapi_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $wire:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum $name {
            $(
                #[doc = concat!("`", $wire, "`")]
                $variant,
            )*
            /// A value not known to this crate, as QEMU spelled it.
            Other(String),
        }

        impl $name {
            /// Returns the value as QEMU spells it.
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$variant => $wire,)*
                    Self::Other(value) => value,
                }
            }
        }

        impl From<&str> for $name {
            fn from(value: &str) -> Self {
                match value {
                    $($wire => Self::$variant,)*
                    other => Self::Other(other.to_owned()),
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::serde::Serialize for $name {
            fn serialize<S: ::serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let value = <::std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                Ok(Self::from(value.as_ref()))
            }
        }
    };
}

pub mod client;
pub mod codec;
pub mod commands;
pub mod error;
pub mod events;

pub use client::{
    Client, CloseReason, Config, Greeting, Negotiating, SessionCounters, DEFAULT_COMMAND_TIMEOUT,
};
pub use codec::{QmpCodec, DEFAULT_MAX_LINE_LENGTH};
pub use commands::{Command, ErrorClass, RunState};
pub use error::Error;
pub use events::{
    Event, EventKind, Events, GuestPanicAction, ShutdownCause, Timestamp,
    DEFAULT_EVENT_QUEUE_CAPACITY,
};
