//! On-demand adapter loading (`--adapter-on-demand`): a request whose `model` names an adapter
//! of the server's `--registry` that is not loaded loads it first, as LoRAX does, instead of
//! getting a 404. Only the configured registry is read, only for names published there, and
//! every version is verified against its manifest as any other load; a name the registry does
//! not have stays 404 `model_not_found`.
//!
//! `model` is `name`, `name@latest`, `name@N` or `name@sha256:…` (the forms validation
//! accepts); the adapter is served as `name`. A name already loaded is left to validation,
//! which answers a version mismatch as before: on-demand loading never replaces a loaded
//! adapter.
//!
//! Loads are bounded (`--adapter-load-concurrency` at a time, each within
//! `--adapter-load-timeout-s`) and single-flight: concurrent requests for one adapter wait on
//! one per-name lock, and the ones after the first find it loaded. On-demand adapters are not
//! pinned: when `--max-adapters` or `--max-adapter-memory-mb` is reached the least recently
//! used of them that no request holds is evicted (see [`crate::adapters`]). When every slot
//! is held by running requests, the loaded adapter waits for one of them to end (within the
//! same timeout) instead of refusing the request: with more adapters asked for at once than
//! `--max-adapters`, requests queue for slots as they queue for the batch. Only a cap that
//! pinned adapters alone fill is refused at once.
//!
//! [`OnDemand::ensure`] hands the request a hold on its adapter, which it keeps until
//! validation has taken its own: an idle adapter, just loaded or found, could otherwise be
//! evicted by another request's load in between, and this request would get a 404.

