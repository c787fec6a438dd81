//! The Helm chart in deploy/helm/fleetmerge, rendered by the real `helm`
//! (installed by scripts/test.sh; FLEETMERGE_HELM names it): what the chart
//! promises is in the manifests (gRPC probes on the health service, restart
//! policies, GPU requests, secret references, no credentials in plain text).
//! Schema validation of the same renders runs in scripts/test.sh
//! (kubernetes-validate --strict).

use std::path::PathBuf;
use std::process::Command;
use yaml_rust2::{Yaml, YamlLoader};

fn helm() -> PathBuf {
    let p =
        std::env::var("FLEETMERGE_HELM").unwrap_or_else(|_| "/tmp/fleetmerge-tools/helm".into());
    let p = PathBuf::from(p);
    assert!(
        p.exists(),
        "helm not found at {}: run `bash scripts/test.sh` (it installs it) or set FLEETMERGE_HELM",
        p.display()
    );
    p
}

fn chart() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/helm/fleetmerge")
}

/// `helm template` with the given --set/-f arguments: (success, stdout, stderr).
fn render(args: &[&str]) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let merge = dir.path().join("merge.yaml");
    std::fs::write(
        &merge,
        "models:\n  - model: s3://models/a\n    parameters: {weight: 0.5}\n  - model: \
         s3://models/b\n    parameters: {weight: 0.5}\nmerge_method: linear\ndtype: bfloat16\n",
    )
    .unwrap();
    let set_file = format!("merge.config={}", merge.display());
    let o = Command::new(helm())
        .args([
            "template",
            "m",
            chart().to_str().unwrap(),
            "--set-file",
            &set_file,
        ])
        .args(args)
        .output()
        .expect("helm runs");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn rendered(args: &[&str]) -> (Vec<Yaml>, String) {
    let (ok, out, err) = render(args);
    assert!(ok, "helm template failed: {err}");
    let docs = YamlLoader::load_from_str(&out).expect("rendered YAML parses");
    (docs.into_iter().filter(|d| !d.is_null()).collect(), out)
}

fn find<'a>(docs: &'a [Yaml], kind: &str, suffix: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| {
            d["kind"].as_str() == Some(kind)
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with(suffix))
        })
        .unwrap_or_else(|| panic!("no {kind} *{suffix} rendered"))
}

fn container(job: &Yaml) -> &Yaml {
    &job["spec"]["template"]["spec"]["containers"][0]
}

