//! Integration tests: the real start-up path, the tiny model, requests through the router.

mod admin;
mod common;
mod compat;
mod engine;
mod generation;
mod ondemand;
mod prefix;
mod structured;
mod tools;
mod validation;
