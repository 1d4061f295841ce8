//! The storage crate's integration tests, as one binary: each file linked the whole dependency
//! tree, so one binary instead of four saves link time and disk.

#[macro_use]
mod common;

mod cache;
mod cli;
mod hf;
mod merged;
mod registry;
mod verify;
