//! Leader election through a coordination.k8s.io Lease, so two operator replicas are safe: only
//! the holder reconciles, the other waits and takes over when the lease expires.
//!
//! No decision compares one host's clock with another's. The holder writes `renewTime` from its
//! wall clock, but nobody reads it back as a time: a candidate judges a lease expired when the
//! record has not changed for `leaseDurationSeconds` on the candidate's own monotonic clock, as
//! client-go does. The holder gives up when it has not renewed for `renew_deadline` on its own
//! monotonic clock, counted from the start of its last successful renewal; `renew_deadline` is
//! shorter than the lease duration, so the holder has stopped before any candidate can have seen
//! the lease unchanged for that long (a candidate's first look at the last renewal comes after
//! the renewal was sent).

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::Client;
use serde_json::json;
use std::time::Duration;
use tokio::time::Instant;

/// How long a lease lasts, how soon its holder gives up, and how often everyone tries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTiming {
    /// How long a candidate waits, seeing the lease unchanged, before it takes the lease over.
    pub duration: Duration,
    /// How long the holder goes on without a successful renewal before it stops reconciling.
    /// Shorter than `duration`: the difference is the margin for the holder to stop.
    pub renew_deadline: Duration,
    /// How often the holder renews and a candidate looks again.
    pub retry: Duration,
}

impl LeaseTiming {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry.
    pub const DEFAULT: LeaseTiming = LeaseTiming {
        duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry: Duration::from_secs(2),
    };

    /// Err names the setting that breaks the ordering retry < renew deadline < duration.
    pub fn check(&self) -> Result<(), String> {
        if self.renew_deadline >= self.duration {
            return Err(format!(
                "leader election: the renew deadline ({:?}) must be shorter than the lease duration ({:?}), or a candidate may take the lease while its holder still reconciles",
                self.renew_deadline, self.duration
            ));
        }
        if self.retry >= self.renew_deadline {
            return Err(format!(
                "leader election: the retry period ({:?}) must be shorter than the renew deadline ({:?}), or the holder gets no second try",
                self.retry, self.renew_deadline
            ));
        }
        if self.duration.as_secs() == 0 || self.duration.as_secs() > i32::MAX as u64 {
            return Err(format!(
                "leader election: the lease duration ({:?}) must be a whole number of seconds from 1 (leaseDurationSeconds)",
                self.duration
            ));
        }
        Ok(())
    }
}

/// Lease settings.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    pub timing: LeaseTiming,
}

/// What a candidate last saw of a lease held by someone else, and when, on its own clock.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    pub record: LeaseSpec,
    pub since: Instant,
}

/// What one round does with the lease as it was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Round {
    /// There is no lease: create it, holding it.
    Create,
    /// The lease is ours: renew it.
    Renew,
    /// The lease is free or expired: take it over.
    TakeOver,
    /// Someone else holds it.
    Wait,
}

/// Decides one round from the lease as read (`None`: it does not exist) at `now`, updating what
/// this candidate has observed. A lease held by another is expired once its record has stayed
/// the same for its leaseDurationSeconds (`own_duration` when it names none) since this
/// candidate first saw that record: renewTime is only compared with itself, never with a clock.
pub fn decide(
    observed: &mut Option<Observation>,
    lease: Option<&LeaseSpec>,
    identity: &str,
    own_duration: Duration,
    now: Instant,
) -> Round {
    let Some(spec) = lease else {
        *observed = None;
        return Round::Create;
    };
    match spec.holder_identity.as_deref() {
        Some(holder) if holder == identity => {
            *observed = None;
            return Round::Renew;
        }
        // Released or never held.
        None | Some("") => {
            *observed = None;
            return Round::TakeOver;
        }
        Some(_) => {}
    }
    let duration = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .filter(|s| *s > 0)
        .map_or(own_duration, Duration::from_secs);
    match observed {
        Some(o) if &o.record == spec => {
            if now.duration_since(o.since) >= duration {
                Round::TakeOver
            } else {
                Round::Wait
            }
        }
        _ => {
            *observed = Some(Observation {
                record: spec.clone(),
                since: now,
            });
            Round::Wait
        }
    }
}

/// Holds or waits for the lease.
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
    observed: Option<Observation>,
    /// When the last successful create, renewal or takeover was sent, on this host's clock.
    renewed_at: Option<Instant>,
}

