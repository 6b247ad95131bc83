//! `meshctl validate`: offline validation of files (no daemon), like `istioctl validate`.

use anyhow::{bail, Result};
use mesh_user::{
    config,
    resolve::{self, NodeContext},
};

use crate::inputs::Files;

/// `meshctl validate` arguments.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    meshctl validate -f config/bookinfo/\n  \
    meshctl validate -f se.yaml -f vs.yaml          # checked together (cross references)")]
pub struct Args {
    #[command(flatten)]
    files: Files,
}

/// Validates the files together; prints notices and warnings, fails on any error.
pub fn run(args: Args) -> Result<()> {
    validate(&args.files)
}

fn validate(files: &Files) -> Result<()> {
    let mut set = config::ResourceSet::default();
    let mut errors = Vec::new();
    for doc in files.read()? {
        match config::parse_str(&doc.source, &doc.yaml) {
            Ok(parsed) => {
                set.resources.extend(parsed.resources);
                set.notices.extend(parsed.notices);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    for notice in &set.notices {
        eprintln!("{notice}");
    }
    let mut warnings = Vec::new();
    if errors.is_empty() {
        // Offline there is no node: Gateways are checked but bound to no address.
        match resolve::resolve(
            &set,
            &NodeContext {
                node_addresses: vec![],
            },
        ) {
            Ok(model) => warnings = model.warnings,
            Err(e) => {
                warnings = e.warnings().to_vec();
                errors.push(e.to_string());
            }
        }
    }
    for warning in &warnings {
        eprintln!("{warning}");
    }
    if !errors.is_empty() {
        bail!("validation failed:\n{}", errors.join("\n"));
    }
    match warnings.len() {
        0 => println!("{} resources valid", set.resources.len()),
        n => println!("{} resources valid, {n} warnings", set.resources.len()),
    }
    Ok(())
}
