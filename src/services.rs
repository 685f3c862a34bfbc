//! Running services: `control-plane`, `transform`, `attach` (the host agent) and `up` (the
//! whole single-node fleet in one process: KMS, block servers, control plane, transform worker,
//! all on the addresses of the config, local object store).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use blockfleet_api::ControlPlaneClient;
use blockfleet_core::config::Config;
use blockfleet_core::ids::VolumeId;
use blockfleet_snapshot_format::manifest_key::open_archive;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::shutdown_signal;

async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

pub async fn control_plane(
    config: &Config,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let listener = bind(&config.control_plane.listen).await?;
    println!(
        "blockfleet control-plane listening on {}",
        listener.local_addr()?
    );
    run_control_plane(config, listener, shutdown).await
}

async fn run_control_plane(
    config: &Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let kms = config
        .control_plane
        .kms
        .clone()
        .unwrap_or_else(|| config.kms.clone());
    let archive = open_archive(&config.store, &config.snapshot, &kms).await?;
    let token_key = blockfleet_core::token::TokenKey::load_or_create(&config.fleet.token_key_file)?;
    blockfleet_snapshot_service::control_plane::run(
        config.control_plane.clone(),
        &kms,
        archive,
        token_key,
        blockfleet_core::token::TokenKey::load_or_create(&config.block_server.token_key_file)?,
        listener,
        shutdown,
    )
    .await?;
    Ok(())
}

pub async fn transform(
    config: &Config,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let listener = bind(&config.transform.listen).await?;
    println!(
        "blockfleet transform listening on {}",
        listener.local_addr()?
    );
    blockfleet_transform_fleet::run(config.clone(), listener, shutdown).await?;
    Ok(())
}

/// The `i`-th of `up`'s block servers: its own data directory, and metrics on the next ports.
fn block_server_config(
    config: &Config,
    i: usize,
    listen: &str,
) -> blockfleet_core::config::BlockServerConfig {
    let mut c = config.block_server.clone();
    c.listen = listen.to_owned();
    c.data_dir = config.block_server.data_dir.join(i.to_string());
    c.metrics_listen = config.block_server.metrics_listen.as_ref().and_then(|m| {
        let mut a: SocketAddr = m.parse().ok()?;
        a.set_port(a.port().checked_add(i as u16)?);
        Some(a.to_string())
    });
    c
}

/// `blockfleet up`: every service of the single-node fleet in this process until Ctrl-C.
pub async fn up(config: &Config) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut tasks = tokio::task::JoinSet::new();

    let kms_listener = bind(&config.kms_server.listen).await?;
    println!("kms            {}", kms_listener.local_addr()?);
    let kc = config.kms_server.clone();
    let s = stopped();
    tasks.spawn(async move {
        blockfleet_kms_server::run(kc, kms_listener, s)
            .await
            .map_err(anyhow::Error::from)
    });

    for (i, addr) in config.control_plane.block_servers.iter().enumerate() {
        let bc = block_server_config(config, i, addr);
        let l = bind(addr).await?;
        println!(
            "block-server   {} ({})",
            l.local_addr()?,
            bc.data_dir.display()
        );
        let s = stopped();
        tasks.spawn(async move {
            blockfleet_block_server::run(bc, l, s)
                .await
                .map_err(anyhow::Error::from)
        });
    }

    let cp_listener = bind(&config.control_plane.listen).await?;
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    println!("control-plane  {scheme}://{}", cp_listener.local_addr()?);
    if let Some(e) = &config.control_plane.ebs_listen {
        println!("ebs-direct     http://{e}");
    }
    let c = config.clone();
    let s = stopped();
    tasks.spawn(async move { run_control_plane(&c, cp_listener, s).await });

    let tf_listener = bind(&config.transform.listen).await?;
    println!("transform      {scheme}://{}", tf_listener.local_addr()?);
    let c = config.clone();
    let s = stopped();
    tasks.spawn(async move {
        blockfleet_transform_fleet::run(c, tf_listener, s)
            .await
            .map_err(anyhow::Error::from)
    });
    println!("blockfleet up: ready (Ctrl-C stops every service)");

    let first_exit = tokio::select! {
        () = shutdown_signal() => None,
        r = tasks.join_next() => r,
    };
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    match first_exit {
        Some(Ok(Err(e))) => Err(e.context("a service stopped")),
        Some(Err(e)) => Err(anyhow::anyhow!("a service panicked: {e}")),
        _ => Ok(()),
    }
}

