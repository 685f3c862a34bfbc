//! The one `blockfleet` binary: the CLI for users and operators. Each service lives in its own
//! library crate; this file parses flags, sets up logging, runs the command and turns an error
//! into a one-line message and a non-zero exit code.

mod cli;
mod demo;
mod output;
mod server_cmd;
mod services;
mod snapshot_cmd;
mod volume_cmd;

use std::process::ExitCode;

use anyhow::Context;
use blockfleet_core::config::{Config, LocalStoreConfig, S3StoreConfig, StoreConfig};
use clap::Parser;

use blockfleet_core::tls::Role;
use cli::{CaCommand, Cli, Command, StoreFlags};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    // Processes that hold plaintext keys: no core files, not dumpable (before any key exists).
    if matches!(
        cli.command,
        Command::Attach { .. } | Command::Up | Command::Transform { .. } | Command::Kms { .. }
    ) {
        if let Err(e) = blockfleet_keys::harden::harden_process() {
            eprintln!("error: cannot make this key-holding process non-dumpable: {e}");
            return ExitCode::FAILURE;
        }
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The block-protocol identity a command's process uses as a client (`None`: it opens no
/// block-protocol connection).
fn client_role(command: &Command) -> Option<Role> {
    match command {
        Command::Up | Command::ControlPlane { .. } => Some(Role::ControlPlane),
        Command::Transform { .. } => Some(Role::Transform),
        Command::Attach { .. } => Some(Role::HostAgent),
        _ => None,
    }
}

/// With a `[tls]` section: `up` makes the CA and certificates it lacks; the block server
/// takes TLS; a client process connects as its role.
fn set_up_tls(config: &mut Config, command: &Command) -> anyhow::Result<()> {
    let Some(tls) = config.tls.clone() else {
        return Ok(());
    };
    if matches!(command, Command::Up) {
        let services = [
            Role::ControlPlane,
            Role::BlockServer,
            Role::Transform,
            Role::Kms,
        ];
        blockfleet_core::tls::ensure(&tls.dir, &services, "localhost")?;
        // The host agent's certificate names its host, as its capabilities do.
        let host = &config.control_plane.default_host;
        blockfleet_core::tls::ensure(&tls.dir, &[Role::HostAgent], host)?;
    }
    config.block_server.tls = Some(tls.clone());
    config.control_plane.tls = Some(tls.clone());
    config.kms_server.tls = Some(tls.clone());
    if !matches!(command, Command::Ca(_)) {
        // AWS SDK clients (KMS) trust the fleet's own KMS by the fleet CA.
        blockfleet_core::tls::set_fleet_ca(&tls.dir)
            .context("the fleet CA ([tls] dir) to verify the KMS")?;
    }
    match client_role(command) {
        Some(role) => {
            let t = blockfleet_proto::Transport::tls(&tls.dir, role)
                .with_context(|| format!("TLS identity of the {role}"))?;
            blockfleet_proto::transport::set_default(t);
        }
        // The CLI: trusts the fleet CA (the control plane's HTTPS), signs with SigV4.
        None if !matches!(command, Command::Ca(_)) => {
            let c = blockfleet_core::tls::anonymous_client_config(&tls.dir)
                .context("the fleet CA ([tls] dir) to verify the control plane")?;
            blockfleet_core::tls::set_client_identity(Some(c));
        }
        None => {}
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = load_config(&cli)?;
    set_up_tls(&mut config, &cli.command)?;
    match cli.command {
        Command::Ca(cmd) => ca(&config, cmd),
        Command::Snapshot(cmd) => {
            let cp = cli_client(&cli.control_plane, &config);
            snapshot_cmd::run(&config, cp, cli.output, cmd).await
        }
        Command::Demo { size_mib } => demo::run(&config, cli.output, size_mib).await,
        Command::Attach {
            block_server,
            replica_timeout_ms,
            volume,
            wrapped_key,
            block_token_key_file,
            listen,
            metrics_listen,
        } => {
            let volume: blockfleet_core::ids::VolumeId = volume.parse()?;
            let block_grant = match &block_token_key_file {
                Some(path) => Some(blockfleet_proto::Grant::writer(
                    &blockfleet_core::token::TokenKey::load_or_create(path)?,
                    &volume,
                    &config.control_plane.default_host,
                )),
                None => None,
            };
            let target = match block_server.is_empty() {
                false => services::AttachTarget {
                    replicas: block_server,
                    wrapped_key,
                    fetch_endpoints: Vec::new(),
                    fetch_token: None,
                    host: String::new(),
                    block_grant,
                    control_plane: None,
                    replica_timeout: std::time::Duration::from_millis(replica_timeout_ms),
                },
                true => {
                    services::attach_target(
                        &control_plane_url(&cli.control_plane, &config),
                        config.host_agent.as_ref(),
                        &volume,
                        std::time::Duration::from_millis(replica_timeout_ms),
                    )
                    .await?
                }
            };
            services::attach(&config, &volume, target, &listen, metrics_listen.as_deref()).await
        }
        Command::Up => services::up(&config).await,
        Command::ControlPlane { listen } => {
            let mut c = config;
            if let Some(l) = listen {
                c.control_plane.listen = l;
            }
            services::control_plane(&c, shutdown_signal()).await
        }
        Command::Transform { listen } => {
            let mut c = config;
            if let Some(l) = listen {
                c.transform.listen = l;
            }
            services::transform(&c, shutdown_signal()).await
        }
        Command::Server(cmd) => {
            server_cmd::run(cli_client(&cli.control_plane, &config), cli.output, cmd).await
        }
        Command::Volume(cmd) => {
            volume_cmd::run(cli_client(&cli.control_plane, &config), cli.output, cmd).await
        }
        Command::Kms { listen } => {
            let mut c = config.kms_server;
            if let Some(l) = listen {
                c.listen = l;
            }
            c.validate()?;
            let listener = tokio::net::TcpListener::bind(&c.listen)
                .await
                .with_context(|| format!("cannot listen on {}", c.listen))?;
            println!("blockfleet kms listening on {}", listener.local_addr()?);
            blockfleet_kms_server::run(c, listener, shutdown_signal()).await?;
            Ok(())
        }
        Command::BlockServer {
            listen,
            data_dir,
            metrics_listen,
            token_key_file,
        } => {
            let mut c = config.block_server;
            if let Some(k) = token_key_file {
                c.token_key_file = k;
            }
            if metrics_listen.is_some() {
                c.metrics_listen = metrics_listen;
            }
            if let Some(l) = listen {
                c.listen = l;
            }
            if let Some(d) = data_dir {
                c.data_dir = d;
            }
            c.validate()?;
            let listener = tokio::net::TcpListener::bind(&c.listen)
                .await
                .with_context(|| format!("cannot listen on {}", c.listen))?;
            // The one line on stdout: scripts and tests read the bound address from it.
            println!(
                "blockfleet block-server listening on {}",
                listener.local_addr()?
            );
            blockfleet_block_server::run(c, listener, shutdown_signal()).await?;
            Ok(())
        }
    }
}

fn ca(config: &Config, cmd: CaCommand) -> anyhow::Result<()> {
    let dir = |d: Option<std::path::PathBuf>| {
        d.or_else(|| config.tls.as_ref().map(|t| t.dir.clone()))
            .context("no [tls] section in the config: give --dir")
    };
    match cmd {
        CaCommand::Init { dir: d } => {
            let d = dir(d)?;
            match blockfleet_core::tls::init_ca(&d)? {
                true => println!("fleet CA made in {}", d.display()),
                false => println!("fleet CA already in {}: kept", d.display()),
            }
        }
        CaCommand::Issue { role, name, dir: d } => {
            let d = dir(d)?;
            let role: Role = role.parse()?;
            blockfleet_core::tls::issue(&d, role, &name)?;
            println!(
                "{} and its key issued for {role} {name}",
                blockfleet_core::tls::cert_path(&d, role).display()
            );
        }
    }
    Ok(())
}

fn control_plane_url(flag: &Option<String>, config: &Config) -> String {
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    flag.clone()
        .unwrap_or_else(|| format!("{scheme}://{}", config.control_plane.listen))
}

/// The CLI's control-plane client: signs with `[client]` (the API refuses unsigned calls).
fn cli_client(flag: &Option<String>, config: &Config) -> blockfleet_api::ControlPlaneClient {
    blockfleet_api::ControlPlaneClient::new(
        &control_plane_url(flag, config),
        config.client.as_ref(),
    )
}

/// Resolves on SIGINT or SIGTERM: the service then finishes in-flight work and exits cleanly.
pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let mut config = match &cli.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    apply_store_flags(&mut config, &cli.store);
    config
        .validate()
        .context("after applying command-line flags")?;
    Ok(config)
}

fn apply_store_flags(config: &mut Config, flags: &StoreFlags) {
    if let Some(dir) = &flags.store_dir {
        config.store = StoreConfig::Local(LocalStoreConfig { path: dir.clone() });
    }
    if let Some(bucket) = &flags.s3_bucket {
        let mut s3 = S3StoreConfig::new(flags.s3_endpoint.clone(), &flags.s3_region, bucket);
        s3.prefix = flags.s3_prefix.clone();
        // Path-style for custom endpoints (self-hosted stores need it), virtual-host for AWS.
        s3.path_style = flags.s3_endpoint.is_some();
        config.store = StoreConfig::S3(s3);
    }
}
