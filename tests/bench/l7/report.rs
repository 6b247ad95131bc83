//! Section 4 of the report: the method, the load and latency tables, the plots, the
//! instruction counts, the ratios and the profiles that explain a missed target.

use super::*;

pub(super) fn clean(s: &str) -> String {
    s.replace('\n', " ").replace('|', "/")
}

pub(super) fn load_table(w: &mut String, r: &L7Result, close: bool) {
    let _ = writeln!(
        w,
        "| system | requests/s (median) | mesh / this | requests per proxy CPU-second | mesh / this, per core | CPU 1 busy % | requests/s per busy CPU 1 | CPU 0 busy % (load) | runs (requests/s) | errors / requests | share at A % |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for x in r.rows.iter().filter(|x| !(close && x.variant.h2)) {
        let mesh = variant_row(r, x.variant.with(L7System::Mesh)).and_then(|m| load_of(m, close));
        if let Some(why) = &x.skipped {
            let _ = writeln!(
                w,
                "| {} | skipped: {} | | | | | | | | |",
                x.variant.label(),
                clean(why)
            );
            continue;
        }
        let Some(l) = load_of(x, close) else {
            let _ = writeln!(
                w,
                "| {} | not measured: {} | | | | | | | | | |",
                x.variant.label(),
                clean(x.error.as_deref().unwrap_or("no run"))
            );
            continue;
        };
        let ratio = |m: Option<f64>, v: f64| opt(m.and_then(|m| finite(m / v)), 2);
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} |",
            x.variant.label(),
            f(l.rps, 0),
            ratio(mesh.map(|m| m.rps), l.rps),
            f(l.rps_per_core, 0),
            ratio(mesh.map(|m| m.rps_per_core), l.rps_per_core),
            f(l.proxy_cpu, 0),
            f(l.rps_per_busy_cpu, 0),
            f(l.load_cpu, 0),
            l.runs
                .iter()
                .map(|v| f(*v, 0))
                .collect::<Vec<_>>()
                .join(", "),
            l.errors,
            l.requests,
            f(l.share_a, 2)
        );
    }
    let _ = writeln!(w);
}