/// How often the host agent tries to bring back a replica that is out.
const REPAIR_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// How often the host agent asks the control plane for placement changes.
const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Where the host agent finds the volume and how it encrypts it.
pub struct AttachTarget {
    /// The block servers holding the volume's replicas.
    pub replicas: Vec<String>,
    /// How long a replica may take to answer before it is marked out.
    pub replica_timeout: std::time::Duration,
    pub wrapped_key: Option<String>,
    pub fetch_endpoints: Vec<String>,
    /// The capability transform workers take for on-demand fetches of this volume.
    pub fetch_token: Option<String>,
    /// The host the volume is attached on (the fetch capability's holder).
    pub host: String,
    /// The block-protocol capability presented to every replica.
    pub block_grant: Option<blockfleet_proto::Grant>,
    /// Asked again for transform workers when none answers.
    pub control_plane: Option<ControlPlaneClient>,
}

/// Asks the control plane how to serve an attached volume.
pub async fn attach_target(
    control_plane: &str,
    credentials: Option<&blockfleet_core::config::Credentials>,
    volume: &VolumeId,
    replica_timeout: std::time::Duration,
) -> anyhow::Result<AttachTarget> {
    let cp = ControlPlaneClient::new(control_plane, credentials);
    let info = cp
        .attach_info(volume)
        .await
        .with_context(|| format!("cannot get the attachment of {volume}"))?;
    Ok(AttachTarget {
        replicas: info.replicas,
        replica_timeout,
        wrapped_key: info.wrapped_key,
        fetch_endpoints: info.fetch_endpoints,
        fetch_token: info.fetch_token,
        host: info.attachment.host,
        block_grant: info.block_grant,
        control_plane: Some(cp),
    })
}

/// The host agent: serves `volume` over NBD on `listen`.
pub async fn attach(
    config: &Config,
    volume: &VolumeId,
    target: AttachTarget,
    listen: &str,
    metrics_listen: Option<&str>,
) -> anyhow::Result<()> {
    let xts = match &target.wrapped_key {
        Some(hex_key) => {
            let wrapped = hex::decode(hex_key).context("the wrapped key is not hex")?;
            let kms = blockfleet_keys::kms::Kms::connect(&config.kms).await;
            // Through the key cache, as every key user: the plaintext key exists only as the
            // cipher it holds, zeroized when the last user drops it.
            let cache = blockfleet_keys::kms::cache::KeyCache::new(Default::default());
            let xts = cache
                .get(&wrapped, volume, || kms.decrypt_key(&wrapped, volume))
                .await
                .with_context(|| {
                    format!("cannot unwrap the key of {volume} (no grant for this host?)")
                })?;
            Some(xts)
        }
        None => None,
    };
    let replicas = Arc::new(
        blockfleet_volume_client::ReplicatedVolume::open(
            volume.clone(),
            &target.replicas,
            target.replica_timeout,
            target.block_grant.clone(),
        )
        .await
        .with_context(|| format!("cannot open {volume} on {}", target.replicas.join(", ")))?,
    );
    // Replicas found behind, or failing later, are repaired while the volume serves.
    let _repair = replicas.spawn_repair(REPAIR_EVERY);
    let _follow = target
        .control_plane
        .clone()
        .map(|cp| blockfleet_host_agent::follow_placement(cp, &replicas, FOLLOW_EVERY));
    let fetcher =
        (!target.fetch_endpoints.is_empty() || target.control_plane.is_some()).then(|| {
            blockfleet_host_agent::Fetcher::new(
                target.fetch_endpoints,
                target.fetch_token,
                target.host,
                target.control_plane,
            )
        });
    let vol = blockfleet_host_agent::AgentVolume::open(replicas, xts, fetcher);
    let listener = bind(listen).await?;
    let vol = Arc::new(vol);
    if let Some(addr) = metrics_listen {
        let l = bind(addr).await?;
        let v = Arc::clone(&vol);
        tokio::spawn(blockfleet_core::metrics::serve(
            l,
            Arc::new(move || v.metrics.render()),
        ));
    }
    println!(
        "blockfleet attach listening on {} (export {volume})",
        listener.local_addr()?
    );
    blockfleet_host_agent::run(vol, listener, shutdown_signal()).await;
    Ok(())
}
