//! The safetensors header: reading it with at most two reads and validating every
//! length, offset and shape in it before anything downstream trusts it.

use super::CheckpointError;
use crate::dtype::DType;
use crate::storage::Storage;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::fmt;

/// Largest header accepted. Real headers are a few MiB at most; a larger length
/// field means the file is not safetensors, and trusting it would allocate blindly.
pub const MAX_HEADER_LEN: u64 = 100 * 1024 * 1024;

/// First read of a file: the length field plus, for all ordinary headers, the
/// whole JSON, so one read usually suffices.
const FIRST_READ: u64 = 64 * 1024;

/// One tensor of a safetensors file, validated against the file it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// Absolute byte offset in the file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl TensorInfo {
    /// Number of elements (1 for a scalar). Saturates rather than wrapping, since
    /// the struct is public and may be built by hand; parsed ones never overflow.
    pub fn numel(&self) -> u64 {
        self.shape.iter().fold(1u64, |n, &d| n.saturating_mul(d))
    }
}

/// A parsed and validated safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetensorsHeader {
    /// `8 + header length`: where the data section starts.
    pub data_start: u64,
    /// Tensors sorted by offset.
    pub tensors: Vec<(String, TensorInfo)>,
    pub metadata: BTreeMap<String, String>,
}

/// A JSON object's entries in file order, duplicates kept, so that a repeated
/// key can be reported instead of silently overwritten.
pub(crate) struct Entries(pub(crate) Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut entries = Vec::new();
                while let Some((k, StrictValue(v))) = map.next_entry::<String, StrictValue>()? {
                    entries.push((k, v));
                }
                Ok(Entries(entries))
            }
        }
        d.deserialize_map(EntriesVisitor)
    }
}

/// A JSON value whose objects, at any depth, have no repeated key: the
/// reference safetensors library refuses `{"dtype": "F32", "dtype": "BF16"}`,
/// where a plain `Value` would keep the last one silently.
struct StrictValue(Value);

