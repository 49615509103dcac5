//! Newline-delimited JSON framing for QMP.
//!
//! QEMU ends every message with `\r\n`. The decoder also accepts a bare `\n`, strips the
//! terminator and yields the line's bytes, so JSON parsing and the policy for invalid JSON stay
//! in the client. The encoder writes one JSON object without a trailing newline, because QEMU's
//! JSON stream parser does not need one. A newline that QEMU has not read when it exits (after
//! `quit`) would make the kernel reset the connection instead of closing it.

use std::fmt::Write as _;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::error::Error;

/// Default maximum line length: 16 MiB. The largest reply seen so far, `query-qmp-schema`, is
/// one line of 207,007 bytes on QEMU 7.2.22 (`-machine none`), so the default leaves room for
/// much larger schemas and replies.
pub const DEFAULT_MAX_LINE_LENGTH: usize = 16 * 1024 * 1024;

/// Line codec for a QMP stream, with a maximum line length.
///
/// A line longer than the maximum is never buffered whole: the decoder discards its bytes as
/// they arrive and, once its newline shows up, returns [`Error::LineTooLong`] with the line's
/// full size. The decoder is not meant to be used after an error.
#[derive(Debug, Clone)]
pub struct QmpCodec {
    max_line_length: usize,
    /// Bytes of `buf` already searched for a newline, so a line split across many reads is
    /// scanned once.
    searched: usize,
    /// Size of the oversized line being discarded, if any.
    discarding: Option<usize>,
}

impl QmpCodec {
    /// Creates a codec that rejects lines longer than `max_line_length` bytes (terminator
    /// excluded).
    pub fn new(max_line_length: usize) -> Self {
        Self {
            max_line_length,
            searched: 0,
            discarding: None,
        }
    }

    /// Returns the maximum line length in bytes.
    pub fn max_line_length(&self) -> usize {
        self.max_line_length
    }

    fn discard(
        &mut self,
        buf: &mut BytesMut,
        discarded_so_far: usize,
    ) -> Result<Option<Bytes>, Error> {
        match buf.iter().position(|&b| b == b'\n') {
            Some(newline) => {
                let size = discarded_so_far + trim_cr_len(&buf[..newline]);
                buf.advance(newline + 1);
                self.discarding = None;
                self.searched = 0;
                Err(Error::LineTooLong {
                    size,
                    max: self.max_line_length,
                })
            }
            None => {
                // Keep a final `\r`: if the newline comes next, it belongs to the terminator.
                let keep = usize::from(buf.last() == Some(&b'\r'));
                let dropped = buf.len() - keep;
                buf.advance(dropped);
                self.discarding = Some(discarded_so_far + dropped);
                Ok(None)
            }
        }
    }
}

impl Default for QmpCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_LINE_LENGTH)
    }
}

/// Length of `line` without one trailing `\r`.
fn trim_cr_len(line: &[u8]) -> usize {
    match line.last() {
        Some(b'\r') => line.len() - 1,
        _ => line.len(),
    }
}

