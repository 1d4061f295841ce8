//! The model crate's integration tests, as one binary: each file links the whole dependency
//! tree, so one binary instead of six saves link time and disk.

mod adapters;
mod checkpointing;
mod common;
mod decode;
mod families;
mod forward;
mod smollm2;
