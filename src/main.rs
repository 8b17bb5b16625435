use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio::signal::unix::{self, Signal, SignalKind};
use tokio::sync::mpsc;
use tracing_subscriber::filter::{LevelFilter, Targets};

use sahool_gateway::common::systemd::Notifier;
use sahool_gateway::common::{http, memory};
use sahool_gateway::fleet::remote;
use sahool_gateway::{app, cli, config, doctor};

/// mimalloc: glibc's malloc cost a sixth of the CPU per reading; `common::memory` says how
/// it is kept from holding on to memory.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEFAULT_CONFIG: &str = "/etc/sahool-gateway/gateway.toml";

#[derive(Parser)]
#[command(
    name = "sahool-gateway",
    version,
    about = "Farm sensors → SQLite buffer → SAHOOL NATS JetStream"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Check a config file; print every problem and exit 1, or exit 0.
    Validate {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Check what an operator checks by hand: config, NATS, streams, commands consumer, MQTT
    /// brokers, serial ports, disk, clock. One line each with its fix; exit 1 if any fails.
    Doctor {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Ask the running gateway: link state, backlog, rates per source, dead-letters by reason.
    Status {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Print the gateway's status report as JSON (one sample, no rates).
        #[arg(long)]
        json: bool,
    },
    /// Every mapped sensor: state (online, offline, low battery), readings, last seen.
    Sensors {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Dry-run the mapping.
    Mappings {
        #[command(subcommand)]
        command: MappingsCommand,
    },
    /// Inspect the buffer.
    Buffer {
        #[command(subcommand)]
        command: BufferCommand,
    },
    /// Inputs that could not be forwarded, with their reason and raw bytes.
    DeadLetters {
        #[command(subcommand)]
        command: DeadLetterCommand,
    },
    /// Each actuator: last confirmed state, last command and status, off deadline.
    Actuators {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Platform commands in the gateway's inbox.
    Commands {
        #[command(subcommand)]
        command: CommandsCommand,
    },
    /// Set a user's password in an [[mqtt_listener]] password file. The password is read from
    /// standard input; only its argon2 hash is written.
    Passwd {
        /// The password file (created with mode 0600 if missing).
        file: PathBuf,
        user: String,
    },
}

#[derive(Subcommand)]
enum MappingsCommand {
    /// Show what the gateway would make of one MQTT message (--topic, --payload) or one line
    /// on a `lines` serial port (--serial-line, --port): readings, or rejection reasons.
    Test {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long, required_unless_present = "serial_line", requires = "payload")]
        topic: Option<String>,
        #[arg(long, requires = "topic")]
        payload: Option<String>,
        /// The [[mqtt]] source or [[mqtt_listener]]; default: the first that takes the topic.
        #[arg(long, requires = "topic")]
        source: Option<String>,
        /// One line as the talker prints it, without its line end.
        #[arg(long, conflicts_with = "topic", requires = "port")]
        serial_line: Option<String>,
        /// The `lines` [[serial]] port the line arrives on.
        #[arg(long, requires = "serial_line")]
        port: Option<String>,
    },
}

#[derive(Subcommand)]
enum BufferCommand {
    /// Readings, bytes, oldest age, next seq, dead-letters by reason.
    Stats {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CommandsCommand {
    /// Newest first, one JSON object per line.
    List {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

#[derive(Subcommand)]
enum DeadLetterCommand {
    /// Newest first, one JSON object per line.
    List {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Map kept messages again with the current config and store their readings, removing
    /// their dead-letters: MQTT messages and lines of `lines` ports. Asks the running gateway
    /// (over [http] listen), or opens the buffer itself when none runs. Flood limits do not
    /// apply; a message still rejected stays dead-lettered.
    Replay {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Only rows of this reason (e.g. unknown_device, out_of_range, rate_limited).
        #[arg(long)]
        reason: Option<String>,
        /// Only rows of this [[mqtt]] source, [[mqtt_listener]] or [[serial]] port.
        #[arg(long)]
        source: Option<String>,
        /// Only rows kept since: an RFC 3339 time, or a duration back from now (2h, 30m).
        #[arg(long)]
        since: Option<String>,
        /// At most this many rows, oldest first.
        #[arg(long)]
        limit: Option<u64>,
        /// Print what a replay would do; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Log filter directives (`RUST_LOG`): `level` or `target=level`, comma-separated. Targets
/// rather than `EnvFilter`: the same syntax without span and field matching, which no operator
/// of a gateway needs and which cost a regex engine (0.95 MiB of the x86_64 binary, measured).
fn log_filter() -> Targets {
    // The NATS client's own lines repeat what `nats` logs from its events, and call a lost
    // link's client giving up (as designed, see `nats::Connector`) an error: RUST_LOG shows them.
    let default = Targets::new()
        .with_default(LevelFilter::INFO)
        .with_target("async_nats", LevelFilter::OFF);
    match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => spec.parse().unwrap_or_else(|e| {
            eprintln!("RUST_LOG={spec:?} is not a log filter ({e}); using the default, info,async_nats=off");
            default
        }),
        _ => default,
    }
}

fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    tracing_subscriber::fmt()
        // The builder's own ceiling is INFO; the filter alone decides.
        .with_max_level(LevelFilter::TRACE)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .finish()
        .with(log_filter())
        .init();
}

fn main() -> ExitCode {
    let args = Cli::parse();
    let mut stdout = std::io::stdout().lock();
    match args.command {
        Command::Run { config } => {
            drop(stdout);
            run(config)
        }
        Command::Validate { config } => verdict(cli::validate(&config, &mut stdout)),
        Command::Doctor { config } => match doctor::run(&config, &mut stdout) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        },
        Command::Mappings {
            command:
                MappingsCommand::Test {
                    config,
                    topic,
                    payload,
                    source,
                    serial_line,
                    port,
                },
        } => verdict(match (serial_line, port) {
            (Some(line), Some(port)) => {
                cli::mappings_test_serial_line(&config, &port, line.as_bytes(), &mut stdout)
            }
            _ => cli::mappings_test(
                &config,
                source.as_deref(),
                topic.as_deref().unwrap_or_default(),
                payload.as_deref().unwrap_or_default().as_bytes(),
                &mut stdout,
            ),
        }),
        Command::Status { config, json } => done(cli::status(&config, json, &mut stdout)),
        Command::Sensors { config } => done(cli::sensors(&config, &mut stdout)),
        Command::Buffer {
            command: BufferCommand::Stats { config, json },
        } => done(cli::buffer_stats(&config, json, &mut stdout)),
        Command::DeadLetters { command } => done(dead_letters(command, &mut stdout)),
        Command::Actuators { config } => done(cli::actuators(&config, &mut stdout)),
        Command::Commands {
            command: CommandsCommand::List { config, limit },
        } => done(cli::commands_list(&config, limit, &mut stdout)),
        Command::Passwd { file, user } => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                eprint!("password for {user} (shown as typed): ");
            }
            done(cli::passwd(&file, &user, &mut stdin.lock(), &mut stdout))
        }
    }
}

fn dead_letters(command: DeadLetterCommand, out: &mut impl Write) -> Result<(), cli::CliError> {
    match command {
        DeadLetterCommand::List { config, limit } => cli::dead_letters_list(&config, limit, out),
        DeadLetterCommand::Replay {
            config,
            reason,
            source,
            since,
            limit,
            dry_run,
        } => {
            let since_ms = since.as_deref().map(cli::parse_since).transpose()?;
            let filter = sahool_gateway::store::ReplayFilter {
                reason,
                source,
                since_ms,
                limit,
                dry_run,
            };
            cli::dead_letters_replay(&config, filter, out)
        }
    }
}

/// Exit status of a command that answers yes (0) or no (1).
fn verdict(result: Result<bool, cli::CliError>) -> ExitCode {
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => done(Err(e)),
    }
}

fn done(result: Result<(), cli::CliError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// `run`: the gateway until SIGTERM or SIGINT; exit 75 when a restart cures the cause.
fn run(config_path: PathBuf) -> ExitCode {
    memory::limit_arenas();
    init_logging();
    // With remote config on, the last known good remote revision; never waits for KV.
    let config = match config::load(&config_path).map(remote::choose) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(serve(config_path, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "gateway stopped");
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Binds HTTP, turns signals into the app's shutdown and reloads, and runs the app.
async fn serve(config_path: PathBuf, config: config::Config) -> Result<(), app::RunError> {
    let listener = http::bind(config.http.listen).await?;
    let signal = |kind| unix::signal(kind).map_err(app::RunError::Signal);
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let sighup = signal(SignalKind::hangup())?;
    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
        }
    };
    let (reloads, reloaded) = mpsc::channel(1);
    tokio::spawn(read_on_sighup(sighup, config_path, reloads));
    tokio::spawn(memory::give_back_periodically());
    app::run(config, listener, shutdown, reloaded).await
}

/// On each SIGHUP, reads and checks the config file as `validate` does and hands a good one to
/// the app (which reports READY once it is applied); a bad one is refused and the running
/// config stays. With remote config on, the last known good remote revision stays in force
/// over the file (see `fleet::remote`: the precedence).
async fn read_on_sighup(mut sighup: Signal, path: PathBuf, reloads: mpsc::Sender<config::Config>) {
    let notifier = Notifier::from_env();
    while sighup.recv().await.is_some() {
        notifier.reloading();
        match config::load(&path).map(remote::choose) {
            Ok(new) => {
                if let Some(revision) = new.origin.remote_revision {
                    tracing::info!(revision, "SIGHUP: remote config revision in force over the local file (remote config has precedence while a revision is kept)");
                }
                if reloads.send(new).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: new config refused; the running one stays");
                notifier.ready();
            }
        }
    }
}
