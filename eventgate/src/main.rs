//! `eventgate`: the publisher API, the SSE gateway, or both in one process.

use std::{net::SocketAddr, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use eventgate_broker::{Broker, BrokerConfig};
use eventgate_gateway::GatewayConfig;
use eventgate_publisher::PublisherConfig;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;

/// Real-time event gateway: backends publish, browsers receive over Server-Sent Events, with
/// exact resume after any disconnect. Every flag is also an environment variable.
#[derive(Parser)]
#[command(name = "eventgate", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// Settings of `standalone`, which runs when no subcommand is given.
    #[command(flatten)]
    standalone: StandaloneArgs,

    /// After SIGTERM or SIGINT, streams end at once and the process exits at the latest after
    /// this.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "10s", global = true,
          value_parser = eventgate_broker::config::parse_duration)]
    shutdown_timeout: std::time::Duration,

    /// Log lines as `text` or `json` (one object per line). Filter with `RUST_LOG`.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a gateway replica (needs REDIS_URL).
    Gateway {
        #[command(flatten)]
        broker: BrokerConfig,
        #[command(flatten)]
        gateway: GatewayConfig,
    },
    /// Run the publisher API (needs REDIS_URL).
    Publisher {
        #[command(flatten)]
        broker: BrokerConfig,
        #[command(flatten)]
        publisher: PublisherConfig,
    },
    /// Run both in one process; in memory unless REDIS_URL is set (the default command).
    Standalone(StandaloneArgs),
}

#[derive(clap::Args)]
struct StandaloneArgs {
    #[command(flatten)]
    broker: BrokerConfig,
    #[command(flatten)]
    gateway: GatewayConfig,
    #[command(flatten)]
    publisher: PublisherConfig,
}

/// Exit statuses, from sysexits.h.
const EX_USAGE: u8 = 64;
const EX_UNAVAILABLE: u8 = 69;
const EX_OSERR: u8 = 71;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("eventgate: cannot start the runtime: {e}");
            return ExitCode::from(EX_OSERR);
        }
    };
    let mut command = cli.command.unwrap_or(Command::Standalone(cli.standalone));
    match &mut command {
        Command::Gateway { gateway, .. } => gateway.shutdown_timeout = cli.shutdown_timeout,
        Command::Publisher { publisher, .. } => publisher.shutdown_timeout = cli.shutdown_timeout,
        Command::Standalone(args) => {
            args.gateway.shutdown_timeout = cli.shutdown_timeout;
            args.publisher.shutdown_timeout = cli.shutdown_timeout;
        }
    }
    match runtime.block_on(run(command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, e)) => {
            eprintln!("eventgate: {e:#}");
            ExitCode::from(code)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// An error with the exit status it maps to.
struct Failure(u8, anyhow::Error);

async fn run(command: Command) -> Result<(), Failure> {
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    match command {
        Command::Gateway { broker, gateway } => {
            let broker = connect_redis(&broker, "gateway").await?;
            let listener = bind(gateway.gateway_addr, "gateway").await?;
            announce("gateway", &listener, &broker);
            eventgate_gateway::run(gateway, broker, listener, shutdown)
                .await
                .map_err(|e| Failure(EX_OSERR, e.into()))
        }
        Command::Publisher { broker, publisher } => {
            let broker = connect_redis(&broker, "publisher").await?;
            let listener = bind(publisher.publisher_addr, "publisher").await?;
            announce("publisher", &listener, &broker);
            eventgate_publisher::run(publisher, broker, listener, shutdown)
                .await
                .map_err(|e| Failure(EX_OSERR, e.into()))
        }
        Command::Standalone(args) => standalone(args, shutdown).await,
    }
}

async fn standalone(args: StandaloneArgs, shutdown: CancellationToken) -> Result<(), Failure> {
    let broker = Broker::from_config(&args.broker)
        .await
        .with_context(|| redis_context(&args.broker))
        .map_err(|e| Failure(EX_UNAVAILABLE, e))?;
    let gateway_listener = bind(args.gateway.gateway_addr, "gateway").await?;
    let publisher_listener = bind(args.publisher.publisher_addr, "publisher").await?;
    let gateway_url = url_of(&gateway_listener);
    let publisher_url = url_of(&publisher_listener);
    let where_ = match &args.broker.redis_url {
        Some(_) => format!(
            "Redis at {}",
            args.broker.redacted_redis_url().unwrap_or_default()
        ),
        None => "in-memory broker".to_owned(),
    };
    println!("eventgate standalone ({where_})");
    println!("  gateway    {gateway_url}");
    println!("  publisher  {publisher_url}");
    println!("Try it, in two terminals:");
    println!("  curl -N '{gateway_url}/v1/events?channel=orders'");
    println!(
        "  curl -X POST '{publisher_url}/v1/publish' -H 'Content-Type: application/json' \
         -d '{{\"channel\":\"orders\",\"event\":\"order:created\",\"data\":{{\"id\":42}}}}'"
    );
    let gateway = eventgate_gateway::run(
        args.gateway,
        broker.clone(),
        gateway_listener,
        shutdown.clone(),
    );
    let publisher = eventgate_publisher::run(args.publisher, broker, publisher_listener, shutdown);
    let (g, p) = tokio::join!(gateway, publisher);
    g.and(p).map_err(|e| Failure(EX_OSERR, e.into()))
}

async fn connect_redis(config: &BrokerConfig, role: &str) -> Result<Broker, Failure> {
    if config.redis_url.is_none() {
        return Err(Failure(
            EX_USAGE,
            anyhow::anyhow!(
                "`eventgate {role}` needs Redis: set REDIS_URL (for example redis://127.0.0.1:6379), \
                 or run `eventgate standalone` to try eventgate without Redis"
            ),
        ));
    }
    Broker::from_config(config)
        .await
        .with_context(|| redis_context(config))
        .map_err(|e| Failure(EX_UNAVAILABLE, e))
}

fn redis_context(config: &BrokerConfig) -> String {
    format!(
        "cannot use Redis at {}",
        config.redacted_redis_url().unwrap_or_default()
    )
}

/// Pending connections the kernel queues for us (capped by `net.core.somaxconn`). Tokio's
/// `bind` asks for 128, which a reconnect storm overflows: dropped SYNs cost clients a second.
const LISTEN_BACKLOG: u32 = 4096;

async fn bind(addr: SocketAddr, role: &str) -> Result<TcpListener, Failure> {
    let listen = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen()
        .with_context(|| format!("cannot listen on {addr} for the {role}"))
        .map_err(|e| Failure(EX_OSERR, e))
}

/// The URL a local client uses to reach `listener`.
fn url_of(listener: &TcpListener) -> String {
    match listener.local_addr() {
        Ok(addr) if addr.ip().is_unspecified() && addr.is_ipv4() => {
            format!("http://127.0.0.1:{}", addr.port())
        }
        Ok(addr) if addr.ip().is_unspecified() => format!("http://[::1]:{}", addr.port()),
        Ok(addr) => format!("http://{addr}"),
        Err(_) => "http://?".to_owned(),
    }
}

fn announce(role: &str, listener: &TcpListener, broker: &Broker) {
    println!(
        "eventgate {role} listening on {} ({} broker)",
        url_of(listener),
        broker.kind()
    );
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}
