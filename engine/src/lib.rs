//! fleetmerge-engine: everything both binaries share. The YAML config and its
//! parameter resolution (`config`), checkpoint headers (`checkpoint`: safetensors,
//! and PyTorch `.bin` files read without running their pickle), where bytes
//! live (`storage`), the work unit that planner and workers exchange (`unit`),
//! the planner that turns a config into work units (`plan`), the merge methods
//! (`methods`), the executor that runs one work unit (`exec`), the output
//! files around the tensors (`output`), tokenizer merging: the output
//! vocabulary and each input's rows in it (`tokenizer`), `fleetmerge moe`'s
//! planner: a Mixture of Experts built from dense models (`moe`), and the
//! layer-by-layer forward pass of a dense decoder its `hidden` routers run
//! (`forward`).
//!
//! # Layers
//!
//! Each module uses only the modules listed for it, all of them lower in this
//! list (tests may use anything; `layering` below checks this):
//!
//! | module           | may use                                                         |
//! |------------------|-----------------------------------------------------------------|
//! | `dtype`, `size`  | nothing of the crate                                            |
//! | `yaml`           | nothing (a YAML reader that keeps positions; no meaning)        |
//! | `forward`        | nothing of the crate (candle's tensors, one decoder layer at a time) |
//! | `storage`        | `yaml` (its `--storage-config` file); `storage::hub` is its Hugging Face Hub backend |
//! | `config`         | `yaml`, `dtype`                                                 |
//! | `checkpoint`     | `storage`, `dtype`                                              |
//! | `output`         | `storage`, `dtype`                                              |
//! | `unit`           | `output` (a shard's layout), `storage` (a part's upload chunks), `dtype` |
//! | `tokenizer`      | `config` (the tokenizer settings), `storage`, `output`, `unit` (the row alignment), `yaml` |
//! | `methods`        | `unit` (the parameter values), `dtype`                          |
//! | `unit::validate` | `methods` (a unit's parameters are checked against its method's spec), `unit`, `dtype` |
//! | `gpu`            | `methods`, `unit`, `dtype`                                      |
//! | `plan`           | `config`, `checkpoint`, `storage`, `output`, `tokenizer` (the output vocabulary and each vocabulary tensor's alignment), `methods`, `unit`, `yaml`, `size`, `dtype` |
//! | `exec`           | `plan` (only to report its memory estimate: `plan::summary::PeakMemory`), `gpu`, `methods`, `unit`, `checkpoint`, `storage`, `output`, `size`, `dtype` |
//! | `moe`            | `plan` (its input models, shards and plan types), `config` (model references, errors), `methods` (the random streams, LoRA factors), `forward` (the `hidden` routers), `storage`, `output`, `unit`, `yaml`, `size`, `dtype` |
//!
//! `unit` is split in two on purpose: its types are below `methods` (a
//! method's kernel reads the unit's parameter values), while the checks of
//! [`unit::WorkUnit::validate`] are above it (they look the unit's method up).

pub mod checkpoint;
pub mod config;
pub mod dtype;
pub mod exec;
pub mod forward;
pub mod gpu;
pub mod methods;
pub mod moe;
pub mod output;
pub mod plan;
pub mod size;
pub mod storage;
pub mod tokenizer;
pub mod unit;
pub mod yaml;

pub use dtype::DType;

#[cfg(test)]
mod layering {
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    /// The table of the crate's opening comment: a layer, and what it may use.
    const ALLOWED: &[(&str, &[&str])] = &[
        ("dtype", &[]),
        ("size", &[]),
        ("yaml", &[]),
        ("forward", &[]),
        ("storage", &["yaml"]),
        ("config", &["yaml", "dtype"]),
        ("checkpoint", &["storage", "dtype"]),
        ("output", &["storage", "dtype"]),
        ("unit", &["output", "storage", "dtype"]),
        (
            "tokenizer",
            &["config", "storage", "output", "unit", "yaml"],
        ),
        ("methods", &["unit", "dtype"]),
        ("unit::validate", &["methods", "unit", "dtype"]),
        ("gpu", &["methods", "unit", "dtype"]),
        (
            "plan",
            &[
                "config",
                "checkpoint",
                "storage",
                "output",
                "tokenizer",
                "methods",
                "unit",
                "yaml",
                "size",
                "dtype",
            ],
        ),
        (
            "exec",
            &[
                "plan",
                "gpu",
                "methods",
                "unit",
                "checkpoint",
                "storage",
                "output",
                "size",
                "dtype",
            ],
        ),
        (
            "moe",
            &[
                "plan", "config", "methods", "forward", "storage", "output", "unit", "yaml",
                "size", "dtype",
            ],
        ),
    ];

    fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                sources(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    /// The layer of a source file: its top module, or `unit::validate`.
    fn layer(src: &Path, file: &Path) -> String {
        let rel = file.strip_prefix(src).unwrap();
        let rel = rel.to_string_lossy().replace('\\', "/");
        if rel == "unit/validate.rs" {
            return "unit::validate".into();
        }
        let top = rel.split('/').next().unwrap();
        top.trim_end_matches(".rs").to_string()
    }

    /// The modules a file's code (not its comments or its `tests` module)
    /// names as `crate::NAME`.
    fn uses(text: &str) -> BTreeSet<String> {
        let code = match text.find("#[cfg(test)]\nmod tests") {
            Some(i) => &text[..i],
            None => text,
        };
        let mut out = BTreeSet::new();
        for line in code.lines() {
            let line = line.trim_start();
            if line.starts_with("//") {
                continue;
            }
            for (i, _) in line.match_indices("crate::") {
                let name: String = line[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                out.insert(name);
            }
        }
        out
    }

    #[test]
    fn each_layer_uses_only_the_layers_below_it() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&src, &mut files);
        let mut checked = 0;
        let mut wrong = Vec::new();
        for file in &files {
            if file
                .file_name()
                .is_some_and(|n| n == "tests.rs" || n == "lib.rs")
            {
                continue;
            }
            let layer = layer(&src, file);
            let allowed = ALLOWED
                .iter()
                .find(|(l, _)| *l == layer)
                .unwrap_or_else(|| panic!("{}: layer {layer} is not in the table", file.display()))
                .1;
            let own = layer.split("::").next().unwrap();
            for used in uses(&std::fs::read_to_string(file).unwrap()) {
                if used != own && !allowed.contains(&used.as_str()) {
                    wrong.push(format!("{}: {layer} uses {used}", file.display()));
                }
            }
            checked += 1;
        }
        assert!(checked > 50, "{checked} files");
        assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
    }

    /// The table is an order: nothing may use a layer listed after it.
    #[test]
    fn the_table_only_looks_down() {
        for (i, (layer, allowed)) in ALLOWED.iter().enumerate() {
            for a in *allowed {
                let j = ALLOWED.iter().position(|(l, _)| l == a).unwrap();
                assert!(j < i, "{layer} may use {a}, which is not below it");
            }
        }
    }

    #[test]
    fn the_scan_sees_code_and_skips_comments_and_tests() {
        let text = "//! crate::plan\nuse crate::unit::X;\nfn f() { crate::size::g() }\n\
                    #[cfg(test)]\nmod tests {\n    use crate::exec;\n}\n";
        let found: Vec<String> = uses(text).into_iter().collect();
        assert_eq!(found, ["size", "unit"]);
    }
}
