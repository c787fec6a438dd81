//! The byte layout of one output safetensors file, fixed before any tensor data
//! exists so that data can be streamed in order or written at known offsets.

use crate::dtype::DType;
use std::fmt::Write as _;

/// Header bytes and tensor positions of one output safetensors file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardLayout {
    /// 8-byte little-endian length, then the JSON padded with spaces to a
    /// multiple of 8 (so the data section is 8-aligned, as `safetensors` does).
    pub header: Vec<u8>,
    /// (name, dtype, shape, offset from the start of the file, length in bytes),
    /// in the order given, contiguous after the header.
    pub tensors: Vec<(String, DType, Vec<u64>, u64, u64)>,
    pub file_size: u64,
}

impl ShardLayout {
    /// Lays the tensors out in the given order. Names must be unique (the caller
    /// builds them from a validated plan); sizes saturate instead of wrapping,
    /// since real tensors are far below u64 limits.
    pub fn new(tensors: &[(String, DType, Vec<u64>)]) -> ShardLayout {
        let mut json = String::from(r#"{"__metadata__":{"format":"pt"}"#);
        let mut rel = Vec::with_capacity(tensors.len());
        let mut cursor = 0u64;
        for (name, dtype, shape) in tensors {
            let len = shape
                .iter()
                .fold(1u64, |n, &d| n.saturating_mul(d))
                .saturating_mul(dtype.size() as u64);
            let start = cursor;
            cursor = cursor.saturating_add(len);
            let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
            // String serialization cannot fail; the fallback keeps this panic-free.
            let key = serde_json::to_string(name).unwrap_or_else(|_| "\"\"".to_string());
            let _ = write!(
                json,
                r#",{key}:{{"dtype":"{}","shape":[{}],"data_offsets":[{start},{cursor}]}}"#,
                dtype.safetensors_name(),
                dims.join(","),
            );
            rel.push((name.clone(), *dtype, shape.clone(), start, len));
        }
        json.push('}');
        while json.len() % 8 != 0 {
            json.push(' ');
        }
        let json_len = json.len() as u64;
        let mut header = Vec::with_capacity(json.len() + 8);
        header.extend_from_slice(&json_len.to_le_bytes());
        header.extend_from_slice(json.as_bytes());
        let data_start = json_len.saturating_add(8);
        ShardLayout {
            header,
            tensors: rel
                .into_iter()
                .map(|(n, d, s, start, len)| (n, d, s, data_start.saturating_add(start), len))
                .collect(),
            file_size: data_start.saturating_add(cursor),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::parse_header;

    fn sample() -> ShardLayout {
        ShardLayout::new(&[
            ("b.weight".to_string(), DType::BF16, vec![4, 4]),
            ("a.bias".to_string(), DType::F32, vec![3]),
            ("scalar".to_string(), DType::F64, vec![]),
            ("empty".to_string(), DType::I8, vec![0, 5]),
        ])
    }

    #[test]
    fn layout_is_contiguous_in_given_order() {
        let l = sample();
        let data_start = l.header.len() as u64;
        let offsets: Vec<(&str, u64, u64)> =
            l.tensors.iter().map(|t| (t.0.as_str(), t.3, t.4)).collect();
        assert_eq!(
            offsets,
            vec![
                ("b.weight", data_start, 32),
                ("a.bias", data_start + 32, 12),
                ("scalar", data_start + 44, 8),
                ("empty", data_start + 52, 0),
            ]
        );
        assert_eq!(l.file_size, data_start + 52);
    }

    /// The byte format Python's `safetensors` reads: u64 LE length N (a multiple
    /// of 8), N bytes of JSON (space padding allowed), data offsets relative to 8 + N.
    #[test]
    fn header_has_safetensors_byte_format() {
        let l = sample();
        let n = u64::from_le_bytes(l.header[..8].try_into().unwrap());
        assert_eq!(n as usize, l.header.len() - 8);
        assert_eq!(n % 8, 0);
        let text = std::str::from_utf8(&l.header[8..]).unwrap();
        assert!(text.starts_with(r#"{"__metadata__":{"format":"pt"},"b.weight":"#));
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(v["__metadata__"]["format"], "pt");
        assert_eq!(v["b.weight"]["dtype"], "BF16");
        assert_eq!(v["b.weight"]["data_offsets"], serde_json::json!([0, 32]));
        assert_eq!(v["a.bias"]["data_offsets"], serde_json::json!([32, 44]));
        assert_eq!(v["scalar"]["shape"], serde_json::json!([]));
    }

    #[test]
    fn layout_parses_back() {
        let l = sample();
        let h = parse_header("out.safetensors", l.file_size, &l.header[8..]).unwrap();
        assert_eq!(h.data_start, l.header.len() as u64);
        assert_eq!(h.metadata.get("format").map(String::as_str), Some("pt"));
        for (name, dtype, shape, offset, len) in &l.tensors {
            let (_, info) = h.tensors.iter().find(|(n, _)| n == name).unwrap();
            assert_eq!(
                (&info.dtype, &info.shape, info.offset, info.len),
                (dtype, shape, *offset, *len)
            );
        }
    }

    #[test]
    fn empty_layout() {
        let l = ShardLayout::new(&[]);
        assert_eq!(l.file_size, l.header.len() as u64);
        let h = parse_header("x", l.file_size, &l.header[8..]).unwrap();
        assert!(h.tensors.is_empty());
    }
}
