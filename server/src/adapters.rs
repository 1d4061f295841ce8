//! The set of loaded adapters. Requests take an `Arc` of the adapter when they are validated, so
//! replacing or unloading one never disturbs a request already admitted: it finishes on the
//! version it started with, and the weights are freed when the last such request ends.
//!
//! Adapters are pinned (loaded at start, by `--adapter` or the adapters file, or through the
//! admin API) or loaded on demand by a request that named a registry adapter
//! (`--adapter-on-demand`). When a cap is reached, a new adapter takes the place of the least
//! recently used on-demand adapter that no request holds; pinned adapters are never evicted.
//! Eviction only drops the set's `Arc`: a request that took the adapter a moment before keeps
//! it alive until it ends, so eviction never disturbs a running request. Adapters some request
//! holds are not chosen, so that the memory cap stays a cap.

use crate::error::ApiError;
use kubetune_model::LoraAdapter;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::Notify;

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
    /// Told each time the engine lets go of a request's hold on this adapter: the set it goes
    /// into hands over its own, so that a load waiting for a slot that running requests hold
    /// looks again at once (see `ondemand.rs`).
    pub released: Arc<Notify>,
}

impl LoadedAdapter {
    pub fn rank(&self) -> usize {
        self.weights.config.r
    }

    /// Ends a request's hold on the adapter: lets go of it first, then tells its set, so that
    /// a load waiting for a slot finds this one free.
    pub fn release(hold: Arc<Self>) {
        let released = hold.released.clone();
        drop(hold);
        released.notify_waiters();
    }

