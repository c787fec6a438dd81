//! Tests of the torch zip reader: the kit's checkpoint written by torch itself,
//! and archives built here the way torch writes them (stored entries, local
//! headers padded to 64-byte alignment, data descriptors, ZIP64 end records),
//! then bent: views, shared storages, unsafe globals, hostile bytes.

use super::*;
use crate::dtype::DType;
use crate::storage::LocalStorage;
use proptest::prelude::*;
use std::path::Path;

/// A pickle written opcode by opcode, as torch's protocol 2 pickler does.
#[derive(Default)]
pub(crate) struct Pickler {
    pub out: Vec<u8>,
    memo: u32,
}

impl Pickler {
    pub(crate) fn op(&mut self, bytes: &[u8]) -> &mut Self {
        self.out.extend_from_slice(bytes);
        self
    }
    pub(crate) fn put(&mut self) -> &mut Self {
        let m = self.memo;
        self.memo += 1;
        if m < 256 {
            self.op(&[b'q', m as u8])
        } else {
            self.op(b"r").op(&m.to_le_bytes())
        }
    }
    pub(crate) fn str(&mut self, s: &str) -> &mut Self {
        self.op(b"X")
            .op(&(s.len() as u32).to_le_bytes())
            .op(s.as_bytes())
            .put()
    }
    pub(crate) fn int(&mut self, v: u64) -> &mut Self {
        if v < 256 {
            self.op(&[b'K', v as u8])
        } else if v < 65536 {
            self.op(b"M").op(&(v as u16).to_le_bytes())
        } else if v < 1 << 31 {
            self.op(b"J").op(&(v as i32).to_le_bytes())
        } else {
            self.op(&[0x8a, 8]).op(&v.to_le_bytes())
        }
    }
    pub(crate) fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.op(b"c")
            .op(module.as_bytes())
            .op(b"\n")
            .op(name.as_bytes())
            .op(b"\n")
            .put()
    }
    pub(crate) fn ints(&mut self, v: &[u64]) -> &mut Self {
        match v.len() {
            0 => self.op(b")"),
            1..=3 => {
                for &x in v {
                    self.int(x);
                }
                self.op(&[0x84 + v.len() as u8]).put()
            }
            _ => {
                self.op(b"(");
                for &x in v {
                    self.int(x);
                }
                self.op(b"t").put()
            }
        }
    }
}

/// One tensor of a state dict: a view of storage `key`.
#[derive(Clone, Debug)]
pub(crate) struct View {
    pub name: String,
    pub key: String,
    pub class: &'static str,
    /// Elements of the storage.
    pub numel: u64,
    pub offset: u64,
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
}

impl View {
    pub fn contiguous(name: &str, key: &str, class: &'static str, shape: &[u64]) -> View {
        let mut stride = vec![0; shape.len()];
        let mut s = 1;
        for i in (0..shape.len()).rev() {
            stride[i] = s;
            s *= shape[i];
        }
        View {
            name: name.into(),
            key: key.into(),
            class,
            numel: shape.iter().product(),
            offset: 0,
            shape: shape.to_vec(),
            stride,
        }
    }
}

/// torch.save's pickle of a dict of `views`, with `extra` opcodes (a
/// key and a value) spliced in before the last SETITEMS.
pub(crate) fn state_dict(views: &[View], extra: &[u8]) -> Vec<u8> {
    let mut p = Pickler::default();
    p.op(&[0x80, 2]).op(b"}").put().op(b"(");
    for v in views {
        p.str(&v.name);
        p.global("torch._utils", "_rebuild_tensor_v2");
        p.op(b"((");
        p.str("storage")
            .global("torch", v.class)
            .str(&v.key)
            .str("cpu");
        p.int(v.numel).op(b"t").put().op(b"Q");
        p.int(v.offset).ints(&v.shape).ints(&v.stride).op(&[0x89]);
        p.global("collections", "OrderedDict").op(b")R").put();
        p.op(b"t").put().op(b"R").put();
    }
    p.op(extra);
    p.op(b"u.");
    p.out
}