impl LeaderElector {
    /// Err when the timing cannot be safe (see [`LeaseTiming::check`]).
    pub fn new(client: Client, config: LeaseConfig) -> Result<Self, String> {
        config.timing.check()?;
        Ok(Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
            renewed_at: None,
        })
    }

    /// Waits until this replica holds the lease.
    pub async fn acquire(&mut self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    tracing::info!(identity = %self.config.identity, lease = %self.config.name, "became leader");
                    return;
                }
                Ok(false) => tracing::debug!("lease held by another replica"),
                Err(e) => tracing::warn!(error = %e, "leader election"),
            }
            tokio::time::sleep(self.config.timing.retry).await;
        }
    }

    /// Renews the lease every retry period, and returns when this replica must stop reconciling:
    /// another replica holds the lease, or no renewal has succeeded for the renew deadline (the
    /// operator then exits, and its restart stands for election again).
    pub async fn keep_renewing(&mut self) {
        let timing = self.config.timing;
        loop {
            tokio::time::sleep(timing.retry).await;
            // A renewal still hanging at the deadline counts as failed.
            let left = self
                .renewed_at
                .map_or(Duration::ZERO, |at| timing.renew_deadline.saturating_sub(at.elapsed()));
            match tokio::time::timeout(left, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => {
                    tracing::error!("lost the lease to another replica");
                    return;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "renewing the lease"),
                Err(_) => tracing::warn!("renewing the lease timed out"),
            }
            if self.renewed_at.is_none_or(|at| at.elapsed() >= timing.renew_deadline) {
                tracing::error!(deadline = ?timing.renew_deadline, "could not renew the lease in time");
                return;
            }
        }
    }

    /// One round: create the lease, renew it if ours, take it over if free or expired. The API
    /// server's resourceVersion check makes concurrent takeovers safe: only one replace wins.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        // Taken before the request: the lease is renewed no earlier than this, so the renew
        // deadline counted from here never outlasts what candidates see.
        let sent = Instant::now();
        let wall = MicroTime(Timestamp::now());
        let seconds = self.config.timing.duration.as_secs() as i32;
        let mut lease = self.api.get_opt(&self.config.name).await?;
        let round = decide(
            &mut self.observed,
            lease.as_ref().and_then(|l| l.spec.as_ref()),
            &self.config.identity,
            self.config.timing.duration,
            Instant::now(),
        );
        let result = match (round, lease.as_mut()) {
            (Round::Wait, _) => return Ok(false),
            (Round::Create, _) | (_, None) => {
                let lease: Lease = serde_json::from_value(json!({
                    "metadata": {"name": self.config.name, "namespace": self.config.namespace},
                    "spec": {
                        "holderIdentity": self.config.identity,
                        "leaseDurationSeconds": seconds,
                        "acquireTime": wall,
                        "renewTime": wall,
                        "leaseTransitions": 0,
                    }
                }))
                .map_err(kube::Error::SerdeError)?;
                self.api.create(&PostParams::default(), &lease).await.map(drop)
            }
            (round, Some(lease)) => {
                let spec = lease.spec.get_or_insert_with(Default::default);
                if round == Round::TakeOver {
                    tracing::info!(previous = ?spec.holder_identity, "taking over the lease");
                    spec.holder_identity = Some(self.config.identity.clone());
                    spec.acquire_time = Some(wall.clone());
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.renew_time = Some(wall);
                spec.lease_duration_seconds = Some(seconds);
                self.api
                    .replace(&self.config.name, &PostParams::default(), lease)
                    .await
                    .map(drop)
            }
        };
        match result {
            Ok(()) => {
                self.renewed_at = Some(sent);
                Ok(true)
            }
            // Someone else wrote first: they hold it now.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(holder: &str, renewed: &str) -> LeaseSpec {
        serde_json::from_value(json!({
            "holderIdentity": holder, "leaseDurationSeconds": 15, "renewTime": renewed,
        }))
        .expect("lease spec")
    }

    #[test]
    fn the_renew_deadline_must_be_shorter_than_the_lease_and_the_retry_shorter_than_both() {
        assert_eq!(LeaseTiming::DEFAULT.check(), Ok(()));
        let equal = LeaseTiming {
            renew_deadline: Duration::from_secs(15),
            ..LeaseTiming::DEFAULT
        };
        let err = equal.check().expect_err("a deadline as long as the lease");
        assert!(
            err.contains("renew deadline (15s) must be shorter than the lease duration (15s)"),
            "{err}"
        );
        let slow_retry = LeaseTiming {
            retry: Duration::from_secs(10),
            ..LeaseTiming::DEFAULT
        };
        assert!(slow_retry
            .check()
            .expect_err("retry = deadline")
            .contains("retry period"));
    }

    #[test]
    fn a_lease_that_keeps_changing_is_never_expired_however_old_its_renew_time_reads() {
        let start = Instant::now();
        let mut observed = None;
        // The holder's clock is a day behind ours: every renewTime it writes looks long expired.
        for i in 0..20u64 {
            let renewed = format!("2020-01-01T00:00:{i:02}.000000Z");
            let round = decide(
                &mut observed,
                Some(&held_by("a", &renewed)),
                "b",
                Duration::from_secs(15),
                start + Duration::from_secs(2 * i),
            );
            assert_eq!(round, Round::Wait, "renewal {i}");
        }
    }

    #[test]
    fn a_lease_unchanged_for_its_duration_on_the_candidates_clock_is_taken_over() {
        let start = Instant::now();
        let mut observed = None;
        let lease = held_by("a", "2999-01-01T00:00:00.000000Z");
        let at = |secs| start + Duration::from_secs(secs);
        // Its renewTime reads as the far future: irrelevant, only its staying the same counts.
        assert_eq!(
            decide(&mut observed, Some(&lease), "b", Duration::from_secs(60), at(0)),
            Round::Wait
        );
        assert_eq!(
            decide(&mut observed, Some(&lease), "b", Duration::from_secs(60), at(14)),
            Round::Wait
        );
        assert_eq!(
            decide(&mut observed, Some(&lease), "b", Duration::from_secs(60), at(15)),
            Round::TakeOver,
            "the lease's own 15 s, not the candidate's 60 s"
        );
    }

    #[test]
    fn a_missing_free_or_own_lease_needs_no_waiting() {
        let mut observed = None;
        let now = Instant::now();
        let d = Duration::from_secs(15);
        assert_eq!(decide(&mut observed, None, "b", d, now), Round::Create);
        assert_eq!(
            decide(&mut observed, Some(&held_by("b", "2020-01-01T00:00:00Z")), "b", d, now),
            Round::Renew
        );
        assert_eq!(
            decide(&mut observed, Some(&held_by("", "2020-01-01T00:00:00Z")), "b", d, now),
            Round::TakeOver
        );
        assert_eq!(observed, None);
    }
}
