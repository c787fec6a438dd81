//! Hugging Face Hub references end to end, against a fake Hub on loopback
//! (tests/fixtures/fake_hub.py, started by each test: the Hub's origin plus a
//! second "CDN" origin for signed URLs) and the real huggingface_hub client:
//!
//! - a kit config whose `./models/x` became Hub ids merges from the Hub by
//!   range with the bytes of the local merge; one `/resolve/` request per
//!   file read, the token on the Hub's origin only, only the needed ranges;
//! - huggingface_hub's `snapshot_download` fills a real cache, from which an
//!   `HF_HUB_OFFLINE=1` merge gives the same bytes and sends nothing;
//! - `fleetmerge download` fills a cache that huggingface_hub reads offline;
//! - 429s, 503s, an empty 206, a spurious 416 and expiring signed URLs are
//!   recovered; gated, missing repo / revision and bad ids are clear errors
//!   with nothing written; a resume after the branch moved keeps its commit;
//! - cluster mode: a coordinator and worker processes, each with its own token
//!   and cache, merge Hub ids pinned to commits with the bytes of local paths
//!   (a branch that moves after planning changes nothing); a worker without a
//!   token for a gated model fails its units with an error naming the id, and
//!   the merge ends unfinished.

use crate::common::procs::{field, Proc};
use crate::common::{examples, fixture, root, venv_python};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "hf_fake_token_for_tests";
/// Two more tokens the fake Hub accepts (for cluster workers: its request log
/// tells the processes apart by their token).
const TOKEN_W1: &str = "hf_fake_token_of_worker_one";
const TOKEN_W2: &str = "hf_fake_token_of_worker_two";
const REPOS: &[&str] = &[
    "llama-base",
    "llama-ft-a",
    "llama-ft-b",
    "llama-ft-c",
    "mixtral-base",
    "mixtral-ft-a",
    "mixtral-ft-b",
    "lora-qv",
    "lora-wide",
    "llama-bin-a",
    "llama-bin-b",
    "llama-bin-evil",
    "gptoss-base",
    "gptoss-ft-a",
    "gptoss-ft-b",
    "gptoss-ft-c",
];

/// The commit of repo number `i` (40 hex digits).
fn commit(i: usize) -> String {
    format!("{:040x}", 0xc0ffee000 + i)
}