    /// An adapter of rank 1 with no weights, for tests of what holds and frees adapters.
    #[cfg(test)]
    pub(crate) fn empty(name: &str, digest: Option<&str>) -> Self {
        let config = kubetune_model::LoraConfig {
            r: 1,
            alpha: 1.0,
            dropout: 0.0,
            target_modules: Vec::new(),
        };
        LoadedAdapter {
            name: name.into(),
            version: Some(1),
            digest: digest.map(str::to_string),
            source: "test".into(),
            loaded_at: 0,
            weights: LoraAdapter::from_pairs(config, Default::default()),
            bytes: 0,
            released: Default::default(),
        }
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

/// An adapter in the set, and the adapters evicted to make room for it.
pub type Inserted = (Arc<LoadedAdapter>, Vec<Arc<LoadedAdapter>>);

/// An adapter the caps kept out, handed back.
pub struct Refused {
    pub adapter: Box<LoadedAdapter>,
    pub error: ApiError,
    /// Room would be made once the requests holding on-demand adapters end.
    pub until_requests_end: bool,
}

struct Slot {
    adapter: Arc<LoadedAdapter>,
    /// Loaded at start or by the admin API: never evicted.
    pinned: bool,
    /// The set's clock at the last request that named it.
    last_used: AtomicU64,
}

#[derive(Default)]
pub struct AdapterSet {
    limits: AdapterLimits,
    loaded: RwLock<BTreeMap<String, Slot>>,
    /// Ticks on every use, so "least recently used" is exact even within one millisecond.
    clock: AtomicU64,
    /// Told when a request lets go of one of the set's adapters.
    released: Arc<Notify>,
}

impl AdapterSet {
    pub fn new(limits: AdapterLimits) -> Self {
        Self {
            limits,
            loaded: RwLock::default(),
            clock: AtomicU64::new(0),
            released: Arc::default(),
        }
    }

    /// Told each time a request lets go of one of the set's adapters.
    pub fn released(&self) -> Arc<Notify> {
        self.released.clone()
    }

    pub fn limits(&self) -> &AdapterLimits {
        &self.limits
    }

    /// The adapter served as `name`, recording the use: every request resolves its model
    /// through here, which is what the eviction order follows.
    pub fn get(&self, name: &str) -> Option<Arc<LoadedAdapter>> {
        let map = self.read();
        let slot = map.get(name)?;
        slot.last_used.store(self.tick(), Ordering::Relaxed);
        Some(slot.adapter.clone())
    }

    pub fn list(&self) -> Vec<Arc<LoadedAdapter>> {
        self.read().values().map(|s| s.adapter.clone()).collect()
    }

    /// Whether `name` is loaded and pinned (never evicted); None when it is not loaded.
    pub fn is_pinned(&self, name: &str) -> Option<bool> {
        self.read().get(name).map(|s| s.pinned)
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed) + 1
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

    /// Adds or replaces `adapter` under its name as a pinned adapter, atomically, if the caps
    /// allow it (evicting on-demand adapters to make room). A replacement is counted without
    /// the version it replaces.
    pub fn insert(&self, adapter: LoadedAdapter) -> Result<Arc<LoadedAdapter>, ApiError> {
        self.insert_with(adapter, true).map(|(a, _)| a)
    }

    /// As [`insert`](Self::insert), pinned or not; also returns the adapters evicted to make
    /// room: the least recently used unpinned ones that no request holds.
    pub fn insert_with(&self, adapter: LoadedAdapter, pinned: bool) -> Result<Inserted, ApiError> {
        self.try_insert(adapter, pinned).map_err(|refused| refused.error)
    }

    /// As [`insert_with`](Self::insert_with), but a refusal hands the adapter back and says
    /// whether it is only for now: room would be made if the adapters that running requests
    /// hold were idle, so a caller may wait for them instead of loading again.
    pub fn try_insert(&self, mut adapter: LoadedAdapter, pinned: bool) -> Result<Inserted, Refused> {
        adapter.released = self.released.clone();
        if let Err(error) = self.check_rank(adapter.rank()) {
            return Err(Refused {
                adapter: Box::new(adapter),
                error,
                until_requests_end: false,
            });
        }
        let mut map = self.loaded.write().unwrap_or_else(|p| p.into_inner());
        let totals = |map: &BTreeMap<String, Slot>, pinned_only: bool| {
            map.iter()
                .filter(|(n, s)| **n != adapter.name && (s.pinned || !pinned_only))
                .fold((0, 0), |(c, b), (_, s)| (c + 1, b + s.adapter.bytes))
        };
        let fits = |(count, bytes): (usize, usize)| {
            count < self.limits.max_adapters && bytes + adapter.bytes <= self.limits.max_bytes
        };
        // Only the set holds an idle adapter's `Arc`; a request holding one is using it.
        let mut victims: Vec<(u64, String)> = map
            .iter()
            .filter(|(n, s)| !s.pinned && **n != adapter.name && Arc::strong_count(&s.adapter) == 1)
            .map(|(n, s)| (s.last_used.load(Ordering::Relaxed), n.clone()))
            .collect();
        victims.sort();
        let mut evicted = Vec::new();
        let mut victims = victims.into_iter();
        while !fits(totals(&map, false)) {
            let Some((_, name)) = victims.next() else { break };
            if let Some(slot) = map.remove(&name) {
                evicted.push((name, slot));
            }
        }
        let (count, bytes) = totals(&map, false);
        let refusal = if count + 1 > self.limits.max_adapters {
            Some(format!(
                "{count} adapters are loaded and the limit is {} (--max-adapters); unload one first",
                self.limits.max_adapters
            ))
        } else if bytes + adapter.bytes > self.limits.max_bytes {
            Some(format!(
                "adapter `{}` needs {} bytes; {bytes} of the {} byte adapter memory budget are in use (--max-adapter-memory-mb)",
                adapter.name, adapter.bytes, self.limits.max_bytes
            ))
        } else {
            None
        };
        if let Some(message) = refusal {
            // Nothing changes when the adapter cannot go in: put the evicted ones back. What
            // is left unpinned is held by requests, which end.
            map.extend(evicted);
            let until_requests_end = !pinned && fits(totals(&map, true));
            let busy = if pinned {
                ""
            } else {
                " (pinned adapters and adapters in use by running requests are not evicted)"
            };
            return Err(Refused {
                adapter: Box::new(adapter),
                error: ApiError::AdapterLimit(format!("{message}{busy}")),
                until_requests_end,
            });
        }
        let adapter = Arc::new(adapter);
        let slot = Slot {
            adapter: adapter.clone(),
            pinned,
            last_used: AtomicU64::new(self.tick()),
        };
        map.insert(adapter.name.clone(), slot);
        Ok((adapter, evicted.into_iter().map(|(_, s)| s.adapter).collect()))
    }

    pub fn remove(&self, name: &str) -> Result<Arc<LoadedAdapter>, ApiError> {
        let mut map = self.loaded.write().unwrap_or_else(|p| p.into_inner());
        map.remove(name)
            .map(|s| s.adapter)
            .ok_or_else(|| ApiError::AdapterNotFound(name.to_string()))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Slot>> {
        // A panic while holding the lock cannot leave the map half-written (inserts are single
        // map operations), so a poisoned lock is still consistent.
        self.loaded.read().unwrap_or_else(|p| p.into_inner())
    }
}
