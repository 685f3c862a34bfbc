//! Command-line arguments (clap). The same config struct serves the file and the flags: flags
//! given here override what the file says.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "blockfleet",
    version,
    about = "Encrypted block volumes and crash-consistent snapshots"
)]
pub struct Cli {
    /// TOML config file (see config/single-node.toml); without it the embedded single-node
    /// defaults apply: a local object store under ./blockfleet-data.
    #[arg(long, short, global = true, env = "BLOCKFLEET_CONFIG")]
    pub config: Option<PathBuf>,

    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,

    #[command(flatten)]
    pub store: StoreFlags,

    /// The control plane's URL (default: http:// + control_plane.listen of the config).
    #[arg(
        long,
        global = true,
        env = "BLOCKFLEET_CONTROL_PLANE",
        value_name = "URL"
    )]
    pub control_plane: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// Store selection by flags, overriding the config file.
#[derive(Debug, Args)]
pub struct StoreFlags {
    /// Use a local-directory object store at DIR.
    #[arg(long, global = true, value_name = "DIR", conflicts_with = "s3_bucket")]
    pub store_dir: Option<PathBuf>,
    /// Use an S3 bucket (credentials from the config file or the AWS environment).
    #[arg(long, global = true, value_name = "BUCKET")]
    pub s3_bucket: Option<String>,
    /// S3 endpoint URL, for S3-compatible services (with --s3-bucket).
    #[arg(long, global = true, value_name = "URL", requires = "s3_bucket")]
    pub s3_endpoint: Option<String>,
    /// S3 region (with --s3-bucket).
    #[arg(
        long,
        global = true,
        default_value = "us-east-1",
        requires = "s3_bucket"
    )]
    pub s3_region: String,
    /// Key prefix inside the bucket (with --s3-bucket).
    #[arg(long, global = true, default_value = "", requires = "s3_bucket")]
    pub s3_prefix: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Snapshots in the object store: import and export raw images, list, describe.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Run a block server: stores ciphertext blocks for volumes; never holds a key.
    BlockServer {
        /// Address to listen on (overrides block_server.listen); port 0 picks a free port.
        #[arg(long)]
        listen: Option<String>,
        /// Data directory (overrides block_server.data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Serve Prometheus /metrics here (overrides block_server.metrics_listen).
        #[arg(long)]
        metrics_listen: Option<String>,
        /// The key admin capabilities are checked with (overrides block_server.token_key_file).
        #[arg(long)]
        token_key_file: Option<PathBuf>,
    },
    /// Run the embedded KMS: the AWS KMS API subset blockfleet uses, SigV4-authenticated.
    Kms {
        /// Address to listen on (overrides kms_server.listen); port 0 picks a free port.
        #[arg(long)]
        listen: Option<String>,
    },
    /// Run the whole single-node fleet in this process: embedded KMS, the block servers of
    /// control_plane.block_servers, the control plane and a transform worker, on loopback.
    /// With a [tls] section, the fleet CA and every role's certificate are made on first start.
    Up,
    /// The fleet CA for mutual TLS on the block protocol ([tls] dir unless --dir).
    #[command(subcommand)]
    Ca(CaCommand),
    /// Run the control plane: the HTTP API over volumes, placement and hydration jobs.
    ControlPlane {
        /// Address to listen on (overrides control_plane.listen); port 0 picks a free port.
        #[arg(long)]
        listen: Option<String>,
    },
    /// Run a transform worker: hydrates volumes from snapshots, encrypting under each volume's key.
    Transform {
        /// On-demand fetch address (overrides transform.listen); port 0 picks a free port.
        #[arg(long)]
        listen: Option<String>,
    },
    /// Volumes: create (from snapshots), list, describe, attach, detach, delete.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Block servers: list them with their replicas' state, drain one.
    #[command(subcommand)]
    Server(ServerCommand),
    /// Serve an attached volume to this host over NBD (the host agent), encrypting with its key
    /// (unwrapped under this host's KMS grant; the block server sees only ciphertext). Where the
    /// volume lives and its wrapped key come from the control plane unless --block-server is given.
    Attach {
        #[arg(long)]
        volume: String,
        /// Serve straight from these block servers (the volume's replicas; repeat the flag)
        /// instead of asking the control plane.
        #[arg(long)]
        block_server: Vec<String>,
        /// A replica that does not answer within this time is marked out (the volume goes on
        /// with a majority) and repaired when it is back.
        #[arg(long, default_value_t = 2000)]
        replica_timeout_ms: u64,
        /// With --block-server: the volume's wrapped data key (hex); without it the volume is
        /// served unencrypted.
        #[arg(long, requires = "block_server")]
        wrapped_key: Option<String>,
        /// With --block-server: make the block-protocol capability under this key file (the
        /// block servers'; for tests and drills without a control plane, which otherwise
        /// hands the capability out with the attachment).
        #[arg(long, requires = "block_server")]
        block_token_key_file: Option<PathBuf>,
        /// NBD listen address; port 0 picks a free port.
        #[arg(long, default_value = "127.0.0.1:10809")]
        listen: String,
        /// Serve Prometheus /metrics here.
        #[arg(long)]
        metrics_listen: Option<String>,
    },
    /// Round trip on the embedded default: generate an image, import it, export it, verify.
    Demo {
        /// Size of the generated image in MiB.
        #[arg(long, default_value_t = 64)]
        size_mib: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// Every block server: reachable, draining, and each replica it holds with its state
    /// (in_sync, behind N chunks, joining, leaving) and its host agent's view.
    Ls,
    /// Moves every replica off a block server (new replicas are filled while volumes serve,
    /// then the old ones go); nothing new is placed on it. Progress shows in `server ls`.
    Drain {
        /// The block server's address, as in control_plane.block_servers.
        server: String,
        /// Wait until no replica is left on it.
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Import a raw disk image as a new snapshot; prints its id.
    Import {
        /// The raw image (a whole number of 4096-byte sectors).
        image: PathBuf,
        /// Parent snapshot: its chunks are not looked up or uploaded again.
        #[arg(long)]
        parent: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Restore a snapshot to a raw image file, bit-identical to what was imported.
    Export {
        snapshot_id: String,
        out: PathBuf,
        /// Replace OUT if it exists.
        #[arg(long)]
        force: bool,
    },
    /// List snapshots (every manifest in the store).
    Ls,
    /// Describe one snapshot.
    Show { snapshot_id: String },
    /// Snapshot every volume attached to an instance, crash-consistent across them (through
    /// the control plane); prints the snapshot set.
    Create {
        #[arg(long)]
        instance: String,
        /// Leave out the instance's boot volume.
        #[arg(long)]
        exclude_boot: bool,
        /// Leave out this volume (repeatable).
        #[arg(long = "exclude", value_name = "VOLUME_ID")]
        exclude: Vec<String>,
        #[arg(long, default_value = "")]
        description: String,
        /// A tag, KEY=VALUE (repeatable).
        #[arg(long = "tag", value_name = "KEY=VALUE")]
        tags: Vec<String>,
        /// Copy each volume's tags to its snapshot.
        #[arg(long)]
        copy_tags: bool,
        /// Makes a retried call return the same set instead of a second one.
        #[arg(long)]
        client_token: Option<String>,
        /// Wait until the set is completed (or failed), with a progress bar.
        #[arg(long)]
        wait: bool,
    },
    /// Describe a snapshot set made by `snapshot create`.
    Set { set_id: String },
    /// Delete a snapshot: its manifest and every chunk no other snapshot uses.
    Rm { snapshot_id: String },
    /// Blocks (512 KiB chunks) that differ between two snapshots (or, with one, that hold data).
    Diff {
        first: String,
        second: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create volumes, empty, from a snapshot or from a volume (hydrated in the background,
    /// usable at once).
    Create {
        #[arg(long, value_name = "SNAPSHOT_ID", conflicts_with = "from_volume")]
        from_snapshot: Option<String>,
        /// Copy a volume as it is now (a cut taken at once; the source stays in use).
        #[arg(long, value_name = "VOLUME_ID")]
        from_volume: Option<String>,
        /// Size, e.g. 10GiB or 1073741824 (default: the source's size).
        #[arg(long)]
        size: Option<String>,
        /// Encrypt under the fleet's default key, or --kms-key.
        #[arg(long)]
        encrypted: bool,
        /// KMS key id, alias or ARN (implies --encrypted).
        #[arg(long)]
        kms_key: Option<String>,
        /// Create this many volumes from the one source.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// A tag, KEY=VALUE (repeatable).
        #[arg(long = "tag", value_name = "KEY=VALUE")]
        tags: Vec<String>,
        /// Wait for hydration to finish, with a progress bar.
        #[arg(long)]
        wait: bool,
        /// Make the call idempotent: a retry with the same token returns the same volumes.
        #[arg(long)]
        client_token: Option<String>,
    },
    /// List volumes.
    Ls,
    /// Describe a volume.
    Show { volume_id: String },
    /// Attach a volume to an instance (grants the instance's host agent its key).
    Attach {
        volume_id: String,
        #[arg(long)]
        instance: String,
        #[arg(long)]
        device: Option<String>,
        #[arg(long)]
        boot: bool,
        /// The host agent's KMS principal (default: control_plane.default_host).
        #[arg(long)]
        host: Option<String>,
    },
    /// Detach a volume (retires the host agent's grant).
    Detach { volume_id: String },
    /// Delete a volume.
    Rm { volume_id: String },
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Make the fleet CA (ca.pem, and ca.key at 0600) unless it exists.
    Init {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Issue ROLE.pem / ROLE.key for a machine NAME, signed by the CA (valid one year); copy
    /// them with ca.pem to that machine's [tls] dir.
    Issue {
        /// control-plane, block-server, transform or host-agent.
        role: String,
        /// The machine or service name, recorded in the certificate (a-z, 0-9, '-', '.').
        name: String,
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}
