//! Simulated nodes: one Linux network namespace per node, each with a veth
//! pair to a bridge on the host, and its link capped each way with `tc`.
//!
//! ```text
//!   host: bridge fmbench0 10.77.0.1/24 (the S3 server and the coordinator listen here)
//!     ├── fmbh0 ══ fmbn0  10.77.0.2  in namespace fmbench-0
//!     ├── fmbh1 ══ fmbn1  10.77.0.3  in namespace fmbench-1
//!     └── ...
//! ```
//!
//! A cap is an HTB class on the egress of each end: the host end's caps what
//! the node downloads, the node end's what it uploads. The byte counters of
//! the host end ([`Net::counters`]) are what each node received and sent.
//! [`Net`] is a guard: dropping it (after an error, or on Ctrl-C, which the
//! cluster benchmark turns into an error) kills what still runs in the
//! namespaces and removes them and the bridge; [`Net::setup`] removes the
//! leftovers of a run that died first.

use anyhow::{bail, Context, Result};
use std::process::{Command, Stdio};

pub const BRIDGE: &str = "fmbench0";
/// The host's address on the bridge.
pub const HOST: &str = "10.77.0.1";
const NS_PREFIX: &str = "fmbench-";

/// A link rate in bits per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate(pub u64);

impl Rate {
    /// `100mbit`, `1gbit`, `2.5gbit`, `500kbit`.
    pub fn parse(text: &str) -> Result<Rate> {
        let t = text.trim().to_ascii_lowercase();
        let (num, mult) = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)]
            .iter()
            .find_map(|(suffix, m)| t.strip_suffix(suffix).map(|n| (n, *m)))
            .with_context(|| format!("rate '{text}': expected e.g. 100mbit or 1gbit"))?;
        let n: f64 = num
            .parse()
            .with_context(|| format!("rate '{text}': expected e.g. 100mbit or 1gbit"))?;
        if !(n.is_finite() && n > 0.0) {
            bail!("rate '{text}' must be positive");
        }
        Ok(Rate((n * mult) as u64))
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0 as f64;
        if b >= 1e9 {
            write!(f, "{}gbit", b / 1e9)
        } else if b >= 1e6 {
            write!(f, "{}mbit", b / 1e6)
        } else {
            write!(f, "{}kbit", b / 1e3)
        }
    }
}

/// Runs a command, failing with its stderr.
fn sh(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program} (is iproute2 installed?)"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs a command whose failure does not matter (cleanup), returning stdout.
fn quiet(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Whether this process may create namespaces (root), with why not.
pub fn check_privileges() -> std::result::Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(
            "the cluster benchmark needs root (network namespaces, veth links, tc); \
                    run it as root or with sudo"
                .into(),
        );
    }
    for tool in ["ip", "tc"] {
        let ok = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            return Err(format!(
                "the cluster benchmark needs `{tool}` (iproute2) on the PATH"
            ));
        }
    }
    Ok(())
}

/// One simulated node.
pub struct Node {
    pub index: usize,
    /// Its namespace.
    pub ns: String,
    /// Its address on the bridge.
    pub addr: String,
    /// The host end of its link.
    host_if: String,
}

/// The nodes of one run and their links; removed on drop.
pub struct Net {
    pub nodes: Vec<Node>,
}

/// Bytes a node received (downloads) and sent (uploads) over its link.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    pub received: u64,
    pub sent: u64,
}

