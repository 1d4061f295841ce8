//! kubetune-operator: reconciles FineTuneJobs into trainer Jobs and ModelDeployments into
//! inference pods with hot-swapped adapter versions.

use anyhow::Context as _;
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use kube::runtime::controller::{self, Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{predicates, reflector, watcher, WatchStreamExt};
use kube::{Api, Client};
use kubetune_crds::{FineTuneJob, ModelDeployment};
use kubetune_operator::config::OperatorConfig;
use kubetune_operator::context::{Backoff, Context};
use kubetune_operator::finetunejob::{self, progress::MetricsReader};
use kubetune_operator::http::{router, Readiness};
use kubetune_operator::leader::{LeaderElector, LeaseConfig, LeaseTiming};
use kubetune_operator::metrics::Metrics;
use kubetune_operator::modeldeployment;
use kubetune_operator::pace::Pace;
use kubetune_operator::triggers;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How often each controller looks for objects that no reconcile has started for (a lost
/// trigger); one is triggered at the second look in a row that finds it with a reconcile slot
/// free.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// The longest a reconcile may run: kube-client sets no read timeout, so a request the API
/// server never answers would hang its reconcile, silently and for good.
const RECONCILE_LIMIT: Duration = Duration::from_secs(300);

#[derive(Parser, Debug)]
#[command(
    name = "kubetune-operator",
    version,
    about = "Reconciles kubetune FineTuneJobs into trainer Jobs and ModelDeployments into inference pods"
)]
struct Args {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "KUBETUNE_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
    /// Elect a leader through a Lease so that several replicas are safe.
    #[arg(long, env = "KUBETUNE_LEADER_ELECTION", default_value_t = false)]
    leader_election: bool,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kubetune-system")]
    lease_namespace: String,
    /// This replica's identity in the Lease (the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// FineTuneJobs reconciled at the same time, at most.
    #[arg(long, env = "KUBETUNE_CONCURRENCY", default_value_t = 8)]
    concurrency: u16,
    /// Log as JSON lines.
    #[arg(long, env = "KUBETUNE_LOG_JSON", default_value_t = false)]
    log_json: bool,
    #[command(flatten)]
    config: OperatorConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(args.log_json);
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    client
        .apiserver_version()
        .await
        .context("the Kubernetes API does not answer")?;

    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::default());
    readiness.set(true);
    let listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .with_context(|| format!("binding {}", args.http_addr))?;
    let app = router(metrics.clone(), readiness.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });

    let elector = if args.leader_election {
        let identity = args
            .identity
            .clone()
            .unwrap_or_else(|| format!("kubetune-operator-{}", std::process::id()));
        let mut elector = LeaderElector::new(
            client.clone(),
            LeaseConfig {
                namespace: args.lease_namespace.clone(),
                name: "kubetune-operator".into(),
                identity,
                timing: LeaseTiming::DEFAULT,
            },
        )
        .map_err(anyhow::Error::msg)?;
        elector.acquire().await;
        Some(elector)
    } else {
        None
    };

    let ctx = Arc::new(Context {
        client: client.clone(),
        config: args.config.clone(),
        metrics,
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "kubetune-operator".into(),
                instance: args.identity.clone(),
            },
        ),
        metrics_reader: MetricsReader::default(),
        backoff: Backoff::default(),
        model_shapes: Default::default(),
        pod_http: kubetune_operator::podhttp::PodHttp::new(std::time::Duration::from_secs(5)),
        finetunejob_pace: Pace::new(args.concurrency),
        modeldeployment_pace: Pace::new(args.concurrency),
    });
    let ftjs: Api<FineTuneJob> = Api::all(client.clone());
    let jobs: Api<Job> = Api::all(client.clone());
    let (ftj_cache, ftj_writer) = reflector::store();
    // Every change reaches the cache, but only a new generation (a spec change) triggers a
    // reconcile: the operator's own status writes must not trigger the next one. Changes of
    // the owned Jobs and the requeues still do. A listed object triggers only once the list is
    // in the cache (see `triggers`).
    let ftj_triggers = triggers::objects_once_cached(
        watcher(ftjs, watcher::Config::default())
            .default_backoff()
            .reflect(ftj_writer),
    )
    .predicate_filter(predicates::generation, Default::default());
    let ftj_started = Arc::new(triggers::Started::new(args.concurrency));
    let ftj_sweep = triggers::sweep_not_started(ftj_cache.clone(), ftj_started.clone(), SWEEP_INTERVAL, "FineTuneJob");
    let finetunejobs = Controller::for_stream(ftj_triggers, ftj_cache.clone())
        .reconcile_on(ftj_sweep)
        .owns(
            jobs,
            watcher::Config::default().labels(finetunejob::build::FINETUNEJOB_LABEL),
        )
        .with_config(ControllerConfig::default().concurrency(args.concurrency))
        .graceful_shutdown_on(shutdown_signal())
        .run(
            move |ftj, ctx| {
                let running = ftj_started.start(&*ftj);
                async move {
                    let _running = running;
                    triggers::within(RECONCILE_LIMIT, finetunejob::reconcile(ftj, ctx)).await
                }
            },
            finetunejob::error_policy,
            ctx.clone(),
        )
        .for_each(log_result);
    let mdeps: Api<ModelDeployment> = Api::all(client.clone());
    let deployments: Api<Deployment> = Api::all(client.clone());
    let (md_cache, md_writer) = reflector::store();
    // Not `Controller::new`: it triggers a listed object before the list is in the cache, as
    // `touched_objects()` does.
    let md_triggers = triggers::objects_once_cached(
        watcher(mdeps, watcher::Config::default())
            .default_backoff()
            .reflect(md_writer),
    );
    tokio::spawn(prune_deleted_series(ctx.metrics.clone(), ftj_cache, md_cache.clone()));
    let md_started = Arc::new(triggers::Started::new(args.concurrency));
    let md_sweep = triggers::sweep_not_started(md_cache.clone(), md_started.clone(), SWEEP_INTERVAL, "ModelDeployment");
    let modeldeployments = Controller::for_stream(md_triggers, md_cache)
        .reconcile_on(md_sweep)
        .owns(
            deployments,
            watcher::Config::default().labels(modeldeployment::build::MODELDEPLOYMENT_LABEL),
        )
        .with_config(ControllerConfig::default().concurrency(args.concurrency))
        .graceful_shutdown_on(shutdown_signal())
        .run(
            move |md, ctx| {
                let running = md_started.start(&*md);
                async move {
                    let _running = running;
                    triggers::within(RECONCILE_LIMIT, modeldeployment::reconcile(md, ctx)).await
                }
            },
            modeldeployment::error_policy,
            ctx,
        )
        .for_each(log_result);
    let controller = futures::future::join(finetunejobs, modeldeployments);
    tracing::info!("kubetune-operator running");
    match elector {
        Some(mut elector) => {
            tokio::select! {
                _ = controller => {}
                _ = elector.keep_renewing() => anyhow::bail!("lost leadership; exiting so a restart stands for election again"),
            }
        }
        None => {
            controller.await;
        }
    }
    tracing::info!("kubetune-operator stopped");
    Ok(())
}

