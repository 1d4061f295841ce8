//! kubetune-server: see the library docs. Exit status 1 with the reason on stderr when start-up
//! fails (a bad flag, a model or adapter that cannot be loaded).

use clap::Parser;
use kubetune_server::server::{build, serve, shutdown_signal, warm_up, Args};
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    // Before the runtime starts its threads: see kubetune_model::threads.
    kubetune_model::threads::settle_thread_count();
    kubetune_model::malloc::tune();
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(async_main()),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn async_main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let state = build(&args).await?;
    warm_up(&state).await?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("--listen {}: {e}", args.listen))?;
    let admin_listener = match &args.admin_listen {
        Some(address) => Some(
            tokio::net::TcpListener::bind(address)
                .await
                .map_err(|e| anyhow::anyhow!("--admin-listen {address}: {e}"))?,
        ),
        None => None,
    };
    state.set_ready(true);
    tracing::info!(listen = %args.listen, admin_listen = ?args.admin_listen, model = %state.base_name, adapters = state.adapters.len(), "ready");
    serve(
        state,
        listener,
        admin_listener,
        Duration::from_secs(args.shutdown_timeout_s),
        shutdown_signal(),
    )
    .await?;
    Ok(())
}
