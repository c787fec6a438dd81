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
//!   with nothing written; a resume after the branch moved keeps its commit.

mod common;

use common::{examples, fixture, root};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "hf_fake_token_for_tests";
const REPOS: &[&str] = &[
    "llama-base",
    "llama-ft-a",
    "llama-ft-b",
    "llama-ft-c",
    "mixtral-base",
    "mixtral-ft-a",
    "mixtral-ft-b",
];

/// The test venv's python (scripts/test.sh installs huggingface_hub there).
fn python() -> PathBuf {
    let venv = std::env::var("FLEETMERGE_VENV").unwrap_or_else(|_| "/tmp/fleetmerge-venv".into());
    let p = PathBuf::from(venv).join("bin/python");
    assert!(
        p.exists(),
        "{} not found: run `bash scripts/test.sh` (it creates the test venv with huggingface_hub) \
         or set FLEETMERGE_VENV",
        p.display()
    );
    p
}

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
            json!({"token": TOKEN, "page": 4, "repos": repos}).to_string(),
        )
        .unwrap();
        let ports = dir.path().join("ports");
        let child = Command::new(python())
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
    common::run_case(case, out, shard);
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

/// Fills `cache` with huggingface_hub's snapshot_download from the fake hub.
fn snapshot_download(hub: &FakeHub, cache: &Path, repos: &[&str]) {
    let script = format!(
        "import huggingface_hub as h\nfor r in {repos:?}:\n    h.snapshot_download('fm/' + r)\n"
    );
    let o = Command::new(python())
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
    let dead = format!("http://127.0.0.1:{}", common::procs::free_port());
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
    let o = Command::new(python())
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
            &["LoRA", "not supported yet", "line 4"][..],
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
