//! `eventgate`: the publisher API, the SSE gateway, or both in one process.

use std::{net::SocketAddr, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use eventgate_core::{
    Broker, BrokerConfig,
    auth::{AuthConfig, AuthSetupError, Minter, Pattern, Verifier, new_secret},
    limits::EdgeConfig,
    telemetry,
};
use eventgate_gateway::GatewayConfig;
use eventgate_publisher::{PublisherAuth, PublisherConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
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

    /// After SIGTERM or SIGINT the services report not ready at once and keep serving for this
    /// long, so load balancers send new clients elsewhere first; then streams end (clients
    /// resume on another replica) and new requests are refused.
    #[arg(long, env = "DRAIN_GRACE", default_value = "5s", global = true,
          value_parser = eventgate_core::config::parse_duration)]
    drain_grace: std::time::Duration,

    /// The process exits at the latest this long after SIGTERM or SIGINT (more than
    /// `DRAIN_GRACE`).
    #[arg(long, env = "DRAIN_TIMEOUT", default_value = "15s", global = true,
          value_parser = eventgate_core::config::parse_duration)]
    drain_timeout: std::time::Duration,

    /// Log lines as `text` or `json` (one object per line). Filter with `RUST_LOG`.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

// Parsed once at start: the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run a gateway replica (needs REDIS_URL and a JWT key).
    Gateway {
        #[command(flatten)]
        broker: BrokerConfig,
        #[command(flatten)]
        gateway: GatewayConfig,
        #[command(flatten)]
        auth: AuthConfig,
        #[command(flatten)]
        edge: EdgeConfig,
    },
    /// Run the publisher API (needs REDIS_URL and API keys).
    Publisher {
        #[command(flatten)]
        broker: BrokerConfig,
        #[command(flatten)]
        publisher: PublisherConfig,
        #[command(flatten)]
        auth: AuthConfig,
        #[command(flatten)]
        edge: EdgeConfig,
    },
    /// Run both in one process; in memory unless REDIS_URL is set (the default command).
    Standalone(StandaloneArgs),
    /// Exit 0 when URL answers 200 within 3 s: the container HEALTHCHECK (the image has no curl).
    Health {
        #[arg(default_value = "http://127.0.0.1:8080/healthz")]
        url: String,
    },
}

#[derive(clap::Args)]
struct StandaloneArgs {
    #[command(flatten)]
    broker: BrokerConfig,
    #[command(flatten)]
    gateway: GatewayConfig,
    #[command(flatten)]
    publisher: PublisherConfig,
    #[command(flatten)]
    auth: AuthConfig,
    #[command(flatten)]
    edge: EdgeConfig,
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
    if cli.drain_timeout <= cli.drain_grace {
        eprintln!("eventgate: DRAIN_TIMEOUT must be longer than DRAIN_GRACE");
        return ExitCode::from(EX_USAGE);
    }
    let service = match &cli.command {
        Some(Command::Gateway { .. }) => Some("eventgate-gateway"),
        Some(Command::Publisher { .. }) => Some("eventgate-publisher"),
        Some(Command::Health { .. }) => None,
        Some(Command::Standalone(_)) | None => Some("eventgate"),
    };
    limit_malloc_arenas();
    let tracer = init_logging(cli.log_format, service);
    raise_open_files_limit();
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
        Command::Gateway { gateway, edge, .. } => {
            gateway.shutdown_timeout = cli.drain_timeout;
            gateway.drain_grace = cli.drain_grace;
            gateway.trusted_proxies = edge
                .trusted_proxies
                .clone()
                .with_ipv6_prefix(edge.ipv6_prefix_len);
            gateway.request_header_timeout = edge.request_header_timeout;
        }
        Command::Publisher {
            publisher, edge, ..
        } => {
            publisher.shutdown_timeout = cli.drain_timeout;
            publisher.drain_grace = cli.drain_grace;
            publisher.trusted_proxies = edge
                .trusted_proxies
                .clone()
                .with_ipv6_prefix(edge.ipv6_prefix_len);
            publisher.request_header_timeout = edge.request_header_timeout;
        }
        Command::Standalone(args) => {
            args.gateway.shutdown_timeout = cli.drain_timeout;
            args.publisher.shutdown_timeout = cli.drain_timeout;
            args.gateway.drain_grace = cli.drain_grace;
            args.publisher.drain_grace = cli.drain_grace;
            args.gateway.trusted_proxies = args
                .edge
                .trusted_proxies
                .clone()
                .with_ipv6_prefix(args.edge.ipv6_prefix_len);
            args.gateway.request_header_timeout = args.edge.request_header_timeout;
            args.publisher.trusted_proxies = args
                .edge
                .trusted_proxies
                .clone()
                .with_ipv6_prefix(args.edge.ipv6_prefix_len);
            args.publisher.request_header_timeout = args.edge.request_header_timeout;
        }
        Command::Health { .. } => {}
    }
    let result = runtime.block_on(run(command));
    drop(runtime);
    // Send the spans still buffered.
    if let Some(tracer) = tracer
        && let Err(e) = tracer.shutdown()
    {
        eprintln!("eventgate: flushing traces: {e}");
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, e)) => {
            eprintln!("eventgate: {e:#}");
            ExitCode::from(code)
        }
    }
}

