//! Rendering of error chains for messages that leave the process (gRPC statuses, log fields,
//! fingerprint descriptions), where the caller cannot walk `source()` itself.

use std::error::Error;

/// Renders an error and its sources as `outer: inner: root`.
pub(crate) fn error_chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("start failed")]
    struct Outer(#[source] io::Error);

    #[test]
    fn chain_joins_sources() {
        let error = Outer(io::Error::new(io::ErrorKind::NotFound, "no such file"));
        assert_eq!(error_chain(&error), "start failed: no such file");
    }

    #[test]
    fn chain_of_single_error() {
        let error = io::Error::other("boom");
        assert_eq!(error_chain(&error), "boom");
    }
}
