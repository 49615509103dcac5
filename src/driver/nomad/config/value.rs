//! Lenient readers for the cty-msgpack values Nomad sends as task and plugin configuration.
//!
//! Nomad encodes the config with the value's own cty type: the root is a map with every key of
//! the schema, an unset attribute is `nil`, a number is an integer, a float64 or a string with
//! its decimal text, and a `list(map(...))` attribute arrives as an array of maps.

use std::collections::BTreeMap;

use rmpv::Value;

use super::error::echo;

/// Errors from decoding a config value. Each names the key and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not valid MessagePack.
    #[error("invalid MessagePack in {what}")]
    Msgpack {
        /// Name of the config being decoded.
        what: &'static str,
        /// The decoder's error.
        #[source]
        source: rmpv::decode::Error,
    },
    /// The bytes hold something besides one MessagePack value.
    #[error("invalid MessagePack in {what}: {problem}")]
    Garbage {
        /// Name of the config being decoded.
        what: &'static str,
        /// What is wrong, in words.
        problem: String,
    },
    /// The root value is not a map.
    #[error("{what} must be a map of options, found {found}")]
    NotAMap {
        /// Name of the config being decoded.
        what: &'static str,
        /// Kind of the value found.
        found: &'static str,
    },
    /// A value has the wrong type.
    #[error("option {key} must be {expected}, found {found}")]
    WrongType {
        /// Option name, with an index or map key for nested values.
        key: String,
        /// Expected type.
        expected: &'static str,
        /// Kind of the value found.
        found: &'static str,
    },
    /// A number is not an integer in the allowed range.
    #[error("option {key} = {} is invalid: expected {expected}", echo(.value))]
    InvalidNumber {
        /// Option name, with an index or map key for nested values.
        key: String,
        /// The value as received.
        value: String,
        /// The allowed range, in words.
        expected: &'static str,
    },
    /// A duration string does not parse.
    #[error(
        "option {key} = {} is not a duration: use a number with a unit, like \"30s\" or \"2m\"",
        echo(.value)
    )]
    InvalidDuration {
        /// Option name.
        key: String,
        /// The value as received.
        value: String,
        /// The parser's error.
        #[source]
        source: humantime::DurationError,
    },
}

/// MessagePack's one unused marker byte, which the decoder reads as `nil`.
const RESERVED_MARKER: u8 = 0xc1;

/// Decodes MessagePack bytes that hold exactly one value.
pub(super) fn read(bytes: &[u8], what: &'static str) -> Result<Value, DecodeError> {
    if bytes.first() == Some(&RESERVED_MARKER) {
        return Err(DecodeError::Garbage {
            what,
            problem: "it starts with the reserved byte 0xc1".to_owned(),
        });
    }
    let mut reader = bytes;
    let value = rmpv::decode::read_value(&mut reader)
        .map_err(|source| DecodeError::Msgpack { what, source })?;
    if !reader.is_empty() {
        return Err(DecodeError::Garbage {
            what,
            problem: format!(
                "{} of its {} bytes follow the value",
                reader.len(),
                bytes.len()
            ),
        });
    }
    Ok(value)
}

/// The root map of a config, with lookups that treat a missing key and `nil` alike.
pub(super) struct Options<'a> {
    entries: &'a [(Value, Value)],
}

impl<'a> Options<'a> {
    /// Wraps the root value. `nil` reads as an empty map, because Nomad sends no value when an
    /// agent has no `config {}` block.
    pub(super) fn new(root: &'a Value, what: &'static str) -> Result<Self, DecodeError> {
        match root {
            Value::Map(entries) => Ok(Self { entries }),
            Value::Nil => Ok(Self { entries: &[] }),
            other => Err(DecodeError::NotAMap {
                what,
                found: kind(other),
            }),
        }
    }

