//! mesh over each peer: the ratio lines `--only l7` prints and the summary rows and JSON
//! entries of the report.

use super::*;

pub(super) fn row(r: &L7Result, s: L7System) -> Option<&L7Row> {
    variant_row(r, Variant::base(s))
}

pub(super) fn variant_row(r: &L7Result, v: Variant) -> Option<&L7Row> {
    r.rows
        .iter()
        .find(|x| x.variant == v && x.skipped.is_none())
}

pub(super) fn load_of(x: &L7Row, close: bool) -> Option<&LoadStats> {
    if close {
        x.close.as_ref()
    } else {
        x.keepalive.as_ref()
    }
}

/// mesh's requests per proxy CPU-second divided by `peer`'s in the same configuration.
pub fn variant_ratio(r: &L7Result, peer: Variant, close: bool) -> Option<f64> {
    let get = |v| finite(load_of(variant_row(r, v)?, close)?.rps_per_core);
    finite(get(peer.with(L7System::Mesh))? / get(peer)?)
}

/// One line per ratio, mesh over each peer in each configuration (what `--only l7` prints).
pub fn ratio_lines(r: &L7Result) -> Vec<String> {
    let mut out = Vec::new();
    if let Some((mu, mk)) = row(r, L7System::Mesh).and_then(|m| m.instructions) {
        out.push(format!(
            "l7 instructions per request mesh: {} user + {} kernel",
            f(mu, 0),
            f(mk, 0)
        ));
        for x in r.rows.iter().filter(|x| x.system != L7System::Mesh) {
            if let Some((u, k)) = x.instructions {
                out.push(format!(
                    "l7 instructions per request mesh/{}: {}",
                    x.system.short(),
                    f((mu + mk) / (u + k), 2)
                ));
            }
        }
    }
    for x in r.rows.iter().filter(|x| x.system != L7System::Mesh) {
        for (close, what) in [(false, "keep-alive"), (true, "new connection")] {
            if let Some(v) = variant_ratio(r, x.variant, close) {
                out.push(format!(
                    "l7 {what} per core{} mesh/{}: {}",
                    x.variant.class(),
                    x.system.short(),
                    f(v, 2)
                ));
            }
        }
        let p99 = |v: Variant| finite(variant_row(r, v)?.fixed.as_ref()?.p99);
        let p999 = |v: Variant| finite(variant_row(r, v)?.fixed.as_ref()?.p999);
        let mesh = x.variant.with(L7System::Mesh);
        if let (Some(m), Some(p)) = (p99(mesh), p99(x.variant)) {
            out.push(format!(
                "l7 p99 at a fixed rate{} mesh/{}: {}",
                x.variant.class(),
                x.system.short(),
                f(m / p, 2)
            ));
        }
        if let (Some(m), Some(p)) = (p999(mesh), p999(x.variant)) {
            out.push(format!(
                "l7 p99.9 at a fixed rate{} mesh/{}: {}",
                x.variant.class(),
                x.system.short(),
                f(m / p, 2)
            ));
        }
    }
    out
}

pub(super) fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// mesh's requests/s per busy proxy core divided by `peer`'s (keep-alive, close).
pub fn per_core_ratio(r: &L7Result, peer: L7System, close: bool) -> Option<f64> {
    let get = |s| {
        let x = row(r, s)?;
        let l = if close {
            x.close.as_ref()
        } else {
            x.keepalive.as_ref()
        }?;
        finite(l.rps_per_core)
    };
    finite(get(L7System::Mesh)? / get(peer)?)
}

/// mesh's p99 at the fixed rate divided by `peer`'s.
pub fn p99_ratio(r: &L7Result, peer: L7System) -> Option<f64> {
    let get = |s| finite(row(r, s)?.fixed.as_ref()?.p99);
    finite(get(L7System::Mesh)? / get(peer)?)
}

pub(super) fn opt(v: Option<f64>, d: usize) -> String {
    v.map(|x| f(x, d)).unwrap_or_else(|| "n/a".into())
}

pub(super) fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "met",
        Some(false) => "**not met**",
        None => "not measured",
    }
}

