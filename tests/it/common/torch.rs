//! PyTorch `.bin` checkpoints written as `torch.save` writes them: a zip of
//! stored entries (local headers padded to 64-byte alignment, ZIP64 end
//! records) holding `archive/data.pkl`, the protocol-2 pickle of a dict of
//! `torch._utils._rebuild_tensor_v2` calls, and one `archive/data/N` per
//! storage. For tests that need `.bin` inputs larger than the kit's.

use std::path::Path;

/// Appends one pickle opcode stream, memoizing as torch's pickler does.
struct Pickle {
    out: Vec<u8>,
    memo: u32,
}

impl Pickle {
    fn put(&mut self) {
        self.out.push(b'r');
        self.out.extend_from_slice(&self.memo.to_le_bytes());
        self.memo += 1;
    }
    fn str(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
        self.put();
    }
    fn int(&mut self, v: u64) {
        self.out.push(b'J');
        self.out.extend_from_slice(&(v as i32).to_le_bytes());
    }
    fn global(&mut self, module: &str, name: &str) {
        self.out
            .extend_from_slice(format!("c{module}\n{name}\n").as_bytes());
        self.put();
    }
    fn ints(&mut self, v: &[u64]) {
        self.out.push(b'(');
        for &x in v {
            self.int(x);
        }
        self.out.push(b't');
        self.put();
    }
}

/// A stored zip archive laid out as torch's writer lays it out.
fn archive(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let (mut out, mut central) = (Vec::new(), Vec::new());
    for (name, data) in entries {
        let offset = out.len();
        let pad = (64 - (offset + 30 + name.len() + 4) % 64) % 64;
        out.extend_from_slice(b"PK\x03\x04\0\0\x08\x08\0\0\0\0\0\0");
        out.extend_from_slice(&[0; 12]);
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(&((pad + 4) as u16).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"FB");
        out.extend_from_slice(&(pad as u16).to_le_bytes());
        out.extend(std::iter::repeat_n(b'Z', pad));
        out.extend_from_slice(data);
        out.extend_from_slice(b"PK\x07\x08\0\0\0\0");
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());
        central.extend_from_slice(b"PK\x01\x02\0\0\0\0\x08\x08\0\0\0\0\0\0\0\0\0\0");
        central.extend_from_slice(&(data.len() as u32).to_le_bytes());
        central.extend_from_slice(&(data.len() as u32).to_le_bytes());
        central.extend_from_slice(&(name.len() as u16).to_le_bytes());
        central.extend_from_slice(&[0; 12]);
        central.extend_from_slice(&(offset as u32).to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let (cd, n) = (out.len() as u64, entries.len() as u64);
    out.extend_from_slice(&central);
    let z64 = out.len() as u64;
    out.extend_from_slice(b"PK\x06\x06");
    out.extend_from_slice(&44u64.to_le_bytes());
    out.extend_from_slice(&[0x1e, 3, 0x2d, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    for v in [n, n, central.len() as u64, cd] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(b"PK\x06\x07\0\0\0\0");
    out.extend_from_slice(&z64.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(b"PK\x05\x06\0\0\0\0");
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&(cd as u32).to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out
}

/// `torch.save({name: tensor})` of bf16 tensors (name, shape, values), each
/// in its own storage.
pub fn torch_save(tensors: &[(String, Vec<u64>, Vec<f32>)]) -> Vec<u8> {
    let mut p = Pickle {
        out: vec![0x80, 2, b'}'],
        memo: 0,
    };
    p.put();
    p.out.push(b'(');
    let mut entries = Vec::new();
    for (key, (name, shape, values)) in tensors.iter().enumerate() {
        let mut stride = vec![1u64; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            stride[i] = stride[i + 1] * shape[i + 1];
        }
        p.str(name);
        p.global("torch._utils", "_rebuild_tensor_v2");
        p.out.extend_from_slice(b"((");
        p.str("storage");
        p.global("torch", "BFloat16Storage");
        p.str(&key.to_string());
        p.str("cpu");
        p.int(values.len() as u64);
        p.out.extend_from_slice(b"tQ");
        p.int(0);
        p.ints(shape);
        p.ints(&stride);
        p.out.push(0x89);
        p.global("collections", "OrderedDict");
        p.out.extend_from_slice(b")RtR");
        let bytes: Vec<u8> = values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
            .collect();
        entries.push((format!("archive/data/{key}"), bytes));
    }
    p.out.extend_from_slice(b"u.");
    let mut all = vec![
        ("archive/data.pkl".to_string(), p.out),
        ("archive/byteorder".to_string(), b"little".to_vec()),
    ];
    all.extend(entries);
    all.push(("archive/version".to_string(), b"3\n".to_vec()));
    archive(&all)
}

/// Writes a bf16 Llama-like model as `pytorch_model.bin`, or with `shards`
/// above 1 as `pytorch_model-0000N-of-0000M.bin` plus
/// `pytorch_model.bin.index.json`, and its `config.json`.
pub fn write_bin_model(
    dir: &Path,
    layers: u64,
    tensors: &[(String, Vec<u64>, Vec<f32>)],
    shards: usize,
) {
    std::fs::create_dir_all(dir).unwrap();
    if shards <= 1 {
        std::fs::write(dir.join("pytorch_model.bin"), torch_save(tensors)).unwrap();
    } else {
        let per = tensors.len().div_ceil(shards);
        let mut map = serde_json::Map::new();
        for (i, part) in tensors.chunks(per).enumerate() {
            let name = format!("pytorch_model-{:05}-of-{shards:05}.bin", i + 1);
            std::fs::write(dir.join(&name), torch_save(part)).unwrap();
            for (t, _, _) in part {
                map.insert(t.clone(), name.clone().into());
            }
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": map});
        std::fs::write(
            dir.join("pytorch_model.bin.index.json"),
            serde_json::to_vec_pretty(&index).unwrap(),
        )
        .unwrap();
    }
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "num_hidden_layers": layers, "torch_dtype": "bfloat16"
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();
}
