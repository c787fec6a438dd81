//! A worker's side of the cluster protocol, spoken by the test itself: the
//! worker crate's real gRPC client against a real coordinator process, for
//! tests that play a peer who does not follow the rules (a liar, a flood).

use fleetmerge_engine::unit::WorkUnit;
use fleetmerge_proto::*;
pub use fleetmerge_worker::remote::Client;
use std::time::Duration;

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A client of the coordinator at `addr` (`host:port`, plain HTTP).
pub fn client(rt: &tokio::runtime::Runtime, addr: &str, token: Option<&str>) -> Client {
    let _guard = rt.enter();
    fleetmerge_worker::remote::connect(&format!("http://{addr}"), token, None, false).unwrap()
}

/// Registers as worker `id` with one CPU slot; the session id.
pub fn register(
    rt: &tokio::runtime::Runtime,
    c: &Client,
    id: &str,
) -> Result<String, tonic::Status> {
    let mut c = c.clone();
    rt.block_on(c.register(RegisterRequest {
        protocol_version: PROTOCOL_VERSION,
        worker_id: id.to_string(),
        device: "cpu".into(),
        memory_bytes: 0,
        slots: 1,
    }))
    .map(|r| r.into_inner().session)
}

/// Leases a unit for `session` (waiting up to 10 s for one): (lease id,
/// unit, output folder).
pub fn lease(rt: &tokio::runtime::Runtime, c: &Client, session: &str) -> (u64, WorkUnit, String) {
    let mut c = c.clone();
    for _ in 0..100 {
        let r = rt
            .block_on(c.lease(LeaseRequest {
                protocol_version: PROTOCOL_VERSION,
                worker_id: String::new(),
                session: session.to_string(),
            }))
            .unwrap()
            .into_inner();
        match r.reply {
            Some(lease_response::Reply::Unit(u)) => {
                return (
                    u.lease_id,
                    serde_json::from_slice(&u.unit).unwrap(),
                    u.out_dir,
                )
            }
            other => {
                println!("no unit yet: {other:?}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    panic!("no unit leased")
}
