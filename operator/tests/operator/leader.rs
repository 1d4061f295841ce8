//! Leader election of two operator replicas against a fake Lease API (one Lease, with the API
//! server's resourceVersion check), on tokio's paused clock: the timings are exact, and a
//! minute of renewals takes no real time.

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::Client;
use kubetune_operator::leader::{LeaderElector, LeaseConfig, LeaseTiming};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tower_test::mock;

const LEASE_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/kubetune-system/leases";
const TIMING: LeaseTiming = LeaseTiming::DEFAULT;

/// How the fake API server treats one replica's requests.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Link {
    Up,
    /// Every request fails with 503, as from an API server that cannot be reached.
    Failing,
    /// Requests are never answered.
    Hanging,
}

#[derive(Default)]
struct State {
    lease: Option<Value>,
    resource_version: u64,
    links: BTreeMap<String, Link>,
    /// How far each replica's wall clock is off, applied to the times it writes.
    skew: BTreeMap<String, i64>,
    /// When each replica last wrote the lease, on the (paused) test clock.
    written: BTreeMap<String, Instant>,
}

#[derive(Clone, Default)]
struct FakeLeases(Arc<Mutex<State>>);

impl FakeLeases {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().expect("fake API state")
    }

    fn set_link(&self, who: &str, link: Link) {
        self.state().links.insert(who.into(), link);
    }

    fn holder(&self) -> Option<String> {
        let state = self.state();
        state.lease.as_ref()?["spec"]["holderIdentity"].as_str().map(Into::into)
    }

    fn transitions(&self) -> Option<i64> {
        self.state().lease.as_ref()?["spec"]["leaseTransitions"].as_i64()
    }

    fn last_write(&self, who: &str) -> Instant {
        *self.state().written.get(who).expect("a write by the replica")
    }

    /// An elector for replica `who` whose client talks to this fake API server.
    fn elector(&self, who: &str) -> LeaderElector {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let fake = self.clone();
        let replica = who.to_string();
        tokio::spawn(async move {
            // Unanswered requests stay here, so that they hang rather than fail.
            let mut hanging = Vec::new();
            while let Some((request, send)) = handle.next_request().await {
                match fake.answer(&replica, request).await {
                    Some(response) => send.send_response(response),
                    None => hanging.push(send),
                }
            }
        });
        LeaderElector::new(
            Client::new(service, "kubetune-system"),
            LeaseConfig {
                namespace: "kubetune-system".into(),
                name: "kubetune-operator".into(),
                identity: who.into(),
                timing: TIMING,
            },
        )
        .expect("the default timing is valid")
    }

    /// GET, POST and PUT of the one Lease, as the API server answers them; None: no answer.
    async fn answer(&self, who: &str, request: Request<Body>) -> Option<Response<Body>> {
        let link = self.state().links.get(who).copied().unwrap_or(Link::Up);
        match link {
            Link::Up => {}
            Link::Failing => return Some(reply(503, status(503, "ServiceUnavailable"))),
            Link::Hanging => return None,
        }
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let body = request.into_body().collect_bytes().await.expect("request body");
        let mut state = self.state();
        Some(match (method, path.as_str()) {
            (Method::GET, p) if p == format!("{LEASE_PATH}/kubetune-operator") => match &state.lease {
                Some(lease) => reply(200, lease.clone()),
                None => reply(404, status(404, "NotFound")),
            },
            (Method::POST, LEASE_PATH) if state.lease.is_some() => reply(409, status(409, "AlreadyExists")),
            (Method::POST, LEASE_PATH) => state.write(who, &body),
            (Method::PUT, p) if p == format!("{LEASE_PATH}/kubetune-operator") => {
                let sent: Value = serde_json::from_slice(&body).expect("lease JSON");
                let current = state.lease.as_ref().map(|l| l["metadata"]["resourceVersion"].clone());
                if current != Some(sent["metadata"]["resourceVersion"].clone()) {
                    reply(409, status(409, "Conflict"))
                } else {
                    state.write(who, &body)
                }
            }
            (method, path) => panic!("unexpected request {method} {path}"),
        })
    }
}

impl State {
    /// Stores the lease `who` sent, with a new resourceVersion and `who`'s clock skew applied.
    fn write(&mut self, who: &str, body: &[u8]) -> Response<Body> {
        let mut lease: Value = serde_json::from_slice(body).expect("lease JSON");
        self.resource_version += 1;
        lease["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        if let Some(skew) = self.skew.get(who) {
            for field in ["renewTime", "acquireTime"] {
                if let Some(t) = lease["spec"][field].as_str() {
                    let t: k8s_openapi::jiff::Timestamp = t.parse().expect("a MicroTime");
                    let shifted = t + k8s_openapi::jiff::SignedDuration::from_secs(*skew);
                    lease["spec"][field] = json!(shifted.to_string());
                }
            }
        }
        self.written.insert(who.into(), Instant::now());
        self.lease = Some(lease.clone());
        reply(200, lease)
    }
}

