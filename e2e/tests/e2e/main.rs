//! The end-to-end tests, as one binary: each file used to be a binary of its own that linked
//! the whole dependency tree (kube, the model crate, object_store), so one binary instead of
//! eight saves link time and disk.
//!
//! Cargo ran those binaries one after another; here all tests run on parallel threads of one
//! process. The tests that install an operator (operator, finetune_and_serve) must never
//! overlap each other nor the tests that create kubetune objects, which an operator would
//! reconcile: [`tools::OPERATOR_LOCK`] keeps them apart. Tests that create no kubetune object
//! in the cluster (helm and promtool on rendered files, the chart's
//! RBAC) run alongside anything.

mod tools;

mod alerts;
mod api;
mod argocd;
mod chart;
mod ci;
mod finetune_and_serve;
mod network_policy;
mod operator;
mod real_node;
