//! Leader election through a coordination.k8s.io Lease, so two operator replicas are safe: only
//! the holder reconciles, the other waits and takes over when the lease expires.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use kube::Client;
use serde_json::json;
use std::time::Duration;

/// Lease settings.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// How long a lease stays valid without renewal.
    pub duration: Duration,
    /// How often the holder renews and a standby retries.
    pub retry: Duration,
}

/// Holds or waits for the lease.
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
}

impl LeaderElector {
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
        }
    }

    /// Waits until this replica holds the lease.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    tracing::info!(identity = %self.config.identity, lease = %self.config.name, "became leader");
                    return;
                }
                Ok(false) => tracing::debug!("lease held by another replica"),
                Err(e) => tracing::warn!(error = %e, "leader election"),
            }
            tokio::time::sleep(self.config.retry).await;
        }
    }

    /// Renews the lease until renewal fails for longer than the lease lasts, then returns: the
    /// caller must stop reconciling (the operator exits, and its restart stands for election again).
    pub async fn keep_renewing(&self) {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.config.retry).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewal = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!("lost the lease to another replica");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "renewing the lease");
                    if last_renewal.elapsed() >= self.config.duration {
                        tracing::error!("could not renew the lease in time");
                        return;
                    }
                }
            }
        }
    }

    /// One round: take the lease if free or expired, renew it if ours. The API server's
    /// resourceVersion check makes concurrent takeovers safe: only one replace wins.
    async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let seconds = self.config.duration.as_secs() as i32;
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease: Lease = serde_json::from_value(json!({
                "metadata": {"name": self.config.name, "namespace": self.config.namespace},
                "spec": {
                    "holderIdentity": self.config.identity,
                    "leaseDurationSeconds": seconds,
                    "acquireTime": MicroTime(now),
                    "renewTime": MicroTime(now),
                    "leaseTransitions": 0,
                }
            }))
            .map_err(kube::Error::SerdeError)?;
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let ours = spec.holder_identity.as_deref() == Some(self.config.identity.as_str());
        let expired = spec
            .renew_time
            .as_ref()
            .map(|t| t.0 + SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(seconds))) < now)
            .unwrap_or(true);
        if !ours && !expired {
            return Ok(false);
        }
        if !ours {
            spec.holder_identity = Some(self.config.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(seconds);
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}
