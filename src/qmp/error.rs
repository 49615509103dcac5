//! The one error type of the QMP layer.

use std::io;
use std::time::Duration;

use super::commands::ErrorClass;

/// Errors from the QMP codec, session set-up and commands.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading from or writing to the QMP stream failed.
    #[error("QMP stream i/o failed")]
    Io(#[from] io::Error),

    /// The connection has ended, so pending and new commands fail.
    /// [`Client::close_reason`](super::Client::close_reason) returns the cause.
    #[error("QMP connection closed")]
    ConnectionClosed,

    /// A line from the peer is longer than the configured maximum. The session closes.
    #[error(
        "QMP line of {size} bytes exceeds the maximum of {max} bytes (raise `max_line_length`)"
    )]
    LineTooLong {
        /// Length of the line in bytes, without the line terminator.
        size: usize,
        /// The configured maximum line length in bytes.
        max: usize,
    },

    /// The peer closed the stream after a partial line.
    #[error("QMP peer closed the stream in the middle of a line ({len} bytes without a newline)")]
    TruncatedLine {
        /// Bytes received after the last newline.
        len: usize,
    },

    /// A command could not be encoded as JSON.
    #[error("failed to encode QMP command `{command}`")]
    Encode {
        /// QMP command name.
        command: String,
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },

    /// A reply is valid JSON but does not have the shape the command's reply type expects.
    #[error("invalid reply to QMP command `{command}`")]
    InvalidReply {
        /// QMP command name.
        command: String,
        /// The deserializer's error.
        #[source]
        source: serde_json::Error,
    },

    /// A message that has no place at this point of the session (for example a reply before
    /// the greeting).
    #[error("unexpected QMP message: {message}")]
    UnexpectedMessage {
        /// The message, truncated to a few hundred bytes.
        message: String,
    },

    /// The first message that is not an event is not a valid greeting.
    #[error("invalid QMP greeting: {message}")]
    InvalidGreeting {
        /// The message, truncated to a few hundred bytes.
        message: String,
    },

    /// The greeting or the `qmp_capabilities` reply did not arrive in time.
    #[error("QMP negotiation timed out after {after:?} (is another client connected?)")]
    NegotiationTimedOut {
        /// The deadline that passed.
        after: Duration,
    },

    /// No reply arrived before the command's deadline.
    #[error("QMP command `{command}` timed out after {after:?}")]
    TimedOut {
        /// QMP command name.
        command: String,
        /// The deadline that passed.
        after: Duration,
    },

    /// QEMU replied with an error object: `{"error": {"class": ..., "desc": ...}}`.
    #[error("QMP command `{command}` failed: {class}: {desc}")]
    Qmp {
        /// QMP command name.
        command: String,
        /// QEMU's error class, for example `CommandNotFound` or `GenericError`.
        class: ErrorClass,
        /// QEMU's human-readable description.
        desc: String,
    },
}

/// Shortens a message for inclusion in an error or a log line.
pub(crate) fn excerpt(text: &str) -> String {
    const MAX: usize = 256;
    if text.len() <= MAX {
        return text.to_owned();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &text[..end], text.len())
}