/// Deleted objects are never reconciled again, so their metric series are dropped by comparing
/// with the controllers' caches now and then.
async fn prune_deleted_series(
    metrics: Arc<Metrics>,
    ftjs: kube::runtime::reflector::Store<FineTuneJob>,
    mds: kube::runtime::reflector::Store<ModelDeployment>,
) {
    use kube::runtime::reflector::ObjectRef;
    let mut every = tokio::time::interval(Duration::from_secs(30));
    loop {
        every.tick().await;
        metrics.retain(
            |ns, name| ftjs.get(&ObjectRef::new(name).within(ns)).is_some(),
            |ns, name| mds.get(&ObjectRef::new(name).within(ns)).is_some(),
        );
    }
}

async fn log_result<T, E: std::error::Error>(result: Result<T, controller::Error<E, watcher::Error>>) {
    match result {
        Ok(_) => {}
        // The error policy logs it, with the object and when it is retried.
        Err(controller::Error::ReconcilerFailed(..)) => {}
        // Expected for a deleted object (its own delete event, its Job's going).
        Err(e @ controller::Error::ObjectNotFound(_)) => tracing::debug!(error = %e, "not reconciled"),
        // A watch that failed is started again, with backoff; after a 410 Gone it lists again.
        Err(controller::Error::QueueError(e)) => tracing::warn!(error = %e, "watch failed"),
        Err(e) => tracing::warn!(error = %e, "controller error"),
    }
}

/// Resolves on SIGTERM or Ctrl-C; in-flight reconciles then finish before the process exits.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