/// The start of the error a repeated key raises (see `parse_header`).
const DUPLICATE_KEY: &str = "duplicate key";

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StrictValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<StrictValue, E> {
                Ok(StrictValue(Value::Bool(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<StrictValue, E> {
                Ok(StrictValue(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<StrictValue, E> {
                Ok(StrictValue(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<StrictValue, E> {
                Ok(StrictValue(
                    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number),
                ))
            }
            fn visit_str<E>(self, v: &str) -> Result<StrictValue, E> {
                Ok(StrictValue(Value::String(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<StrictValue, E> {
                Ok(StrictValue(Value::String(v)))
            }
            fn visit_unit<E>(self) -> Result<StrictValue, E> {
                Ok(StrictValue(Value::Null))
            }
            fn visit_none<E>(self) -> Result<StrictValue, E> {
                Ok(StrictValue(Value::Null))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<StrictValue, A::Error> {
                let mut items = Vec::new();
                while let Some(StrictValue(v)) = seq.next_element()? {
                    items.push(v);
                }
                Ok(StrictValue(Value::Array(items)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StrictValue, A::Error> {
                let mut obj = serde_json::Map::new();
                while let Some((k, StrictValue(v))) = map.next_entry::<String, StrictValue>()? {
                    if obj.contains_key(&k) {
                        let shown: String = k.chars().take(80).collect();
                        return Err(serde::de::Error::custom(format!(
                            "{DUPLICATE_KEY} {shown:?} in one object"
                        )));
                    }
                    obj.insert(k, v);
                }
                Ok(StrictValue(Value::Object(obj)))
            }
        }
        d.deserialize_any(V)
    }
}

/// A JSON value for an error message, cut short: it comes from an untrusted file
/// and may be huge.
pub(crate) fn short(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(80) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

/// The header length field of a file of `file_size` bytes: not zero, within
/// [`MAX_HEADER_LEN`], and inside the file.
pub(crate) fn check_header_len(
    location: &str,
    file_size: u64,
    len: u64,
) -> Result<(), CheckpointError> {
    if len == 0 {
        return Err(CheckpointError::HeaderEmpty {
            location: location.to_string(),
        });
    }
    if len > MAX_HEADER_LEN {
        return Err(CheckpointError::HeaderTooLarge {
            location: location.to_string(),
            len,
            limit: MAX_HEADER_LEN,
        });
    }
    if len.checked_add(8).is_none_or(|end| end > file_size) {
        return Err(CheckpointError::HeaderPastEnd {
            location: location.to_string(),
            len,
            file_size,
        });
    }
    Ok(())
}

/// Validates a header JSON given the file size: every offset and length is
/// checked before it is trusted.
pub fn parse_header(
    location: &str,
    file_size: u64,
    header_json: &[u8],
) -> Result<SafetensorsHeader, CheckpointError> {
    let loc = || location.to_string();
    let header_len =
        u64::try_from(header_json.len()).map_err(|_| CheckpointError::HeaderTooLarge {
            location: loc(),
            len: u64::MAX,
            limit: MAX_HEADER_LEN,
        })?;
    check_header_len(location, file_size, header_len)?;
    // Both hold after check_header_len; the fallbacks only keep this panic-free.
    let data_start = header_len.saturating_add(8);
    let data_len = file_size.saturating_sub(data_start);

    let text = std::str::from_utf8(header_json)
        .map_err(|_| CheckpointError::HeaderNotUtf8 { location: loc() })?;
    let Entries(entries) = serde_json::from_str(text).map_err(|e| match e.classify() {
        // Besides a repeated key inside an entry, a type error at the top level
        // is the only data error the visitors raise.
        serde_json::error::Category::Data if e.to_string().starts_with(DUPLICATE_KEY) => {
            CheckpointError::HeaderJson {
                location: loc(),
                message: e.to_string(),
            }
        }
        serde_json::error::Category::Data => CheckpointError::HeaderNotObject { location: loc() },
        _ => CheckpointError::HeaderJson {
            location: loc(),
            message: e.to_string(),
        },
    })?;

    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(entries.len());
    let mut seen = HashSet::with_capacity(entries.len());
    for (name, value) in entries {
        if !seen.insert(name.clone()) {
            return Err(CheckpointError::DuplicateHeaderEntry {
                location: loc(),
                tensor: name,
            });
        }
        if name == "__metadata__" {
            metadata = parse_metadata(location, value)?;
            continue;
        }
        let info = parse_entry(location, &name, &value, data_start, data_len)?;
        tensors.push((name, info));
    }

    tensors.sort_by(|(an, a), (bn, b)| (a.offset, a.len, an).cmp(&(b.offset, b.len, bn)));
    check_overlaps(location, &tensors)?;
    Ok(SafetensorsHeader {
        data_start,
        tensors,
        metadata,
    })
}

fn parse_metadata(
    location: &str,
    value: Value,
) -> Result<BTreeMap<String, String>, CheckpointError> {
    let bad = |message: String| CheckpointError::BadMetadata {
        location: location.to_string(),
        message,
    };
    match value {
        Value::Null => Ok(BTreeMap::new()),
        Value::Object(map) => map
            .into_iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k, s)),
                other => Err(bad(format!("value of {k:?} is {}", short(&other)))),
            })
            .collect(),
        other => Err(bad(format!("found {}", short(&other)))),
    }
}

fn parse_entry(
    location: &str,
    name: &str,
    value: &Value,
    data_start: u64,
    data_len: u64,
) -> Result<TensorInfo, CheckpointError> {
    let loc = || location.to_string();
    let tensor = || name.to_string();
    let obj = value
        .as_object()
        .ok_or_else(|| CheckpointError::EntryNotObject {
            location: loc(),
            tensor: tensor(),
        })?;
    if let Some(key) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "dtype" | "shape" | "data_offsets"))
    {
        return Err(CheckpointError::UnknownKey {
            location: loc(),
            tensor: tensor(),
            key: key.clone(),
        });
    }
    let field = |field: &'static str| {
        obj.get(field).ok_or_else(|| CheckpointError::MissingField {
            location: loc(),
            tensor: tensor(),
            field,
        })
    };

    let dtype_value = field("dtype")?;
    let dtype = dtype_value
        .as_str()
        .and_then(DType::from_safetensors)
        .ok_or_else(|| CheckpointError::UnknownDtype {
            location: loc(),
            tensor: tensor(),
            dtype: short(dtype_value),
        })?;

    let shape_value = field("shape")?;
    let shape = shape_value
        .as_array()
        .and_then(|dims| dims.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>())
        .ok_or_else(|| CheckpointError::BadShape {
            location: loc(),
            tensor: tensor(),
            found: short(shape_value),
        })?;

    let offsets_value = field("data_offsets")?;
    let (start, end) = match offsets_value.as_array().map(Vec::as_slice) {
        Some([s, e]) => match (s.as_u64(), e.as_u64()) {
            (Some(s), Some(e)) if s <= e => (s, e),
            _ => (1, 0),
        },
        _ => (1, 0),
    };
    if start > end {
        return Err(CheckpointError::BadOffsets {
            location: loc(),
            tensor: tensor(),
            found: short(offsets_value),
        });
    }

    let needed = shape
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d))
        .and_then(|numel| numel.checked_mul(dtype.size() as u64))
        .ok_or_else(|| CheckpointError::SizeOverflow {
            location: loc(),
            tensor: tensor(),
            shape: shape.clone(),
            dtype,
        })?;
    let span = end - start;
    if needed != span {
        return Err(CheckpointError::SizeMismatch {
            location: loc(),
            tensor: tensor(),
            shape,
            dtype,
            needed,
            span,
        });
    }
    if end > data_len {
        return Err(CheckpointError::Truncated {
            location: loc(),
            tensor: tensor(),
            end,
            data_len,
        });
    }
    // end <= data_len = file_size - data_start, so this cannot overflow.
    let offset = data_start.saturating_add(start);
    Ok(TensorInfo {
        dtype,
        shape,
        offset,
        len: span,
    })
}

/// `tensors` must be sorted by offset. Zero-length tensors occupy nothing, so they
/// overlap nothing.
fn check_overlaps(location: &str, tensors: &[(String, TensorInfo)]) -> Result<(), CheckpointError> {
    let mut furthest: Option<(&str, u64)> = None;
    for (name, info) in tensors.iter().filter(|(_, t)| t.len > 0) {
        if let Some((prev, prev_end)) = furthest {
            if info.offset < prev_end {
                return Err(CheckpointError::Overlap {
                    location: location.to_string(),
                    first: prev.to_string(),
                    second: name.clone(),
                });
            }
        }
        let end = info.offset.saturating_add(info.len);
        if furthest.is_none_or(|(_, e)| end > e) {
            furthest = Some((name, end));
        }
    }
    Ok(())
}

/// Reads the 8-byte length, then the JSON (at most two reads), then validates it
/// with [`parse_header`].
pub fn read_header(
    storage: &dyn Storage,
    location: &str,
) -> Result<SafetensorsHeader, CheckpointError> {
    let file_size = storage.size(location)?;
    if file_size < 8 {
        return Err(CheckpointError::FileTooSmall {
            location: location.to_string(),
            size: file_size,
        });
    }
    let first_len = file_size.min(FIRST_READ);
    let mut bytes = storage.read_range(location, 0..first_len)?;
    let len_field: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| CheckpointError::FileTooSmall {
            location: location.to_string(),
            size: file_size,
        })?;
    let header_len = u64::from_le_bytes(len_field);
    check_header_len(location, file_size, header_len)?;
    // check_header_len bounds header_len by MAX_HEADER_LEN, so these fit.
    let header_end = header_len.saturating_add(8);
    if header_end > first_len {
        let rest = storage.read_range(location, first_len..header_end)?;
        bytes.extend_from_slice(&rest);
    }
    let end = usize::try_from(header_end).map_err(|_| CheckpointError::HeaderTooLarge {
        location: location.to_string(),
        len: header_len,
        limit: MAX_HEADER_LEN,
    })?;
    let json = bytes
        .get(8..end)
        .ok_or_else(|| CheckpointError::HeaderPastEnd {
            location: location.to_string(),
            len: header_len,
            file_size,
        })?;
    parse_header(location, file_size, json)
}
