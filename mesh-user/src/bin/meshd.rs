//! meshd: the node daemon. Attaches the XDP programs to the node's interfaces and keeps the BPF
//! maps in line with the Istio rules it is given.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::Parser;
use mesh_user::{
    daemon::{self, DaemonOptions},
    dataplane::{
        features::TcAttachRequest, AttachRequest, KernelLogLevel, SocketLbOptions, XdpAttachMode,
    },
    proxy::{ClientLimits, ProxyOptions, WorkerOptions},
};

#[derive(Parser, Debug)]
#[command(
    name = "meshd",
    version,
    about = "mesh node daemon: Istio traffic rules enforced in the kernel by XDP",
    long_about = "mesh node daemon: Istio traffic rules enforced in the kernel by XDP.\n\n\
        meshd attaches its XDP program to every --iface, compiles the Istio resources found at \
        --config (ServiceEntry, DestinationRule, VirtualService, Gateway) into BPF maps, and \
        forwards each new TCP/UDP connection to a service address to one backend chosen by \
        weight. It must run as root.\n\n\
        Rules come from --config (watched; SIGHUP forces a re-read) and from `meshctl apply` \
        over the admin socket (persisted in --state-file, or with --etcd shared by a fleet of \
        nodes through etcd, see docs/fleet.md). Every change is validated and compiled \
        first and applied all-or-nothing; on any error the old rules stay in force.\n\n\
        SIGTERM or SIGINT stop meshd. With pinning (the default) the XDP programs and maps stay \
        in the kernel and keep forwarding, so a restarted or upgraded meshd takes over without \
        breaking established connections; `meshd --cleanup` removes them.",
    after_help = "Examples:\n  \
        meshd --iface eth0 --iface eth1 --config /etc/mesh/rules/\n  \
        meshd --iface veth0 --config config/tcp-echo/ --attach tc\n  \
        meshd --iface eth0 --state-file /var/lib/mesh/state.yaml   # rules from meshctl only\n  \
        meshd --iface eth0 --etcd http://198.18.1.1:2379,http://198.18.1.2:2379 --node-name n1\n  \
        meshd --cleanup            # detach pinned programs, remove pinned maps"
)]
struct Args {
    /// Interface to attach to (repeat for each interface traffic enters or leaves by).
    #[arg(long = "iface", value_name = "IF", required_unless_present = "cleanup")]
    interfaces: Vec<String>,

    /// Istio YAML: a file, or a directory of *.yaml / *.yml files. Watched: changes are applied
    /// (all-or-nothing) within --watch-interval. Optional: rules can also come from `meshctl apply`.
    #[arg(long, value_name = "PATH", visible_alias = "config-dir")]
    config: Option<PathBuf>,

    /// How often the --config files are checked for changes.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    watch_interval: std::time::Duration,

    /// Admin API socket (root only) used by meshctl.
    #[arg(long, value_name = "PATH", default_value = mesh_user::admin::DEFAULT_SOCKET, env = "MESH_SOCKET")]
    socket: PathBuf,

    /// Where rules applied with meshctl are stored and restored from at start.
    #[arg(long, value_name = "PATH", default_value = "/var/lib/mesh/state.yaml")]
    state_file: PathBuf,

    /// Do not persist rules applied with meshctl (they are lost on restart).
    #[arg(long)]
    no_state: bool,

    /// Prometheus metrics listener.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9464")]
    metrics_addr: std::net::SocketAddr,

    /// Do not serve Prometheus metrics over TCP (they stay available on the admin socket).
    #[arg(long)]
    no_metrics: bool,

    /// Which hook serves each interface. `auto`: XDP on NICs whose driver runs it natively
    /// (physical, virtio-net), TC on veth, bridges and other virtual devices (`meshctl status`
    /// shows the choice and why). `xdp` on a veth needs GRO on and TX checksum offload off on
    /// every endpoint behind it.
    #[arg(long, value_enum, default_value = "auto")]
    attach: AttachRequest,

    /// XDP attach mode where XDP runs. `generic` (explicit only) runs XDP on the skb on any
    /// device; it is slower than both native XDP and TC.
    #[arg(long, value_enum, default_value = "native")]
    xdp_mode: XdpAttachMode,

    /// How TC programs are attached. `auto`: tcx links where the kernel has them (6.6+), a
    /// cls_bpf filter on the clsact qdisc otherwise. `cls-bpf` forces the filter also where tcx
    /// exists; `tcx` refuses to start on a kernel without it. `meshctl status` shows the choice.
    #[arg(long, value_enum, default_value = "auto")]
    tc_attach: TcAttachRequest,

