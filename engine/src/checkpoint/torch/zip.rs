//! The zip container of a torch checkpoint, read by byte range: the end of
//! central directory record (and its ZIP64 form), the central directory, and
//! each entry's local header, which says where the entry's bytes begin.
//!
//! torch writes every entry *stored* (uncompressed), with the local header's
//! extra field padded so that the data is aligned; the local header's sizes are
//! zero (a data descriptor follows the data), so sizes come from the central
//! directory and the data offset from the local header. Nothing here
//! decompresses: a compressed, encrypted or multi-disk archive is an error.

use super::super::CheckpointError;
use std::collections::HashMap;

/// The end of central directory record, without its comment.
const EOCD_LEN: usize = 22;
const EOCD_SIG: u32 = 0x0605_4b50;
const ZIP64_LOCATOR_LEN: usize = 20;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const ZIP64_EOCD_LEN: usize = 56;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const CENTRAL_LEN: usize = 46;
const LOCAL_SIG: u32 = 0x0403_4b50;
/// Fixed part of a local file header.
pub(super) const LOCAL_LEN: u64 = 30;
/// A zip comment is at most this long, so the end record lies in the last
/// `EOCD_LEN + MAX_COMMENT` bytes.
const MAX_COMMENT: usize = 0xffff;
/// The bytes read from the end of the file first: the end record with any
/// comment, its ZIP64 companions, and for ordinary checkpoints (a few hundred
/// tensors) the whole central directory.
pub(super) const TAIL_READ: u64 =
    (EOCD_LEN + MAX_COMMENT + ZIP64_LOCATOR_LEN + ZIP64_EOCD_LEN) as u64;
/// Largest central directory accepted (about 600,000 entries of torch's names).
pub(super) const MAX_DIRECTORY_LEN: u64 = 64 << 20;
/// Most entries accepted.
const MAX_ENTRIES: u64 = 1 << 20;

/// One entry of the central directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Entry {
    pub name: String,
    /// Offset of the entry's local header.
    pub header_offset: u64,
    /// Bytes of data (stored entries only, so compressed and uncompressed sizes agree).
    pub size: u64,
    /// Where the next entry's local header (or the central directory) begins:
    /// the entry's header, data and data descriptor lie before it.
    pub end: u64,
}

/// Where the central directory is, from the end record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Directory {
    pub offset: u64,
    pub len: u64,
    pub entries: u64,
}