/// glibc gives each thread that allocates its own heap ("arena"), up to eight per core, and each
/// keeps its own free space: on two cores that was a seventh of an idle stream's memory
/// (BENCHMARKS.md). One arena per core (at least two), unless `MALLOC_ARENA_MAX` says otherwise; threads keep
/// their lock-free caches for small allocations. Must run before the runtime's threads start.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas = libc::c_int::try_from(cores.max(2)).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets a tuning parameter; no threads allocate concurrently yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}

/// Every stream is an open file: take the hard limit, not the (often 1,024) soft one. The
/// gateway sizes `MAX_CONNECTIONS` from what this leaves.
fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open files limit"),
    }
}

/// Logs to stderr (`RUST_LOG` filters them), and traces over OTLP when `OTEL_*` asks for them
/// (see `eventgate_core::telemetry`). The two have their own filters: traces take eventgate's
/// `debug` spans whatever `RUST_LOG` says.
fn init_logging(format: LogFormat, service: Option<&str>) -> Option<SdkTracerProvider> {
    use tracing_subscriber::{Layer, layer::SubscriberExt, util::SubscriberInitExt};
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    // JSON lines carry the fields of the span they are in: trace_id and span_id of a traced
    // request among them.
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };
    let (provider, failed) = match service.map(telemetry::provider_from_env) {
        Some(Ok(provider)) => (provider, None),
        Some(Err(e)) => (None, Some(e)),
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(provider.as_ref().map(telemetry::layer))
        .init();
    if let Some(e) = failed {
        tracing::warn!(error = %e, "traces are off: cannot build the OTLP exporter");
    }
    provider
}

/// `eventgate health URL`: one GET over HTTP/1.1.
async fn health(url: &str) -> Result<(), Failure> {
    let fail = |e: String| {
        Failure(
            EX_UNAVAILABLE,
            anyhow::anyhow!("health check of {url}: {e}"),
        )
    };
    let uri: hyper::Uri = url.parse().map_err(|e| fail(format!("{e}")))?;
    let authority = uri
        .authority()
        .ok_or_else(|| fail("the URL needs a host and port".into()))?
        .clone();
    let check = async {
        let stream = tokio::net::TcpStream::connect(authority.as_str())
            .await
            .map_err(|e| fail(e.to_string()))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| fail(e.to_string()))?;
        tokio::spawn(connection);
        let request = hyper::Request::get(uri.path())
            .header(hyper::header::HOST, authority.as_str())
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| fail(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| fail(e.to_string()))?;
        match response.status() {
            hyper::StatusCode::OK => Ok(()),
            status => Err(fail(format!("answered {status}"))),
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(3), check)
        .await
        .map_err(|_| fail("no answer within 3 s".into()))?
}

/// An error with the exit status it maps to.
struct Failure(u8, anyhow::Error);

