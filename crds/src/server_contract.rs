//! What the operator and the inference server say to each other: the adapters file a server pod
//! loads at start, and the admin API the operator hot-swaps adapter versions through.

use serde::{Deserialize, Serialize};

/// Port the server listens on in its pod.
pub const SERVER_PORT: u16 = 8000;
/// Port of the server's admin API in its pod: apart from SERVER_PORT so that the Service, which
/// exposes only SERVER_PORT, never reaches it.
pub const ADMIN_PORT: u16 = 8001;
/// Where the adapters file is mounted in the server pod.
pub const ADAPTERS_FILE: &str = "/etc/kubetune/adapters/adapters.json";

/// One adapter a server pod serves: `name` is what clients ask for; `source` is the registry
/// reference or URI it loads from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServedAdapter {
    pub name: String,
    /// Registry reference `registry-name@N`, resolved against the server's `--registry`.
    pub source: String,
    pub version: u32,
    /// Manifest digest the loaded files must match, "sha256:<hex>".
    pub digest: String,
}

/// The adapters file: every adapter a pod loads at start, before it reports ready.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AdaptersFile {
    pub adapters: Vec<ServedAdapter>,
}

/// `POST /v1/adapters`: load (or replace) an adapter under `name`. The switch is atomic: requests
/// see the old version until the new one is fully loaded, and a failed load leaves the old one.
pub type LoadAdapterRequest = ServedAdapter;

/// One entry of `GET /v1/models`, as OpenAI lists models, plus the adapter's version and digest;
/// `GET /v1/adapters` (admin) adds whether it is pinned.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ModelEntry {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// False for an adapter the server loaded on demand (and may evict): not the operator's to
    /// roll out or unload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<bool>,
}

/// `GET /v1/models`, and `GET /v1/adapters` on the admin port.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelList {
    pub data: Vec<ModelEntry>,
}