/// A zip archive of stored entries as torch writes it: each local header's
/// extra field padded so the data starts on a 64-byte boundary, sizes in a
/// data descriptor, and ZIP64 end records.
pub(crate) fn archive(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in entries {
        let offset = out.len() as u64;
        let base = offset as usize + 30 + name.len() + 4;
        let pad = (64 - base % 64) % 64;
        let crc = 0u32;
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        out.extend_from_slice(&[0, 0, 0x08, 0x08, 0, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&[0; 12]); // crc and sizes: in the descriptor
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(&((pad + 4) as u16).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"FB");
        out.extend_from_slice(&(pad as u16).to_le_bytes());
        out.extend(std::iter::repeat_n(b'Z', pad));
        assert_eq!(out.len() % 64, 0);
        out.extend_from_slice(data);
        out.extend_from_slice(&0x0807_4b50u32.to_le_bytes());
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());

        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&[0, 0, 0, 0, 0x08, 0x08, 0, 0, 0, 0, 0, 0]);
        central.extend_from_slice(&crc.to_le_bytes());
        central.extend_from_slice(&(data.len() as u32).to_le_bytes());
        central.extend_from_slice(&(data.len() as u32).to_le_bytes());
        central.extend_from_slice(&(name.len() as u16).to_le_bytes());
        central.extend_from_slice(&[0; 12]); // extra, comment, disk, attributes
        central.extend_from_slice(&(offset as u32).to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let cd_offset = out.len() as u64;
    let n = entries.len() as u64;
    out.extend_from_slice(&central);
    let z64 = out.len() as u64;
    out.extend_from_slice(&0x0606_4b50u32.to_le_bytes());
    out.extend_from_slice(&44u64.to_le_bytes());
    out.extend_from_slice(&[0x1e, 3, 0x2d, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&(central.len() as u64).to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&0x0706_4b50u32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&z64.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&(cd_offset as u32).to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out
}

fn element(class: &str) -> u64 {
    match class {
        "FloatStorage" => 4,
        "BFloat16Storage" | "HalfStorage" => 2,
        _ => 1,
    }
}

/// A checkpoint of `views` (storages filled with their key's byte), with
/// `extra` spliced into the pickle.
pub(crate) fn checkpoint(views: &[View], extra: &[u8]) -> Vec<u8> {
    let mut entries = vec![("archive/data.pkl".to_string(), state_dict(views, extra))];
    entries.push(("archive/byteorder".into(), b"little".to_vec()));
    let mut keys: Vec<(&str, u64, &str)> = Vec::new();
    for v in views {
        if !keys.iter().any(|(k, _, _)| *k == v.key) {
            keys.push((&v.key, v.numel, v.class));
        }
    }
    for (k, numel, class) in keys {
        let fill = k.parse::<u8>().unwrap_or(0xee);
        entries.push((
            format!("archive/data/{k}"),
            vec![fill; (numel * element(class)) as usize],
        ));
    }
    entries.push(("archive/version".into(), b"3\n".to_vec()));
    archive(&entries)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.to_string_lossy().into_owned()
}

fn read_bytes(bytes: &[u8]) -> Result<Vec<(String, TensorInfo)>, CheckpointError> {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "pytorch_model.bin", bytes);
    read_torch(&LocalStorage, &f)
}

fn kit(file: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/models")
        .join(file)
        .to_string_lossy()
        .into_owned()
}

#[test]
fn reads_the_checkpoint_torch_wrote() {
    let f = kit("llama-bin-a/pytorch_model.bin");
    let tensors = read_torch(&LocalStorage, &f).unwrap();
    assert_eq!(tensors.len(), 57);
    let get = |n: &str| {
        tensors
            .iter()
            .find(|(name, _)| name == n)
            .unwrap()
            .1
            .clone()
    };
    // Offsets as Python's zipfile finds them (local header + name + extra).
    let embed = get("model.embed_tokens.weight");
    assert_eq!(
        (embed.dtype, embed.shape.clone(), embed.offset, embed.len),
        (DType::BF16, vec![512, 64], 6848, 65536)
    );
    let norm = get("model.layers.0.input_layernorm.weight");
    assert_eq!(
        (norm.shape.clone(), norm.offset, norm.len),
        (vec![64], 72512, 128)
    );
    let head = get("lm_head.weight");
    assert_eq!((head.offset, head.len), (634176, 65536));
    // Their bytes are the tensor: the kit's embedding starts with these values.
    let bytes = LocalStorage
        .read_range(&f, embed.offset..embed.offset + 4)
        .unwrap();
    assert_eq!(bytes.len(), 4);
    assert!(tensors.windows(2).all(|w| w[0].1.offset <= w[1].1.offset));
}

#[test]
fn reads_the_sharded_float32_checkpoint() {
    let f = kit("llama-bin-b/pytorch_model-00001-of-00002.bin");
    let tensors = read_torch(&LocalStorage, &f).unwrap();
    assert!(tensors.iter().all(|(_, t)| t.dtype == DType::F32));
    assert!(tensors.iter().all(|(_, t)| t.offset % 64 == 0));
}

#[test]
fn the_kits_unsafe_pickle_is_refused_naming_the_file_and_global() {
    let f = kit("llama-bin-evil/pytorch_model.bin");
    let err = read_torch(&LocalStorage, &f).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, CheckpointError::UnsafePickle { global, .. } if global == "posix.system"),
        "{msg}"
    );
    assert!(
        msg.contains("llama-bin-evil/pytorch_model.bin") && msg.contains("posix.system"),
        "{msg}"
    );
}

