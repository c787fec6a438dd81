//! Planning at DeepSeek-V3 scale: two checkpoints with DeepSeek-V3's tensor
//! layout and full tensor count, header-only sparse files made by
//! `fleetmerge_bench::deepseek` (shared with the coordinator benchmark).
//! `fleetmerge plan` plans them from the headers alone; the time it takes is
//! printed, not asserted (about 2.5 s on the project's 2-core machine).

use crate::common::*;
use fleetmerge_bench::deepseek::{tensors, write_model};
use std::time::{Duration, Instant};

#[test]
fn a_deepseek_v3_sized_merge_is_planned_from_headers_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (count, total) = write_model(&dir.path().join("ds-a")).unwrap();
    write_model(&dir.path().join("ds-b")).unwrap();
    assert!(count > 90_000, "{count} tensors");
    assert!(total > 600_000_000_000, "{total} bytes");
    std::fs::write(
        dir.path().join("m.yaml"),
        "models:\n  - model: ds-a\n    parameters: {weight: 0.5}\n  - model: ds-b\n    \
         parameters: {weight: 0.5}\nmerge_method: linear\ndtype: bfloat16\n",
    )
    .unwrap();
    let started = Instant::now();
    let o = fleetmerge(dir.path(), &["plan", "m.yaml", "--json"]);
    let took = started.elapsed();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let p = &v["plan"];
    // Every FP8 weight is dequantized: its scale is not an output of its own.
    let scales = tensors()
        .iter()
        .filter(|(n, _, _)| n.ends_with("_scale_inv"))
        .count();
    assert_eq!(
        p["output_tensors"].as_u64().unwrap() as usize,
        count - scales
    );
    assert_eq!(p["read_total"].as_u64().unwrap(), 2 * total);
    eprintln!(
        "planned {count} tensors, {} units, {:.0} GB per model in {took:.2?}",
        p["work_units"],
        total as f64 / 1e9
    );
    // No time limit asserted (timings belong in benchmarks); the time is printed
    // and recorded in the notes: about 2.5 s on the project's 2-core machine.
    let _: Duration = took;
    let warnings = p["warnings"].to_string();
    assert!(
        warnings.contains(&format!("{scales} FP8 weights are dequantized")),
        "{warnings}"
    );
}
