//! One system ready to serve: its own topology, the benchmark's backends, the proxy process
//! pinned to its CPUs, and the readiness wait; everything goes on drop.

use super::*;

/// Pins the calling thread to one CPU.
pub(super) fn pin_thread(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity(0) affects the calling thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// A process pinned to one CPU inside a namespace (`taskset` and `nsenter` exec it, so the
/// child's pid is the program's); SIGTERM, then SIGKILL, on drop.
pub(super) struct Proc {
    pub(super) child: Child,
    pub(super) log: PathBuf,
}

impl Proc {
    pub(super) fn spawn(
        ns: &Netns,
        cpu: &str,
        program: &str,
        args: &[String],
        env: &[(&str, &str)],
        log: PathBuf,
    ) -> Result<Proc> {
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new("taskset")
            .args(["-c", cpu, "nsenter"])
            .arg(format!("--net=/var/run/netns/{}", ns.name()))
            .arg("--")
            .arg(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        Ok(Proc { child, log })
    }

    pub(super) fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            for _ in 0..150 {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A hyper HTTP/1.1 backend answering [`BODY`] on a thread pinned to the load CPU, counting
/// requests. Stops when dropped (the runtime and every connection go with its thread).
pub(super) struct Backend {
    pub(super) requests: Arc<AtomicU64>,
    pub(super) _stop: tokio::sync::oneshot::Sender<()>,
}

pub(super) fn backend(ns: &Netns, addr: SocketAddr) -> Result<Backend> {
    let listener = ns
        .run(move || -> std::io::Result<std::net::TcpListener> {
            let l = std::net::TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?
        .with_context(|| format!("binding {addr}"))?;
    let requests = Arc::new(AtomicU64::new(0));
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let count = requests.clone();
    std::thread::Builder::new()
        .name("l7-backend".into())
        .spawn(move || {
            pin_thread(LOAD_CPU);
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                loop {
                    tokio::select! {
                        _ = &mut stopped => break,
                        accepted = listener.accept() => {
                            let Ok((stream, _)) = accepted else {
                                tokio::time::sleep(Duration::from_millis(1)).await;
                                continue;
                            };
                            let _ = stream.set_nodelay(true);
                            let count = count.clone();
                            tokio::spawn(async move {
                                let service = hyper::service::service_fn(
                                    move |_req: hyper::Request<hyper::body::Incoming>| {
                                        count.fetch_add(1, Ordering::Relaxed);
                                        async {
                                            Ok::<_, Infallible>(hyper::Response::new(
                                                http_body_util::Full::new(
                                                    bytes::Bytes::from_static(BODY),
                                                ),
                                            ))
                                        }
                                    },
                                );
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                    .await;
                            });
                        }
                    }
                }
            });
        })
        .context("starting a backend thread")?;
    Ok(Backend {
        requests,
        _stop: stop,
    })
}

/// One system ready to serve: its own topology, backends and proxy. Field order = drop order.
pub(super) struct Setup {
    pub(super) system: L7System,
    pub(super) variant: Variant,
    pub(super) backends: Vec<Backend>,
    pub(super) proxy: Proc,
    pub(super) topo: Topology,
    pub(super) _dir: DirGuard,
    pub(super) target: SocketAddr,
}

impl Setup {
    pub(super) fn start(variant: Variant, binary: &str) -> Result<Setup> {
        let system = variant.system;
        let cpus = variant.cpus();
        let cpu = cpus.as_str();
        let topo = Topology::build(2)?;
        for s in [
            "net.ipv4.ip_local_port_range=1024 65000",
            "net.ipv4.tcp_tw_reuse=1",
        ] {
            topo.client.exec("sysctl", &["-qw", s])?;
        }
        topo.node
            .exec("sysctl", &["-qw", "net.core.somaxconn=4096"])?;
        let backends = vec![
            backend(
                &topo.backends[0],
                SocketAddr::new(backend_v4(1), BACKEND_PORT),
            )?,
            backend(
                &topo.backends[1],
                SocketAddr::new(backend_v4(2), BACKEND_PORT),
            )?,
        ];
        let dir = std::env::temp_dir().join(format!("{}-bench-l7", topo.prefix));
        std::fs::create_dir_all(&dir)?;
        let guard = DirGuard(dir.clone());
        let log = dir.join("proxy.log");
        let peer = SocketAddr::new(NODE_V4.parse()?, PEER_PORT);
        let s = |p: &Path| p.display().to_string();
        let (proxy, target) = match system {
            L7System::Mesh => {
                let rules = dir.join("rules");
                std::fs::create_dir_all(&rules)?;
                std::fs::write(rules.join("web.yaml"), mesh_rules())?;
                let mut args = meshd_private_args(&dir);
                for i in topo.node_interfaces() {
                    args.extend(["--iface".into(), i]);
                }
                args.extend(["--config".into(), s(&rules)]);
                args.extend(["--proxy-workers".into(), variant.cores.to_string()]);
                // The access log (info level, one line per request) is meshd's default; the
                // runs with it off filter its target out.
                let filter = if variant.log {
                    "info"
                } else {
                    "info,mesh::access=off"
                };
                let env = [("RUST_LOG", filter)];
                (
                    Proc::spawn(&topo.node, cpu, binary, &args, &env, log)?,
                    SocketAddr::new(VIP.parse()?, 80),
                )
            }
            L7System::Envoy => {
                let cfg = dir.join("envoy.yaml");
                let access = dir.join("access.log");
                std::fs::write(&cfg, envoy_config(variant.log.then_some(access.as_path())))?;
                let args: Vec<String> = vec![
                    "-c".into(),
                    s(&cfg),
                    "--concurrency".into(),
                    variant.cores.to_string(),
                    "--disable-hot-restart".into(),
                    "-l".into(),
                    "warning".into(),
                ];
                (Proc::spawn(&topo.node, cpu, binary, &args, &[], log)?, peer)
            }
            L7System::Nginx => {
                let cfg = dir.join("nginx.conf");
                std::fs::write(&cfg, nginx_config(&dir, variant.log, variant.cores))?;
                let args: Vec<String> = vec![
                    "-c".into(),
                    s(&cfg),
                    "-p".into(),
                    s(&dir),
                    "-e".into(),
                    s(&dir.join("nginx-error.log")),
                ];
                (Proc::spawn(&topo.node, cpu, binary, &args, &[], log)?, peer)
            }
            L7System::Haproxy => {
                let cfg = dir.join("haproxy.cfg");
                std::fs::write(&cfg, haproxy_config(variant.log, variant.cores))?;
                let args: Vec<String> = vec!["-db".into(), "-f".into(), s(&cfg)];
                (Proc::spawn(&topo.node, cpu, binary, &args, &[], log)?, peer)
            }
        };
        let mut setup = Setup {
            system,
            variant,
            backends,
            proxy,
            topo,
            _dir: guard,
            target,
        };
        setup.wait_ready(Duration::from_secs(30))?;
        Ok(setup)
    }

    /// Waits until a request through the proxy gets the backend's answer.
    pub(super) fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        let target = self.target;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.proxy.child.try_wait() {
                bail!(
                    "{} exited ({status}) before serving:\n{}",
                    self.system.short(),
                    self.proxy.log_tail()
                );
            }
            match self
                .topo
                .client
                .run(move || get_once(target, "/", HOST, &[]))?
            {
                Ok(r) if r.status == 200 && r.body.as_bytes() == BODY => return Ok(()),
                Ok(r) => last = format!("status {} body {:?}", r.status, r.body),
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "{} did not serve {target} within {limit:?} (last: {last}):\n{}",
            self.system.short(),
            self.proxy.log_tail()
        )
    }

    pub(super) fn counts(&self) -> (u64, u64) {
        (
            self.backends[0].requests.load(Ordering::Relaxed),
            self.backends[1].requests.load(Ordering::Relaxed),
        )
    }
}
