//! Local routes for L7 VIPs: the kernel delivers VIP:port to the proxy's listener only when the
//! VIP is local in meshd's network namespace (`ip route add local VIP dev lo table local`, for
//! IPv4 and IPv6). Addresses already on an interface (Gateway node addresses) need nothing.
//!
//! Netlink requests run on a short-lived current-thread runtime on their own thread, so they
//! work the same from async code, a blocking task or the startup path.

use std::{collections::BTreeSet, net::IpAddr};

use rtnetlink::{
    packet_route::route::{RouteScope, RouteType},
    RouteMessageBuilder,
};

/// Errors changing local routes.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// Netlink refused the change.
    #[error("{action} the local route for {ip}: {message}")]
    Netlink {
        /// "adding" or "removing".
        action: &'static str,
        /// The VIP.
        ip: IpAddr,
        /// The kernel's answer.
        message: String,
    },
}

/// Local routes this meshd added (and must remove).
#[derive(Debug, Default)]
pub struct LocalRoutes {
    added: BTreeSet<IpAddr>,
    /// Routing table of the routes (`None`: the local table).
    table: Option<u32>,
}

/// The kernel's local routing table.
const RT_TABLE_LOCAL: u32 = 255;
/// The kernel's main routing table.
const RT_TABLE_MAIN: u32 = 254;

impl LocalRoutes {
    /// Local routes kept in the main table, apart from the proxy's (in the local table), so
    /// that neither owner removes the other's route for the same address.
    pub fn in_main_table() -> Self {
        Self {
            added: BTreeSet::new(),
            table: Some(RT_TABLE_MAIN),
        }
    }

    fn table(&self) -> u32 {
        self.table.unwrap_or(RT_TABLE_LOCAL)
    }

    /// Makes `ip` local unless an interface already has it.
    pub fn ensure(&mut self, ip: IpAddr) -> Result<(), RouteError> {
        if self.added.contains(&ip) || configured_on_interface(ip) {
            return Ok(());
        }
        change(ip, true, self.table())?;
        self.added.insert(ip);
        Ok(())
    }

    /// Removes the route this meshd added for `ip`, if any.
    pub fn remove(&mut self, ip: IpAddr) -> Result<(), RouteError> {
        if self.added.remove(&ip) {
            change(ip, false, self.table())?;
        }
        Ok(())
    }

    /// Removes every route this meshd added (at shutdown).
    pub fn remove_all(&mut self) {
        for ip in std::mem::take(&mut self.added) {
            if let Err(e) = change(ip, false, self.table()) {
                tracing::warn!("{e}");
            }
        }
    }
}

fn configured_on_interface(ip: IpAddr) -> bool {
    nix::ifaddrs::getifaddrs()
        .map(|addrs| {
            addrs.filter_map(|a| a.address).any(|a| {
                a.as_sockaddr_in().map(|v4| IpAddr::V4(v4.ip())) == Some(ip)
                    || a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())) == Some(ip)
            })
        })
        .unwrap_or(false)
}

fn change(ip: IpAddr, add: bool, table: u32) -> Result<(), RouteError> {
    let action = if add { "adding" } else { "removing" };
    let fail = |message: String| RouteError::Netlink {
        action,
        ip,
        message,
    };
    let lo = nix::net::if_::if_nametoindex("lo").map_err(|e| fail(format!("no loopback: {e}")))?;
    let prefix = if ip.is_ipv4() { 32 } else { 128 };
    let message = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(ip, prefix)
        .map_err(|e| fail(e.to_string()))?
        .kind(RouteType::Local)
        .scope(RouteScope::Host)
        .table_id(table)
        .output_interface(lo)
        .build();
    std::thread::spawn(move || -> Result<(), String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async move {
            let (connection, handle, _) = rtnetlink::new_connection().map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            let result = if add {
                handle.route().add(message).replace().execute().await
            } else {
                handle.route().del(message).execute().await
            };
            result.map_err(|e| e.to_string())
        })
    })
    .join()
    .map_err(|_| fail("netlink thread panicked".into()))?
    .map_err(fail)
}