struct FakeHub {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

#[derive(Debug, Clone)]
struct Req {
    origin: String,
    method: String,
    path: String,
    range: Option<String>,
    auth: Option<String>,
}

impl FakeHub {
    fn start() -> FakeHub {
        let dir = tempfile::tempdir().unwrap();
        let mut repos = serde_json::Map::new();
        for (i, name) in REPOS.iter().enumerate() {
            repos.insert(
                format!("fm/{name}"),
                json!({"dir": examples().join("models").join(name), "commits": [commit(i)]}),
            );
        }
        repos.insert(
            "fm/gated".into(),
            json!({"dir": examples().join("models/llama-ft-a"), "gated": true, "commits": [commit(99)]}),
        );
        let config = dir.path().join("hub.json");
        std::fs::write(
            &config,
            json!({"token": TOKEN, "tokens": [TOKEN_W1, TOKEN_W2], "page": 4, "repos": repos})
                .to_string(),
        )
        .unwrap();
        let ports = dir.path().join("ports");
        let child = Command::new(venv_python())
            .arg(root().join("tests/fixtures/fake_hub.py"))
            .arg(&config)
            .arg(&ports)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the fake hub");
        let deadline = Instant::now() + Duration::from_secs(30);
        let text = loop {
            if let Ok(t) = std::fs::read_to_string(&ports) {
                break t;
            }
            assert!(Instant::now() < deadline, "the fake hub did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        let port = text.split_whitespace().next().unwrap().parse().unwrap();
        FakeHub {
            child,
            port,
            _dir: dir,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn http(&self, method: &str, path: &str, body: &str) -> Vec<u8> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: \
             application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        let at = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        out[at..].to_vec()
    }

    /// Every request so far (and forget them with `clear`); the admin calls left out.
    fn log(&self, clear: bool) -> Vec<Req> {
        let path = if clear {
            "/_admin/log?clear=1"
        } else {
            "/_admin/log"
        };
        let v: Vec<Value> = serde_json::from_slice(&self.http("GET", path, "")).unwrap();
        v.into_iter()
            .map(|r| Req {
                origin: r["origin"].as_str().unwrap().into(),
                method: r["method"].as_str().unwrap().into(),
                path: r["path"].as_str().unwrap().into(),
                range: r["range"].as_str().map(str::to_string),
                auth: r["auth"].as_str().map(str::to_string),
            })
            .filter(|r| !r.path.starts_with("/_admin"))
            .collect()
    }

    fn faults(&self, f: Value) {
        self.http("POST", "/_admin/faults", &f.to_string());
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `fleetmerge ARGS` in `cwd` with only the given Hub environment.
fn run_env(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fleetmerge"));
    c.current_dir(cwd).args(args);
    for k in [
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_ENDPOINT",
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_HOME",
        "HF_TOKEN_PATH",
    ] {
        c.env_remove(k);
    }
    c.env("FLEETMERGE_IO_RETRIES", "4");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("the fleetmerge binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A kit case's config with `./models/x` as the Hub id `fm/x` (the base
/// model at `@main`, to exercise revisions).
fn hub_config(case: &str, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(fixture(case).join("config.yaml")).unwrap();
    let text = text
        .replace("base_model: ./models/", "base_model: ./models/@@")
        .replace("./models/", "fm/");
    let text = regex_base(&text);
    let p = dir.join(format!("{case}.yaml"));
    std::fs::write(&p, text).unwrap();
    p
}

/// `fm/@@name` → `fm/name@main`.
fn regex_base(text: &str) -> String {
    text.lines()
        .map(|l| match l.split_once("fm/@@") {
            Some((head, name)) => format!("{head}fm/{}@main", name.trim()),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// The safetensors and config.json files of an output, by name.
fn outputs(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            (n.ends_with(".safetensors") || n == "config.json" || n.ends_with(".index.json"))
                .then(|| (n, std::fs::read(e.path()).unwrap()))
        })
        .collect()
}

fn local_run(case: &str, out: &Path, shard: &str) -> BTreeMap<String, Vec<u8>> {
    crate::common::run_case(case, out, shard);
    outputs(out)
}

/// Sum of the byte ranges of `Range: bytes=a-b` requests.
fn range_bytes(reqs: &[Req]) -> u64 {
    reqs.iter()
        .filter_map(|r| r.range.as_deref())
        .map(|r| {
            let (a, b) = r.trim_start_matches("bytes=").split_once('-').unwrap();
            b.parse::<u64>().unwrap() - a.parse::<u64>().unwrap() + 1
        })
        .sum()
}

fn model_file_bytes(names: &[&str]) -> u64 {
    names
        .iter()
        .flat_map(|n| std::fs::read_dir(examples().join("models").join(n)).unwrap())
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

#[test]
fn kit_cases_merge_from_the_hub_by_range_with_the_bytes_of_local_paths() {
    let hub = FakeHub::start();
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("empty-cache");
    let endpoint = hub.endpoint();
    let env = [
        ("HF_ENDPOINT", endpoint.as_str()),
        ("HF_HUB_CACHE", cache.to_str().unwrap()),
        ("HF_TOKEN", TOKEN),
    ];
    for (case, inputs, shard) in [
        (
            "ties",
            &["llama-ft-a", "llama-ft-b", "llama-ft-c", "llama-base"][..],
            "5B",
        ),
        (
            "passthrough_slices",
            &["llama-ft-a", "llama-ft-b"][..],
            "5B",
        ),
        (
            "mixtral_ties",
            &["mixtral-ft-a", "mixtral-ft-b", "mixtral-base"][..],
            "5B",
        ),
        (
            "gptoss_ties",
            &["gptoss-ft-a", "gptoss-ft-b", "gptoss-ft-c", "gptoss-base"][..],
            "5B",
        ),
    ] {
        let want = local_run(case, &t.path().join(format!("{case}-local")), shard);
        let config = hub_config(case, t.path());
        hub.log(true);
        let out = t.path().join(format!("{case}-hub"));
        let o = run_env(
            t.path(),
            &[
                "run",
                config.to_str().unwrap(),
                out.to_str().unwrap(),
                "--quiet",
                "--out-shard-size",
                shard,
            ],
            &env,
        );
        assert!(o.status.success(), "{case}: {}", stderr(&o));
        assert_eq!(
            outputs(&out),
            want,
            "{case}: the Hub merge differs from the local one"
        );
        let reqs = hub.log(false);
        // One /resolve/ request per file read, whatever the tensor count.
        let mut per_file: BTreeMap<&str, usize> = BTreeMap::new();
        for r in reqs.iter().filter(|r| r.path.contains("/resolve/")) {
            *per_file.entry(r.path.as_str()).or_default() += 1;
        }
        assert!(
            per_file.values().all(|&n| n == 1),
            "{case}: more than one /resolve/ per file: {per_file:?}"
        );
        let shard_heads = reqs
            .iter()
            .filter(|r| {
                r.method == "HEAD"
                    && r.path.contains("/resolve/")
                    && r.path.ends_with(".safetensors")
            })
            .count();
        let shard_files: usize = inputs
            .iter()
            .map(|n| {
                std::fs::read_dir(examples().join("models").join(n))
                    .unwrap()
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
                    .count()
            })
            .sum();
        assert!(
            shard_heads <= shard_files && shard_heads > 0,
            "{case}: {shard_heads} HEADs for {shard_files} shard files"
        );
        // Ranges go to the signed CDN URL (or the Hub's resolve-cache URL of a
        // small file), never through /resolve/; the token reaches the Hub's
        // origin and never the CDN.
        assert!(reqs
            .iter()
            .filter(|r| r.range.is_some())
            .all(|r| !r.path.contains("/resolve/")));
        assert!(reqs
            .iter()
            .filter(|r| r.range.is_some() && r.path.starts_with("/blob/"))
            .all(|r| r.origin == "cdn"));
        assert!(
            reqs.iter()
                .filter(|r| r.origin == "cdn")
                .all(|r| r.auth.is_none()),
            "{case}: the token reached the CDN"
        );
        assert!(reqs
            .iter()
            .filter(|r| r.origin == "hub")
            .all(|r| r.auth.as_deref() == Some(&format!("Bearer {TOKEN}"))));
        let cdn = reqs.iter().filter(|r| r.origin == "cdn").count();
        let cdn_reqs: Vec<Req> = reqs.iter().filter(|r| r.origin == "cdn").cloned().collect();
        let read = range_bytes(&cdn_reqs);
        let size = model_file_bytes(inputs);
        eprintln!(
            "{case}: {} requests ({} to /resolve/, {} API, {cdn} ranges on the CDN), {read} bytes \
             read from the CDN of {size} bytes of input shards",
            reqs.len(),
            per_file.len(),
            reqs.iter()
                .filter(|r| r.path.starts_with("/api/models"))
                .count()
        );
        assert!(read <= size, "{case}: read {read} bytes of {size}");
        if case == "passthrough_slices" {
            // Two of six layers of each model are not needed: not read.
            assert!(read < size * 9 / 10, "{case}: read {read} of {size}");
        }
        // The model card records the commit, the journal's plan too.
        let card = std::fs::read_to_string(out.join("README.md")).unwrap();
        assert!(
            card.contains(&format!("Hugging Face Hub `fm/{}` at commit", inputs[0])),
            "{card}"
        );
        assert!(card.contains("[fm/"), "Hub ids are linked: {card}");
        let plan = std::fs::read_to_string(out.join(".fleetmerge/plan.json")).unwrap();
        assert!(plan.contains(&format!("hf://fm/{}@", inputs[0])));
    }
}

/// LoRA references with both sides on the Hub (`fm/llama-base+fm/lora-wide`)
/// merge by range with the bytes of local paths; `plan` lists the adapter's
/// repository as an input of its own and the card records its commit;
/// `download` puts the adapter's files in the cache beside the model's, and an
/// offline merge from that cache gives the same bytes.
#[test]
fn adapters_on_the_hub_merge_like_local_ones() {
    let hub = FakeHub::start();
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("hf-cache");
    let endpoint = hub.endpoint();
    let env = [
        ("HF_ENDPOINT", endpoint.as_str()),
        ("HF_HUB_CACHE", cache.to_str().unwrap()),
        ("HF_TOKEN", TOKEN),
    ];
    let case = "lora_ties";
    let want = local_run(case, &t.path().join("local"), "5B");
    let config = hub_config(case, t.path());
    assert!(std::fs::read_to_string(&config)
        .unwrap()
        .contains("model: fm/llama-base+fm/lora-wide"));
    let out = t.path().join("hub");
    let o = run_env(
        t.path(),
        &[
            "run",
            config.to_str().unwrap(),
            out.to_str().unwrap(),
            "--quiet",
        ],
        &env,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        outputs(&out),
        want,
        "the Hub merge differs from the local one"
    );
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains("Hugging Face Hub `fm/lora-wide` at commit")
            && card.contains("[fm/lora-wide](https://huggingface.co/fm/lora-wide)"),
        "{card}"
    );
    let o = run_env(
        t.path(),
        &["plan", config.to_str().unwrap(), "--json"],
        &env,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let plan: Value = serde_json::from_slice(&o.stdout).unwrap();
    let lora = plan["hub"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["repo"] == "fm/lora-wide")
        .unwrap_or_else(|| panic!("no hub line for the adapter: {plan}"));
    assert_eq!(lora["reference"], "fm/lora-wide");
    assert_eq!(lora["files"], 1, "{lora}");
    // download, then offline.
    let config = hub_config("lora_base_model", t.path());
    let o = run_env(
        t.path(),
        &["download", config.to_str().unwrap()],
        &[
            ("HF_ENDPOINT", endpoint.as_str()),
            ("HF_HUB_CACHE", cache.to_str().unwrap()),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let snapshot = cache
        .join("models--fm--lora-qv/snapshots")
        .join(commit(REPOS.iter().position(|r| *r == "lora-qv").unwrap()));
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert_eq!(
            std::fs::read(snapshot.join(f)).unwrap(),
            std::fs::read(examples().join("models/lora-qv").join(f)).unwrap(),
            "{f}"
        );
    }
    let want = local_run("lora_base_model", &t.path().join("local-base"), "5B");
    let out = t.path().join("offline");
    let o = run_env(
        t.path(),
        &[
            "run",
            config.to_str().unwrap(),
            out.to_str().unwrap(),
            "--quiet",
        ],
        &[
            ("HF_HUB_CACHE", cache.to_str().unwrap()),
            ("HF_HUB_OFFLINE", "1"),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(outputs(&out), want);
}

#[test]
fn bin_checkpoints_merge_from_the_hub_by_range_and_unsafe_ones_are_refused() {
    let hub = FakeHub::start();
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("empty-cache");
    let endpoint = hub.endpoint();
    let env = [
        ("HF_ENDPOINT", endpoint.as_str()),
        ("HF_HUB_CACHE", cache.to_str().unwrap()),
        ("HF_TOKEN", TOKEN),
    ];
    // fm/llama-bin-a (pytorch_model.bin), fm/llama-bin-b (two .bin shards and
    // pytorch_model.bin.index.json) with two safetensors models.
    let case = "bin_mixed_ties";
    let want = local_run(case, &t.path().join("local"), "5B");
    let config = hub_config(case, t.path());
    hub.log(true);
    let out = t.path().join("hub");
    let o = run_env(
        t.path(),
        &[
            "run",
            config.to_str().unwrap(),
            out.to_str().unwrap(),
            "--quiet",
        ],
        &env,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        outputs(&out),
        want,
        "the Hub merge differs from the local one"
    );
    let reqs = hub.log(false);
    let resolved: Vec<&str> = reqs
        .iter()
        .filter(|r| r.path.contains("/resolve/") && r.path.ends_with(".bin"))
        .map(|r| r.path.as_str())
        .collect();
    assert!(
        resolved
            .iter()
            .any(|p| p.ends_with("/pytorch_model-00002-of-00002.bin")),
        "{resolved:?}"
    );
    // Every byte of a checkpoint comes by range from the CDN, none whole.
    let blobs: Vec<&Req> = reqs
        .iter()
        .filter(|r| r.path.starts_with("/blob/"))
        .collect();
    assert!(!blobs.is_empty());
    assert!(
        blobs
            .iter()
            .all(|r| r.range.is_some() || r.method == "HEAD"),
        "a blob fetched whole: {blobs:?}"
    );

    // The unsafe one, from the Hub: refused naming its hf:// file and the global.
    let config = t.path().join("evil.yaml");
    std::fs::write(
        &config,
        "models:\n  - model: fm/llama-bin-evil\n    parameters: {weight: 1}\nmerge_method: linear\n",
    )
    .unwrap();
    let o = run_env(
        t.path(),
        &[
            "run",
            config.to_str().unwrap(),
            t.path().join("evil").to_str().unwrap(),
            "--quiet",
        ],
        &env,
    );
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("hf://fm/llama-bin-evil@")
            && err.contains("pytorch_model.bin")
            && err.contains("posix.system"),
        "{err}"
    );
}

/// Fills `cache` with huggingface_hub's snapshot_download from the fake hub.
fn snapshot_download(hub: &FakeHub, cache: &Path, repos: &[&str]) {
    let script = format!(
        "import huggingface_hub as h\nfor r in {repos:?}:\n    h.snapshot_download('fm/' + r)\n"
    );
    let o = Command::new(venv_python())
        .args(["-c", &script])
        .env("HF_ENDPOINT", hub.endpoint())
        .env("HF_HUB_CACHE", cache)
        .env("HF_HUB_DISABLE_XET", "1")
        .env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .expect("python runs");
    assert!(
        o.status.success(),
        "snapshot_download (is huggingface_hub installed? run `bash scripts/test.sh`): {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_cache_huggingface_hub_filled_merges_offline_with_no_request() {
    let hub = FakeHub::start();
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("hf-cache");
    snapshot_download(
        &hub,
        &cache,
        &["llama-base", "llama-ft-a", "llama-ft-b", "llama-ft-c"],
    );
    hub.log(true);
    // A dead endpoint: any request would fail.
    let dead = format!("http://127.0.0.1:{}", crate::common::procs::free_port());
    let env = [
        ("HF_ENDPOINT", dead.as_str()),
        ("HF_HUB_CACHE", cache.to_str().unwrap()),
        ("HF_HUB_OFFLINE", "1"),
    ];
    for case in ["ties", "passthrough_slices"] {
        let want = local_run(case, &t.path().join(format!("{case}-local")), "5B");
        let config = hub_config(case, t.path());
        let out = t.path().join(format!("{case}-offline"));
        let o = run_env(
            t.path(),
            &[
                "run",
                config.to_str().unwrap(),
                out.to_str().unwrap(),
                "--quiet",
            ],
            &env,
        );
        assert!(o.status.success(), "{case}: {}", stderr(&o));
        assert_eq!(outputs(&out), want, "{case}: the offline merge differs");
        // The tokenizer came from the cache too.
        if case == "ties" {
            assert!(out.join("tokenizer.json").exists());
        }
    }
    assert!(hub.log(false).is_empty(), "offline merges sent requests");

    // `plan` says where each input comes from.
    let config = hub_config("ties", t.path());
    let o = run_env(t.path(), &["plan", config.to_str().unwrap()], &env);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("hub inputs"), "{text}");
    assert!(
        text.contains(&format!("fm/llama-base@main  commit {}", commit(0)))
            && text.contains("from the cache"),
        "{text}"
    );

    // A model that is not cached: the id, the revision and the folder looked in.
    let missing = t.path().join("missing.yaml");
    std::fs::write(
        &missing,
        "models:\n  - model: fm/llama-ft-a\n    parameters: {weight: 1}\n  - model: fm/mixtral-base@v2\n    parameters: {weight: 1}\nmerge_method: linear\n",
    )
    .unwrap();
    let out = t.path().join("never");
    let o = run_env(
        t.path(),
        &["run", missing.to_str().unwrap(), out.to_str().unwrap()],
        &env,
    );
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(
        e.contains("fm/mixtral-base@v2")
            && e.contains("models--fm--mixtral-base")
            && e.contains("HF_HUB_OFFLINE")
            && e.contains("line 4"),
        "{e}"
    );
    assert!(!out.exists());
}

#[test]
fn download_fills_a_cache_that_huggingface_hub_reads_offline() {
    let hub = FakeHub::start();
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("hf-cache");
    let endpoint = hub.endpoint();
    let config = hub_config("ties", t.path());
    let o = run_env(
        t.path(),
        &["download", config.to_str().unwrap()],
        &[
            ("HF_ENDPOINT", endpoint.as_str()),
            ("HF_HUB_CACHE", cache.to_str().unwrap()),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("downloaded"), "{}", stderr(&o));
    // huggingface_hub, offline, finds every file with its bytes.
    let script = "import huggingface_hub as h, os, sys, json\n\
        out = {}\n\
        for r in ['llama-base', 'llama-ft-a', 'llama-ft-b', 'llama-ft-c']:\n\
        \x20   d = h.snapshot_download('fm/' + r, local_files_only=True)\n\
        \x20   out[r] = {n: open(os.path.join(d, n), 'rb').read().hex() for n in os.listdir(d)}\n\
        \x20   h.hf_hub_download('fm/' + r, 'config.json')\n\
        print(json.dumps(out))\n";
    let o = Command::new(venv_python())
        .args(["-c", script])
        .env("HF_HUB_CACHE", &cache)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got: BTreeMap<String, BTreeMap<String, String>> =
        serde_json::from_slice(&o.stdout).unwrap();
    for (repo, files) in &got {
        assert!(
            files.contains_key("config.json") && files.keys().any(|f| f.ends_with(".safetensors"))
        );
        for (name, hex) in files {
            let want = std::fs::read(examples().join("models").join(repo).join(name)).unwrap();
            assert_eq!(hex, &hex::encode(want), "{repo}/{name}");
        }
    }
    assert!(got["llama-base"].contains_key("tokenizer.json"));
    // And fleetmerge merges from it offline.
    let want = local_run("ties", &t.path().join("local"), "5B");
    let out = t.path().join("offline");
    let o = run_env(
        t.path(),
        &[
            "run",
            config.to_str().unwrap(),
            out.to_str().unwrap(),
            "--quiet",
        ],
        &[
            ("HF_HUB_CACHE", cache.to_str().unwrap()),
            ("HF_HUB_OFFLINE", "1"),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(outputs(&out), want);
}

#[test]
fn hub_faults_are_recovered_and_failures_leave_nothing_complete() {
    let hub = FakeHub::start();
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("empty-cache");
    let endpoint = hub.endpoint();
    let env = [
        ("HF_ENDPOINT", endpoint.as_str()),
        ("HF_HUB_CACHE", cache.to_str().unwrap()),
    ];
    let want = local_run("ties", &t.path().join("local"), "300K");
    let config = hub_config("ties", t.path());
    hub.faults(json!({"rate_limit": 2, "cdn_503": 2, "empty_206": 1, "spurious_416": 1, "expire_after": 3}));
    hub.log(true);
    let out = t.path().join("faulty");
    let o = run_env(
        t.path(),
        &[
            "run",
            config.to_str().unwrap(),
            out.to_str().unwrap(),
            "--quiet",
            "--out-shard-size",
            "300K",
        ],
        &env,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(outputs(&out), want);
    let reqs = hub.log(false);
    // Expired signed URLs were resolved again: some shard got a second HEAD.
    let mut heads: BTreeMap<&str, usize> = BTreeMap::new();
    for r in reqs
        .iter()
        .filter(|r| r.method == "HEAD" && r.path.ends_with(".safetensors"))
    {
        *heads.entry(r.path.as_str()).or_default() += 1;
    }
    assert!(heads.values().any(|&n| n >= 2), "{heads:?}");
    assert!(reqs.iter().all(|r| r.origin == "hub" || r.auth.is_none()));
    hub.faults(json!({"expire_after": 0}));

    // A CDN that fails once the merge was planned (its 7 shard headers read):
    // a clear error naming the file, no complete-looking output.
    hub.faults(json!({"cdn_ok_then_503": 7}));
    let out = t.path().join("failed");
    let o = run_env(
        t.path(),
        &[
            "run",
            config.to_str().unwrap(),
            out.to_str().unwrap(),
            "--quiet",
            "--out-shard-size",
            "300K",
        ],
        &[env[0], env[1], ("FLEETMERGE_IO_RETRIES", "1")],
    );
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(
        e.contains("hf://fm/llama-") && e.contains(".safetensors"),
        "{e}"
    );
    assert!(
        !out.join("model.safetensors.index.json").exists()
            && !out.join("README.md").exists()
            && !out.join(".fleetmerge/done").exists(),
        "a failed merge left a finished-looking output"
    );
    hub.faults(json!({"cdn_ok_then_503": -1}));

    // Resumed after `main` moved: the journal's commit is kept, and said so.
    hub.http(
        "POST",
        "/_admin/ref",
        &json!({"repo": "fm/llama-base", "ref": "main", "commit": commit(50)}).to_string(),
    );
    let o = run_env(
        t.path(),
        &[
            "run",
            config.to_str().unwrap(),
            out.to_str().unwrap(),
            "--out-shard-size",
            "300K",
        ],
        &env,
    );
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains(&format!("now points to commit {}", commit(50)))
            && e.contains(&format!("started from commit {}", commit(0))),
        "{e}"
    );
    assert_eq!(outputs(&out), want);
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains(&commit(0)) && !card.contains(&commit(50)),
        "{card}"
    );
}

#[test]
fn hub_errors_name_the_id_and_what_to_do() {
    let hub = FakeHub::start();
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("c");
    let endpoint = hub.endpoint();
    let env = [
        ("HF_ENDPOINT", endpoint.as_str()),
        ("HF_HUB_CACHE", cache.to_str().unwrap()),
    ];
    let run = |model: &str, env: &[(&str, &str)]| {
        let cfg = t.path().join("e.yaml");
        std::fs::write(
            &cfg,
            format!("models:\n  - model: fm/llama-ft-b\n    parameters: {{weight: 1}}\n  - model: {model}\n    parameters: {{weight: 1}}\nmerge_method: linear\n"),
        )
        .unwrap();
        let out = t.path().join("out");
        let o = run_env(
            t.path(),
            &[
                "run",
                cfg.to_str().unwrap(),
                out.to_str().unwrap(),
                "--quiet",
            ],
            env,
        );
        (o, out)
    };
    for (model, words) in [
        (
            "fm/gated",
            &["fm/gated", "gated", "licence", "HF_TOKEN", "line 4"][..],
        ),
        ("fm/nope", &["fm/nope", "not found", "HF_TOKEN"][..]),
        (
            "fm/llama-ft-a@v7",
            &["fm/llama-ft-a", "'v7'", "branch, tag or commit"][..],
        ),
        (
            "./models/x/y",
            &["not a Hugging Face Hub id", "is not a directory"][..],
        ),
        (
            "fm/llama-ft-a+fm/lora",
            &["adapter 'fm/lora'", "not found", "line 4"][..],
        ),
        (
            "fm/llama-ft-a+fm/llama-ft-b",
            &["fm/llama-ft-b", "adapter_config.json: not found"][..],
        ),
    ] {
        let (o, out) = run(model, &env);
        let e = stderr(&o);
        assert!(!o.status.success(), "{model}");
        for w in words {
            assert!(e.contains(w), "{model}: no '{w}' in: {e}");
        }
        assert!(!e.contains(TOKEN));
        assert!(!out.join("model.safetensors").exists());
    }
    // The token in the environment opens the gated model; a token from the
    // storage config's hf_token_file too.
    let (o, _) = run("fm/gated", &[env[0], env[1], ("HF_TOKEN", TOKEN)]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::write(t.path().join("tok"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(
        t.path().join("storage.yaml"),
        format!(
            "hf://fm/gated:\n  hf_token_file: {}\n",
            t.path().join("tok").display()
        ),
    )
    .unwrap();
    let sc = t.path().join("storage.yaml");
    let (o, _) = run(
        "fm/gated",
        &[
            env[0],
            env[1],
            ("FLEETMERGE_STORAGE_CONFIG", sc.to_str().unwrap()),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let reqs = hub.log(false);
    assert!(reqs
        .iter()
        .filter(|r| r.origin == "cdn")
        .all(|r| r.auth.is_none()));
}

// ---------------------------------------------------------------------------
// Cluster mode: `fleetmerge coordinator` and `fleetmerge worker` processes.

const MINUTE: Duration = Duration::from_secs(60);

/// The `ties` kit case with Hub ids, `fm/llama-ft-a` as the gated `fm/gated`
/// (the same files).
fn gated_ties_config(dir: &Path) -> PathBuf {
    let p = hub_config("ties", dir);
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("fm/llama-ft-a", "fm/gated");
    let p = dir.join("ties-gated.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

/// A coordinator for `config` into `out` (units of 100K: 8 of them), with
/// `env`; returns it with its address once it listens (planning is done).
fn hub_coordinator(cwd: &Path, config: &Path, out: &Path, env: &[(&str, &str)]) -> (Proc, String) {
    let mut p = Proc::start(
        "coordinator",
        cwd,
        &[
            "coordinator",
            "--config",
            config.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--out-shard-size",
            "100K",
        ],
        env,
    );
    let line = p.wait_for("coordinator listening", MINUTE, |l| {
        l.contains("coordinator listening")
    });
    let addr = field(&line, "listen").expect("address").to_string();
    (p, addr)
}

/// A one-thread worker `name` for the coordinator at `addr`, with `global`
/// options before the subcommand (`--storage-config`), `args` after it, and
/// `env`.
fn hub_worker(
    name: &str,
    addr: &str,
    global: &[&str],
    args: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let url = format!("http://{addr}");
    let mut all: Vec<&str> = global.to_vec();
    all.extend([
        "worker",
        "--coordinator",
        url.as_str(),
        "--worker-id",
        name,
        "--threads",
        "1",
    ]);
    all.extend_from_slice(args);
    Proc::start(name, Path::new("."), &all, env)
}

/// How many units a worker says it computed.
fn units_computed(w: &mut Proc) -> usize {
    let line = w.wait_for("its summary", MINUTE, |l| l.contains("worker finished"));
    line.split_whitespace()
        .find_map(|t| t.parse::<usize>().ok())
        .unwrap()
}

fn journal_units(out: &Path) -> usize {
    std::fs::read_dir(out.join(".fleetmerge/units"))
        .map(|d| d.flatten().count())
        .unwrap_or(0)
}

/// Every `hf://` location in `text` (up to the closing quote).
fn hub_locations(text: &str) -> Vec<&str> {
    text.match_indices("hf://")
        .map(|(i, _)| {
            let rest = &text[i..];
            &rest[..rest.find('"').unwrap_or(rest.len())]
        })
        .collect()
}

fn bearer(token: &str) -> Option<String> {
    Some(format!("Bearer {token}"))
}

#[test]
fn a_cluster_merges_hub_models_each_process_with_its_own_token() {
    let hub = FakeHub::start();
    let t = tempfile::tempdir().unwrap();
    let endpoint = hub.endpoint();
    let want = local_run("ties", &t.path().join("local"), "100K");
    let config = gated_ties_config(t.path());
    let home = |n: &str| {
        let p = t.path().join(n);
        std::fs::create_dir_all(&p).unwrap();
        p.to_str().unwrap().to_string()
    };
    let (coordinator_home, w1_home, w2_home) = (home("home-c"), home("home-1"), home("home-2"));
    // Worker 2's own cache holds the models that are not gated (filled by
    // huggingface_hub): it reads only the gated one from the Hub.
    let w2_cache = t.path().join("cache-2");
    snapshot_download(&hub, &w2_cache, &["llama-base", "llama-ft-b", "llama-ft-c"]);

    // The coordinator plans with HF_TOKEN (it reads the shard headers, then
    // config.json and the tokenizer); the workers have no HF_TOKEN, each its
    // own token in a storage config: worker 1 for the whole `fm` org (from
    // --storage-config), worker 2 for fm/gated only (from a token file named in
    // FLEETMERGE_STORAGE_CONFIG).
    hub.log(true);
    let out = t.path().join("out");
    let (mut coordinator, addr) = hub_coordinator(
        t.path(),
        &config,
        &out,
        &[
            ("HF_ENDPOINT", &endpoint),
            ("HF_HOME", &coordinator_home),
            ("HF_TOKEN", TOKEN),
        ],
    );
    let planning = hub.log(true);
    assert!(
        !planning.is_empty()
            && planning
                .iter()
                .all(|r| r.origin == "cdn" || r.auth == bearer(TOKEN)),
        "planning: {planning:?}"
    );
    let sc1 = t.path().join("storage-1.yaml");
    std::fs::write(&sc1, format!("hf://fm:\n  hf_token: {TOKEN_W1}\n")).unwrap();
    let tok2 = t.path().join("token-2");
    std::fs::write(&tok2, format!("{TOKEN_W2}\n")).unwrap();
    let sc2 = t.path().join("storage-2.yaml");
    std::fs::write(
        &sc2,
        format!("hf://fm/gated:\n  hf_token_file: {}\n", tok2.display()),
    )
    .unwrap();
    // Each worker reads only where --allow-path says: the org, or each
    // repository (at whatever commit the plan pinned).
    let out_text = out.to_str().unwrap();
    let mut w1 = hub_worker(
        "w1",
        &addr,
        &["--storage-config", sc1.to_str().unwrap()],
        &["--allow-path", "hf://fm", "--allow-path", out_text],
        &[("HF_ENDPOINT", &endpoint), ("HF_HOME", &w1_home)],
    );
    let mut w2 = hub_worker(
        "w2",
        &addr,
        &[],
        &[
            "--allow-path",
            "hf://fm/gated",
            "--allow-path",
            "hf://fm/llama-base",
            "--allow-path",
            "hf://fm/llama-ft-b",
            "--allow-path",
            "hf://fm/llama-ft-c",
            "--allow-path",
            out_text,
        ],
        &[
            ("HF_ENDPOINT", &endpoint),
            ("HF_HOME", &w2_home),
            ("HF_HUB_CACHE", w2_cache.to_str().unwrap()),
            ("FLEETMERGE_STORAGE_CONFIG", sc2.to_str().unwrap()),
        ],
    );
    coordinator.succeeds(MINUTE * 2);
    w1.succeeds(MINUTE);
    w2.succeeds(MINUTE);
    let (n1, n2) = (units_computed(&mut w1), units_computed(&mut w2));
    eprintln!("units computed: w1 {n1}, w2 {n2}");
    assert_eq!(journal_units(&out), 8, "{}", coordinator.log());
    assert_eq!(n1 + n2, 8, "each unit computed once");
    assert_eq!(
        outputs(&out),
        want,
        "the cluster's Hub merge differs from the local one"
    );
    assert!(out.join(".fleetmerge/done").exists());
    for f in ["tokenizer.json", "special_tokens_map.json"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(examples().join("models/llama-base").join(f)).unwrap(),
            "{f}"
        );
    }

    // The plan pins every Hub location to the commit its branch had.
    let plan = std::fs::read_to_string(out.join(".fleetmerge/plan.json")).unwrap();
    let locations = hub_locations(&plan);
    assert!(locations.len() > 8, "{plan}");
    for l in &locations {
        let (repo, rest) = l["hf://".len()..].split_once('@').expect("a commit");
        let i = REPOS
            .iter()
            .position(|r| repo == format!("fm/{r}"))
            .unwrap_or(99);
        assert!(
            rest.starts_with(&commit(i)),
            "{l} is not pinned to {}",
            commit(i)
        );
    }
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains(&format!(
            "Hugging Face Hub `fm/gated` at commit [`{}`]",
            commit(99)
        )),
        "{card}"
    );

    let reqs = hub.log(false);
    let by = |token: &str| -> Vec<&Req> {
        let auth = bearer(token);
        reqs.iter()
            .filter(|r| r.origin == "hub" && r.auth == auth)
            .collect()
    };
    // No token to the CDN; no request to the Hub without a token (worker 2
    // read the other models from its cache).
    assert!(
        reqs.iter()
            .filter(|r| r.origin == "cdn")
            .all(|r| r.auth.is_none()),
        "a token reached the CDN"
    );
    assert!(
        reqs.iter().all(|r| r.origin == "cdn" || r.auth.is_some()),
        "requests without a token: {reqs:?}"
    );
    for (who, token) in [("coordinator", TOKEN), ("w1", TOKEN_W1), ("w2", TOKEN_W2)] {
        let mine = by(token);
        // At most one /resolve/ per file per process (none per tensor), and
        // always at the pinned commit.
        let mut per_file: BTreeMap<&str, usize> = BTreeMap::new();
        for r in mine.iter().filter(|r| r.path.contains("/resolve/")) {
            *per_file.entry(r.path.as_str()).or_default() += 1;
        }
        assert!(
            per_file.values().all(|&n| n == 1),
            "{who}: more than one /resolve/ per file: {per_file:?}"
        );
        for p in per_file.keys() {
            let (repo, _) = p.trim_start_matches('/').split_once("/resolve/").unwrap();
            let i = REPOS
                .iter()
                .position(|r| repo == format!("fm/{r}"))
                .unwrap_or(99);
            assert!(
                p.contains(&format!("/resolve/{}/", commit(i))),
                "{who} read {p}, not at the pinned commit"
            );
        }
        eprintln!(
            "{who}: {} requests to the Hub, {} files resolved",
            mine.len(),
            per_file.len()
        );
        if who == "w2" {
            assert!(
                mine.iter().all(|r| r.path.contains("fm/gated")),
                "w2 asked the Hub for a model in its cache: {mine:?}"
            );
        }
        if who != "coordinator" {
            // Workers read shards only, and nothing but at pinned commits.
            assert!(
                mine.iter()
                    .filter(|r| r.path.contains("/resolve/"))
                    .all(|r| r.path.ends_with(".safetensors")),
                "{who}: {mine:?}"
            );
            assert!(
                !mine
                    .iter()
                    .any(|r| r.path.contains("/revision/") || r.path.contains("/main")),
                "{who} resolved a branch: {mine:?}"
            );
        }
    }
    // The workers read by range only from the CDN (and each read at most
    // what the inputs hold).
    let cdn: Vec<Req> = reqs.iter().filter(|r| r.origin == "cdn").cloned().collect();
    let size = model_file_bytes(&["llama-base", "llama-ft-a", "llama-ft-b", "llama-ft-c"]);
    assert!(range_bytes(&cdn) <= 2 * size);
    for p in [&coordinator, &w1, &w2] {
        for token in [TOKEN, TOKEN_W1, TOKEN_W2] {
            assert!(!p.log().contains(token), "{} logged a token", p.name);
        }
    }
}

/// A copy of `models/NAME` whose shards hold other bytes (same names, sizes
/// and headers): the files a branch moved to.
fn altered_copy(name: &str, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(examples().join("models").join(name)).unwrap() {
        let e = e.unwrap();
        let mut data = std::fs::read(e.path()).unwrap();
        if e.file_name().to_string_lossy().ends_with(".safetensors") {
            let header = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
            for b in &mut data[8 + header..] {
                *b = b.wrapping_add(1);
            }
        }
        std::fs::write(to.join(e.file_name()), data).unwrap();
    }
}

#[test]
fn cluster_workers_read_the_planned_commit_after_the_branch_moved() {
    let hub = FakeHub::start();
    let t = tempfile::tempdir().unwrap();
    let endpoint = hub.endpoint();
    let want = local_run("ties", &t.path().join("local"), "100K");
    let config = hub_config("ties", t.path());
    let home = |n: &str| {
        let p = t.path().join(n);
        std::fs::create_dir_all(&p).unwrap();
        p.to_str().unwrap().to_string()
    };
    let (coordinator_home, w1_home, w2_home) = (home("home-c"), home("home-1"), home("home-2"));
    // Worker 2's token is huggingface_hub's token file in its HF_HOME.
    std::fs::write(Path::new(&w2_home).join("token"), TOKEN_W2).unwrap();
    let out = t.path().join("out");
    let (mut coordinator, addr) = hub_coordinator(
        t.path(),
        &config,
        &out,
        &[
            ("HF_ENDPOINT", &endpoint),
            ("HF_HOME", &coordinator_home),
            ("HF_TOKEN", TOKEN),
        ],
    );
    // Planned: `fm/llama-base@main` is commit(0). Now main moves to a commit
    // whose shards have the same names and sizes but other bytes.
    let moved = t.path().join("moved-base");
    altered_copy("llama-base", &moved);
    hub.http(
        "POST",
        "/_admin/ref",
        &json!({"repo": "fm/llama-base", "ref": "main", "commit": commit(50), "dir": moved})
            .to_string(),
    );
    hub.log(true);
    let mut workers = [
        hub_worker(
            "w1",
            &addr,
            &[],
            &[],
            &[
                ("HF_ENDPOINT", &endpoint),
                ("HF_HOME", &w1_home),
                ("HF_TOKEN", TOKEN_W1),
            ],
        ),
        hub_worker(
            "w2",
            &addr,
            &[],
            &[],
            &[("HF_ENDPOINT", &endpoint), ("HF_HOME", &w2_home)],
        ),
    ];
    coordinator.succeeds(MINUTE * 2);
    for w in &mut workers {
        w.succeeds(MINUTE);
    }
    assert_eq!(
        outputs(&out),
        want,
        "the workers did not read the planned commit"
    );
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        std::fs::read(examples().join("models/llama-base/tokenizer.json")).unwrap()
    );
    let reqs = hub.log(false);
    assert!(
        reqs.iter().any(|r| r.path.contains("/resolve/")),
        "the workers read nothing from the Hub"
    );
    assert!(
        !reqs.iter().any(|r| r.path.contains(&commit(50))
            || r.path.contains("/main")
            || r.path.contains("/revision/")),
        "a branch was resolved again after planning: {reqs:?}"
    );
    assert!(reqs.iter().all(|r| r.origin == "cdn" || r.auth.is_some()));
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains(&commit(0)) && !card.contains(&commit(50)),
        "{card}"
    );

    // The moved branch does hold other bytes: a new merge gives another model.
    let again = t.path().join("again");
    let o = run_env(
        t.path(),
        &[
            "run",
            config.to_str().unwrap(),
            again.to_str().unwrap(),
            "--quiet",
            "--out-shard-size",
            "100K",
        ],
        &[("HF_ENDPOINT", &endpoint), ("HF_HOME", &coordinator_home)],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(outputs(&again), want, "the moved branch merges the same");
}

#[test]
fn a_cluster_worker_without_a_token_for_a_gated_model_fails_its_units_clearly() {
    let hub = FakeHub::start();
    let t = tempfile::tempdir().unwrap();
    let endpoint = hub.endpoint();
    let config = gated_ties_config(t.path());
    let (coordinator_home, worker_home) = (t.path().join("home-c"), t.path().join("home-w"));
    std::fs::create_dir_all(&coordinator_home).unwrap();
    std::fs::create_dir_all(&worker_home).unwrap();
    let out = t.path().join("out");
    // Planning reads the gated model's headers: a coordinator without a token
    // refuses to start, naming the model, and writes nothing.
    let mut tokenless = Proc::start(
        "tokenless-coordinator",
        t.path(),
        &[
            "coordinator",
            "--config",
            config.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        &[
            ("HF_ENDPOINT", &endpoint),
            ("HF_HOME", coordinator_home.to_str().unwrap()),
        ],
    );
    assert!(!tokenless.wait_exit(MINUTE).success());
    let log = tokenless.log();
    assert!(
        log.contains("fm/gated is a gated model")
            && log.contains("HF_TOKEN")
            && !log.contains("coordinator listening"),
        "{log}"
    );
    assert!(
        !out.exists(),
        "a coordinator that could not plan wrote {out:?}"
    );
    // With a token it plans; the worker has none.
    let (mut coordinator, addr) = hub_coordinator(
        t.path(),
        &config,
        &out,
        &[
            ("HF_ENDPOINT", &endpoint),
            ("HF_HOME", coordinator_home.to_str().unwrap()),
            ("HF_TOKEN", TOKEN),
        ],
    );
    hub.log(true);
    let mut w = hub_worker(
        "tokenless",
        &addr,
        &[],
        &["--give-up-after", "10"],
        &[
            ("HF_ENDPOINT", &endpoint),
            ("HF_HOME", worker_home.to_str().unwrap()),
        ],
    );
    let status = coordinator.wait_exit(MINUTE * 2);
    w.wait_exit(MINUTE);
    let log = coordinator.log();
    assert!(!status.success(), "the merge finished:\n{log}");
    // The worker's error reached the coordinator: the id, why, what to do.
    for part in [
        "tokenless",
        "hf://fm/gated@",
        "fm/gated is a gated model",
        "licence",
        "HF_TOKEN",
        "cannot fix",
    ] {
        assert!(log.contains(part), "{part:?} missing from:\n{log}");
    }
    assert!(
        w.log().contains("unit failed") && w.log().contains("fm/gated"),
        "{}",
        w.log()
    );
    // The worker asked without a token and was refused; no token anywhere.
    let reqs = hub.log(false);
    assert!(
        reqs.iter()
            .any(|r| r.path.contains("/fm/gated/") && r.auth.is_none()),
        "{reqs:?}"
    );
    assert!(!log.contains(TOKEN) && !w.log().contains(TOKEN));
    assert!(
        !out.join("model.safetensors.index.json").exists()
            && !out.join("README.md").exists()
            && !out.join(".fleetmerge/done").exists(),
        "a failed merge looks finished"
    );
}
