//! `avalon-osd`: the Avalon object storage daemon.

use avalon_osd::{Cli, Config};
use clap::Parser;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// mimalloc: the daemons allocate and free many small objects per request
/// (glibc's malloc/free were ~30% of the MDS's CPU applying batches).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    use clap::CommandFactory;
    if let Some(code) = avalon_proto::man_page::write_if_asked(Cli::command()) {
        return ExitCode::from(code);
    }
    let cli = Cli::parse();
    let cfg = match Config::from_cli(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("avalon-osd: {e:#}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log_level).unwrap_or_else(|e| {
        eprintln!(
            "avalon-osd: bad log level {:?} ({e}); using info",
            cfg.log_level
        );
        tracing_subscriber::EnvFilter::new("info")
    });
    avalon_proto::log_output::init(
        filter,
        cfg.log_format,
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
        true,
        std::io::stderr,
    );
    avalon_proto::request_id::set_slow_threshold(cfg.slow_request_ms);
    // Test builds arm fault-injection points from $FAILPOINTS.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("avalon-osd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let token = CancellationToken::new();
        let t = token.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested");
            t.cancel();
        });
        avalon_osd::run(cfg, token).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("avalon-osd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
