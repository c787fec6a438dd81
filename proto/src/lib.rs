//! fleetmerge-proto: the generated types and service stubs of `merge.proto`,
//! and the protocol version peers must agree on.

#![allow(clippy::all)]

tonic::include_proto!("fleetmerge.v1");

/// Version of the coordinator/worker protocol; a peer with another version is refused.
pub const PROTOCOL_VERSION: u32 = 1;
