//! Which interfaces lead straight into another network namespace: veth and netkit devices whose
//! peer lives elsewhere (a container's end). TC hands a packet routed into such an interface to
//! the peer's ingress with `bpf_redirect_peer`, which skips the host end's transmit and the
//! backlog queue; the kernel drops it instead when the peer is in the same namespace, so only
//! interfaces this module confirms are listed for it.
//!
//! The answer comes from the link's `IFLA_LINK_NETNSID`, which the kernel includes exactly when
//! the peer's namespace differs from the device's own.

use rtnetlink::packet_route::link::LinkAttribute;

/// Drivers whose devices have a peer that `bpf_redirect_peer` can reach.
pub const PEER_DRIVERS: &[&str] = &["veth", "netkit"];

/// Whether the interface `ifindex` (driven by `driver`) has its peer in another network
/// namespace. Netlink runs on a short-lived current-thread runtime on its own thread, so this
/// works the same from async code and the startup path.
pub fn peer_in_other_namespace(ifindex: u32, driver: Option<&str>) -> Result<bool, String> {
    if !driver.is_some_and(|d| PEER_DRIVERS.contains(&d)) {
        return Ok(false);
    }
    std::thread::spawn(move || -> Result<bool, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async move {
            use futures_util::TryStreamExt;
            let (connection, handle, _) = rtnetlink::new_connection().map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            let mut links = handle.link().get().match_index(ifindex).execute();
            let link = links
                .try_next()
                .await
                .map_err(|e| format!("reading link {ifindex}: {e}"))?
                .ok_or_else(|| format!("link {ifindex} not found"))?;
            Ok(link
                .attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::LinkNetNsId(_))))
        })
    })
    .join()
    .map_err(|_| "netlink thread panicked".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_veth_and_netkit_are_asked_about() {
        // No netlink round trip for other drivers (index 0 does not exist).
        assert_eq!(peer_in_other_namespace(0, Some("virtio_net")), Ok(false));
        assert_eq!(peer_in_other_namespace(0, None), Ok(false));
    }

    #[test]
    fn loopback_is_not_a_peer_device() {
        // Asking about a real link that has no peer: lo (index 1) as if it were a veth.
        assert_eq!(peer_in_other_namespace(1, Some("veth")), Ok(false));
    }
}