use crate::adapters::{AdapterSet, Inserted, LoadedAdapter, Refused};
use crate::error::ApiError;
use crate::loader::AdapterLoader;
use crate::metrics::Metrics;
use kubetune_storage::{AdapterRef, StorageError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// How often a loaded adapter looks for a slot again while running requests hold them all, at
/// the latest. The engine wakes the wait when it lets go of a finished request's adapter; a
/// hold that ends elsewhere (a handler's, before its request reached the engine) is found by
/// this poll, whose interval grows to this from a few milliseconds.
const SLOT_POLL_MAX: Duration = Duration::from_millis(100);

pub struct OnDemand {
    semaphore: Semaphore,
    /// One lock per adapter name being loaded: the single flight.
    flights: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl OnDemand {
    pub fn new(concurrency: usize) -> Self {
        Self {
            semaphore: Semaphore::new(concurrency.max(1)),
            flights: Mutex::default(),
        }
    }

    /// Makes sure the adapter `model` names is loaded, if it names a registry adapter that is
    /// not, and returns a hold on the adapter it names (keep it until validation is done).
    /// Returns Ok when there is nothing to do (the base, a malformed body: validation answers
    /// those), and the load's error when loading fails.
    pub async fn ensure(
        &self,
        loader: &AdapterLoader,
        adapters: &AdapterSet,
        metrics: &Metrics,
        base_names: &[&str],
        model: &str,
    ) -> Result<Option<Arc<LoadedAdapter>>, ApiError> {
        let name = model.split_once('@').map_or(model, |(n, _)| n);
        if base_names.contains(&model) || base_names.contains(&name) {
            return Ok(None);
        }
        if let Some(held) = adapters.get(name) {
            return Ok(Some(held));
        }
        let Some(registry) = loader.registry.as_ref() else {
            return Ok(None);
        };
        // Not a well-formed reference: not an adapter name, so validation's 404 stands.
        let Ok(reference) = model.parse::<AdapterRef>() else {
            return Ok(None);
        };
        let flight = {
            let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
            flights.entry(name.to_string()).or_default().clone()
        };
        let result = async {
            let _flight = flight.lock().await;
            if let Some(held) = adapters.get(name) {
                return Ok(Some(held));
            }
            let resolved = match registry.resolve(&reference).await {
                Ok(r) => r,
                Err(StorageError::AdapterNotFound { .. } | StorageError::InvalidName { .. }) => {
                    return Err(ApiError::UnknownModel {
                        message: format!(
                            "model `{model}` is not served here and the adapter registry has no such version; GET /v1/models lists what is loaded"
                        ),
                    })
                }
                Err(e) => return Err(ApiError::Storage(e.to_string())),
            };
            let _permit = self
                .semaphore
                .acquire()
                .await
                .map_err(|_| ApiError::ShuttingDown)?;
            let started = Instant::now();
            let outcome = match loader.load_resolved(name, &resolved, adapters).await {
                Ok(loaded) => insert_when_room(adapters, metrics, loaded, started + loader.limits.timeout).await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok((adapter, evicted)) => {
                    metrics.adapter_loads.with_label_values(&["loaded"]).inc();
                    metrics.adapter_evictions.inc_by(evicted.len() as u64);
                    metrics.loaded_adapters.set(adapters.len() as i64);
                    for e in &evicted {
                        tracing::info!(name = %e.name, version = ?e.version, "adapter evicted (least recently used)");
                    }
                    tracing::info!(
                        name = %adapter.name, version = ?adapter.version, seconds = started.elapsed().as_secs_f64(),
                        "adapter loaded on demand"
                    );
                    Ok(Some(adapter))
                }
                Err(e) => {
                    let outcome = if e.to_string().contains("--adapter-load-timeout-s") {
                        "timeout"
                    } else {
                        "failed"
                    };
                    metrics.adapter_loads.with_label_values(&[outcome]).inc();
                    tracing::warn!(%name, error = %e, "on-demand adapter load failed");
                    Err(e)
                }
            }
        }
        .await;
        // The last one out removes the flight's lock (the map holds one reference).
        let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        drop(flight);
        if flights.get(name).is_some_and(|f| Arc::strong_count(f) == 1) {
            flights.remove(name);
        }
        result
    }
}

/// Puts a loaded on-demand adapter in the set, waiting while the only adapters that could make
/// room are held by running requests, until `deadline`.
async fn insert_when_room(
    adapters: &AdapterSet,
    metrics: &Metrics,
    mut adapter: LoadedAdapter,
    deadline: Instant,
) -> Result<Inserted, ApiError> {
    let mut poll = Duration::from_millis(5);
    let mut waiting = None;
    let released = adapters.released();
    loop {
        // Listening before looking, so that a release between the two is not missed.
        let notified = released.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        match adapters.try_insert(adapter, false) {
            Ok(inserted) => return Ok(inserted),
            Err(Refused {
                adapter: back,
                until_requests_end: true,
                ..
            }) if Instant::now() + poll < deadline => {
                waiting.get_or_insert_with(|| WaitingGauge::enter(metrics));
                adapter = *back;
                tokio::select! {
                    _ = &mut notified => {}
                    _ = tokio::time::sleep(poll) => {}
                }
                poll = (poll * 2).min(SLOT_POLL_MAX);
            }
            Err(Refused {
                error: ApiError::AdapterLimit(message),
                until_requests_end: true,
                ..
            }) => {
                return Err(ApiError::AdapterLimit(format!(
                    "{message}; no slot came free within --adapter-load-timeout-s"
                )))
            }
            Err(refused) => return Err(refused.error),
        }
    }
}

/// Counts a load in `kubetune_server_adapter_loads_waiting` while it lives.
struct WaitingGauge<'a>(&'a Metrics);

impl<'a> WaitingGauge<'a> {
    fn enter(metrics: &'a Metrics) -> Self {
        metrics.adapter_loads_waiting.inc();
        Self(metrics)
    }
}

impl Drop for WaitingGauge<'_> {
    fn drop(&mut self) {
        self.0.adapter_loads_waiting.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::AdapterLimits;

    /// Runs on paused time: no virtual time passes unless every task waits on a timer, so a
    /// load that finishes at the instant it started was woken by the release, not by its poll.
    #[tokio::test(start_paused = true)]
    async fn a_load_waiting_for_a_slot_takes_it_when_a_request_lets_go_without_waiting_for_its_poll() {
        let set = Arc::new(AdapterSet::new(AdapterLimits {
            max_adapters: 1,
            ..Default::default()
        }));
        let metrics = Arc::new(Metrics::default());
        let (in_use, _) = set
            .insert_with(LoadedAdapter::empty("busy", None), false)
            .expect("room");
        let started = tokio::time::Instant::now();
        let load = tokio::spawn({
            let (set, metrics) = (set.clone(), metrics.clone());
            async move {
                let deadline = Instant::now() + Duration::from_secs(60);
                insert_when_room(&set, &metrics, LoadedAdapter::empty("new", None), deadline).await
            }
        });
        while metrics.adapter_loads_waiting.get() == 0 {
            tokio::task::yield_now().await;
        }
        // What the engine does when the request holding `busy` ends.
        LoadedAdapter::release(in_use);
        let (inserted, evicted) = load.await.expect("joined").expect("a slot came free");
        assert_eq!(inserted.name, "new");
        assert_eq!(evicted.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(), ["busy"]);
        assert_eq!(
            tokio::time::Instant::now(),
            started,
            "woken by its poll, not the release"
        );
    }
}
