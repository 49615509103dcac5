//! Log output in go-hclog's JSON format, the format Nomad's plugin client parses on stderr.
//!
//! Each event becomes one JSON object on one line:
//!
//! ```text
//! {"@level":"info","@message":"plugin serving","@module":"nomad_driver_qemu::driver::nomad::plugin","@timestamp":"2026-08-21T12:34:56.123456Z","socket":"/tmp/plugin1a2b3c"}
//! ```
//!
//! The client re-emits the record through the agent's logger at `@level`. It rejects a
//! timestamp that does not have exactly six fractional digits, and a non-string `@level`,
//! `@message` or `@timestamp` crashes go-plugin's reader (go-plugin v1.8.0 `client.go`), so those
//! three keys are always strings here. Fields of the enclosing spans and of the event follow
//! as JSON values, the innermost value winning on a name clash.
//!
//! Write errors are ignored: after the agent dies, stderr is a pipe without a reader and every
//! write fails with `EPIPE`.

use std::error::Error as StdError;
use std::fmt;
use std::io::Write;
use std::time::SystemTime;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Record};
use tracing::{Event, Id, Level, Subscriber};
use tracing_subscriber::filter::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::report::error_chain;

/// Level used when `RUST_LOG` is unset or invalid.
const DEFAULT_FILTER: &str = "info";

/// Failure to install the global log subscriber.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// Another global subscriber was installed first.
    #[error("failed to install the log subscriber")]
    Install(#[source] tracing_subscriber::util::TryInitError),
}

/// Installs the hclog JSON layer on stderr as the global subscriber.
///
/// The filter comes from `RUST_LOG` (`tracing_subscriber` directive syntax, for example
/// `info` or `nomad_driver_qemu=debug`). When it is unset the level is `info`; when it is
/// invalid the level is `info` and a warning names the bad value. A panic is logged as an
/// `error` record, because the client would otherwise show the default panic text at a level
/// of its own choosing.
pub fn install() -> Result<(), LoggingError> {
    let (filter, invalid_filter) = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => match EnvFilter::try_new(&directives) {
            Ok(filter) => (filter, None),
            Err(error) => (EnvFilter::new(DEFAULT_FILTER), Some((directives, error))),
        },
        _ => (EnvFilter::new(DEFAULT_FILTER), None),
    };

    tracing_subscriber::registry()
        .with(filter)
        .with(HclogLayer::new(std::io::stderr))
        .try_init()
        .map_err(LoggingError::Install)?;

    if let Some((directives, error)) = invalid_filter {
        tracing::warn!(
            rust_log = %directives,
            error = %error,
            "invalid RUST_LOG, logging at info; fix the value or unset it"
        );
    }

    std::panic::set_hook(Box::new(|info| {
        tracing::error!(panic = %info, "plugin panicked");
    }));

    Ok(())
}

/// A [`Layer`] that writes every event as one hclog JSON line to the writer `make_writer`
/// returns.
pub struct HclogLayer<W> {
    make_writer: W,
}

impl<W> HclogLayer<W>
where
    W: for<'writer> MakeWriter<'writer> + 'static,
{
    /// Creates a layer writing to `make_writer`, for example `std::io::stderr`.
    pub fn new(make_writer: W) -> Self {
        Self { make_writer }
    }
}

/// Fields recorded on a span, stored in its extensions until the span closes.
struct SpanFields(Map<String, Value>);

