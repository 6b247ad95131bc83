//! Section 5, table side: disruption when 1 of N equally weighted backends is removed, measured
//! on meshd's own weighted Maglev builder (`mesh-user/src/compile/maglev.rs`).
//!
//! That file is compiled into this binary as the module [`maglev`] rather than through a
//! dependency on the whole `mesh-user` crate: the builder is self-contained (it needs only
//! xxhash), and the benchmark then keeps building while other parts of meshd are being edited.
//!
//! A flow's backend is `table[hash(flow) % M]`, so with a uniform hash the share of flows that
//! move is exactly the share of table slots whose backend changes; the slots are compared
//! directly (all M of them), which is the expectation over every possible flow rather than a
//! sample. Flows of the removed backend must move (1/N, the ideal); the rest is disruption.

/// meshd's weighted Maglev builder, the very source file meshd compiles.
#[path = "../../mesh-user/src/compile/maglev.rs"]
#[allow(dead_code)]
pub mod maglev;

use maglev::build_table;

/// One point of the disruption curve.
#[derive(Clone, Debug)]
pub struct DisruptionPoint {
    pub backends: usize,
    pub table_size: u32,
    /// Percent of flows that change backend.
    pub moved_pct: f64,
    /// 100/N.
    pub ideal_pct: f64,
    /// The table size is the one meshd uses for N backends when the rules set none.
    pub is_default: bool,
}

fn key(i: usize) -> String {
    format!("198.18.{}.{}:8080", 10 + i / 250, 1 + i % 250)
}

/// Removes the middle backend of `n` and compares the tables slot by slot.
pub fn disruption(n: usize, m: u32) -> DisruptionPoint {
    let keys: Vec<String> = (0..n).map(key).collect();
    let before = build_table(&keys, &vec![1.0; n], m);
    let removed = n / 2;
    let kept: Vec<String> = keys
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != removed)
        .map(|(_, k)| k.clone())
        .collect();
    let after = build_table(&kept, &vec![1.0; n - 1], m);
    let moved = before
        .iter()
        .zip(after.iter())
        .filter(|(b, a)| keys[**b as usize] != kept[**a as usize])
        .count();
    DisruptionPoint {
        backends: n,
        table_size: m,
        moved_pct: 100.0 * moved as f64 / f64::from(m),
        ideal_pct: 100.0 / n as f64,
        is_default: m == maglev::default_table_size(n),
    }
}
