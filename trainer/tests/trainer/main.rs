//! The trainer's integration tests, as one binary: each file linked the whole dependency tree
//! (candle, the model crate, object_store), so one binary instead of six saves link time and
//! disk. The tests share the process and run on parallel threads; none of them sets
//! environment variables, changes the current directory, binds a fixed port or registers
//! metrics globally (children get their environment through `Command::env`, `/metrics` binds
//! port 0, and each `Metrics` has its own registry), so running them together is safe.

mod common;

mod bad_data;
mod data_prep;
mod dpo;
mod dpo_reference;
mod gguf_peft;
mod gguf_peft_train;
mod init_from;
mod job;
mod learning;
mod metrics;
mod resume;
