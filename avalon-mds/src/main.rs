use clap::Parser;
use tokio_util::sync::CancellationToken;

/// mimalloc: the daemons allocate and free many small objects per request
/// (glibc's malloc/free were ~30% of the MDS's CPU applying batches).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    use clap::CommandFactory;
    if let Some(code) = avalon_proto::man_page::write_if_asked(avalon_mds::config::Args::command())
    {
        return std::process::ExitCode::from(code);
    }
    let args = avalon_mds::config::Args::parse();
    let cfg = match avalon_mds::config::Config::load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("avalon-mds: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    // A bare level keeps openraft's chatty info logs at warn.
    let level = cfg.log_level.trim();
    let spec = if matches!(level, "trace" | "debug" | "info" | "warn" | "error") {
        format!("{level},openraft=warn")
    } else {
        level.to_string()
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    use std::io::IsTerminal;
    avalon_proto::log_output::init(
        filter,
        cfg.log_format,
        std::io::stderr().is_terminal(),
        true,
        std::io::stderr,
    );
    avalon_proto::request_id::set_slow_threshold(cfg.slow_request_ms);
    // Test builds arm fault-injection points from $FAILPOINTS.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received; shutting down");
        t.cancel();
    });
    match avalon_mds::run(cfg, token).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "avalon-mds failed");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