impl Decoder for QmpCodec {
    type Item = Bytes;
    type Error = Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, Error> {
        loop {
            if let Some(discarded) = self.discarding {
                return self.discard(buf, discarded);
            }

            // Search one byte past the maximum: that byte may be the line's `\r` or `\n`.
            let limit = buf.len().min(self.max_line_length.saturating_add(2));
            let newline = buf[self.searched..limit]
                .iter()
                .position(|&b| b == b'\n')
                .map(|offset| self.searched + offset);

            let Some(newline) = newline else {
                if buf.len() > self.max_line_length.saturating_add(1) {
                    // No newline within the maximum: the line is too long whatever follows.
                    self.discarding = Some(0);
                    continue;
                }
                self.searched = limit;
                return Ok(None);
            };

            self.searched = 0;
            let mut line = buf.split_to(newline + 1);
            line.truncate(trim_cr_len(&line[..newline]));
            if line.len() > self.max_line_length {
                return Err(Error::LineTooLong {
                    size: line.len(),
                    max: self.max_line_length,
                });
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Ok(Some(line.freeze()));
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, Error> {
        if let Some(line) = self.decode(buf)? {
            return Ok(Some(line));
        }
        if let Some(discarded) = self.discarding.take() {
            let len = discarded + buf.len();
            buf.clear();
            return Err(Error::TruncatedLine { len });
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            buf.clear();
            return Ok(None);
        }
        let len = buf.len();
        buf.clear();
        self.searched = 0;
        Err(Error::TruncatedLine { len })
    }
}

/// One command request whose arguments are already serialized, so the hot path of
/// [`Client`](super::Client) writes it without building a JSON tree.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Request<'a> {
    /// QMP command name.
    pub name: &'a str,
    /// The `arguments` member as compact JSON, or `None` to leave it out.
    pub arguments: Option<&'a [u8]>,
    /// The `id` QEMU echoes in the reply.
    pub id: u64,
}

/// Writes `{"execute": NAME, "arguments": ..., "id": ID}` as compact JSON with no newline.
impl Encoder<Request<'_>> for QmpCodec {
    type Error = Error;

    fn encode(&mut self, request: Request<'_>, buf: &mut BytesMut) -> Result<(), Error> {
        let start = buf.len();
        buf.put_slice(br#"{"execute":"#);
        // The name is escaped as a JSON string. Writing into memory cannot fail, but if it did,
        // the partial request must not stay in the buffer and reach the peer.
        if let Err(error) = serde_json::to_writer(buf.writer(), request.name) {
            buf.truncate(start);
            return Err(std::io::Error::from(error).into());
        }
        if let Some(arguments) = request.arguments {
            buf.put_slice(br#","arguments":"#);
            buf.put_slice(arguments);
        }
        // `BytesMut` grows as needed, so formatting into it cannot fail.
        let _ = write!(buf, r#","id":{}}}"#, request.id);
        Ok(())
    }
}

/// Writes one outgoing QMP message as compact JSON with no newline.
impl Encoder<&serde_json::Value> for QmpCodec {
    type Error = Error;

    fn encode(&mut self, message: &serde_json::Value, buf: &mut BytesMut) -> Result<(), Error> {
        // Serializing a `Value` into memory fails only if the writer fails, and this one cannot.
        serde_json::to_writer(buf.writer(), message).map_err(std::io::Error::from)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `chunks` one at a time, as separate reads would, then signals EOF.
    fn decode_chunks(codec: &mut QmpCodec, chunks: &[&[u8]]) -> Vec<Result<Bytes, String>> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(line)) => out.push(Ok(line)),
                    Ok(None) => break,
                    Err(error) => {
                        out.push(Err(error.to_string()));
                        return out;
                    }
                }
            }
        }
        loop {
            match codec.decode_eof(&mut buf) {
                Ok(Some(line)) => out.push(Ok(line)),
                Ok(None) => break,
                Err(error) => {
                    out.push(Err(error.to_string()));
                    break;
                }
            }
        }
        out
    }

    fn line(text: &str) -> Result<Bytes, String> {
        Ok(Bytes::copy_from_slice(text.as_bytes()))
    }

    #[test]
    fn decode_crlf_and_lf() {
        let mut codec = QmpCodec::default();
        let out = decode_chunks(&mut codec, &[b"{\"a\": 1}\r\n{\"b\": 2}\n"]);
        assert_eq!(out, vec![line("{\"a\": 1}"), line("{\"b\": 2}")]);
    }

    #[test]
    fn decode_split_reads() {
        let mut codec = QmpCodec::default();
        let out = decode_chunks(
            &mut codec,
            &[b"{\"ret", b"urn\": {}", b"}\r", b"\n{}", b"\r\n"],
        );
        assert_eq!(out, vec![line("{\"return\": {}}"), line("{}")]);
    }

    #[test]
    fn decode_skips_blank_lines() {
        let mut codec = QmpCodec::default();
        let out = decode_chunks(&mut codec, &[b"\r\n\n{}\n  \r\n"]);
        assert_eq!(out, vec![line("{}")]);
    }

    #[test]
    fn decode_clean_eof() {
        let mut codec = QmpCodec::default();
        let out = decode_chunks(&mut codec, &[b"{}\r\n"]);
        assert_eq!(out, vec![line("{}")]);
    }

    #[test]
    fn decode_eof_mid_line() {
        let mut codec = QmpCodec::default();
        let mut buf = BytesMut::from(&b"{}\n{\"return\": "[..]);
        assert_eq!(
            codec.decode_eof(&mut buf).unwrap(),
            Some(Bytes::from_static(b"{}"))
        );
        let error = codec.decode_eof(&mut buf).unwrap_err();
        assert!(
            matches!(error, Error::TruncatedLine { len: 11 }),
            "{error:?}"
        );
    }