fn args(c: &Yaml) -> Vec<String> {
    c["args"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

const OUT: &str = "merge.output=s3://merged/m";

#[test]
fn default_render_has_probes_restarts_and_secret_references() {
    let (docs, _) = rendered(&["--set", OUT]);
    let coord = find(&docs, "Job", "-coordinator");
    let spec = &coord["spec"]["template"]["spec"];
    assert_eq!(spec["restartPolicy"].as_str(), Some("OnFailure"));
    let c = container(coord);
    // TLS is on by default, and Kubernetes' gRPC probes speak no TLS.
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(
            c[probe]["tcpSocket"]["port"].as_i64(),
            Some(7070),
            "{probe}"
        );
    }
    let a = args(c);
    assert!(a.contains(&"coordinator".to_string()));
    assert!(a.contains(&"--out=s3://merged/m".to_string()), "{a:?}");
    assert!(a.contains(&"--token-file=/var/run/secrets/fleetmerge/token/token".to_string()));
    assert!(a.contains(&"--metrics-listen=0.0.0.0:9090".to_string()));
    assert_eq!(
        c["securityContext"]["readOnlyRootFilesystem"].as_bool(),
        Some(true)
    );
    assert_eq!(
        spec["securityContext"]["runAsNonRoot"].as_bool(),
        Some(true)
    );

    let svc = find(&docs, "Service", "-coordinator");
    let ports: Vec<i64> = svc["spec"]["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|p| p["port"].as_i64().unwrap())
        .collect();
    assert_eq!(ports, vec![7070, 9090]);

    let workers = find(&docs, "Job", "-workers");
    assert_eq!(workers["spec"]["completionMode"].as_str(), Some("Indexed"));
    assert_eq!(workers["spec"]["completions"].as_i64(), Some(2));
    assert_eq!(workers["spec"]["parallelism"].as_i64(), Some(2));
    let wspec = &workers["spec"]["template"]["spec"];
    assert_eq!(wspec["restartPolicy"].as_str(), Some("OnFailure"));
    assert!(wspec["terminationGracePeriodSeconds"].as_i64().unwrap() >= 300);
    let w = container(workers);
    let a = args(w);
    assert!(a.contains(&"--coordinator=https://m-fleetmerge-coordinator:7070".to_string()));
    assert!(a.contains(&"--device=cpu".to_string()));
    assert!(w["resources"]["limits"]["nvidia.com/gpu"].is_badvalue());
    // The token comes from the chart's Secret, mounted as a file.
    let secret = find(&docs, "Secret", "-token");
    assert!(secret["data"]["token"].as_str().is_some());
    let vols = wspec["volumes"].as_vec().unwrap();
    assert!(vols
        .iter()
        .any(|v| v["secret"]["secretName"].as_str() == Some("m-fleetmerge-token")));
}

#[test]
fn gpu_values_request_gpus_and_schedule_on_gpu_nodes() {
    let values = chart().join("values-gpu.yaml");
    let (docs, _) = rendered(&["--set", OUT, "-f", values.to_str().unwrap()]);
    let workers = find(&docs, "Job", "-workers");
    let w = container(workers);
    assert_eq!(w["resources"]["limits"]["nvidia.com/gpu"].as_i64(), Some(1));
    assert_eq!(
        w["resources"]["requests"]["nvidia.com/gpu"].as_i64(),
        Some(1)
    );
    assert!(args(w).contains(&"--device=cuda:0".to_string()));
    assert!(args(w).contains(&"--max-memory=120G".to_string()));
    assert!(w["image"].as_str().unwrap().ends_with("-cuda"));
    let spec = &workers["spec"]["template"]["spec"];
    assert_eq!(
        spec["tolerations"][0]["key"].as_str(),
        Some("nvidia.com/gpu")
    );
    assert!(!spec["nodeSelector"].is_badvalue());
    assert_eq!(workers["spec"]["completions"].as_i64(), Some(4));
}

#[test]
fn credentials_come_from_secrets_never_from_plain_values() {
    let (docs, text) = rendered(&[
        "--set",
        OUT,
        "--set",
        "storage.existingSecret=s3-credentials",
        "--set",
        "auth.existingSecret=merge-token",
        "--set",
        "storage.gcsServiceAccount.existingSecret=gcs-sa",
        "--set",
        "hf.existingSecret=hf-token",
    ]);
    // With an existing token Secret the chart creates none (only the TLS one).
    assert!(!docs.iter().any(|d| d["kind"].as_str() == Some("Secret")
        && d["metadata"]["name"].as_str().unwrap().ends_with("-token")));
    for job in ["-coordinator", "-workers"] {
        let j = find(&docs, "Job", job);
        let c = container(j);
        assert_eq!(
            c["envFrom"][0]["secretRef"]["name"].as_str(),
            Some("s3-credentials"),
            "{job}"
        );
        // No environment variable carries a secret-looking literal value.
        for e in c["env"].as_vec().unwrap() {
            let name = e["name"].as_str().unwrap();
            let secretish = ["KEY", "SECRET", "TOKEN", "PASSWORD"]
                .iter()
                .any(|s| name.contains(s));
            assert!(
                !secretish || e["value"].is_badvalue(),
                "{job}: {name} is set in plain text"
            );
        }
        // The Hub token: HF_TOKEN from its Secret, in the coordinator and every worker.
        let hf = c["env"]
            .as_vec()
            .unwrap()
            .iter()
            .find(|e| e["name"].as_str() == Some("HF_TOKEN"))
            .unwrap_or_else(|| panic!("{job}: no HF_TOKEN"));
        assert_eq!(
            hf["valueFrom"]["secretKeyRef"]["name"].as_str(),
            Some("hf-token")
        );
        let vols = j["spec"]["template"]["spec"]["volumes"].as_vec().unwrap();
        assert!(vols
            .iter()
            .any(|v| v["secret"]["secretName"].as_str() == Some("merge-token")));
        assert!(vols
            .iter()
            .any(|v| v["secret"]["secretName"].as_str() == Some("gcs-sa")));
    }
    assert!(text.contains("GOOGLE_APPLICATION_CREDENTIALS"));

    // A token given as a value is stored base64 in a Secret, nowhere in clear.
    let (docs, text) = rendered(&["--set", OUT, "--set", "auth.token=hunter2-very-secret"]);
    assert!(!text.contains("hunter2-very-secret"));
    let secret = find(&docs, "Secret", "-token");
    assert_eq!(
        secret["data"]["token"].as_str(),
        Some("aHVudGVyMi12ZXJ5LXNlY3JldA==")
    );
}

#[test]
fn missing_or_wrong_values_fail_with_a_message() {
    let (ok, _, err) = render(&[]);
    assert!(!ok);
    assert!(err.contains("merge.output is required"), "{err}");
    let (ok, _, err) = render(&["--set", OUT, "--set", "worker.device=tpu"]);
    assert!(!ok);
    assert!(err.contains("worker.device must be cpu or cuda"), "{err}");
    let o = Command::new(helm())
        .args(["template", "m", chart().to_str().unwrap(), "--set", OUT])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("merge.config is required"));
}

#[test]
fn tls_is_on_by_default_and_plain_http_must_be_asked_for() {
    let tls = "/var/run/secrets/fleetmerge/tls";
    let (docs, _) = rendered(&["--set", OUT]);
    let secret = find(&docs, "Secret", "-tls");
    assert_eq!(secret["type"].as_str(), Some("kubernetes.io/tls"));
    for key in ["tls.crt", "tls.key", "ca.crt"] {
        assert!(secret["data"][key].as_str().is_some(), "{key}");
    }
    let coord = container(find(&docs, "Job", "-coordinator"));
    let a = args(coord);
    assert!(a.contains(&format!("--tls-cert={tls}/tls.crt")), "{a:?}");
    assert!(a.contains(&format!("--tls-key={tls}/tls.key")), "{a:?}");
    let workers = find(&docs, "Job", "-workers");
    let a = args(container(workers));
    assert!(a.contains(&format!("--tls-ca={tls}/ca.crt")), "{a:?}");
    assert!(!a.contains(&"--insecure".to_string()), "{a:?}");
    let vols = workers["spec"]["template"]["spec"]["volumes"]
        .as_vec()
        .unwrap();
    assert!(vols
        .iter()
        .any(|v| v["secret"]["secretName"].as_str() == Some("m-fleetmerge-tls")));

    // A certificate from an existing Secret (cert-manager): none generated.
    let (docs, _) = rendered(&["--set", OUT, "--set", "tls.existingSecret=coord-cert"]);
    assert!(!docs.iter().any(|d| d["kind"].as_str() == Some("Secret")
        && d["metadata"]["name"].as_str().unwrap().ends_with("-tls")));
    let workers = find(&docs, "Job", "-workers");
    let vols = workers["spec"]["template"]["spec"]["volumes"]
        .as_vec()
        .unwrap();
    assert!(vols
        .iter()
        .any(|v| v["secret"]["secretName"].as_str() == Some("coord-cert")));

    // Without TLS the workers must be told to send the token in the clear.
    let (docs, _) = rendered(&["--set", OUT, "--set", "tls.enabled=false"]);
    assert!(!docs.iter().any(|d| d["kind"].as_str() == Some("Secret")
        && d["metadata"]["name"].as_str().unwrap().ends_with("-tls")));
    let a = args(container(find(&docs, "Job", "-workers")));
    assert!(a.contains(&"--coordinator=http://m-fleetmerge-coordinator:7070".to_string()));
    assert!(a.contains(&"--insecure".to_string()), "{a:?}");
    let coord = container(find(&docs, "Job", "-coordinator"));
    assert!(!args(coord).iter().any(|a| a.starts_with("--tls-")));
    assert_eq!(coord["livenessProbe"]["grpc"]["port"].as_i64(), Some(7070));
}
