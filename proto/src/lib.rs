//! fleetmerge-proto: the generated types and service stubs of `merge.proto`,
//! the protocol version peers must agree on, and the size limits both sides use.

#![allow(clippy::all)]

tonic::include_proto!("fleetmerge.v1");

/// Version of the coordinator/worker protocol; a peer with another version is
/// refused. 2: session ids (Register issues one, every other call carries it).
/// 3: units that write a part of their shard (`WorkUnit::part`), chunk ids in
/// CompleteRequest.
pub const PROTOCOL_VERSION: u32 = 3;

/// Largest message the coordinator accepts. Every legitimate request is a few
/// KiB at most: ids, texts and lists are bounded by the constants below (the
/// largest, a Fail with its error text and a Heartbeat with its lease ids, stay
/// under 16 KiB), so anything larger is refused by the transport unread.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Largest message a worker accepts (and the coordinator sends): a
/// LeaseResponse carries a whole unit as JSON. A unit costs ~0.5 KiB of JSON
/// per tensor and input; the planner's largest units (a shard of thousands of
/// small tensors: 12,000 tensors of two inputs are 6.3 MB) fit with a wide
/// margin, and a DeepSeek-V3 unit (a few hundred tensors of 5 GB) is far
/// smaller. The coordinator checks every unit against
/// this bound before it listens and refuses to start, naming the unit, when one
/// does not fit.
pub const MAX_UNIT_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Longest worker id and device name, in bytes.
pub const MAX_WORKER_ID_BYTES: usize = 256;
pub const MAX_DEVICE_BYTES: usize = 64;
/// Longest error text of a Fail kept (longer ones are cut, saying so).
pub const MAX_ERROR_BYTES: usize = 8 * 1024;
/// Most lease ids in one Heartbeat (a worker holds one lease per slot).
pub const MAX_LEASES_PER_HEARTBEAT: usize = 1024;
/// Most slots a worker may declare.
pub const MAX_SLOTS: u32 = 1024;

/// How an UNAUTHENTICATED answer for an unknown or evicted session starts:
/// the worker registers again when it sees it.
pub const UNKNOWN_SESSION: &str = "unknown session";
