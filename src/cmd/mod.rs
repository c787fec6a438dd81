//! One module per command; `options` holds what several of them share.

pub mod coordinator;
pub mod moe;
pub mod options;
pub mod plan;
pub mod run;
pub mod status;
pub mod verify;
pub mod worker;