async fn run(command: Command) -> Result<(), Failure> {
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    match command {
        Command::Health { url } => health(&url).await,
        Command::Gateway {
            broker,
            gateway,
            auth,
            ..
        } => {
            let verifier = Verifier::new(&auth).map_err(usage)?;
            let broker = connect_redis(&broker, "gateway").await?;
            let listener = bind(gateway.gateway_addr, "gateway").await?;
            announce("gateway", &listener, &broker);
            eventgate_gateway::run(gateway, broker, verifier, listener, shutdown)
                .await
                .map_err(|e| Failure(EX_OSERR, e.into()))
        }
        Command::Publisher {
            broker,
            publisher,
            auth,
            ..
        } => {
            let publisher_auth = PublisherAuth::from_config(&publisher, &auth).map_err(usage)?;
            let broker = connect_redis(&broker, "publisher").await?;
            let listener = bind(publisher.publisher_addr, "publisher").await?;
            announce("publisher", &listener, &broker);
            eventgate_publisher::run(publisher, broker, publisher_auth, listener, shutdown)
                .await
                .map_err(|e| Failure(EX_OSERR, e.into()))
        }
        Command::Standalone(args) => standalone(args, shutdown).await,
    }
}

fn usage(e: AuthSetupError) -> Failure {
    Failure(EX_USAGE, e.into())
}

/// Key material generated for a standalone run that was given none, to print.
struct Generated {
    secret: Option<String>,
    key: Option<String>,
    /// A token reading every channel, with the generated secret.
    token: Option<String>,
}

/// Standalone keeps the quick start at two commands: with no key material configured it makes
/// a random JWT secret and publisher key for this run, and a token that reads every channel.
fn standalone_keys(args: &mut StandaloneArgs) -> Result<Generated, Failure> {
    let no_jwt_key = args.auth.jwt_secret.is_none()
        && args.auth.jwt_public_key_file.is_none()
        && args.auth.jwt_jwks_file.is_none();
    let secret = no_jwt_key.then(new_secret);
    if secret.is_some() {
        args.auth.jwt_secret = secret.clone();
    }
    let key = if args.publisher.publisher_api_keys.is_empty()
        && args.publisher.publisher_api_keys_file.is_none()
    {
        let key = new_secret();
        args.publisher.publisher_api_keys = vec![key.clone()];
        Some(key)
    } else {
        None
    };
    // A ready token only with a secret made for this run: never a long-lived wildcard token
    // signed with a configured (perhaps production) key.
    let token = match &secret {
        Some(_) => {
            let everything = Pattern::parse("*").map_err(|e| usage(AuthSetupError::new(e)))?;
            Minter::new(&args.auth)
                .map_err(usage)?
                .map(|minter| {
                    minter.mint(
                        "demo",
                        &[everything],
                        std::time::Duration::from_secs(24 * 3600),
                    )
                })
                .transpose()
                .map_err(usage)?
                .map(|(token, _)| token)
        }
        None => None,
    };
    Ok(Generated { secret, key, token })
}

async fn standalone(mut args: StandaloneArgs, shutdown: CancellationToken) -> Result<(), Failure> {
    let generated = standalone_keys(&mut args)?;
    args.broker
        .check_redis()
        .map_err(|e| Failure(EX_USAGE, anyhow::anyhow!(e)))?;
    let verifier = Verifier::new(&args.auth).map_err(usage)?;
    let publisher_auth = PublisherAuth::from_config(&args.publisher, &args.auth).map_err(usage)?;
    let broker = connect_broker(&args.broker).await?;
    let gateway_listener = bind(args.gateway.gateway_addr, "gateway").await?;
    let publisher_listener = bind(args.publisher.publisher_addr, "publisher").await?;
    let gateway_url = url_of(&gateway_listener);
    let publisher_url = url_of(&publisher_listener);
    // The console is on unless CONSOLE=false; its page may publish with the demo key.
    let console = *args.gateway.console.get_or_insert(true);
    if console {
        args.publisher.console_port = gateway_listener.local_addr().ok().map(|a| a.port());
    }
    let where_ = if args.broker.uses_redis() {
        format!("Redis at {}", args.broker.redis_description())
    } else {
        "in-memory broker".to_owned()
    };
    println!("eventgate standalone ({where_})");
    println!("  gateway    {gateway_url}");
    println!("  publisher  {publisher_url}");
    print_quick_start(&generated, &gateway_url, &publisher_url);
    if console {
        print_console(&generated, &gateway_url, &publisher_url);
    }
    let gateway = eventgate_gateway::run(
        args.gateway,
        broker.clone(),
        verifier,
        gateway_listener,
        shutdown.clone(),
    );
    let publisher = eventgate_publisher::run(
        args.publisher,
        broker,
        publisher_auth,
        publisher_listener,
        shutdown,
    );
    let (g, p) = tokio::join!(gateway, publisher);
    g.and(p).map_err(|e| Failure(EX_OSERR, e.into()))
}

