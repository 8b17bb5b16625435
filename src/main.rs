use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use sahool_gateway::{app, cli, config};

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

fn init_logging() {
    // The NATS client's own lines repeat what `nats` logs from its events, and call a lost
    // link's client giving up (as designed, see `nats::Connector`) an error: RUST_LOG shows them.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn main() -> ExitCode {
    let args = Cli::parse();
    let mut stdout = std::io::stdout().lock();
    let result = match args.command {
        Command::Run { config } => {
            init_logging();
            let config_path = config;
            let config = match config::load(&config_path) {
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
            return match runtime.block_on(app::run(&config_path, config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "gateway stopped");
                    eprintln!("error: {e}");
                    ExitCode::from(e.exit_code())
                }
            };
        }
        Command::Validate { config } => match cli::validate(&config, &mut stdout) {
            Ok(true) => return ExitCode::SUCCESS,
            Ok(false) => return ExitCode::from(1),
            Err(e) => Err(e),
        },
        Command::Status { config, json } => cli::status(&config, json, &mut stdout),
        Command::Sensors { config } => cli::sensors(&config, &mut stdout),
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
        } => match match (serial_line, port) {
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
        } {
            Ok(true) => return ExitCode::SUCCESS,
            Ok(false) => return ExitCode::from(1),
            Err(e) => Err(e),
        },
        Command::Buffer {
            command: BufferCommand::Stats { config, json },
        } => cli::buffer_stats(&config, json, &mut stdout),
        Command::DeadLetters {
            command: DeadLetterCommand::List { config, limit },
        } => cli::dead_letters_list(&config, limit, &mut stdout),
        Command::DeadLetters {
            command:
                DeadLetterCommand::Replay {
                    config,
                    reason,
                    source,
                    since,
                    limit,
                    dry_run,
                },
        } => since
            .as_deref()
            .map(cli::parse_since)
            .transpose()
            .and_then(|since_ms| {
                let filter = sahool_gateway::store::ReplayFilter {
                    reason,
                    source,
                    since_ms,
                    limit,
                    dry_run,
                };
                cli::dead_letters_replay(&config, filter, &mut stdout)
            }),
        Command::Actuators { config } => cli::actuators(&config, &mut stdout),
        Command::Commands {
            command: CommandsCommand::List { config, limit },
        } => cli::commands_list(&config, limit, &mut stdout),
        Command::Passwd { file, user } => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                eprint!("password for {user} (shown as typed): ");
            }
            cli::passwd(&file, &user, &mut stdin.lock(), &mut stdout)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
