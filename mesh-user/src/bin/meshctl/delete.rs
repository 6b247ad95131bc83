//! `meshctl delete`: remove resources applied with meshctl, by file or by kind and name.

use anyhow::{bail, Result};
use mesh_user::{
    admin::{client::AdminClient, ApplyResponse, DeleteRequest, ResourceRef},
    config,
};

use crate::{apply::print_changes, get::canonical_kind, inputs::read_inputs};

/// `meshctl delete` arguments.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    meshctl delete -f vs.yaml\n  \
    meshctl delete vs reviews\n  \
    meshctl delete dr reviews -n bookinfo")]
pub struct Args {
    /// Files naming the resources to delete.
    #[arg(short = 'f', long = "filename", value_name = "FILE|DIR|-", conflicts_with_all = ["kind", "name"])]
    files: Vec<String>,
    /// Kind (virtualservice|vs, destinationrule|dr, serviceentry|se, gateway|gw).
    kind: Option<String>,
    /// Name.
    name: Option<String>,
    /// Namespace.
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    /// Check only.
    #[arg(long)]
    dry_run: bool,
}

/// Deletes the named resources (all or nothing) and prints what changed.
pub async fn run(client: &AdminClient, args: Args) -> Result<()> {
    let resources = if !args.files.is_empty() {
        let mut refs = Vec::new();
        for doc in read_inputs(&args.files)? {
            let set =
                config::parse_str(&doc.source, &doc.yaml).map_err(|e| anyhow::anyhow!("{e}"))?;
            refs.extend(set.resources.iter().map(|r| ResourceRef {
                kind: r.kind.kind_name().into(),
                namespace: r.meta.namespace.clone(),
                name: r.meta.name.clone(),
            }));
        }
        refs
    } else {
        let (Some(kind), Some(name)) = (args.kind, args.name) else {
            bail!("say what to delete: `meshctl delete -f FILE` or `meshctl delete KIND NAME`");
        };
        vec![ResourceRef {
            kind: canonical_kind(&kind)?.into(),
            namespace: args.namespace,
            name,
        }]
    };
    let answer: ApplyResponse = client
        .post(
            "/v1/delete",
            &DeleteRequest {
                resources,
                dry_run: args.dry_run,
            },
        )
        .await?;
    print_changes(&answer);
    Ok(())
}