#[test]
fn built_archives_read_back() {
    let views = vec![
        View::contiguous("a", "0", "FloatStorage", &[4, 3]),
        View::contiguous("b", "1", "BFloat16Storage", &[5]),
        View::contiguous("s", "2", "HalfStorage", &[]),
        View::contiguous("e", "3", "FloatStorage", &[0, 7]),
    ];
    let bytes = checkpoint(&views, b"");
    let t = read_bytes(&bytes).unwrap();
    let get = |n: &str| t.iter().find(|(name, _)| name == n).unwrap().1.clone();
    assert_eq!((get("a").dtype, get("a").len), (DType::F32, 48));
    assert_eq!(
        (get("b").dtype, get("b").shape.clone(), get("b").len),
        (DType::BF16, vec![5], 10)
    );
    assert_eq!((get("s").shape.len(), get("s").len), (0, 2));
    assert_eq!(get("e").len, 0);
    for (name, info) in &t {
        let data = &bytes[info.offset as usize..(info.offset + info.len) as usize];
        let key = views
            .iter()
            .find(|v| &v.name == name)
            .unwrap()
            .key
            .parse::<u8>()
            .unwrap();
        assert!(data.iter().all(|&b| b == key), "{name}");
    }
}

#[test]
fn tied_weights_and_views_into_a_shared_storage_are_byte_ranges() {
    let mut embed = View::contiguous("embed", "0", "FloatStorage", &[8, 4]);
    let mut head = embed.clone();
    head.name = "lm_head".into();
    // Rows 2..6 of the same storage, and one row.
    let mut rows = embed.clone();
    rows.name = "rows".into();
    rows.offset = 8;
    rows.shape = vec![4, 4];
    let mut row = embed.clone();
    row.name = "row".into();
    row.offset = 28;
    row.shape = vec![1, 4];
    row.stride = vec![999, 1];
    embed.numel = 32;
    head.numel = 32;
    let t = read_bytes(&checkpoint(&[embed, head, rows, row], b"")).unwrap();
    let get = |n: &str| t.iter().find(|(name, _)| name == n).unwrap().1.clone();
    assert_eq!(get("embed"), get("lm_head"));
    assert_eq!(get("rows").offset, get("embed").offset + 32);
    assert_eq!(get("rows").len, 64);
    assert_eq!(
        (get("row").offset, get("row").len),
        (get("embed").offset + 112, 16)
    );
}