    #[test]
    fn decode_line_at_max() {
        let mut codec = QmpCodec::new(8);
        let out = decode_chunks(&mut codec, &[b"12345678\r\n"]);
        assert_eq!(out, vec![line("12345678")]);
    }

    #[test]
    fn decode_oversize_in_one_read() {
        let mut codec = QmpCodec::new(8);
        let mut buf = BytesMut::from(&b"123456789\r\n{}\n"[..]);
        let error = codec.decode(&mut buf).unwrap_err();
        assert!(
            matches!(error, Error::LineTooLong { size: 9, max: 8 }),
            "{error:?}"
        );
    }

    #[test]
    fn decode_oversize_discards_as_it_reads() {
        let mut codec = QmpCodec::new(8);
        let mut buf = BytesMut::new();
        for _ in 0..100 {
            buf.extend_from_slice(b"0123456789");
            assert_eq!(codec.decode(&mut buf).unwrap(), None);
            assert!(buf.len() <= 10, "buffer grew to {} bytes", buf.len());
        }
        buf.extend_from_slice(b"abc\r");
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        buf.extend_from_slice(b"\n{}\n");
        let error = codec.decode(&mut buf).unwrap_err();
        assert!(
            matches!(error, Error::LineTooLong { size: 1003, max: 8 }),
            "{error:?}"
        );
        assert_eq!(&buf[..], b"{}\n");
    }

    #[test]
    fn decode_oversize_then_eof() {
        let mut codec = QmpCodec::new(4);
        let out = decode_chunks(&mut codec, &[b"0123456789"]);
        assert_eq!(out.len(), 1);
        let message = out[0].clone().unwrap_err();
        assert!(
            message.contains("in the middle of a line (10 bytes"),
            "{message}"
        );
    }

    #[test]
    fn encode_has_no_newline() {
        let mut codec = QmpCodec::default();
        let mut buf = BytesMut::new();
        let message = serde_json::json!({"execute": "quit", "id": 3});
        codec.encode(&message, &mut buf).unwrap();
        assert_eq!(&buf[..], br#"{"execute":"quit","id":3}"#);
    }

    #[test]
    fn encode_request_bytes() {
        let mut codec = QmpCodec::default();
        let mut buf = BytesMut::new();
        let request = Request {
            name: "set_link\"",
            arguments: Some(br#"{"up":false}"#),
            id: 42,
        };
        codec.encode(request, &mut buf).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"execute": "set_link\"", "arguments": {"up": false}, "id": 42})
        );
        buf.clear();
        let request = Request {
            name: "query-status",
            arguments: None,
            id: 7,
        };
        codec.encode(request, &mut buf).unwrap();
        assert_eq!(&buf[..], br#"{"execute":"query-status","id":7}"#);
    }

    proptest! {
        #[test]
        fn decode_arbitrary_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            split in 0usize..512,
            max in 1usize..64,
        ) {
            let mut codec = QmpCodec::new(max);
            let split = split.min(bytes.len());
            let (first, second) = bytes.split_at(split);
            for line in decode_chunks(&mut codec, &[first, second]).into_iter().flatten() {
                prop_assert!(line.len() <= max);
                prop_assert!(!line.contains(&b'\n'));
            }
        }

        #[test]
        fn decode_split_points(
            values in proptest::collection::vec(any::<(u32, String, bool)>(), 1..8),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let lines: Vec<String> = values
                .iter()
                .map(|(id, text, flag)| serde_json::json!({"return": {"s": text, "f": flag}, "id": id}).to_string())
                .collect();
            let wire: Vec<u8> = lines.iter().flat_map(|l| format!("{l}\r\n").into_bytes()).collect();

            let mut positions: Vec<usize> = cuts.iter().map(|cut| cut.index(wire.len() + 1)).collect();
            positions.sort_unstable();
            let mut chunks = Vec::new();
            let mut start = 0;
            for position in positions {
                chunks.push(&wire[start..position]);
                start = position;
            }
            chunks.push(&wire[start..]);

            let mut codec = QmpCodec::default();
            let decoded = decode_chunks(&mut codec, &chunks);
            let expected: Vec<Result<Bytes, String>> = lines.iter().map(|l| line(l)).collect();
            prop_assert_eq!(decoded, expected);
        }
    }
}
