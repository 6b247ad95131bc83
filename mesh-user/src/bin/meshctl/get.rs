//! `meshctl get`: the resources in force (table, wide, YAML or JSON), and the fleet's nodes.

use anyhow::{bail, Result};
use mesh_user::admin::{
    client::AdminClient,
    services::{self, ServiceView},
    ResourceEntry,
};

use crate::{fleet, Output};

/// `meshctl get` arguments.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    meshctl get vs\n  \
    meshctl get se reviews -o yaml\n  \
    meshctl get all -o wide\n  \
    meshctl get services -o wide                    # address, port, kernel/proxy and why, endpoints\n  \
    meshctl get nodes                               # the fleet (meshd --etcd)")]
pub struct Args {
    /// Kind (virtualservice|vs, destinationrule|dr, serviceentry|se, gateway|gw, all), or
    /// services|svc (every service address: kernel path or proxy and why, subsets and endpoints
    /// with -o wide), or nodes (the fleet's nodes, with meshd --etcd).
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
    match kind.to_ascii_lowercase().as_str() {
        "nodes" | "node" | "no" => return fleet::nodes(client, output).await,
        "services" | "service" | "svc" => return services(client, name.as_deref(), output).await,
        _ => {}
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

/// `meshctl get services [NAME]`: every service address in force (or those of one host).
async fn services(client: &AdminClient, name: Option<&str>, output: Output) -> Result<()> {
    let mut views: Vec<ServiceView> = client.get("/v1/services").await?;
    if let Some(name) = name {
        let short = |h: &str| h.split('.').next().unwrap_or(h).to_string();
        views.retain(|v| v.name == name || short(&v.name) == short(name));
        if views.is_empty() {
            bail!("service {name} not found (`meshctl get services` lists them)");
        }
    }
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&views)?),
        Output::Yaml => print!("{}", serde_yaml::to_string(&views)?),
        Output::Table | Output::Wide if views.is_empty() => eprintln!("no services in force"),
        Output::Table | Output::Wide => {
            print!("{}", services::render(&views, output == Output::Wide))
        }
    }
    Ok(())
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