/// Writes section 4 (after its heading) and its plots.
pub fn write_section(
    w: &mut String,
    r: &Result<L7Result, String>,
    out: &Path,
    text: bool,
    plots_note: &mut Vec<String>,
) {
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(w, "Not measured: {e}\n");
            return;
        }
    };
    let _ = writeln!(
        w,
        "HTTP/1.1 GET through each proxy, client namespace -> node namespace (the proxy, pinned to \
         CPU 1 with `taskset`, or CPUs 0 and 1 in the 2-core rows) -> two backends with an 80/20 \
         split per request. mesh: meshd's L7 proxy on the VIP (VirtualService weights 80/20 with \
         `timeout: 10s`, which puts the service on the proxy), `--proxy-workers 1` (or 2): one \
         current-thread runtime per worker with its own SO_REUSEPORT listener and upstream \
         pools. Envoy `--concurrency 1` (weighted_clusters 80/20), nginx `worker_processes 1` \
         (upstream `weight=4`/`weight=1`, `keepalive 64`), HAProxy `nbthread 1` (`weight \
         80`/`20`, `http-reuse always`), or 2 of each in the 2-core rows; upstream keep-alive on. \
         Access log off, and on in the rows that say so, for every system: a line per request to \
         a file in each one's default format (meshd: its `mesh::access` log target, on by \
         default, to stderr redirected to a file; off with `RUST_LOG=info,mesh::access=off`; \
         nginx `access_log FILE`; Envoy a file access logger; HAProxy `option httplog` to \
         stdout redirected to a file). The h2c rows: h2load (`-t1 -c8 -m4`, 32 streams in \
         flight) speaking HTTP/2 with prior knowledge to mesh and Envoy (nginx and HAProxy \
         are not configured for h2c here). Backends: the benchmark's own hyper server answering 64 bytes, \
         the same for every system; backends and load generator share CPU 0. One topology per \
         system, all started first, then measured interleaved (system by system within each \
         round). Closed loops: {}, {CONNS} connections, {} s per run, {} round(s); keep-alive, \
         then `Connection: close` (one new connection per request). Medians over rounds.\n",
        r.generator, r.run_s, r.rounds
    );
    if r.quick {
        let _ = writeln!(
            w,
            "Quick mode: nothing installed, mesh measured against the peers already present, \
             1-second runs, one round: a smoke run, not numbers to quote.\n"
        );
    }
    let _ = writeln!(w, "Versions: {}.\n", {
        r.rows
            .iter()
            .map(|x| format!("{} = {}", x.system.short(), clean(&x.version)))
            .collect::<Vec<_>>()
            .join("; ")
    });
    let _ = writeln!(w, "**Keep-alive** ({CONNS} connections):\n");
    load_table(w, r, false);
    let _ = writeln!(
        w,
        "**New connection per request** (`Connection: close`, {CONNS} at a time):\n"
    );
    load_table(w, r, true);
    let _ = writeln!(
        w,
        "*requests per proxy CPU-second* = requests / (user + system CPU time of the proxy's \
         own processes, /proc/<pid>/stat): the per-core figure the targets use, robust to other \
         work on this shared machine taking CPU 1 away. *requests/s per busy CPU 1* divides by \
         CPU 1's busy share instead (/proc/stat: also counts softirq work the kernel does on \
         CPU 1 for the proxy's sends, and anything else that ran there). *mesh / this* > 1 means \
         mesh is faster. Both cores are normally 100% busy in a closed loop: the proxy (CPU 1) \
         and the generator plus backends (CPU 0) each run flat out; requests/s alone is \
         therefore partly a property of CPU 0, the per-core figures are not.\n"
    );
    let _ = writeln!(
        w,
        "**Fixed rate** {} requests/s (half the slowest system's keep-alive median), {CONNS} \
         keep-alive connections, {} s per run, built-in open-loop client (wrk2 is not in Debian): \
         latency from the scheduled send time when the connection was still busy (no \
         coordinated omission), else from the actual send. Percentiles: median over rounds of \
         each round's value.\n",
        f(r.rate, 0),
        f(r.fixed_s, 0)
    );
    let _ = writeln!(
        w,
        "| system | p50 us | p99 us | p99.9 us | mesh p99 / this p99 | samples | sent late (busy connection) | errors | proxy processes CPU % | CPU 1 busy % (all work) | share at A % |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for x in r
        .rows
        .iter()
        .filter(|x| x.variant.cores == 1 && !x.variant.h2)
    {
        let mesh_p99 = variant_row(r, x.variant.with(L7System::Mesh))
            .and_then(|x| x.fixed.as_ref().map(|l| l.p99));
        let Some(l) = x.fixed.as_ref().filter(|_| x.skipped.is_none()) else {
            let _ = writeln!(
                w,
                "| {} | {} | | | | | | | | | |",
                x.variant.label(),
                clean(
                    x.skipped
                        .as_deref()
                        .map(|s| format!("skipped: {s}"))
                        .or_else(|| x.error.clone())
                        .as_deref()
                        .unwrap_or("not measured")
                )
            );
            continue;
        };
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            x.variant.label(),
            f(l.p50, 0),
            f(l.p99, 0),
            f(l.p999, 0),
            opt(mesh_p99.and_then(|m| finite(m / l.p99)), 2),
            l.samples,
            l.late,
            l.errors,
            f(l.own_cpu, 0),
            f(l.proxy_cpu, 0),
            f(l.share_a, 2)
        );
    }
    let _ = writeln!(
        w,
        "\n*proxy processes CPU %*: the proxy's own CPU time during the run (percent of one \
         core); *CPU 1 busy %* is everything that ran on the proxy's core (its softirq work and \
         any other job on this shared machine). Where the second is far above the first, other \
         work competed for the core and the tail percentiles carry that scheduling noise; the \
         *sent late* column shows how often a connection was still busy at its next send time."
    );
    for x in r.rows.iter().filter(|x| x.error.is_some()) {
        let _ = writeln!(
            w,
            "\n{}: a run failed: {}",
            x.variant.label(),
            clean(x.error.as_deref().unwrap_or(""))
        );
    }
    let _ = writeln!(w);
    let measured: Vec<&L7Row> = r
        .rows
        .iter()
        .filter(|x| {
            x.skipped.is_none() && x.fixed.is_some() && x.variant == Variant::base(x.system)
        })
        .collect();
    let cats: Vec<String> = measured
        .iter()
        .map(|x| x.system.short().to_string())
        .collect();
    let pick = |g: fn(&LatStats) -> f64| -> Vec<f64> {
        measured
            .iter()
            .map(|x| x.fixed.as_ref().map(g).unwrap_or(f64::NAN))
            .collect()
    };
    match plot::bars(
        &out.join("l7_latency.png"),
        text,
        &format!("L7 latency at {} requests/s", f(r.rate, 0)),
        "microseconds",
        &cats,
        &[
            ("p50".into(), pick(|l| l.p50)),
            ("p99".into(), pick(|l| l.p99)),
            ("p99.9".into(), pick(|l| l.p999)),
        ],
    ) {
        Ok(()) => {
            let _ = writeln!(
                w,
                "Plot: `l7_latency.png` (groups left to right: {}; blue = p50, red = p99, green = \
                 p99.9, microseconds at the fixed rate).\n",
                cats.join(", ")
            );
        }
        Err(e) => plots_note.push(format!("l7_latency.png: {e:#}")),
    }
    let per_core = |close: bool| -> Vec<f64> {
        measured
            .iter()
            .map(|x| {
                if close {
                    x.close.as_ref()
                } else {
                    x.keepalive.as_ref()
                }
                .map(|l| l.rps_per_core)
                .unwrap_or(f64::NAN)
            })
            .collect()
    };
    match plot::bars(
        &out.join("l7_rps.png"),
        text,
        "L7 requests/s per busy proxy core",
        "requests/s",
        &cats,
        &[
            ("keep-alive".into(), per_core(false)),
            ("new connection per request".into(), per_core(true)),
        ],
    ) {
        Ok(()) => {
            let _ = writeln!(
                w,
                "Plot: `l7_rps.png` (groups left to right: {}; blue = keep-alive, red = new \
                 connection per request; requests/s per busy proxy core).\n",
                cats.join(", ")
            );
        }
        Err(e) => plots_note.push(format!("l7_rps.png: {e:#}")),
    }
    let counted: Vec<&L7Row> = r.rows.iter().filter(|x| x.instructions.is_some()).collect();
    if !counted.is_empty() {
        let mesh = row(r, L7System::Mesh).and_then(|m| m.instructions);
        let _ = writeln!(
            w,
            "**Instructions per request** (keep-alive, `perf stat -e instructions:u,instructions:k` \
             of every process in the proxy's namespace over one run, divided by the requests the \
             backends counted in that window; unlike CPU time, other work on the machine does \
             not change it):\n\n| system | user | kernel | total | mesh / this (total) |\n|---|---|---|---|---|"
        );
        for x in counted {
            let Some((u, k)) = x.instructions else {
                continue;
            };
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} |",
                x.variant.label(),
                f(u, 0),
                f(k, 0),
                f(u + k, 0),
                opt(mesh.and_then(|(mu, mk)| finite((mu + mk) / (u + k))), 2)
            );
        }
        let _ = writeln!(w);
    }
    let lines = ratio_lines(r);
    if !lines.is_empty() {
        let _ = writeln!(
            w,
            "**Ratios** (mesh over each peer in the same configuration; per core = requests per \
             proxy CPU-second; > 1 means mesh serves more per core; for p99 < 1 means mesh's tail \
             is lower), as `cargo xtask bench --only l7` prints them:\n\n```text\n{}\n```\n",
            lines.join("\n")
        );
    }
    match &r.perf {
        Ok(profiles) if !profiles.is_empty() => write_profiles(w, r, profiles),
        Ok(_) => {
            let _ = writeln!(w, "Profiles: none could be taken.\n");
        }
        Err(e) => {
            let _ = writeln!(w, "Profiles: not taken ({e}).\n");
        }
    }
}