impl<S, W> Layer<S> for HclogLayer<W>
where
    S: Subscriber + for<'lookup> LookupSpan<'lookup>,
    W: for<'writer> MakeWriter<'writer> + 'static,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut visitor = JsonVisitor::default();
        attrs.record(&mut visitor);
        span.extensions_mut().insert(SpanFields(visitor.fields));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut extensions = span.extensions_mut();
        if let Some(SpanFields(fields)) = extensions.get_mut::<SpanFields>() {
            let mut visitor = JsonVisitor {
                fields: std::mem::take(fields),
                message: None,
            };
            values.record(&mut visitor);
            *fields = visitor.fields;
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut record = Map::new();

        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(SpanFields(fields)) = span.extensions().get::<SpanFields>() {
                    record.extend(fields.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
        }

        let mut visitor = JsonVisitor::default();
        event.record(&mut visitor);
        record.extend(visitor.fields);

        let metadata = event.metadata();
        record.insert("@level".into(), level_name(metadata.level()).into());
        record.insert(
            "@message".into(),
            visitor.message.unwrap_or_default().into(),
        );
        record.insert("@module".into(), metadata.target().into());
        record.insert(
            "@timestamp".into(),
            format_timestamp(SystemTime::now()).into(),
        );

        let mut line = match serde_json::to_vec(&record) {
            Ok(line) => line,
            Err(_) => return,
        };
        line.push(b'\n');
        // Ignored on purpose: a log line that cannot be written has nowhere else to go.
        let _ = self.make_writer.make_writer().write_all(&line);
    }
}

/// Returns hclog's name for `level`.
fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::TRACE => "trace",
        Level::DEBUG => "debug",
        Level::INFO => "info",
        Level::WARN => "warn",
        Level::ERROR => "error",
    }
}

/// Formats `time` in UTC with exactly six fractional digits, as hclog's parser requires.
fn format_timestamp(time: SystemTime) -> String {
    humantime::format_rfc3339_micros(time).to_string()
}

/// Collects tracing fields as JSON values and the `message` field as text.
#[derive(Default)]
struct JsonVisitor {
    fields: Map<String, Value>,
    message: Option<String>,
}

impl JsonVisitor {
    fn insert(&mut self, field: &Field, value: Value) {
        self.fields.insert(field.name().to_owned(), value);
    }
}

impl Visit for JsonVisitor {
    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity, so those are written as text.
        let json = serde_json::Number::from_f64(value)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(value.to_string()));
        self.insert(field, json);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.insert(field, value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.insert(field, value.into());
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        let json = i64::try_from(value)
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(value.to_string()));
        self.insert(field, json);
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        let json = u64::try_from(value)
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(value.to_string()));
        self.insert(field, json);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.insert(field, value.into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = Some(value.to_owned());
        } else {
            self.insert(field, value.into());
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn StdError + 'static)) {
        self.insert(field, error_chain(value).into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.message = Some(text);
        } else {
            self.insert(field, text.into());
        }
    }
}


