//! kubetune-storage: moves models, datasets and LoRA adapters between object storage and local
//! disk, and keeps a versioned adapter registry.
//!
//! - [`Storage::from_uri`] opens `s3://`, `gs://`, `az://` or `file://` roots with
//!   [`Credentials`] from the environment or a mounted Secret.
//! - [`Cache`] downloads objects, prefixes, `hf://` models and adapters into a local cache that
//!   is safe under concurrent fillers and readers.
//! - [`Registry`] publishes, lists, resolves, fetches, deletes and retains adapter versions
//!   (`adapters/<name>/v<N>/`), with race-free version numbers.
//! - [`publish_merged`] keeps a base model with an adapter version folded in beside it
//!   (`merged/<name>/v<N>/`), manifest last, as the registry keeps adapters.
//! - [`scoped_registry_uri`] gives each namespace its own registry below a shared root.
//! - [`verify_version_dir`] checks a version directory named directly against its manifest.
//! - [`AdapterRef`] parses `name`, `name@latest`, `name@3`, `name@sha256:…`.

mod adapter_ref;
mod cache;
mod credentials;
mod digest;
mod error;
mod fs;
mod hf;
mod manifest;
mod merged;
mod names;
mod progress;
mod registry;
mod retry;
mod scope;
mod store;
mod uri;
mod verify;

pub use adapter_ref::{AdapterRef, VersionSelector};
pub use cache::Cache;
pub use credentials::Credentials;
pub use digest::Sha256Digest;
pub use error::{Result, StorageError};
pub use hf::HfConfig;
pub use manifest::validate_file_path;
pub use manifest::{
    DpoMetrics, DpoScores, Evaluation, FileEntry, JobRef, Manifest, Metrics, ModelScores, SourceRef, CARD_FILE,
    MANIFEST_FILE,
};
pub use merged::{fetch_merged, publish_merged, resolve_merged, MergedManifest, PublishedMerged};
pub use names::validate_adapter_name;
pub use progress::{ProgressEvent, ProgressFn};
pub use registry::{PublishRequest, Registry, RegistryConfig, ResolvedAdapter};
pub use retry::RetryPolicy;
pub use scope::{scoped_registry_uri, RegistryScope};
pub use store::{CreateOutcome, ObjectInfo, Storage};
pub use uri::{HfRepo, StorageUri};
pub use verify::{verify_version_dir, VerifiedVersion};