fn err(location: &str, message: impl Into<String>) -> CheckpointError {
    CheckpointError::TorchZip {
        location: location.to_string(),
        message: message.into(),
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// Finds the central directory from the last bytes of the file: `tail` holds
/// the bytes from `tail_start` to the end of a file of `file_size` bytes.
/// `Ok(None)` when there is no end record (not a zip file at all).
pub(super) fn find_directory(
    location: &str,
    tail: &[u8],
    tail_start: u64,
    file_size: u64,
) -> Result<Option<Directory>, CheckpointError> {
    let bad = |m: &str| err(location, m);
    // The last end record whose comment reaches exactly the end of the file.
    let Some(at) = (0..=tail.len().saturating_sub(EOCD_LEN)).rev().find(|&i| {
        u32_at(tail, i) == Some(EOCD_SIG)
            && u16_at(tail, i + 20).is_some_and(|c| i + EOCD_LEN + c as usize == tail.len())
    }) else {
        return Ok(None);
    };
    let field16 = |o: usize| u16_at(tail, at + o).unwrap_or(0);
    let field32 = |o: usize| u32_at(tail, at + o).unwrap_or(0);
    let (disk, cd_disk) = (field16(4), field16(6));
    let (mut entries, mut len, mut offset) = (
        u64::from(field16(10)),
        u64::from(field32(12)),
        u64::from(field32(16)),
    );
    if field16(8) != field16(10) {
        return Err(bad("the archive spans several disks"));
    }
    // Absolute position of the end record, and the lowest byte the directory may reach.
    let eocd_pos = tail_start + at as u64;
    let mut dir_end = eocd_pos;
    let locator = at.checked_sub(ZIP64_LOCATOR_LEN);
    match locator.filter(|&l| u32_at(tail, l) == Some(ZIP64_LOCATOR_SIG)) {
        Some(l) => {
            let record = u64_at(tail, l + 8).unwrap_or(u64::MAX);
            if u32_at(tail, l + 4) != Some(0) || u32_at(tail, l + 16).is_some_and(|n| n > 1) {
                return Err(bad("the archive spans several disks"));
            }
            let rel = record
                .checked_sub(tail_start)
                .and_then(|r| usize::try_from(r).ok())
                .filter(|&r| r + ZIP64_EOCD_LEN <= l)
                .ok_or_else(|| bad("the ZIP64 end record lies outside the end of the file"))?;
            if u32_at(tail, rel) != Some(ZIP64_EOCD_SIG) {
                return Err(bad(
                    "the ZIP64 locator does not point at a ZIP64 end record",
                ));
            }
            if u32_at(tail, rel + 16) != Some(0) || u32_at(tail, rel + 20) != Some(0) {
                return Err(bad("the archive spans several disks"));
            }
            if u64_at(tail, rel + 24) != u64_at(tail, rel + 32) {
                return Err(bad("the archive spans several disks"));
            }
            entries = u64_at(tail, rel + 32).unwrap_or(u64::MAX);
            len = u64_at(tail, rel + 40).unwrap_or(u64::MAX);
            offset = u64_at(tail, rel + 48).unwrap_or(u64::MAX);
            dir_end = tail_start + rel as u64;
        }
        None if disk != 0 || cd_disk != 0 => {
            return Err(bad("the archive spans several disks"));
        }
        None if entries == 0xffff || len == 0xffff_ffff || offset == 0xffff_ffff => {
            return Err(bad("ZIP64 sizes without a ZIP64 end record"));
        }
        None => {}
    }
    if len > MAX_DIRECTORY_LEN || entries > MAX_ENTRIES {
        return Err(err(
            location,
            format!(
                "a central directory of {entries} entries and {len} bytes is beyond the limit \
                 of {MAX_ENTRIES} entries and {MAX_DIRECTORY_LEN} bytes"
            ),
        ));
    }
    if offset.checked_add(len).is_none_or(|e| e > dir_end) || dir_end > file_size {
        return Err(err(
            location,
            format!(
                "the central directory at bytes {offset}..+{len} does not lie before its end \
                 record at byte {dir_end} (the file is truncated?)"
            ),
        ));
    }
    Ok(Some(Directory {
        offset,
        len,
        entries,
    }))
}

/// Parses the central directory's bytes. Entries come back sorted by the
/// offset of their local header, each with the offset where the next begins.
pub(super) fn parse_directory(
    location: &str,
    dir: Directory,
    bytes: &[u8],
) -> Result<Vec<Entry>, CheckpointError> {
    let truncated = || err(location, "the central directory is truncated");
    let mut out: Vec<Entry> = Vec::new();
    let mut at = 0usize;
    for _ in 0..dir.entries {
        let head = bytes.get(at..at + CENTRAL_LEN).ok_or_else(truncated)?;
        if u32_at(head, 0) != Some(CENTRAL_SIG) {
            return Err(err(
                location,
                "a central directory entry has a bad signature",
            ));
        }
        let f16 = |o| u16_at(head, o).unwrap_or(0);
        let f32 = |o| u32_at(head, o).unwrap_or(0);
        let (flags, method) = (f16(8), f16(10));
        let (mut compressed, mut size) = (u64::from(f32(20)), u64::from(f32(24)));
        let (name_len, extra_len, comment_len) =
            (f16(28) as usize, f16(30) as usize, f16(32) as usize);
        let mut disk = u32::from(f16(34));
        let mut header_offset = u64::from(f32(42));
        let name_at = at + CENTRAL_LEN;
        let name = bytes
            .get(name_at..name_at + name_len)
            .ok_or_else(truncated)?;
        let name = String::from_utf8_lossy(name).into_owned();
        let extra = bytes
            .get(name_at + name_len..name_at + name_len + extra_len)
            .ok_or_else(truncated)?;
        // ZIP64: each field that is all ones is in the extra field, in order.
        let mut z64 = zip64_field(extra).unwrap_or(&[]);
        let mut wide = |value: u64| -> Result<u64, CheckpointError> {
            if value != 0xffff_ffff {
                return Ok(value);
            }
            let v = u64_at(z64, 0).ok_or_else(|| {
                err(
                    location,
                    format!("{name}: ZIP64 sizes are missing from its extra field"),
                )
            })?;
            z64 = z64.get(8..).unwrap_or(&[]);
            Ok(v)
        };
        size = wide(size)?;
        compressed = wide(compressed)?;
        header_offset = wide(header_offset)?;
        if disk == 0xffff {
            disk = u32_at(z64, 0).unwrap_or(u32::MAX);
        }
        if disk != 0 {
            return Err(err(
                location,
                format!("{name}: on another disk of the archive"),
            ));
        }
        if flags & 1 != 0 {
            return Err(err(location, format!("{name} is encrypted")));
        }
        if method != 0 || compressed != size {
            return Err(err(
                location,
                format!(
                    "{name} is compressed (method {method}); torch writes its entries stored, \
                     and fleetmerge reads them only so, by byte range"
                ),
            ));
        }
        out.push(Entry {
            name,
            header_offset,
            size,
            end: 0,
        });
        at = name_at + name_len + extra_len + comment_len;
    }
    out.sort_by_key(|e| e.header_offset);
    let mut names = HashMap::with_capacity(out.len());
    for i in 0..out.len() {
        let end = out.get(i + 1).map_or(dir.offset, |n| n.header_offset);
        let e = &mut out[i];
        e.end = end;
        if e.header_offset
            .saturating_add(LOCAL_LEN)
            .saturating_add(e.size)
            > end
        {
            return Err(err(
                location,
                format!(
                    "{}: its {} bytes at local header {} overlap the next entry or the central \
                     directory",
                    e.name, e.size, e.header_offset
                ),
            ));
        }
        if names.insert(e.name.clone(), ()).is_some() {
            return Err(err(location, format!("two entries are named {}", e.name)));
        }
    }
    Ok(out)
}

/// The data of the ZIP64 extended information extra field (id 1), if present.
fn zip64_field(mut extra: &[u8]) -> Option<&[u8]> {
    while extra.len() >= 4 {
        let id = u16_at(extra, 0)?;
        let len = u16_at(extra, 2)? as usize;
        let data = extra.get(4..4 + len)?;
        if id == 1 {
            return Some(data);
        }
        extra = &extra[4 + len..];
    }
    None
}

/// The length of an entry's local header (fixed part, name and extra field),
/// from its first [`LOCAL_LEN`] bytes, after checking that it is the local
/// header of `entry`.
pub(super) fn local_header_len(
    location: &str,
    entry: &Entry,
    head: &[u8],
) -> Result<u64, CheckpointError> {
    let bad = |m: &str| err(location, format!("{}: {m}", entry.name));
    if u32_at(head, 0) != Some(LOCAL_SIG) {
        return Err(bad("no local header where the central directory puts it"));
    }
    if u16_at(head, 8) != Some(0) {
        return Err(bad("its local header says it is compressed"));
    }
    let name_len = u64::from(u16_at(head, 26).unwrap_or(0));
    let extra_len = u64::from(u16_at(head, 28).unwrap_or(0));
    let len = LOCAL_LEN + name_len + extra_len;
    if entry.header_offset + len + entry.size > entry.end {
        return Err(bad("its data runs into the next entry"));
    }
    Ok(len)
}

/// Checks the name in a local header (`header` is the whole header).
pub(super) fn check_local_name(
    location: &str,
    entry: &Entry,
    header: &[u8],
) -> Result<(), CheckpointError> {
    let name_len = u16_at(header, 26).unwrap_or(0) as usize;
    let at = LOCAL_LEN as usize;
    match header.get(at..at + name_len) {
        Some(n) if n == entry.name.as_bytes() => Ok(()),
        _ => Err(err(
            location,
            format!("{}: its local header names another file", entry.name),
        )),
    }
}
