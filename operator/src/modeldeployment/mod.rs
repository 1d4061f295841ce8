//! The ModelDeployment controller. This first part builds the workloads; resolving versions and
//! rolling them out through the servers' admin API come with the inference server.

pub mod build;
pub mod rollout;
