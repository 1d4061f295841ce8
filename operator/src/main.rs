//! kubetune-operator: reconciles FineTuneJobs and ModelDeployments.
//! The controllers arrive with their own issues; until then the binary only reports its version,
//! so that images, charts and the local cluster can already refer to it.

fn main() {
    println!("kubetune-operator {} (controllers not built yet)", env!("CARGO_PKG_VERSION"));
}