/// Prints generated keys (to stdout, never to the log) and commands that work as printed.
fn print_quick_start(generated: &Generated, gateway_url: &str, publisher_url: &str) {
    if generated.secret.is_some() || generated.key.is_some() {
        println!(
            "Generated for this run (set JWT_SECRET and PUBLISHER_API_KEYS to choose your own):"
        );
    }
    if let Some(secret) = &generated.secret {
        println!("  JWT_SECRET          {secret}");
    }
    if let Some(key) = &generated.key {
        println!("  PUBLISHER_API_KEYS  {key}");
    }
    let key = generated.key.as_deref().unwrap_or("<publisher key>");
    let Some(token) = &generated.token else {
        println!("Mint a subscriber token (with JWT_SECRET or JWT_PRIVATE_KEY_FILE set):");
        println!(
            "  curl -X POST '{publisher_url}/v1/tokens' -H 'Authorization: Bearer {key}' \
             -H 'Content-Type: application/json' -d '{{\"sub\":\"demo\",\"channels\":[\"orders\"]}}'"
        );
        return;
    };
    println!("  subscriber token    {token}");
    println!("                      (sub \"demo\", reads every channel, valid 24 h)");
    println!("Try it, in two terminals:");
    println!(
        "  curl -N -H 'Authorization: Bearer {token}' '{gateway_url}/v1/events?channel=orders'"
    );
    println!(
        "  curl -X POST '{publisher_url}/v1/publish' -H 'Authorization: Bearer {key}' \
         -H 'Content-Type: application/json' \
         -d '{{\"channel\":\"orders\",\"event\":\"order:created\",\"data\":{{\"id\":42}}}}'"
    );
}

/// The console's address. Credentials go in the fragment, which browsers never send, so they
/// reach no access log; the page keeps them in the tab's sessionStorage.
fn print_console(generated: &Generated, gateway_url: &str, publisher_url: &str) {
    let mut fragment = Vec::new();
    if let Some(token) = &generated.token {
        fragment.push(format!("token={token}"));
    }
    if let Some(key) = &generated.key {
        fragment.push(format!("key={key}&publisher={publisher_url}"));
    }
    let fragment = if fragment.is_empty() {
        String::new()
    } else {
        format!("#{}", fragment.join("&"))
    };
    println!("Watch and publish events in the browser:");
    println!("  console             {gateway_url}/console{fragment}");
}

async fn connect_redis(config: &BrokerConfig, role: &str) -> Result<Broker, Failure> {
    if !config.uses_redis() {
        return Err(Failure(
            EX_USAGE,
            anyhow::anyhow!(
                "`eventgate {role}` needs Redis: set REDIS_URL (for example redis://127.0.0.1:6379) \
                 or REDIS_SENTINELS and REDIS_SENTINEL_MASTER, or run `eventgate standalone` to \
                 try eventgate without Redis"
            ),
        ));
    }
    config
        .check_redis()
        .map_err(|e| Failure(EX_USAGE, anyhow::anyhow!(e)))?;
    connect_broker(config).await
}

/// Connects the broker: settings that do not fit the data (another shard count) exit 64,
/// anything else 69.
async fn connect_broker(config: &BrokerConfig) -> Result<Broker, Failure> {
    match Broker::from_config(config).await {
        Ok(broker) => Ok(broker),
        Err(e) => {
            let status = match e {
                eventgate_core::BrokerError::Config(_) => EX_USAGE,
                _ => EX_UNAVAILABLE,
            };
            Err(Failure(
                status,
                anyhow::Error::new(e).context(redis_context(config)),
            ))
        }
    }
}

fn redis_context(config: &BrokerConfig) -> String {
    format!("cannot use Redis at {}", config.redis_description())
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
