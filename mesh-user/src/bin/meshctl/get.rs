//! `meshctl get`: the resources in force (table, wide, YAML or JSON), and the fleet's nodes.

use anyhow::{bail, Result};
use mesh_user::admin::{client::AdminClient, ResourceEntry};

use crate::{fleet, Output};

/// `meshctl get` arguments.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    meshctl get vs\n  \
    meshctl get se reviews -o yaml\n  \
    meshctl get all -o wide\n  \
    meshctl get nodes                               # the fleet (meshd --etcd)")]
pub struct Args {
    /// Kind (virtualservice|vs, destinationrule|dr, serviceentry|se, gateway|gw, all), or
    /// nodes (the fleet's nodes, with meshd --etcd).
    kind: String,
    /// Name (all when omitted).
    name: Option<String>,
    /// Namespace filter.
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
}

/// Lists what `args` asks for.
pub async fn run(client: &AdminClient, args: Args) -> Result<()> {
    let Args {
        kind,
        name,
        namespace,
        output,
    } = args;
    if matches!(kind.to_ascii_lowercase().as_str(), "nodes" | "node" | "no") {
        return fleet::nodes(client, output).await;
    }
    let mut path = String::from("/v1/resources?");
    if kind != "all" {
        path.push_str(&format!("kind={}&", canonical_kind(&kind)?));
    }
    if let Some(name) = &name {
        path.push_str(&format!("name={name}&"));
    }
    if let Some(ns) = &namespace {
        path.push_str(&format!("namespace={ns}&"));
    }
    let entries: Vec<ResourceEntry> = client.get(&path).await?;
    if entries.is_empty() && name.is_some() {
        bail!("{kind} {} not found", name.unwrap_or_default());
    }
    print_resources(&entries, output)
}

/// The resource kind a short or plural name stands for.
pub fn canonical_kind(kind: &str) -> Result<&'static str> {
    Ok(match kind.to_ascii_lowercase().as_str() {
        "vs" | "virtualservice" | "virtualservices" => "VirtualService",
        "dr" | "destinationrule" | "destinationrules" => "DestinationRule",
        "se" | "serviceentry" | "serviceentries" => "ServiceEntry",
        "gw" | "gateway" | "gateways" => "Gateway",
        other => bail!(
            "unknown kind `{other}`: expected virtualservice (vs), destinationrule (dr), \
             serviceentry (se), gateway (gw) or all"
        ),
    })
}

fn print_resources(entries: &[ResourceEntry], output: Output) -> Result<()> {
    match output {
        Output::Json => {
            let values: Vec<&serde_json::Value> = entries.iter().map(|e| &e.resource).collect();
            println!("{}", serde_json::to_string_pretty(&values)?);
        }
        Output::Yaml => {
            for e in entries {
                print!("---\n{}", serde_yaml::to_string(&e.resource)?);
            }
        }
        Output::Table | Output::Wide => {
            if entries.is_empty() {
                eprintln!("no resources found");
                return Ok(());
            }
            let wide = output == Output::Wide;
            println!(
                "{:<16} {:<24} {:<12} {:<6}{}",
                "KIND",
                "NAME",
                "NAMESPACE",
                "FROM",
                if wide { "  HOSTS / SOURCE" } else { "" }
            );
            for e in entries {
                let extra = if wide {
                    let spec = &e.resource["spec"];
                    let hosts = spec["hosts"]
                        .as_array()
                        .map(|h| {
                            h.iter()
                                .filter_map(|v| v.as_str())
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .or_else(|| spec["host"].as_str().map(str::to_string))
                        .unwrap_or_default();
                    format!("  {hosts}  {}", e.source)
                } else {
                    String::new()
                };
                println!(
                    "{:<16} {:<24} {:<12} {:<6}{extra}",
                    e.kind, e.name, e.namespace, e.layer
                );
            }
        }
    }
    Ok(())
}
