//! `meshctl apply`: send Istio resources to meshd, all or nothing; and the change report that
//! `apply` and `delete` share.

use anyhow::Result;
use mesh_user::admin::{client::AdminClient, ApplyRequest, ApplyResponse};

use crate::inputs::Files;

/// `meshctl apply` arguments.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    meshctl apply -f config/tcp-echo/\n  \
    meshctl apply -f se.yaml -f dr.yaml -f vs.yaml\n  \
    cat vs.yaml | meshctl apply -f -\n  \
    meshctl apply -f vs.yaml --dry-run              # check against the rules in force")]
pub struct Args {
    #[command(flatten)]
    files: Files,
    /// Validate and compile against the rules in force, change nothing.
    #[arg(long)]
    dry_run: bool,
}

/// Applies the files' resources; prints what changed and the warnings.
pub async fn run(client: &AdminClient, args: Args) -> Result<()> {
    let documents = args.files.read()?;
    let answer: ApplyResponse = client
        .post(
            "/v1/apply",
            &ApplyRequest {
                documents,
                dry_run: args.dry_run,
            },
        )
        .await?;
    print_changes(&answer);
    Ok(())
}

/// One line per changed resource, kubectl style, then what is in force.
pub fn print_changes(answer: &ApplyResponse) {
    for warning in &answer.warnings {
        eprintln!("{warning}");
    }
    for change in &answer.changes {
        // "VirtualService default/reviews" -> "virtualservice.networking.istio.io/reviews".
        let (kind, qualified) = change
            .resource
            .split_once(' ')
            .unwrap_or((&change.resource, ""));
        let name = qualified.rsplit('/').next().unwrap_or(qualified);
        println!(
            "{}.networking.istio.io/{name} {}{}",
            kind.to_lowercase(),
            change.action,
            if answer.dry_run { " (dry run)" } else { "" }
        );
    }
    if !answer.dry_run {
        eprintln!(
            "in force: {} service addresses, {} backends ({} written, {} us)",
            answer.services, answer.backends, answer.written, answer.duration_us
        );
    }
}