/// The L7 rows of the summary table.
pub fn summary_rows(w: &mut String, r: &Result<L7Result, String>) {
    let r = r.as_ref().ok();
    for peer in [L7System::Envoy, L7System::Nginx, L7System::Haproxy] {
        let ka = r.and_then(|r| per_core_ratio(r, peer, false));
        let cl = r.and_then(|r| per_core_ratio(r, peer, true));
        let ok = match (ka, cl) {
            (Some(a), Some(b)) => Some(a >= 1.0 && b >= 1.0),
            (Some(a), None) | (None, Some(a)) => Some(a >= 1.0),
            _ => None,
        };
        let _ = writeln!(
            w,
            "| L7 requests/s per core >= {}'s | mesh/{0}: {}x keep-alive, {}x new connection per request | {} |",
            peer.short(),
            opt(ka, 2),
            opt(cl, 2),
            verdict(ok)
        );
    }
    for peer in [L7System::Nginx, L7System::Haproxy] {
        let logged = Variant {
            log: true,
            ..Variant::base(peer)
        };
        let ka = r.and_then(|r| variant_ratio(r, logged, false));
        let cl = r.and_then(|r| variant_ratio(r, logged, true));
        let ok = match (ka, cl) {
            (Some(a), Some(b)) => Some(a >= 1.0 && b >= 1.0),
            (Some(a), None) | (None, Some(a)) => Some(a >= 1.0),
            _ => None,
        };
        let _ = writeln!(
            w,
            "| L7 requests/s per core >= {}'s, access log on for both | mesh/{0}: {}x keep-alive, {}x new connection per request | {} |",
            peer.short(),
            opt(ka, 2),
            opt(cl, 2),
            verdict(ok)
        );
    }
    let e = r.and_then(|r| p99_ratio(r, L7System::Envoy));
    let n = r.and_then(|r| p99_ratio(r, L7System::Nginx));
    let mesh_p99 = r.and_then(|r| finite(row(r, L7System::Mesh)?.fixed.as_ref()?.p99));
    let ok = match (e, n) {
        (Some(a), Some(b)) => Some(a <= 1.0 && b <= 1.0),
        (Some(a), None) | (None, Some(a)) => Some(a <= 1.0),
        _ => None,
    };
    let _ = writeln!(
        w,
        "| L7 p99 at a fixed rate no worse than Envoy's and nginx's | mesh p99 {} us; mesh/Envoy {}x, mesh/nginx {}x | {} |",
        opt(mesh_p99, 0),
        opt(e, 2),
        opt(n, 2),
        verdict(ok)
    );
}

/// summary.json entries.
pub fn summary_json(r: &Result<L7Result, String>) -> Vec<(&'static str, Option<f64>)> {
    let r = r.as_ref().ok();
    vec![
        (
            "l7_mesh_vs_envoy_keepalive_per_core",
            r.and_then(|r| per_core_ratio(r, L7System::Envoy, false)),
        ),
        (
            "l7_mesh_vs_nginx_keepalive_per_core",
            r.and_then(|r| per_core_ratio(r, L7System::Nginx, false)),
        ),
        (
            "l7_mesh_vs_envoy_close_per_core",
            r.and_then(|r| per_core_ratio(r, L7System::Envoy, true)),
        ),
        (
            "l7_mesh_vs_nginx_close_per_core",
            r.and_then(|r| per_core_ratio(r, L7System::Nginx, true)),
        ),
        (
            "l7_mesh_keepalive_rps",
            r.and_then(|r| finite(row(r, L7System::Mesh)?.keepalive.as_ref()?.rps)),
        ),
        (
            "l7_mesh_p99_us",
            r.and_then(|r| finite(row(r, L7System::Mesh)?.fixed.as_ref()?.p99)),
        ),
        (
            "l7_p99_mesh_vs_envoy",
            r.and_then(|r| p99_ratio(r, L7System::Envoy)),
        ),
        (
            "l7_p99_mesh_vs_nginx",
            r.and_then(|r| p99_ratio(r, L7System::Nginx)),
        ),
    ]
}
