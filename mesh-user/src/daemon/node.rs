//! Facts about the node meshd runs on: the addresses of the interfaces it is attached to (a
//! Gateway listens on these).

use std::net::IpAddr;

use anyhow::{bail, Context, Result};

/// Unicast addresses configured on `interfaces` (IPv6 link-local addresses excluded: a Gateway
/// is reached through routable addresses).
pub fn interface_addresses(interfaces: &[String]) -> Result<Vec<IpAddr>> {
    for interface in interfaces {
        nix::net::if_::if_nametoindex(interface.as_str())
            .with_context(|| format!("interface {interface} does not exist"))?;
    }
    let mut out = Vec::new();
    for ifaddr in nix::ifaddrs::getifaddrs().context("listing interface addresses")? {
        if !interfaces.contains(&ifaddr.interface_name) {
            continue;
        }
        let Some(address) = ifaddr.address else {
            continue;
        };
        if let Some(v4) = address.as_sockaddr_in() {
            out.push(IpAddr::V4(v4.ip()));
        } else if let Some(v6) = address.as_sockaddr_in6() {
            let ip = v6.ip();
            if (ip.segments()[0] & 0xffc0) != 0xfe80 {
                out.push(IpAddr::V6(ip));
            }
        }
    }
    out.sort();
    out.dedup();
    if interfaces.is_empty() {
        bail!("no interface given");
    }
    Ok(out)
}
