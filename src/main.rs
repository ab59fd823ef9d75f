/// mimalloc instead of glibc's allocator: a request allocates a few strings per stats object,
/// from whichever worker thread runs it, and glibc's arenas spent a tenth of the ingest path in
/// malloc and free (`./scripts/bench`, row 1).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kohaku::app::App;
use kohaku::config::{Config, ConfigSource};

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
    Migrate(MigrateArgs),
    /// Load Sora's rtc_stats.jsonl log files (plain or gzip; `-` reads stdin) into the configured
    /// sinks, creating or upgrading their schemas first. Importing a file twice stores it once.
    /// Exit status 0 when every stats line was stored, 1 otherwise (bad lines, refused rows).
    Import(ImportArgs),
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

#[derive(clap::Args)]
struct MigrateArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Then give the reports stored before Kohaku kept per-report summaries (SQLite schema 4,
    /// PostgreSQL schema 5) their summaries, read back from the stored objects. Safe to stop and
    /// run again: a summary already stored stays as it is.
    #[arg(long)]
    summaries: bool,
}

#[derive(clap::Args)]
struct ImportArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Stop at the first bad line or unreadable input; what was read before it is still stored.
    /// Without it, bad lines are reported with their line number and skipped.
    #[arg(long)]
    strict: bool,
    /// Log files (`rtc_stats.jsonl`, optionally gzip-compressed); `-` for standard input.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The importer logs to stderr, where the error is printed anyway.
    let logs_on_stderr = matches!(cli.command, Command::Import(_));
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
            Command::Migrate(args) => migrate(args).await,
            Command::Import(args) => import(args).await,
            Command::CheckConfig(arg) => check_config(arg.config.as_deref()),
        }
    });
    match result {
        Ok(code) => code,
        Err(err) => {
            if !logs_on_stderr {
                tracing::error!(error = format!("{err:#}"), "kohaku stopped");
            }
            eprintln!("kohaku: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let (config, source) = Config::load(path)?;
    kohaku::server::tls::server_config(&config.server)?;
    check_sinks(&config, &source)?;
    print!("{}", config.to_effective_toml());
    Ok(ExitCode::SUCCESS)
}

async fn migrate(args: MigrateArgs) -> anyhow::Result<ExitCode> {
    let (config, source) = Config::load(args.config.config.as_deref())?;
    let _logs = kohaku::logging::init(&config.log, config.debug)?;
    let sinks = build_sinks(&config, &source)?;
    kohaku::sinks::migrate(&sinks).await?;
    let mut result = Ok(ExitCode::SUCCESS);
    if args.summaries {
        for sink in &sinks {
            let name = sink.name().to_owned();
            let done = kohaku::backfill::backfill_summaries(sink.as_ref(), |done| {
                if done.connections % 100 == 0 {
                    eprintln!(
                        "kohaku migrate: {name}: {} reports of {} connections summarised",
                        done.reports, done.connections
                    );
                }
            })
            .await;
            match done {
                Ok(done) => eprintln!(
                    "kohaku migrate: {name}: summaries of {} reports of {} connections written (those already stored kept)",
                    done.reports, done.connections
                ),
                Err(err) => {
                    result = Err(anyhow::anyhow!(
                        "{name}: summarising the stored reports stopped: {}; run `kohaku migrate --summaries` again to resume",
                        err.detailed()
                    ));
                    break;
                }
            }
        }
    }
    for sink in &sinks {
        let _ = sink.close().await;
    }
    result
}

async fn import(args: ImportArgs) -> anyhow::Result<ExitCode> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use kohaku::import::{Console, ImportOptions, Input, Inputs};

    let (config, source) = Config::load(args.config.config.as_deref())?;
    let console = Console::detect();
    kohaku::logging::init_console(config.debug, console.clone())?;
    let inputs: Vec<Input> = args.files.into_iter().map(Input::from_arg).collect();
    let inputs = Inputs::open(&inputs)?;
    let sinks = build_sinks(&config, &source)?;
    kohaku::sinks::migrate(&sinks).await?;

    let cancel = Arc::new(AtomicBool::new(false));
    let on_signal = Arc::clone(&cancel);
    let signal_console = console.clone();
    tokio::spawn(async move {
        if let Ok(signal) = wait_for_signal().await {
            signal_console.println(&format!(
                "kohaku import: {signal}: stopping after the current line and storing what was read (again to exit at once)"
            ));
            on_signal.store(true, Ordering::Relaxed);
        }
        if wait_for_signal().await.is_ok() {
            std::process::exit(130);
        }
    });

    let options = ImportOptions {
        strict: args.strict,
    };
    let summary = kohaku::import::run(
        inputs,
        sinks,
        (&config.pipeline).into(),
        options,
        console,
        Arc::clone(&cancel),
    )
    .await?;
    print!("{}", summary.render());
    Ok(if cancel.load(Ordering::Relaxed) {
        ExitCode::from(130)
    } else if summary.complete() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn serve(path: Option<&Path>) -> anyhow::Result<ExitCode> {
    kohaku::crash::log_fatal_signals();
    let (config, source) = Config::load(path)?;
    let _logs = kohaku::logging::init(&config.log, config.debug)?;
    tracing::info!(config = %source, version = env!("CARGO_PKG_VERSION"), "kohaku starting");
    let sinks = build_sinks(&config, &source)?;
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

/// Sink settings are checked by their backends; the error names the config it came from.
fn check_sinks(config: &Config, source: &ConfigSource) -> anyhow::Result<()> {
    kohaku::sinks::check(&config.effective_sinks())
        .with_context(|| format!("invalid config ({source})"))
}

/// `sinks::build` checks the settings first, so its errors are config errors too.
fn build_sinks(
    config: &Config,
    source: &ConfigSource,
) -> anyhow::Result<Vec<std::sync::Arc<dyn kohaku_sink::StatsSink>>> {
    kohaku::sinks::build(&config.effective_sinks())
        .with_context(|| format!("invalid config ({source})"))
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