impl Net {
    /// `rates.len()` nodes, node `i` capped at `rates[i]` each way.
    pub fn setup(rates: &[Option<Rate>]) -> Result<Net> {
        cleanup();
        // From here on, an error drops `net`, which removes what was made.
        let mut net = Net { nodes: Vec::new() };
        sh("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
        sh("ip", &["addr", "add", &format!("{HOST}/24"), "dev", BRIDGE])?;
        sh("ip", &["link", "set", BRIDGE, "up"])?;
        for i in 0..rates.len() {
            let node = Node {
                index: i,
                ns: format!("{NS_PREFIX}{i}"),
                addr: format!("10.77.0.{}", i + 2),
                host_if: format!("fmbh{i}"),
            };
            let node_if = format!("fmbn{i}");
            sh("ip", &["netns", "add", &node.ns])?;
            net.nodes.push(node);
            let node = net.nodes.last().expect("pushed");
            sh(
                "ip",
                &[
                    "link",
                    "add",
                    &node.host_if,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &node_if,
                    "netns",
                    &node.ns,
                ],
            )?;
            sh("ip", &["link", "set", &node.host_if, "master", BRIDGE])?;
            sh("ip", &["link", "set", &node.host_if, "up"])?;
            let n = |args: &[&str]| {
                let mut all = vec!["-n", node.ns.as_str()];
                all.extend_from_slice(args);
                sh("ip", &all)
            };
            n(&["addr", "add", &format!("{}/24", node.addr), "dev", &node_if])?;
            n(&["link", "set", &node_if, "up"])?;
            n(&["link", "set", "lo", "up"])?;
        }
        net.set_rates(rates)?;
        Ok(net)
    }

    /// Caps node `i`'s link at `rates[i]` each way (`None`, or a node past
    /// the end: uncapped).
    pub fn set_rates(&self, rates: &[Option<Rate>]) -> Result<()> {
        for node in &self.nodes {
            let node_if = format!("fmbn{}", node.index);
            quiet("tc", &["qdisc", "del", "dev", &node.host_if, "root"]);
            quiet(
                "tc",
                &["-n", &node.ns, "qdisc", "del", "dev", &node_if, "root"],
            );
            if let Some(Some(rate)) = rates.get(node.index) {
                cap(None, &node.host_if, *rate)?;
                cap(Some(&node.ns), &node_if, *rate)?;
            }
        }
        Ok(())
    }

    /// What each node has received and sent so far (the host end's counters).
    pub fn counters(&self) -> Vec<Counters> {
        self.nodes
            .iter()
            .map(|n| {
                let read = |what: &str| {
                    std::fs::read_to_string(format!(
                        "/sys/class/net/{}/statistics/{what}",
                        n.host_if
                    ))
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0)
                };
                // The host end transmits what the node receives.
                Counters {
                    received: read("tx_bytes"),
                    sent: read("rx_bytes"),
                }
            })
            .collect()
    }
}

/// Caps the egress of `dev` (in namespace `ns`) at `rate` with one HTB class.
fn cap(ns: Option<&str>, dev: &str, rate: Rate) -> Result<()> {
    let r = format!("{}bit", rate.0);
    // A burst of 1 ms at the rate, at least 64 KiB (one segmentation-offloaded packet).
    let burst = format!("{}", (rate.0 / 8 / 1000).max(64 << 10));
    let mut base = Vec::new();
    if let Some(ns) = ns {
        base.extend(["-n", ns]);
    }
    let tc = |args: &[&str]| {
        let mut all = base.clone();
        all.extend_from_slice(args);
        sh("tc", &all)
    };
    tc(&[
        "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1",
    ])?;
    tc(&[
        "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", &r, "ceil",
        &r, "burst", &burst, "cburst", &burst,
    ])?;
    Ok(())
}

/// Kills what runs in our namespaces, removes them, their links and the bridge.
fn cleanup() {
    for line in quiet("ip", &["netns", "list"]).lines() {
        let Some(ns) = line.split_whitespace().next() else {
            continue;
        };
        if !ns.starts_with(NS_PREFIX) {
            continue;
        }
        for pid in quiet("ip", &["netns", "pids", ns]).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: a signal to a process of our own namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        quiet("ip", &["netns", "del", ns]);
    }
    // Host ends whose namespace went away are gone with it; the bridge is not.
    quiet("ip", &["link", "del", BRIDGE]);
}

impl Drop for Net {
    fn drop(&mut self) {
        cleanup();
    }
}
