//! The fixed-rate open loop and its latency percentiles (no coordinated omission).

use super::*;

/// One fixed-rate run.
pub(super) struct FixedRun {
    pub(super) lat_us: Vec<f64>,
    pub(super) late: u64,
    pub(super) errors: u64,
    pub(super) a: u64,
    pub(super) b: u64,
    pub(super) proxy_cpu: f64,
    /// CPU share of the proxy's own processes, percent of one core.
    pub(super) own_cpu: f64,
}

/// Open loop at `rate` requests/s over [`CONNS`] keep-alive connections: connection i sends at
/// t0 + i/rate + k*CONNS/rate. Latency runs from the actual send when the connection was idle
/// at its scheduled time (tokio's timer is coarse, ~1 ms: its lateness is not the proxy's), and
/// from the scheduled time when the connection was still busy (that wait is the proxy's).
pub(super) fn fixed_rate(setup: &Setup, rate: f64, secs: f64) -> Result<FixedRun> {
    let target = setup.target;
    let (a0, b0) = setup.counts();
    let c0 = cpu_ticks();
    let p0 = ns_cpu_ticks(&setup.topo.node);
    let started = Instant::now();
    let (lat_us, late, errors) =
        setup
            .topo
            .client
            .run(move || -> Result<(Vec<f64>, u64, u64)> {
                pin_thread(LOAD_CPU);
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                Ok(rt.block_on(async move {
                    let t0 = Instant::now() + Duration::from_millis(50);
                    let end = t0 + Duration::from_secs_f64(secs);
                    let request: Arc<[u8]> = request_bytes(false).into();
                    let mut tasks = Vec::new();
                    for i in 0..CONNS {
                        let request = request.clone();
                        tasks.push(tokio::spawn(async move {
                            let period = CONNS as f64 / rate;
                            let mut lat = Vec::new();
                            let (mut late, mut errors) = (0u64, 0u64);
                            let mut buf = Vec::with_capacity(1024);
                            let mut stream = connect(target).await;
                            for k in 0u64.. {
                                let sched = t0
                                    + Duration::from_secs_f64(i as f64 / rate + k as f64 * period);
                                if sched >= end {
                                    break;
                                }
                                let was_late = Instant::now() >= sched;
                                let start = if was_late {
                                    sched
                                } else {
                                    tokio::time::sleep_until(sched.into()).await;
                                    Instant::now()
                                };
                                if stream.is_none() {
                                    stream = connect(target).await;
                                }
                                let Some(s) = stream.as_mut() else {
                                    errors += 1;
                                    continue;
                                };
                                match tokio::time::timeout(
                                    Duration::from_secs(5),
                                    exchange(s, &request, &mut buf),
                                )
                                .await
                                {
                                    Ok(Ok(200)) => {
                                        lat.push(start.elapsed().as_secs_f64() * 1e6);
                                        late += u64::from(was_late);
                                    }
                                    Ok(Ok(_)) => errors += 1,
                                    _ => {
                                        errors += 1;
                                        stream = None;
                                    }
                                }
                            }
                            (lat, late, errors)
                        }));
                    }
                    let (mut all, mut late, mut errors) = (Vec::new(), 0, 0);
                    for t in tasks {
                        if let Ok((l, x, e)) = t.await {
                            all.extend(l);
                            late += x;
                            errors += e;
                        }
                    }
                    (all, late, errors)
                }))
            })??;
    let own_cpu = 100.0 * ns_cpu_ticks(&setup.topo.node).saturating_sub(p0) as f64
        / clock_ticks_per_s()
        / started.elapsed().as_secs_f64();
    let c1 = cpu_ticks();
    let (a1, b1) = setup.counts();
    Ok(FixedRun {
        own_cpu,
        lat_us,
        late,
        errors,
        a: a1 - a0,
        b: b1 - b0,
        proxy_cpu: busy_pct(&c0, &c1, PROXY_CPU),
    })
}

pub(super) fn lat_stats(runs: &[FixedRun]) -> Option<LatStats> {
    if runs.is_empty() {
        return None;
    }
    let pct = |p: f64| {
        median(
            &runs
                .iter()
                .map(|r| percentile(&r.lat_us, p))
                .collect::<Vec<_>>(),
        )
    };
    let (a, b) = runs.iter().fold((0, 0), |(a, b), r| (a + r.a, b + r.b));
    Some(LatStats {
        p50: pct(50.0),
        p99: pct(99.0),
        p999: pct(99.9),
        samples: runs.iter().map(|r| r.lat_us.len()).sum(),
        late: runs.iter().map(|r| r.late).sum(),
        errors: runs.iter().map(|r| r.errors).sum(),
        proxy_cpu: median(&runs.iter().map(|r| r.proxy_cpu).collect::<Vec<_>>()),
        own_cpu: median(&runs.iter().map(|r| r.own_cpu).collect::<Vec<_>>()),
        share_a: share(a, b),
    })
}