/// CPU per request split by where `perf` found it, and what explains mesh's gap.
pub(super) fn write_profiles(w: &mut String, r: &L7Result, profiles: &[Profile]) {
    let _ = writeln!(
        w,
        "**Where the proxy's CPU goes** under the keep-alive load: `perf record -F 999 -g` of \
         every process in the system's node namespace for 3 s during a 5-s wrk run, `perf \
         report --no-children` (self time). *CPU us per request* = 1e6 / requests per proxy \
         CPU-second (keep-alive table); the split multiplies it by perf's shares. Kernel time \
         includes the softirq work the kernel does inside the proxy's send calls (delivering \
         to the peer's socket over veth and waking it on the other CPU).\n"
    );
    let _ = writeln!(
        w,
        "| system | CPU us per request | kernel % | own binary % | libc % | other % | kernel us per request | user-space us per request |\n|---|---|---|---|---|---|---|---|"
    );
    let us = |s: L7System| {
        row(r, s)
            .and_then(|x| x.keepalive.as_ref())
            .and_then(|l| finite(1e6 / l.rps_per_core))
    };
    let split = |p: &Profile| {
        let total = (p.kernel + p.own + p.libc + p.other).max(1e-9);
        us(p.system).map(|u| (u * p.kernel / total, u * (total - p.kernel) / total))
    };
    for p in profiles {
        let (k, u) = split(p).unzip();
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            p.system.short(),
            opt(us(p.system), 1),
            f(p.kernel, 1),
            f(p.own, 1),
            f(p.libc, 1),
            f(p.other, 1),
            opt(k, 1),
            opt(u, 1)
        );
    }
    let _ = writeln!(w);
    let mesh = profiles.iter().find(|p| p.system == L7System::Mesh);
    if let Some(m) = mesh {
        let _ = writeln!(
            w,
            "meshd's top symbols (self time, >= 0.8% of samples):\n\n```text\n{}\n```\n",
            m.top
        );
    }
    // Plain statement of every shortfall against a peer, with the profile's split.
    let mut gaps = Vec::new();
    if let (Some(m), Some((mk, mu))) = (mesh, mesh.and_then(split)) {
        for p in profiles.iter().filter(|p| p.system != L7System::Mesh) {
            let Some((pk, pu)) = split(p) else { continue };
            let (Some(a), Some(b)) = (us(m.system), us(p.system)) else {
                continue;
            };
            if a > b {
                gaps.push(format!(
                    "mesh needs {} us of CPU per keep-alive request, {} {} us ({}x): {} us more \
                     in the kernel ({} vs {}) and {} us more in user space ({} vs {})",
                    f(a, 1),
                    p.system.short(),
                    f(b, 1),
                    f(a / b, 2),
                    f(mk - pk, 1),
                    f(mk, 1),
                    f(pk, 1),
                    f(mu - pu, 1),
                    f(mu, 1),
                    f(pu, 1)
                ));
            }
        }
    }
    if !gaps.is_empty() {
        let _ = writeln!(w, "**Where mesh falls short**: {}.\n", gaps.join("; "));
    }
}