#[test]
fn non_contiguous_views_and_views_past_their_storage_are_refused() {
    let mut t = View::contiguous("w", "0", "FloatStorage", &[4, 3]);
    t.shape = vec![3, 4];
    t.stride = vec![1, 3];
    let err = read_bytes(&checkpoint(&[t], b"")).unwrap_err().to_string();
    assert!(
        err.contains("tensor w") && err.contains("non-contiguous"),
        "{err}"
    );

    let mut t = View::contiguous("w", "0", "FloatStorage", &[4, 3]);
    t.offset = 1;
    let err = read_bytes(&checkpoint(&[t], b"")).unwrap_err().to_string();
    assert!(
        err.contains("tensor w") && err.contains("past the end of its storage"),
        "{err}"
    );

    // A storage that claims more elements than its entry holds.
    let t = View::contiguous("w", "0", "FloatStorage", &[4, 3]);
    let mut bytes = checkpoint(std::slice::from_ref(&t), b"");
    let mut big = t.clone();
    big.numel = 13;
    let pickle = state_dict(&[big], b"");
    let good = state_dict(&[t], b"");
    assert_eq!(pickle.len(), good.len());
    let at = bytes.windows(good.len()).position(|w| w == good).unwrap();
    bytes[at..at + pickle.len()].copy_from_slice(&pickle);
    let err = read_bytes(&bytes).unwrap_err().to_string();
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn every_global_outside_the_allow_list_is_refused_by_name() {
    let t = View::contiguous("w", "0", "FloatStorage", &[2]);
    for (module, name) in [
        ("posix", "system"),
        ("os", "system"),
        ("builtins", "eval"),
        ("builtins", "getattr"),
        ("subprocess", "Popen"),
        ("torch", "load"),
        ("torch._utils", "_rebuild_qtensor"),
        ("torch", "FakeStorage"),
        ("numpy.core.multiarray", "_reconstruct"),
    ] {
        let mut p = Pickler::default();
        p.str("x")
            .global(module, name)
            .str("echo pwned")
            .op(&[0x85])
            .op(b"R");
        let err = read_bytes(&checkpoint(std::slice::from_ref(&t), &p.out)).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(&err, CheckpointError::UnsafePickle { global, .. } if *global == format!("{module}.{name}")),
            "{module}.{name}: {msg}"
        );
        assert!(
            msg.contains("pytorch_model.bin") && msg.contains("archive/data.pkl"),
            "{msg}"
        );
    }
    // STACK_GLOBAL and INST too.
    let mut p = Pickler::default();
    p.str("x")
        .str("posix")
        .str("system")
        .op(&[0x93])
        .str("id")
        .op(&[0x85])
        .op(b"R");
    let err = read_bytes(&checkpoint(std::slice::from_ref(&t), &p.out)).unwrap_err();
    assert!(matches!(err, CheckpointError::UnsafePickle { .. }), "{err}");
    let mut p = Pickler::default();
    p.str("x").op(b"(").str("id").op(b"iposix\nsystem\n");
    let err = read_bytes(&checkpoint(std::slice::from_ref(&t), &p.out)).unwrap_err();
    assert!(matches!(err, CheckpointError::UnsafePickle { .. }), "{err}");
}

#[test]
fn allowed_globals_used_out_of_place_are_errors_not_calls() {
    let t = View::contiguous("w", "0", "FloatStorage", &[2]);
    for extra in [
        // Calling a storage class or a dtype.
        {
            let mut p = Pickler::default();
            p.str("x").global("torch", "FloatStorage").op(b")R");
            p.out
        },
        // OrderedDict with arguments.
        {
            let mut p = Pickler::default();
            p.str("x")
                .global("collections", "OrderedDict")
                .op(b"]")
                .op(&[0x85])
                .op(b"R");
            p.out
        },
        // _rebuild_tensor_v2 with a string for a storage.
        {
            let mut p = Pickler::default();
            p.str("x")
                .global("torch._utils", "_rebuild_tensor_v2")
                .op(b"(")
                .str("s");
            p.int(0).ints(&[1]).ints(&[1]).op(&[0x89]).op(b"}tR");
            p.out
        },
    ] {
        let err = read_bytes(&checkpoint(std::slice::from_ref(&t), &extra)).unwrap_err();
        assert!(matches!(err, CheckpointError::TorchPickle { .. }), "{err}");
    }
}

