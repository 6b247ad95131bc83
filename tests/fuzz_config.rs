//! Fuzz target `config`: random and mutated Istio YAML through meshd's own path, parse ->
//! validate -> resolve -> compile (`mesh_user::config::parse_str`, `compile_rules`).
//!
//! Seeds: `tests/fuzz-corpus/config/`, every YAML file under `config/`, the bad-input and
//! warn-input corpora of mesh-user, and each `config/` directory joined into one bundle.
//! Invariants, for every input:
//! - nothing panics;
//! - a rejection is a precise error: it names the input file, and no line of it is empty;
//! - an accepted input compiles, and it round-trips: the resources written back as YAML (what
//!   meshd's state file holds) parse and compile to the same state.

use std::{
    net::IpAddr,
    sync::atomic::{AtomicU64, Ordering},
};

use mesh_tests::fuzz::{self, mutate, Budget, Corpus};
use mesh_user::{
    compile::{compile_rules, NodeContext},
    config::{parse_own_state, parse_str},
};
use proptest::{collection::vec, prelude::*};

/// The file name every input is parsed as (errors must name it).
const LABEL: &str = "fuzz-input.yaml";

/// Words that make YAML and Istio resources go wrong in interesting ways.
const DICTIONARY: &[&str] = &[
    "-1",
    "0",
    "65536",
    "4294967296",
    "18446744073709551616",
    "1e309",
    "-0",
    "0x10",
    "null",
    "~",
    "[]",
    "{}",
    "\"\"",
    "''",
    "*a",
    "&a ",
    "<<: *a",
    "!!binary AAAA",
    "!!str",
    "---\n",
    "\n- ",
    ": ",
    "\n  ",
    "\t",
    "\u{0}",
    "é",
    "\u{feff}",
    "weight",
    "subset",
    "host",
    "hosts",
    "198.18.0.1",
    "198.18.100.1",
    "2001:db8::1",
    "::",
    "999.1.1.1",
    "198.18.0.0/15",
    "VirtualService",
    "DestinationRule",
    "ServiceEntry",
    "Gateway",
    "Sidecar",
    "networking.istio.io/v1",
    "networking.istio.io/v1alpha3",
    "http",
    "tcp",
    "tls",
    "route",
    "destination",
    "match",
    "regex: \"(\"",
    "exact",
    "prefix",
    "1s",
    "-1s",
    "99999999999h",
    "0.5",
    "true",
    "TCP",
    "HTTP",
    "HTTP2",
    "UDP",
    "port",
    "number",
    "targetPort",
    "mirror",
    "mirrorPercentage",
    "timeout",
    "retries",
    "fault",
    "abort",
    "delay",
    "tableSize",
    "consistentHash",
    "maglev",
    "loadBalancer",
    "subsets",
    "labels",
    "endpoints",
    "addresses",
    "resolution",
    "STATIC",
    "DNS",
    "gateways",
    "mesh",
    "redirect",
    "rewrite",
    "directResponse",
    "headers",
    "corsPolicy",
    "outlierDetection",
    "connectionPool",
];

fn node() -> NodeContext {
    NodeContext {
        node_addresses: vec!["198.18.0.1".parse::<IpAddr>().expect("address")],
    }
}

/// A rejection must say where: the file, on every line that says something.
fn precise(what: &str, error: &str) -> Result<(), String> {
    if error.trim().is_empty() {
        return Err(format!("{what} error is empty"));
    }
    for line in error.lines() {
        if line.trim().is_empty() {
            return Err(format!("{what} error has an empty line: {error:?}"));
        }
    }
    if !error.contains(LABEL) {
        return Err(format!("{what} error does not name the file: {error}"));
    }
    Ok(())
}

/// Inputs accepted so far (shows the round-trip invariant was exercised).
static ACCEPTED: AtomicU64 = AtomicU64::new(0);

fn check(input: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(input);
    let set = match parse_str(LABEL, &text) {
        Ok(set) => set,
        Err(e) => return precise("parse", &e.to_string()),
    };
    let node = node();
    let state = match compile_rules(&set, &node) {
        Ok(state) => state,
        Err(e) => return precise("validation/compile", &e.to_string()),
    };
    // Accepted: what meshd would persist must come back as the same rules (a file of skipped
    // documents only, e.g. another API group, holds nothing to persist).
    if set.resources.is_empty() {
        return Ok(());
    }
    let yaml = set.to_yaml();
    let again = parse_own_state(LABEL, &yaml)
        .map_err(|e| format!("accepted resources written back do not parse: {e}\n{yaml}"))?;
    let state_again = compile_rules(&again, &node)
        .map_err(|e| format!("accepted resources written back do not compile: {e}\n{yaml}"))?;
    ACCEPTED.fetch_add(1, Ordering::Relaxed);
    if state_again.services != state.services {
        return Err(format!(
            "accepted resources compile differently once written back:\n{yaml}"
        ));
    }
    Ok(())
}

/// Every `config/` directory's YAML joined into one multi-document bundle.
fn bundles() -> Vec<Vec<u8>> {
    let root = fuzz::repo_root().join("config");
    let mut dirs = vec![root.clone()];
    let mut out = Vec::new();
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut files: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        let mut bundle = Vec::new();
        for f in files {
            if f.is_dir() {
                dirs.push(f);
            } else if f.extension().is_some_and(|e| e == "yaml") {
                bundle.extend(std::fs::read(&f).unwrap_or_default());
                bundle.extend_from_slice(b"\n---\n");
            }
        }
        if !bundle.is_empty() {
            out.push(bundle);
        }
    }
    out
}

fn strategy(corpus: &Corpus) -> impl Strategy<Value = Vec<u8>> {
    let mut seeds = corpus.seeds();
    seeds.extend(bundles());
    let words = vec(0..DICTIONARY.len(), 0..64).prop_map(|picks| {
        picks
            .into_iter()
            .map(|i| DICTIONARY[i])
            .collect::<Vec<_>>()
            .join(" ")
            .into_bytes()
    });
    prop_oneof![
        8 => mutate::mutated(seeds, DICTIONARY),
        1 => words,
        1 => vec(any::<u8>(), 0..512),
    ]
}

#[test]
fn config_yaml_never_panics_and_accepted_rules_compile() {
    let corpus = Corpus::config();
    let report = fuzz::run(&corpus, Budget::from_env(300), strategy(&corpus), check);
    eprintln!(
        "config: {} inputs accepted and round-tripped",
        ACCEPTED.load(Ordering::Relaxed)
    );
    report.assert_clean();
}