    /// Where maps are pinned under bpffs (so connections survive a restart).
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/mesh")]
    pin_dir: PathBuf,

    /// Keep maps private to this process (connections do not survive a restart).
    #[arg(long)]
    no_pin: bool,

    /// Entries of the Maglev pool, shared by all services (each service takes a slice of M
    /// entries, M = 211 for two backends by default; 8 bytes of kernel memory per entry).
    #[arg(long, value_name = "N", default_value_t = mesh_common::DEFAULT_MAGLEV_POOL_ENTRIES)]
    maglev_pool_entries: u32,

    /// Connection-tracking capacity in established flows; the least recently used are evicted.
    /// New flows wait in a separate table of a quarter of this size (at least 512) until
    /// traffic went both ways, so a flood of spoofed packets never evicts established flows.
    #[arg(long, value_name = "N", default_value_t = mesh_common::DEFAULT_CONNTRACK_FLOWS)]
    conntrack_entries: u32,

    /// Do not balance clients on the node itself. By default meshd attaches cgroup socket hooks
    /// (connect, sendmsg, recvmsg, getpeername) so a process in meshd's network namespace that
    /// connects to a service address goes straight to a backend chosen by the same weights,
    /// with no per-packet translation. Needs Linux 5.18+ and cgroup2 (mounted at
    /// /run/mesh/cgroup2 when the host has none).
    #[arg(long)]
    no_socket_lb: bool,

    /// cgroup2 directory to attach the socket hooks to (default: the root of the mounted
    /// cgroup2 hierarchy). The hooks act only on sockets of meshd's network namespace.
    #[arg(long, value_name = "DIR", conflicts_with = "no_socket_lb")]
    cgroup: Option<PathBuf>,

    /// Detach the pinned programs and remove the pinned maps under --pin-dir, then exit.
    #[arg(long)]
    cleanup: bool,

    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: daemon::LogFormat,

    /// Kernel debug logging, for developers: the programs log refused and dropped packets and
    /// connection-table repairs through aya-log, and meshd writes the records to its own log
    /// (target `kernel`). Off, the verifier removes the log points: no cost per packet.
    /// Example: `meshd --iface eth0 --kernel-log debug`.
    #[arg(long, value_enum, value_name = "LEVEL", default_value = "off")]
    kernel_log: KernelLogLevel,

    /// Join a fleet: keep the meshctl layer of the rules in this etcd cluster (v3 API) instead
    /// of --state-file, which then caches the last rules applied here. Comma-separated client
    /// URLs, e.g. http://198.18.1.1:2379,http://198.18.1.2:2379.
    #[arg(
        long,
        value_name = "URL[,URL...]",
        value_delimiter = ',',
        env = "MESH_ETCD",
        help_heading = "Fleet (etcd)"
    )]
    etcd: Vec<String>,

    /// Key prefix of the fleet in etcd.
    #[arg(
        long,
        value_name = "PREFIX",
        default_value = "/mesh",
        help_heading = "Fleet (etcd)"
    )]
    etcd_prefix: String,

    /// This node's name in the fleet (default: the host name). Must be unique in the fleet.
    #[arg(long, value_name = "NAME", help_heading = "Fleet (etcd)")]
    node_name: Option<String>,

    /// CA bundle that signed the etcd servers' certificates (https:// endpoints).
    #[arg(long, value_name = "FILE", help_heading = "Fleet (etcd)")]
    etcd_cacert: Option<PathBuf>,

    /// Client certificate for etcd (mutual TLS), with --etcd-key.
    #[arg(
        long,
        value_name = "FILE",
        requires = "etcd_key",
        help_heading = "Fleet (etcd)"
    )]
    etcd_cert: Option<PathBuf>,

    /// Client key for etcd (mutual TLS), with --etcd-cert.
    #[arg(
        long,
        value_name = "FILE",
        requires = "etcd_cert",
        help_heading = "Fleet (etcd)"
    )]
    etcd_key: Option<PathBuf>,

    /// etcd user as NAME:PASSWORD (prefer the MESH_ETCD_USER environment variable).
    #[arg(
        long,
        value_name = "NAME:PASSWORD",
        env = "MESH_ETCD_USER",
        hide_env_values = true,
        help_heading = "Fleet (etcd)"
    )]
    etcd_user: Option<String>,

    /// Lease of this node's record: a node silent this long shows as gone.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration, help_heading = "Fleet (etcd)")]
    etcd_lease_ttl: std::time::Duration,

    /// How often this node renews its lease and republishes its record (revision, counters).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration, help_heading = "Fleet (etcd)")]
    etcd_publish_interval: std::time::Duration,

    /// Time limit of one etcd request: a partition or a lost quorum is noticed after this.
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = parse_duration, help_heading = "Fleet (etcd)")]
    etcd_timeout: std::time::Duration,
    /// L7 proxy worker threads, each with its own listening socket per service (SO_REUSEPORT)
    /// and its own upstream connections. Default: the number of CPUs meshd may run on (its
    /// affinity mask, e.g. under `taskset`).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    proxy_workers: Option<u16>,

    /// Pin L7 proxy worker i to the i-th CPU meshd may run on.
    #[arg(long)]
    proxy_pin: bool,

    /// Most client connections the L7 proxy holds at once; beyond it a new connection is
    /// answered 503 and closed.
    #[arg(long, value_name = "N", default_value_t = mesh_user::proxy::server::DEFAULT_MAX_CONNECTIONS)]
    proxy_max_connections: usize,

    /// L7 stream idle timeout: a request body that stops arriving is answered 408, a client
    /// that stops reading its response is disconnected.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    proxy_stream_idle_timeout: std::time::Duration,

    /// L7 client connections (HTTP/2) with no request in flight this long are closed.
    #[arg(long, value_name = "DURATION", default_value = "300s", value_parser = parse_duration)]
    proxy_idle_timeout: std::time::Duration,
}

