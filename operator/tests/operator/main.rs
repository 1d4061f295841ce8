//! The operator's reconcile tests against a mocked API server, as one binary: each test file
//! linked the whole dependency tree, and they shared the mock's helpers by copy.

mod common;
mod finetunejob;
mod leader;
mod modeldeployment;