#[test]
fn parameters_ordered_dicts_and_nested_state_dicts_are_read() {
    // {"state_dict": OrderedDict(w=Parameter(tensor))} with _metadata set by BUILD.
    let t = View::contiguous("w", "0", "HalfStorage", &[2, 2]);
    let mut p = Pickler::default();
    p.op(&[0x80, 2]).op(b"}").put().str("state_dict");
    p.global("collections", "OrderedDict")
        .op(b")R")
        .put()
        .op(b"(");
    p.str("w")
        .global("torch._utils", "_rebuild_parameter")
        .op(b"(");
    p.global("torch._utils", "_rebuild_tensor_v2").op(b"((");
    p.str("storage")
        .global("torch", "HalfStorage")
        .str("0")
        .str("cuda:0")
        .int(4);
    p.op(b"tQ").int(0).ints(&[2, 2]).ints(&[2, 1]).op(&[0x89]);
    p.global("collections", "OrderedDict")
        .op(b")RtR")
        .op(&[0x88]);
    p.global("collections", "OrderedDict").op(b")RtR").op(b"u");
    // BUILD with {'_metadata': {}}.
    p.op(b"}").str("_metadata").op(b"}s").op(b"b");
    p.op(b"s.");
    let entries = vec![
        ("m/data.pkl".to_string(), p.out.clone()),
        ("m/data/0".to_string(), vec![1; 8]),
    ];
    let tensors = read_bytes(&archive(&entries)).unwrap();
    assert_eq!(tensors.len(), 1);
    assert_eq!(
        (tensors[0].0.as_str(), tensors[0].1.dtype, tensors[0].1.len),
        ("w", DType::F16, 8)
    );
    let _ = t;
}

#[test]
fn non_tensor_entries_are_skipped() {
    let t = View::contiguous("w", "0", "FloatStorage", &[2]);
    let mut p = Pickler::default();
    p.str("epoch").int(3).str("name").str("x");
    let tensors = read_bytes(&checkpoint(&[t], &p.out)).unwrap();
    assert_eq!(tensors.len(), 1);
}