fn reply(code: u16, body: Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).expect("status code"))
        .body(Body::from(serde_json::to_vec(&body).expect("json")))
        .expect("response")
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": reason})
}

/// Whether the holder still holds the lease after `period` of renewing.
async fn still_leader_after(period: Duration, holder: &mut LeaderElector) -> bool {
    tokio::time::timeout(period, holder.keep_renewing()).await.is_err()
}

#[tokio::test(start_paused = true)]
async fn a_lost_lease_passes_to_the_other_operator_only_after_its_holder_stopped() {
    let leases = FakeLeases::default();
    let mut a = leases.elector("a");
    let mut b = leases.elector("b");
    a.acquire().await;
    assert_eq!(leases.holder().as_deref(), Some("a"));
    let candidate = tokio::spawn(async move {
        b.acquire().await;
        Instant::now()
    });

    assert!(
        still_leader_after(Duration::from_secs(60), &mut a).await,
        "A keeps the lease while the API answers"
    );
    assert!(!candidate.is_finished(), "B waits while A renews");

    // A is cut off from the API server.
    leases.set_link("a", Link::Failing);
    a.keep_renewing().await;
    let a_stopped = Instant::now();
    let renewed = leases.last_write("a");
    assert!(
        a_stopped - renewed <= TIMING.renew_deadline,
        "A stopped {:?} after its last renewal, past the renew deadline",
        a_stopped - renewed
    );

    let b_leader = candidate.await.expect("B's election");
    assert!(b_leader > a_stopped, "B became leader while A still reconciled");
    assert!(
        b_leader - renewed >= TIMING.duration,
        "B took over {:?} after A's last renewal, before the lease ran out",
        b_leader - renewed
    );
    assert!(
        b_leader - renewed <= TIMING.duration + 2 * TIMING.retry,
        "B took over {:?} after A's last renewal: it should notice within a retry or two",
        b_leader - renewed
    );
    assert_eq!(leases.holder().as_deref(), Some("b"));
    assert_eq!(leases.transitions(), Some(1));
}

#[tokio::test(start_paused = true)]
async fn a_holder_whose_clock_is_an_hour_behind_keeps_its_lease_while_it_renews() {
    let leases = FakeLeases::default();
    // Every renewTime A writes reads, by B's clock, as an hour old.
    leases.state().skew.insert("a".into(), -3600);
    let mut a = leases.elector("a");
    let mut b = leases.elector("b");
    a.acquire().await;
    let candidate = tokio::spawn(async move {
        b.acquire().await;
        Instant::now()
    });
    assert!(
        still_leader_after(Duration::from_secs(120), &mut a).await,
        "A keeps renewing"
    );
    assert!(
        !candidate.is_finished(),
        "B took the lease of a live holder by comparing clocks"
    );
    assert_eq!(leases.holder().as_deref(), Some("a"));

    // A stops renewing (its process is gone): B takes over once the lease ran out on its clock.
    drop(a);
    let renewed = leases.last_write("a");
    let b_leader = candidate.await.expect("B's election");
    assert!(b_leader - renewed >= TIMING.duration, "{:?}", b_leader - renewed);
    assert_eq!(leases.holder().as_deref(), Some("b"));
}

#[tokio::test(start_paused = true)]
async fn a_holder_whose_renewal_hangs_stops_at_the_renew_deadline() {
    let leases = FakeLeases::default();
    let mut a = leases.elector("a");
    a.acquire().await;
    let renewed = leases.last_write("a");
    leases.set_link("a", Link::Hanging);
    a.keep_renewing().await;
    assert_eq!(
        Instant::now() - renewed,
        TIMING.renew_deadline,
        "a request that never returns must not hold the deadline open"
    );
}

#[tokio::test(start_paused = true)]
async fn a_holder_that_finds_another_holder_stops_at_its_next_renewal() {
    let leases = FakeLeases::default();
    let mut a = leases.elector("a");
    a.acquire().await;
    // Another replica took the lease (after a partition A has not noticed).
    {
        let mut state = leases.state();
        let lease = state.lease.as_mut().expect("the lease");
        lease["spec"]["holderIdentity"] = json!("c");
        lease["metadata"]["resourceVersion"] = json!("99");
    }
    let started = Instant::now();
    a.keep_renewing().await;
    assert_eq!(Instant::now() - started, TIMING.retry);
    assert_eq!(leases.holder().as_deref(), Some("c"), "A does not write over it");
}
