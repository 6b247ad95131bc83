//! Maglev tables already built, keyed by everything a table depends on (backend keys, shares,
//! size): an apply that changes one service rebuilds one table, and a restart that compiles the
//! rules twice (pool sizing, then the install) builds each table once.
//!
//! The cache is process-wide and bounded by the entries it holds (it is emptied when it grows
//! past [`MAX_CACHED_ENTRIES`]); the tables are a pure function of the key, so a hit is always
//! the table [`maglev::build_table`] would build.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
};

use super::maglev;

/// Table entries the cache holds at most (4 bytes each: 64 MiB).
pub const MAX_CACHED_ENTRIES: usize = 16 << 20;

#[derive(Default)]
struct Cache {
    tables: HashMap<u128, Arc<Vec<u32>>>,
    entries: usize,
}

fn cache() -> &'static Mutex<Cache> {
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// Everything [`maglev::build_table`] reads, hashed.
fn key(keys: &[String], shares: &[f64], size: u32) -> u128 {
    let mut bytes = Vec::with_capacity(8 + keys.len() * 32);
    bytes.extend_from_slice(&size.to_le_bytes());
    for (key, share) in keys.iter().zip(shares) {
        bytes.extend_from_slice(&(key.len() as u32).to_le_bytes());
        bytes.extend_from_slice(key.as_bytes());
        bytes.extend_from_slice(&share.to_bits().to_le_bytes());
    }
    xxhash_rust::xxh3::xxh3_128(&bytes)
}

/// The table [`maglev::build_table`] builds for these inputs, built at most once.
pub fn table(keys: &[String], shares: &[f64], size: u32) -> Vec<u32> {
    let key = key(keys, shares, size);
    let cache = cache();
    if let Some(table) = cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .tables
        .get(&key)
        .cloned()
    {
        return table.as_ref().clone();
    }
    // Built outside the lock: tables of different services build in parallel when callers do.
    let table = maglev::build_table(keys, shares, size);
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    if cache.entries + table.len() > MAX_CACHED_ENTRIES {
        cache.tables.clear();
        cache.entries = 0;
    }
    if table.len() <= MAX_CACHED_ENTRIES {
        cache.entries += table.len();
        cache.tables.insert(key, Arc::new(table.clone()));
    }
    table
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cached_table_is_the_built_one() {
        let keys: Vec<String> = (0..3).map(|i| format!("198.18.7.{i}:80")).collect();
        let shares = [0.5, 0.3, 0.2];
        let built = super::maglev::build_table(&keys, &shares, 1_009);
        assert_eq!(super::table(&keys, &shares, 1_009), built);
        assert_eq!(super::table(&keys, &shares, 1_009), built, "from the cache");
        assert_ne!(super::table(&keys, &[0.2, 0.3, 0.5], 1_009), built);
    }
}
