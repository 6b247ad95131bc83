//! The fleet verbs: `meshctl get nodes`, `meshctl status --fleet`, `meshctl stats --fleet`.
//! All read meshd's `/v1/fleet` (node records from etcd plus this node's own view).

use anyhow::Result;
use mesh_user::{
    admin::client::AdminClient,
    fleet::{view, FleetView},
};

use crate::Output;

/// `meshctl get nodes` and `meshctl status --fleet`: every node, its revision and state.
pub async fn nodes(client: &AdminClient, output: Output) -> Result<()> {
    let view: FleetView = client.get("/v1/fleet").await?;
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print!("{}", view::render_nodes(&view));
    }
    Ok(())
}

/// `meshctl stats --fleet`: the observed split per service summed over the nodes.
pub async fn stats(client: &AdminClient, output: Output) -> Result<()> {
    let view: FleetView = client.get("/v1/fleet").await?;
    if output == Output::Json {
        let split = view::fleet_split(&view);
        println!("{}", serde_json::to_string_pretty(&split)?);
    } else {
        print!("{}", view::render_split(&view));
    }
    Ok(())
}
