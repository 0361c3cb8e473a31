//! `gateway run|check --config FILE`: parse the command line, set up logging,
//! hand over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "gateway", version, about = "eBPF-accelerated L4 mTLS gateway")]
struct Cli {
    /// Log format for the human-facing log on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve: terminate mTLS on every listener and forward to the routes' backends.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate the config, certificates and keys without serving.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Run { config } => run(&config),
        Command::Check { config } => check(&config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GATEWAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let config = gateway::Config::load(path)?;
    let state = gateway::state::State::from_config(&config)?;
    for l in &state.listeners {
        println!(
            "listener {:?} on {}: {} route(s): {}",
            l.name,
            l.bind,
            l.routes.len(),
            l.routes
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!("{}: OK", path.display());
    Ok(())
}

fn run(path: &std::path::Path) -> anyhow::Result<()> {
    let config = gateway::Config::load(path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let app = gateway::build(&config).await?;
        let shutdown = app.shutdown_handle();
        let reload = app.reload_handle();
        let stop_watching = tokio_util::sync::CancellationToken::new();
        if config.watch_files {
            let (path, reload, stop) = (path.to_owned(), reload.clone(), stop_watching.clone());
            tokio::spawn(async move {
                gateway::watch::watch(&path, &config, reload, WATCH_INTERVAL, stop).await;
            });
        }
        let path = path.to_owned();
        tokio::spawn(async move {
            signals(&path, reload).await;
            shutdown.shutdown();
        });
        app.run().await;
        stop_watching.cancel();
        Ok(())
    })
}

const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// SIGHUP reloads; SIGTERM/SIGINT return (to shut down).
async fn signals(path: &std::path::Path, reload: gateway::app::ReloadHandle) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; SIGTERM will kill without draining");
        return std::future::pending().await;
    };
    loop {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = hup.recv() => {
                tracing::info!(signal = "SIGHUP", "reload requested");
                // Errors are logged and counted by the reload itself.
                let _ = reload.reload_file(path).await;
                continue;
            }
        };
        tracing::info!(signal = name, "shutdown requested");
        return;
    }
}
