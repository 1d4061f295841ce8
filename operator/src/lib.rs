//! kubetune's operator: the FineTuneJob controller (and, with its issue, the ModelDeployment
//! controller), plus the process around them: metrics, health, leader election.

pub mod config;
pub mod context;
pub mod error;
pub mod finetunejob;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod modeldeployment;
pub mod pace;
pub mod podhttp;
pub mod pvc;
pub mod tenant_storage;
pub mod triggers;
pub mod workload;

#[cfg(test)]
pub mod fixtures;

/// The one field manager of everything the operator applies.
pub const FIELD_MANAGER: &str = "kubetune-operator";
