//! What triggers a reconcile of a controller's own objects: every object the watch applies or
//! deletes, but an object of a (re-)list only once the whole list is in the cache; and a sweep
//! for objects that no reconcile has started for.
//!
//! #18 §0: of 1,000 FineTuneJobs created at once, 5 never got a Job, a status or a log line.
//! One way kube-runtime loses an object that silently: `touched_objects()` (and
//! `Controller::new`, through `applied_objects()`) triggers each object of a list as the list
//! arrives, while the reflector keeps the list in a buffer and swaps it into the cache only at
//! its end (`InitDone`); the controller reads the object to reconcile from the cache, and one
//! that is not there is dropped (`ObjectNotFound`: no reconcile, no retry, nothing logged above
//! debug). The controller waits for the first list, not for a list after a `410 Gone`, and an
//! object created while the watch was down and listed in a page before the last is lost for
//! good. A list served by the watch cache (the watcher asks for `resourceVersion=0`) comes in
//! one page, so the loss needs a relist that etcd answers in pages of 500, as when the watch
//! cache is off or not ready. On the local cluster, a relist forced by an API server restart
//! with 1,000 unseen FineTuneJobs came in one page and lost none; with the watch cache off
//! (pages of 500) the old trigger left 3 of 1,000 without a Job, a status or a log line, all in
//! the first page, but no `ObjectNotFound` was logged for them, so what held them is not
//! proven. Here each object of a list is triggered after its `InitDone`, when the cache holds
//! it. (What held them was found later: the running jobs' periodic looks took every reconcile
//! slot, and kube-runtime serves such a backlog in hash order; see [`crate::pace`].)
//!
//! Whatever else might drop a trigger, [`sweep_not_started`] finds the cached objects that no
//! reconcile has started for at their current generation, logs each by name and triggers it
//! (and warns when every slot stays taken while objects wait, which no trigger can mend);
//! and [`within`] ends a reconcile that never finishes (kube-client sets no read timeout) with
//! an error that is logged and retried.

use futures::{future, stream, Stream, StreamExt};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher::{Error, Event};
use kube::Resource;
use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The objects to reconcile from a reflected watch (`watcher(..).reflect(writer)`): applied and
/// deleted ones as they come, a list's once it is complete and in the cache.
pub fn objects_once_cached<K, S>(events: S) -> impl Stream<Item = Result<K, Error>>
where
    S: Stream<Item = Result<Event<K>, Error>>,
{
    events
        .scan(Vec::new(), |listing: &mut Vec<K>, event| {
            let ready = match event {
                Ok(Event::Apply(obj) | Event::Delete(obj)) => vec![Ok(obj)],
                // A list that started again (its first attempt failed part-way) starts afresh,
                // as the reflector's buffer does.
                Ok(Event::Init) => {
                    listing.clear();
                    Vec::new()
                }
                Ok(Event::InitApply(obj)) => {
                    listing.push(obj);
                    Vec::new()
                }
                Ok(Event::InitDone) => std::mem::take(listing).into_iter().map(Ok).collect(),
                Err(e) => vec![Err(e)],
            };
            future::ready(Some(stream::iter(ready)))
        })
        .flatten()
}

/// Which objects (by uid) a reconcile has started for, and at which generation; how many
/// reconciles run; and which objects a sweep found without one, to trigger them if the next
/// sweep still does.
#[derive(Default)]
pub struct Started {
    generations: Mutex<HashMap<String, Option<i64>>>,
    suspects: Mutex<HashSet<String>>,
    /// Sweeps in a row that found every reconcile slot taken.
    busy_sweeps: AtomicUsize,
    running: Arc<AtomicUsize>,
    /// The controller's concurrency limit; 0 for none.
    concurrency: usize,
}

