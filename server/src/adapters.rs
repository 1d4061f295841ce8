//! The set of loaded adapters. Requests take an `Arc` of the adapter when they are validated, so
//! replacing or unloading one never disturbs a request already admitted: it finishes on the
//! version it started with, and the weights are freed when the last such request ends.

use crate::error::ApiError;
use kubetune_model::LoraAdapter;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

#[derive(Debug)]
pub struct LoadedAdapter {
    pub name: String,
    /// Registry version, when loaded from the registry (or declared by the loader).
    pub version: Option<u32>,
    /// Registry manifest digest, `sha256:<hex>`.
    pub digest: Option<String>,
    /// Where it was loaded from. Shown on the admin API only: a storage URI says more about
    /// the deployment than inference clients need to know.
    pub source: String,
    /// Unix seconds when it was loaded: its `created` in GET /v1/models.
    pub loaded_at: u64,
    pub weights: LoraAdapter,
    pub bytes: usize,
}

impl LoadedAdapter {
    pub fn rank(&self) -> usize {
        self.weights.config.r
    }
}

/// Caps on what the admin API may load.
#[derive(Debug, Clone)]
pub struct AdapterLimits {
    pub max_adapters: usize,
    pub max_rank: usize,
    pub max_bytes: usize,
}

impl Default for AdapterLimits {
    fn default() -> Self {
        Self {
            max_adapters: 16,
            max_rank: 64,
            max_bytes: 1 << 30,
        }
    }
}

#[derive(Default)]
pub struct AdapterSet {
    limits: AdapterLimits,
    loaded: RwLock<BTreeMap<String, Arc<LoadedAdapter>>>,
}

impl AdapterSet {
    pub fn new(limits: AdapterLimits) -> Self {
        Self {
            limits,
            loaded: RwLock::default(),
        }
    }

    pub fn limits(&self) -> &AdapterLimits {
        &self.limits
    }

    pub fn get(&self, name: &str) -> Option<Arc<LoadedAdapter>> {
        self.read().get(name).cloned()
    }

    pub fn list(&self) -> Vec<Arc<LoadedAdapter>> {
        self.read().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks the rank cap before the weights are even read, so an oversized adapter costs
    /// no memory.
    pub fn check_rank(&self, rank: usize) -> Result<(), ApiError> {
        if rank > self.limits.max_rank {
            return Err(ApiError::AdapterRejected {
                message: format!(
                    "adapter rank r={rank} exceeds this server's maximum rank {} (--max-adapter-rank)",
                    self.limits.max_rank
                ),
                param: Some("source".into()),
            });
        }
        Ok(())
    }

    /// Adds or replaces `adapter` under its name, atomically, if the caps allow it. A
    /// replacement is counted without the version it replaces.
    pub fn insert(&self, adapter: LoadedAdapter) -> Result<Arc<LoadedAdapter>, ApiError> {
        self.check_rank(adapter.rank())?;
        let mut map = self.loaded.write().unwrap_or_else(|p| p.into_inner());
        let others = map.iter().filter(|(n, _)| **n != adapter.name);
        let (count, bytes) = others.fold((0, 0), |(c, b), (_, a)| (c + 1, b + a.bytes));
        if count + 1 > self.limits.max_adapters {
            return Err(ApiError::AdapterLimit(format!(
                "{count} adapters are loaded and the limit is {} (--max-adapters); unload one first",
                self.limits.max_adapters
            )));
        }
        if bytes + adapter.bytes > self.limits.max_bytes {
            return Err(ApiError::AdapterLimit(format!(
                "adapter `{}` needs {} bytes; {bytes} of the {} byte adapter memory budget are in use (--max-adapter-memory-mb)",
                adapter.name, adapter.bytes, self.limits.max_bytes
            )));
        }
        let adapter = Arc::new(adapter);
        map.insert(adapter.name.clone(), adapter.clone());
        Ok(adapter)
    }

    pub fn remove(&self, name: &str) -> Result<Arc<LoadedAdapter>, ApiError> {
        let mut map = self.loaded.write().unwrap_or_else(|p| p.into_inner());
        map.remove(name)
            .ok_or_else(|| ApiError::AdapterNotFound(name.to_string()))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<LoadedAdapter>>> {
        // A panic while holding the lock cannot leave the map half-written (inserts are single
        // map operations), so a poisoned lock is still consistent.
        self.loaded.read().unwrap_or_else(|p| p.into_inner())
    }
}