fn main() -> ExitCode {
    let args = Args::parse();
    daemon::init_logging(args.log_format);
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    if args.cleanup {
        mesh_user::dataplane::sockets::remove_pins(&args.pin_dir).with_context(|| {
            format!("removing the socket hooks under {}", args.pin_dir.display())
        })?;
        mesh_user::dataplane::Dataplane::remove_pins(&args.pin_dir)
            .with_context(|| format!("removing {}", args.pin_dir.display()))?;
        eprintln!(
            "meshd: detached pinned programs and removed pinned maps under {}",
            args.pin_dir.display()
        );
        return Ok(());
    }
    let fleet = (!args.etcd.is_empty()).then(|| mesh_user::fleet::FleetOptions {
        endpoints: args.etcd.clone(),
        prefix: args.etcd_prefix.clone(),
        node_name: args.node_name.clone().unwrap_or_else(host_name),
        cacert: args.etcd_cacert.clone(),
        cert: args.etcd_cert.clone(),
        key: args.etcd_key.clone(),
        user: args.etcd_user.clone(),
        lease_ttl_s: args.etcd_lease_ttl.as_secs().max(2) as i64,
        publish_interval: args.etcd_publish_interval,
        request_timeout: args.etcd_timeout,
    });
    let proxy = proxy_options(&args);
    mesh_user::dataplane::features::request_tc_attach(args.tc_attach);
    let options = DaemonOptions {
        interfaces: args.interfaces,
        config: args.config,
        watch_interval: args.watch_interval,
        socket: args.socket,
        state_file: (!args.no_state).then_some(args.state_file),
        metrics_addr: (!args.no_metrics).then_some(args.metrics_addr),
        attach: args.attach,
        xdp_mode: args.xdp_mode,
        pin_dir: (!args.no_pin).then_some(args.pin_dir),
        maglev_pool_entries: args.maglev_pool_entries,
        conntrack_entries: args.conntrack_entries,
        kernel_log: args.kernel_log,
        fleet,
        proxy,
        socket_lb: (!args.no_socket_lb).then_some(SocketLbOptions {
            cgroup: args.cgroup,
        }),
    };
    let nofile = mesh_user::proxy::server::raise_nofile_limit();
    tracing::debug!(nofile, "open-file limit");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(daemon::run(options))
}

fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "node".into())
}

fn proxy_options(args: &Args) -> ProxyOptions {
    let mut workers = WorkerOptions {
        pin: args.proxy_pin,
        ..WorkerOptions::default()
    };
    if let Some(n) = args.proxy_workers {
        workers.count = usize::from(n);
    }
    ProxyOptions {
        workers,
        limits: ClientLimits {
            stream_idle: args.proxy_stream_idle_timeout,
            idle: args.proxy_idle_timeout,
            max_connections: args.proxy_max_connections.max(1),
        },
    }
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    mesh_user::config::Duration::parse_in(
        text,
        std::time::Duration::from_millis(10),
        std::time::Duration::from_secs(3600),
    )
}
