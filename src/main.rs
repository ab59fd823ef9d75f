use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kohaku::app::App;
use kohaku::config::Config;

/// Kohaku: receives Sora's WebRTC stats over HTTP/2 and stores them in time-series databases.
#[derive(Parser)]
#[command(name = "kohaku", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create or upgrade the sinks' schemas, then receive stats until SIGINT/SIGTERM.
    Serve(ConfigArg),
    /// Create or upgrade the sinks' schemas, then exit.
    Migrate(ConfigArg),
    /// Validate the config (TLS files included, no database contacted) and print the effective
    /// settings; exit 1 with the reason when invalid.
    CheckConfig(ConfigArg),
}

#[derive(clap::Args)]
struct ConfigArg {
    /// TOML config file; without it the built-in defaults apply (SQLite at ./kohaku.db).
    #[arg(long, short, env = "KOHAKU_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("kohaku: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(arg) => serve(arg.config.as_deref()).await,
            Command::Migrate(arg) => migrate(arg.config.as_deref()).await,
            Command::CheckConfig(arg) => check_config(arg.config.as_deref()),
        }
    });
    match result {
        Ok(code) => code,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "kohaku stopped");
            eprintln!("kohaku: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let (config, _source) = Config::load(path)?;
    kohaku::server::tls::server_config(&config.server)?;
    kohaku::sinks::check(&config.effective_sinks())?;
    print!("{}", config.to_effective_toml());
    Ok(ExitCode::SUCCESS)
}

async fn migrate(path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let (config, _source) = Config::load(path)?;
    let _logs = kohaku::logging::init(&config.log, config.debug)?;
    let sinks = kohaku::sinks::build(&config.effective_sinks())?;
    kohaku::sinks::migrate(&sinks).await?;
    for sink in &sinks {
        let _ = sink.close().await;
    }
    Ok(ExitCode::SUCCESS)
}

async fn serve(path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let (config, source) = Config::load(path)?;
    let _logs = kohaku::logging::init(&config.log, config.debug)?;
    tracing::info!(config = %source, version = env!("CARGO_PKG_VERSION"), "kohaku starting");
    let sinks = kohaku::sinks::build(&config.effective_sinks())?;
    kohaku::sinks::migrate(&sinks).await?;
    let app = App::start(&config, sinks)
        .await
        .context("cannot start serving")?;

    let signal = wait_for_signal().await?;
    tracing::info!(
        signal,
        "signal received; shutting down (send it again to exit at once)"
    );
    tokio::spawn(async {
        if let Ok(signal) = wait_for_signal().await {
            tracing::error!(signal, "second signal: exiting without finishing the flush");
            std::process::exit(130);
        }
    });
    let summary = app.shutdown().await;
    Ok(if summary.dropped_rows == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn wait_for_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    Ok(tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    })
}