/// A reconcile that runs; it counts as running until dropped.
pub struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Started {
    /// For a controller that runs at most `concurrency` reconciles at once (0: no limit).
    pub fn new(concurrency: u16) -> Self {
        Started {
            concurrency: usize::from(concurrency),
            ..Default::default()
        }
    }

    /// Records that a reconcile of `obj` starts now; it runs until the guard is dropped.
    pub fn start<K: Resource>(&self, obj: &K) -> Running {
        if let (Some(uid), Ok(mut generations)) = (obj.meta().uid.clone(), self.generations.lock()) {
            generations.insert(uid, obj.meta().generation);
        }
        self.running.fetch_add(1, Ordering::Relaxed);
        Running(self.running.clone())
    }

    /// The cached objects that no reconcile has started for at their current generation, at
    /// this sweep and the one before, with a free slot for a reconcile at both: while every
    /// slot is taken, an object may just be waiting in the queue, but with one free the
    /// controller would have started any object it had queued. Objects no longer in the cache
    /// are forgotten.
    pub fn not_started<K>(&self, cache: &Store<K>) -> Swept<K>
    where
        K: Resource + Clone + 'static,
        K::DynamicType: Clone + Default + Eq + Hash,
    {
        let mut swept = Swept {
            late: Vec::new(),
            waiting_on_busy_slots: 0,
        };
        let (Ok(mut generations), Ok(mut suspects)) = (self.generations.lock(), self.suspects.lock()) else {
            return swept;
        };
        let objects = cache.state();
        let cached: HashSet<&str> = objects.iter().filter_map(|o| o.meta().uid.as_deref()).collect();
        generations.retain(|uid, _| cached.contains(uid.as_str()));
        let waiting: Vec<_> = objects
            .iter()
            .filter(|obj| {
                let meta = obj.meta();
                meta.deletion_timestamp.is_none()
                    && meta
                        .uid
                        .as_ref()
                        .is_some_and(|uid| generations.get(uid) != Some(&meta.generation))
            })
            .collect();
        if self.concurrency > 0 && self.running.load(Ordering::Relaxed) >= self.concurrency {
            suspects.clear();
            if self.busy_sweeps.fetch_add(1, Ordering::Relaxed) >= 1 {
                swept.waiting_on_busy_slots = waiting.len();
            }
            return swept;
        }
        self.busy_sweeps.store(0, Ordering::Relaxed);
        let mut now_suspect = HashSet::new();
        for obj in waiting {
            let uid = obj.meta().uid.clone().unwrap_or_default();
            if suspects.contains(&uid) {
                swept.late.push(ObjectRef::from_obj(obj.as_ref()));
            }
            now_suspect.insert(uid);
        }
        *suspects = now_suspect;
        swept
    }
}

/// What a sweep found.
pub struct Swept<K: Resource> {
    /// Objects whose trigger was lost (see [`Started::not_started`]).
    pub late: Vec<ObjectRef<K>>,
    /// Objects waiting for a reconcile while every slot was taken at this sweep and the one
    /// before: the controller is saturated (see [`crate::pace`]); 0 otherwise.
    pub waiting_on_busy_slots: usize,
}

/// Every `every`, the objects of `cache` that `started` says no reconcile has started for (see
/// [`Started::not_started`]), each logged by name: a trigger was lost somewhere, and this one
/// is not.
pub fn sweep_not_started<K>(
    cache: Store<K>,
    started: Arc<Started>,
    every: Duration,
    kind: &'static str,
) -> impl Stream<Item = ObjectRef<K>>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Clone + Default + Eq + Hash,
{
    stream::unfold((), move |()| {
        let (cache, started) = (cache.clone(), started.clone());
        async move {
            tokio::time::sleep(every).await;
            let Swept {
                late,
                waiting_on_busy_slots,
            } = started.not_started(&cache);
            tracing::debug!(
                %kind,
                cached = cache.state().len(),
                running = started.running.load(Ordering::Relaxed),
                late = late.len(),
                "swept for objects no reconcile has started for"
            );
            if waiting_on_busy_slots > 0 {
                tracing::warn!(
                    %kind,
                    waiting = waiting_on_busy_slots,
                    "every reconcile slot was taken at two sweeps in a row while objects waited for a \
                     reconcile; more slots (--concurrency) or a faster API server would let them in sooner"
                );
            }
            for obj in &late {
                tracing::warn!(%kind, object = %obj, "no reconcile had started for it; triggering it");
            }
            Some((stream::iter(late), ()))
        }
    })
    .flatten()
}