    /// Returns the value of `key`, or `None` when the key is absent or `nil`.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.entries
            .iter()
            .find(|(name, _)| name.as_str() == Some(key))
            .map(|(_, value)| value)
            .filter(|value| !value.is_nil())
    }

    pub(super) fn string(&self, key: &str) -> Result<Option<String>, DecodeError> {
        self.get(key).map(|value| as_string(value, key)).transpose()
    }

    pub(super) fn bool(&self, key: &str) -> Result<Option<bool>, DecodeError> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        match value {
            Value::Boolean(flag) => Ok(Some(*flag)),
            other => Err(wrong_type(key, "a bool", other)),
        }
    }

    pub(super) fn u64(&self, key: &str) -> Result<Option<u64>, DecodeError> {
        self.get(key)
            .map(|value| as_u64(value, key, WHOLE_NUMBER))
            .transpose()
    }

    pub(super) fn duration(&self, key: &str) -> Result<Option<std::time::Duration>, DecodeError> {
        let Some(text) = self.string(key)? else {
            return Ok(None);
        };
        humantime::parse_duration(&text)
            .map(Some)
            .map_err(|source| DecodeError::InvalidDuration {
                key: key.to_owned(),
                value: text,
                source,
            })
    }

    pub(super) fn string_list(&self, key: &str) -> Result<Vec<String>, DecodeError> {
        let Some(value) = self.get(key) else {
            return Ok(Vec::new());
        };
        let Value::Array(items) = value else {
            return Err(wrong_type(key, "a list of strings", value));
        };
        items
            .iter()
            .enumerate()
            .map(|(index, item)| as_string(item, &format!("{key}[{index}]")))
            .collect()
    }

    /// Reads a `list(map(number))` attribute, merging the maps. A plain map is accepted too.
    /// A label that appears twice keeps its last value, as Nomad's built-in driver does.
    pub(super) fn port_map(&self, key: &str) -> Result<BTreeMap<String, u16>, DecodeError> {
        let mut ports = BTreeMap::new();
        let Some(value) = self.get(key) else {
            return Ok(ports);
        };
        let maps: Vec<&Value> = match value {
            Value::Array(items) => items.iter().collect(),
            Value::Map(_) => vec![value],
            other => return Err(wrong_type(key, "a map of port label to port number", other)),
        };
        for map in maps {
            let Value::Map(entries) = map else {
                return Err(wrong_type(key, "a map of port label to port number", map));
            };
            for (label, port) in entries {
                let label = as_string(label, key)?;
                let entry_key = format!("{key}.{label}");
                let number = as_u64(port, &entry_key, PORT_NUMBER)?;
                let port = u16::try_from(number)
                    .ok()
                    .filter(|port| *port != 0)
                    .ok_or_else(|| DecodeError::InvalidNumber {
                        key: entry_key,
                        value: number.to_string(),
                        expected: PORT_NUMBER,
                    })?;
                ports.insert(label, port);
            }
        }
        Ok(ports)
    }
}

fn as_string(value: &Value, key: &str) -> Result<String, DecodeError> {
    match value {
        Value::String(text) => text
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| wrong_type(key, "a UTF-8 string", value)),
        other => Err(wrong_type(key, "a string", other)),
    }
}

/// The range of a plain number option, in words.
const WHOLE_NUMBER: &str = "a whole number from 0 to 2^64-1";

/// The range of a port number, in words.
const PORT_NUMBER: &str = "a port number from 1 to 65535";

/// Reads a non-negative integer from any of the forms cty-msgpack uses for a number. `expected`
/// names the allowed range in the error.
fn as_u64(value: &Value, key: &str, expected: &'static str) -> Result<u64, DecodeError> {
    let invalid = |text: String| DecodeError::InvalidNumber {
        key: key.to_owned(),
        value: text,
        expected,
    };
    match value {
        Value::Integer(number) => number.as_u64().ok_or_else(|| invalid(number.to_string())),
        Value::F64(number) => float_to_u64(*number).ok_or_else(|| invalid(number.to_string())),
        Value::F32(number) => {
            float_to_u64(f64::from(*number)).ok_or_else(|| invalid(number.to_string()))
        }
        Value::String(text) => {
            let text = text.as_str().unwrap_or_default();
            text.trim()
                .parse::<u64>()
                .map_err(|_| invalid(text.to_owned()))
        }
        other => Err(wrong_type(key, "a number", other)),
    }
}

fn float_to_u64(number: f64) -> Option<u64> {
    // 2^64 is exactly representable, and every f64 below it that has no fraction fits in u64.
    let in_range = (0.0..18_446_744_073_709_551_616.0).contains(&number);
    (in_range && number.fract() == 0.0).then_some(number as u64)
}

fn wrong_type(key: &str, expected: &'static str, found: &Value) -> DecodeError {
    DecodeError::WrongType {
        key: key.to_owned(),
        expected,
        found: kind(found),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Nil => "nil",
        Value::Boolean(_) => "a bool",
        Value::Integer(_) | Value::F32(_) | Value::F64(_) => "a number",
        Value::String(_) => "a string",
        Value::Binary(_) => "binary data",
        Value::Array(_) => "a list",
        Value::Map(_) => "a map",
        Value::Ext(..) => "an unknown value",
    }
}