#[test]
fn container_formats_torch_does_not_write_are_refused() {
    let t = View::contiguous("w", "0", "FloatStorage", &[2]);
    let good = checkpoint(std::slice::from_ref(&t), b"");

    // The legacy format: a bare pickle beginning with torch's magic number.
    let mut legacy = LEGACY_MAGIC.to_vec();
    legacy.extend_from_slice(&[b'.'; 100]);
    let err = read_bytes(&legacy).unwrap_err();
    assert!(matches!(err, CheckpointError::TorchLegacy { .. }), "{err}");
    assert!(err.to_string().contains("legacy"), "{err}");

    // A safetensors file named .bin, and an empty file.
    for bytes in [b"\x10\0\0\0\0\0\0\0{\"a\":1}".to_vec(), Vec::new()] {
        let err = read_bytes(&bytes).unwrap_err();
        assert!(matches!(err, CheckpointError::TorchZip { .. }), "{err}");
    }

    // A compressed data.pkl (method 8 in the central directory).
    let cd = good.windows(4).position(|w| w == b"PK\x01\x02").unwrap();
    let mut deflated = good.clone();
    deflated[cd + 10] = 8;
    let err = read_bytes(&deflated).unwrap_err().to_string();
    assert!(err.contains("compressed"), "{err}");

    // Big-endian.
    let pickle = state_dict(std::slice::from_ref(&t), b"");
    let big = archive(&[
        ("archive/data.pkl".into(), pickle.clone()),
        ("archive/byteorder".into(), b"big".to_vec()),
        ("archive/data/0".into(), vec![0; 8]),
    ]);
    let err = read_bytes(&big).unwrap_err().to_string();
    assert!(err.contains("big-endian"), "{err}");

    // No data.pkl, and a storage without its entry.
    let err = read_bytes(&archive(&[("archive/data/0".into(), vec![0; 8])])).unwrap_err();
    assert!(err.to_string().contains("data.pkl"), "{err}");
    let err = read_bytes(&archive(&[("archive/data.pkl".into(), pickle)]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no entry archive/data/0"), "{err}");

    // Truncated: the end record is gone.
    let err = read_bytes(&good[..good.len() - 30]).unwrap_err();
    assert!(matches!(err, CheckpointError::TorchZip { .. }), "{err}");
}

#[test]
fn pickles_that_would_exhaust_memory_or_stack_are_bounded() {
    let t = View::contiguous("w", "0", "FloatStorage", &[2]);
    // 100,000 nested one-element tuples.
    let mut deep = vec![0x80, 2, b'N'];
    deep.extend(std::iter::repeat_n(0x85, 100_000));
    deep.push(b'.');
    // A list that appends itself, through the memo.
    let cycle = [0x80, 2, b']', b'q', 0, b'h', 0, b'a', b'.'].to_vec();
    // 2 million DUPs.
    let mut wide = vec![0x80, 2, b'N'];
    wide.extend(std::iter::repeat_n(b'2', 2_000_000));
    wide.push(b'.');
    // A string longer than the pickle, and a LONG4 of 4 GiB.
    let long_str = [0x80, 2, b'X', 0xff, 0xff, 0xff, 0x7f, b'a', b'.'].to_vec();
    let long_int = [0x80, 2, 0x8b, 0xff, 0xff, 0xff, 0xff, b'.'].to_vec();
    // A memo key read before it is written, an empty stack, no STOP.
    let get = [0x80, 2, b'h', 9, b'.'].to_vec();
    let empty = [0x80, 2, b'R', b'.'].to_vec();
    let endless = [0x80, 2, b'N'].to_vec();
    for (what, pickle) in [
        ("deep", deep),
        ("cycle", cycle),
        ("wide", wide),
        ("long_str", long_str),
        ("long_int", long_int),
        ("get", get),
        ("empty", empty),
        ("endless", endless),
    ] {
        let bytes = archive(&[
            ("archive/data.pkl".into(), pickle),
            ("archive/data/0".into(), vec![0; 8]),
        ]);
        let err = read_bytes(&bytes).unwrap_err();
        assert!(
            matches!(err, CheckpointError::TorchPickle { .. }),
            "{what}: {err}"
        );
    }
    // The bounds leave real state dicts alone: 20,000 tensors.
    let views: Vec<View> = (0..20_000)
        .map(|i| {
            View::contiguous(
                &format!("layers.{i}.w"),
                &i.to_string(),
                "FloatStorage",
                &[1],
            )
        })
        .collect();
    assert_eq!(read_bytes(&checkpoint(&views, b"")).unwrap().len(), 20_000);
    let _ = t;
}

#[test]
fn read_at_lists_only_the_storages_holding_the_offsets() {
    let views = vec![
        View::contiguous("a", "0", "FloatStorage", &[4]),
        View::contiguous("b", "1", "FloatStorage", &[4]),
        View::contiguous("c", "2", "FloatStorage", &[0]),
    ];
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "x.bin", &checkpoint(&views, b""));
    let all = read_torch(&LocalStorage, &f).unwrap();
    let get = |n: &str| all.iter().find(|(name, _)| name == n).unwrap().1.clone();
    let some = read_torch_at(&LocalStorage, &f, &[get("b").offset, get("c").offset]).unwrap();
    let names: Vec<&str> = some.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["b", "c"]);
    assert!(read_torch_at(&LocalStorage, &f, &[1 << 40])
        .unwrap()
        .is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = read_bytes(&bytes);
    }

    #[test]
    fn edited_checkpoints_never_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let views = vec![
            View::contiguous("a", "0", "FloatStorage", &[4, 3]),
            View::contiguous("b", "1", "BFloat16Storage", &[5]),
        ];
        let mut bytes = checkpoint(&views, b"");
        for (i, b) in edits {
            let i = i.index(bytes.len());
            bytes[i] = b;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        if let Ok(tensors) = read_bytes(&bytes) {
            for (_, t) in tensors {
                prop_assert!(t.offset + t.len <= bytes.len() as u64);
                prop_assert_eq!(t.len, t.numel() * t.dtype.size() as u64);
            }
        }
    }

    #[test]
    fn edited_pickles_never_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let views = vec![
            View::contiguous("a", "0", "FloatStorage", &[4, 3]),
            View::contiguous("b", "0", "FloatStorage", &[12]),
        ];
        let mut pickle = state_dict(&views, b"");
        for (i, b) in edits {
            let i = i.index(pickle.len());
            pickle[i] = b;
        }
        let _ = pickle::load(&pickle);
    }
}