/// Runs `reconcile` for at most `limit`; past it, the reconcile fails with
/// [`crate::error::Error::TimedOut`], which the error policy logs and retries. A reconcile that
/// never finished held its object (and a slot) with no status, no Job and no log line.
pub async fn within<F>(limit: Duration, reconcile: F) -> crate::error::Result<kube::runtime::controller::Action>
where
    F: std::future::Future<Output = crate::error::Result<kube::runtime::controller::Action>>,
{
    tokio::time::timeout(limit, reconcile)
        .await
        .unwrap_or(Err(crate::error::Error::TimedOut(limit)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::stream::BoxStream;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::ObjectMeta;
    use kube::runtime::reflector::{self, ObjectRef, Store};
    use kube::runtime::WatchStreamExt;
    use kube::ResourceExt;

    fn object(name: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("team-a".into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// A watch that lists `a`, then sees `b` created, then loses its place and lists again
    /// (a `410 Gone`), finding `c` created meanwhile; then sees `d` created and `a` deleted.
    fn watch_that_lists_again() -> Vec<Result<Event<ConfigMap>, Error>> {
        vec![
            Ok(Event::Init),
            Ok(Event::InitApply(object("a"))),
            Ok(Event::InitDone),
            Ok(Event::Apply(object("b"))),
            Ok(Event::Init),
            Ok(Event::InitApply(object("a"))),
            Ok(Event::InitApply(object("b"))),
            Ok(Event::InitApply(object("c"))),
            Ok(Event::InitDone),
            Ok(Event::Apply(object("d"))),
            Ok(Event::Delete(object("a"))),
        ]
    }

    type Triggers =
        fn(BoxStream<'static, Result<Event<ConfigMap>, Error>>) -> BoxStream<'static, Result<ConfigMap, Error>>;

    /// Runs the watch through a reflector and `triggers`, and for each triggered object records
    /// its name and whether the cache (what a controller reconciles from) held it right then.
    async fn trigger_with_cache(triggers: Triggers) -> Vec<(String, bool)> {
        let (cache, writer) = reflector::store::<ConfigMap>();
        let reflected = stream::iter(watch_that_lists_again()).reflect(writer).boxed();
        let in_cache = |cache: &Store<ConfigMap>, obj: &ConfigMap| cache.get(&ObjectRef::from_obj(obj)).is_some();
        triggers(reflected)
            .map(|obj| {
                let obj = obj.expect("no watch error");
                (obj.name_any(), in_cache(&cache, &obj))
            })
            .collect()
            .await
    }

    #[tokio::test]
    async fn every_listed_object_is_triggered_once_the_cache_holds_it() {
        let triggered = trigger_with_cache(|s| objects_once_cached(s).boxed()).await;
        let t = |name: &str, cached| (name.to_string(), cached);
        assert_eq!(
            triggered,
            [
                t("a", true),
                t("b", true),
                t("a", true),
                t("b", true),
                t("c", true),
                t("d", true),
                // A deleted object is gone from the cache; its reconcile is dropped, as it
                // should be.
                t("a", false),
            ]
        );
    }

    /// Why this module exists: kube-runtime's own trigger for a controller's objects fires for
    /// `c`, created while the watch was down, before the cache has it, so the controller drops
    /// its reconcile. Should kube-runtime change this, `objects_once_cached` can go.
    #[tokio::test]
    async fn kube_runtime_triggers_a_relisted_object_before_the_cache_holds_it() {
        let triggered = trigger_with_cache(|s| s.touched_objects().boxed()).await;
        assert!(
            triggered.contains(&("c".to_string(), false)),
            "c was triggered with the cache holding it: {triggered:?}"
        );
    }

    #[tokio::test]
    async fn a_list_that_starts_again_triggers_only_what_the_finished_list_holds() {
        let events = vec![
            Ok(Event::Init),
            Ok(Event::InitApply(object("gone"))),
            Ok(Event::Init),
            Ok(Event::InitApply(object("kept"))),
            Ok(Event::InitDone),
        ];
        let names: Vec<String> = objects_once_cached(stream::iter(events))
            .map(|o| o.expect("no watch error").name_any())
            .collect()
            .await;
        assert_eq!(names, ["kept"]);
    }

    fn with_uid(name: &str, generation: i64) -> ConfigMap {
        let mut obj = object(name);
        obj.metadata.uid = Some(format!("uid-{name}"));
        obj.metadata.generation = Some(generation);
        obj
    }

    fn names(refs: Vec<ObjectRef<ConfigMap>>) -> Vec<String> {
        let mut names: Vec<String> = refs.into_iter().map(|r| r.name).collect();
        names.sort();
        names
    }

    #[test]
    fn a_sweep_names_an_object_no_reconcile_started_for_at_the_second_look() {
        let (cache, mut writer) = reflector::store::<ConfigMap>();
        for obj in [with_uid("a", 1), with_uid("b", 1)] {
            writer.apply_watcher_event(&Event::Apply(obj));
        }
        let started = Started::new(2);
        drop(started.start(&with_uid("a", 1)));
        assert!(
            started.not_started(&cache).late.is_empty(),
            "b may still be waiting in the queue at the first look"
        );
        assert_eq!(names(started.not_started(&cache).late), ["b"]);
        drop(started.start(&with_uid("b", 1)));
        assert!(started.not_started(&cache).late.is_empty());
    }

    #[test]
    fn a_new_generation_needs_a_reconcile_of_its_own() {
        let (cache, mut writer) = reflector::store::<ConfigMap>();
        writer.apply_watcher_event(&Event::Apply(with_uid("a", 1)));
        let started = Started::new(2);
        drop(started.start(&with_uid("a", 1)));
        writer.apply_watcher_event(&Event::Apply(with_uid("a", 2)));
        assert!(started.not_started(&cache).late.is_empty());
        assert_eq!(names(started.not_started(&cache).late), ["a"]);
    }

    #[test]
    fn a_sweep_skips_objects_being_deleted_and_forgets_deleted_ones() {
        let (cache, mut writer) = reflector::store::<ConfigMap>();
        let mut deleting = with_uid("deleting", 1);
        deleting.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ));
        writer.apply_watcher_event(&Event::Apply(deleting));
        writer.apply_watcher_event(&Event::Apply(with_uid("gone", 1)));
        let started = Started::new(2);
        drop(started.start(&with_uid("gone", 1)));
        writer.apply_watcher_event(&Event::Delete(with_uid("gone", 1)));
        assert!(started.not_started(&cache).late.is_empty());
        assert!(started.not_started(&cache).late.is_empty());
        assert!(
            started.generations.lock().unwrap().is_empty(),
            "the deleted object is forgotten"
        );
    }

    #[test]
    fn no_object_is_named_while_every_reconcile_slot_is_taken() {
        let (cache, mut writer) = reflector::store::<ConfigMap>();
        for obj in [with_uid("busy", 1), with_uid("queued", 1)] {
            writer.apply_watcher_event(&Event::Apply(obj));
        }
        let started = Started::new(1);
        let busy = started.start(&with_uid("busy", 1));
        let first = started.not_started(&cache);
        assert!(first.late.is_empty());
        assert_eq!(first.waiting_on_busy_slots, 0, "one busy sweep says nothing yet");
        let second = started.not_started(&cache);
        assert!(second.late.is_empty(), "queued may be waiting for the one slot");
        assert_eq!(
            second.waiting_on_busy_slots, 1,
            "busy at two sweeps in a row, with queued waiting"
        );
        drop(busy);
        let freed = started.not_started(&cache);
        assert!(freed.late.is_empty(), "the slot has just come free");
        assert_eq!(freed.waiting_on_busy_slots, 0);
        assert_eq!(names(started.not_started(&cache).late), ["queued"]);
    }

    #[tokio::test]
    async fn a_reconcile_that_never_finishes_fails_with_a_timeout() {
        let never = future::pending::<crate::error::Result<kube::runtime::controller::Action>>();
        let result = within(Duration::from_millis(1), never).await;
        assert!(matches!(result, Err(crate::error::Error::TimedOut(_))), "{result:?}");
    }

    #[tokio::test]
    async fn a_reconcile_that_finishes_keeps_its_result() {
        let done = future::ready(Ok(kube::runtime::controller::Action::await_change()));
        let result = within(Duration::from_secs(3600), done).await;
        assert_eq!(result.ok(), Some(kube::runtime::controller::Action::await_change()));
    }
}