#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    /// A writer that appends to a shared buffer, so a test can read what the layer wrote.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Captured {
        fn lines(&self) -> Vec<Value> {
            let bytes = self.0.lock().expect("buffer lock poisoned").clone();
            let text = String::from_utf8(bytes).expect("log output is UTF-8");
            text.lines()
                .map(|line| serde_json::from_str(line).expect("each line is JSON"))
                .collect()
        }
    }

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .expect("buffer lock poisoned")
                .extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;

        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    /// A writer whose reader is gone, like stderr after the agent died. It counts the writes
    /// it rejected.
    #[derive(Clone, Default)]
    struct BrokenPipe(Arc<AtomicUsize>);

    impl io::Write for BrokenPipe {
        fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }

        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
    }

    fn capture(emit: impl FnOnce()) -> Vec<Value> {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::registry()
            .with(HclogLayer::new(captured.clone()))
            .with(tracing_subscriber::filter::LevelFilter::TRACE);
        tracing::subscriber::with_default(subscriber, emit);
        captured.lines()
    }

    #[test]
    fn timestamp_has_six_fraction_digits() {
        let time = UNIX_EPOCH + Duration::new(1_787_315_696, 123_456_789);
        assert_eq!(format_timestamp(time), "2026-08-21T12:34:56.123456Z");

        let whole_second = UNIX_EPOCH + Duration::from_secs(1_787_315_696);
        assert_eq!(
            format_timestamp(whole_second),
            "2026-08-21T12:34:56.000000Z"
        );
    }

    #[test]
    fn event_has_hclog_keys() {
        let lines = capture(|| tracing::info!(task_id = "a/b/c", attempt = 3, "task started"));

        assert_eq!(lines.len(), 1);
        let line = &lines[0];
        assert_eq!(line["@level"], "info");
        assert_eq!(line["@message"], "task started");
        assert_eq!(line["@module"], module_path!());
        assert_eq!(line["task_id"], "a/b/c");
        assert_eq!(line["attempt"], 3);
        assert!(line.get("message").is_none(), "message duplicated: {line}");

        let timestamp = line["@timestamp"].as_str().expect("@timestamp is a string");
        humantime::parse_rfc3339(timestamp).expect("@timestamp is RFC 3339");
        let fraction = timestamp
            .split_once('.')
            .and_then(|(_, rest)| rest.strip_suffix('Z'))
            .expect("@timestamp has a fraction and ends in Z");
        assert_eq!(fraction.len(), 6, "fraction of {timestamp}");
        assert!(
            fraction.bytes().all(|b| b.is_ascii_digit()),
            "fraction of {timestamp}"
        );
    }

    #[test]
    fn event_levels_are_lowercase() {
        let lines = capture(|| {
            tracing::trace!("t");
            tracing::debug!("d");
            tracing::info!("i");
            tracing::warn!("w");
            tracing::error!("e");
        });

        let levels: Vec<&str> = lines.iter().filter_map(|l| l["@level"].as_str()).collect();
        assert_eq!(levels, ["trace", "debug", "info", "warn", "error"]);
    }

    #[test]
    fn field_types_stay_json_types() {
        let error = io::Error::new(io::ErrorKind::NotFound, "no such socket");
        let lines = capture(|| {
            tracing::info!(
                flag = true,
                negative = -5_i64,
                ratio = 0.5_f64,
                not_a_number = f64::NAN,
                huge = u128::MAX,
                debug = ?vec![1, 2],
                display = %"shown",
                error = &error as &(dyn StdError + 'static),
                "typed fields"
            );
        });

        let line = &lines[0];
        assert_eq!(line["flag"], true);
        assert_eq!(line["negative"], -5);
        assert_eq!(line["ratio"], 0.5);
        assert_eq!(line["not_a_number"], "NaN");
        assert_eq!(line["huge"], u128::MAX.to_string());
        assert_eq!(line["debug"], "[1, 2]");
        assert_eq!(line["display"], "shown");
        assert_eq!(line["error"], "no such socket");
    }

    #[test]
    fn span_fields_are_included() {
        let lines = capture(|| {
            let outer = tracing::info_span!("task", alloc_id = "alloc-1", vm_id = "outer");
            let _outer = outer.enter();
            let inner =
                tracing::info_span!("stop", vm_id = "inner", timeout_ms = tracing::field::Empty);
            inner.record("timeout_ms", 5000);
            let _inner = inner.enter();
            tracing::warn!(signal = "SIGINT", "stopping");
        });

        let line = &lines[0];
        assert_eq!(line["alloc_id"], "alloc-1");
        assert_eq!(line["vm_id"], "inner");
        assert_eq!(line["timeout_ms"], 5000);
        assert_eq!(line["signal"], "SIGINT");
    }

    #[test]
    fn reserved_keys_override_fields() {
        let lines = capture(|| tracing::info!(level = 7, "level field"));

        let line = &lines[0];
        assert_eq!(line["@level"], "info");
        assert_eq!(line["level"], 7);
    }

    #[test]
    fn broken_pipe_is_ignored() {
        let pipe = BrokenPipe::default();
        let writer = pipe.clone();
        let subscriber =
            tracing_subscriber::registry().with(HclogLayer::new(move || writer.clone()));

        tracing::subscriber::with_default(subscriber, || {
            tracing::error!("nobody reads this");
            tracing::info!("nor this");
        });

        assert_eq!(
            pipe.0.load(Ordering::SeqCst),
            2,
            "both events were attempted"
        );
    }
}
