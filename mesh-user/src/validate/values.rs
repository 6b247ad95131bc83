//! Parsers and predicates for field values (ports, addresses, names, protocols), shared by
//! validation and compile so both read a value the same way.

use std::net::IpAddr;

use crate::compile::L4Protocol;

/// A port number in 1..=65535.
pub(crate) fn port(number: i64) -> Result<u16, String> {
    u16::try_from(number)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("port {number} is out of range, expected 1..=65535"))
}

/// An IP address with an optional prefix length (`198.18.0.0/15`).
pub(crate) fn cidr(text: &str) -> Result<(IpAddr, u8), String> {
    let (address, prefix) = match text.split_once('/') {
        Some((address, prefix)) => (address, Some(prefix)),
        None => (text, None),
    };
    let ip: IpAddr = address
        .parse()
        .map_err(|_| format!("`{text}` is not an IP address or CIDR"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(prefix) => prefix
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("`{text}` has a bad prefix length, expected 0..={max}"))?,
    };
    Ok((ip, prefix))
}

/// A ServiceEntry VIP: an address, or a CIDR covering exactly one address.
pub(crate) fn vip(text: &str) -> Result<IpAddr, String> {
    let (ip, prefix) = cidr(text)?;
    let single = if ip.is_ipv4() { 32 } else { 128 };
    if prefix != single {
        return Err(format!(
            "`{text}` is a range; a VIP must be one address (a CIDR only as /{single})"
        ));
    }
    Ok(ip)
}

/// True when `ip` lies in `network/prefix`.
pub(crate) fn in_subnet(ip: IpAddr, (network, prefix): (IpAddr, u8)) -> bool {
    match (ip, network) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

/// "IPv4" or "IPv6".
pub(crate) fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

/// Istio protocol names mesh knows, upper-case, with their transport.
const PROTOCOLS: [(&str, L4Protocol); 11] = [
    ("TCP", L4Protocol::Tcp),
    ("HTTP", L4Protocol::Tcp),
    ("HTTP2", L4Protocol::Tcp),
    ("GRPC", L4Protocol::Tcp),
    ("GRPC-WEB", L4Protocol::Tcp),
    ("HTTPS", L4Protocol::Tcp),
    ("TLS", L4Protocol::Tcp),
    ("MONGO", L4Protocol::Tcp),
    ("MYSQL", L4Protocol::Tcp),
    ("REDIS", L4Protocol::Tcp),
    ("UDP", L4Protocol::Udp),
];

/// Transport of an Istio protocol name (case-insensitive, as Istio parses it); absent means TCP.
pub(crate) fn protocol(name: Option<&str>) -> Result<L4Protocol, String> {
    let Some(name) = name else {
        return Ok(L4Protocol::Tcp);
    };
    PROTOCOLS
        .iter()
        .find(|(known, _)| known.eq_ignore_ascii_case(name))
        .map(|(_, l4)| *l4)
        .ok_or_else(|| {
            format!(
                "unknown protocol `{name}`, expected one of {}",
                PROTOCOLS.map(|(n, _)| n).join(", ")
            )
        })
}

/// RFC 1123 label: lower-case alphanumerics and '-', alphanumeric at both ends, 1..=63 chars.
pub(crate) fn is_dns_label(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 63
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !text.starts_with('-')
        && !text.ends_with('-')
}

/// RFC 1123 subdomain: dot-separated labels, at most 253 chars.
pub(crate) fn is_dns_subdomain(text: &str) -> bool {
    text.len() <= 253 && text.split('.').all(is_dns_label)
}

/// An Istio host: a DNS name, optionally with a leading `*.` wildcard, or `*` alone when
/// `allow_star` (gateway-bound VirtualServices). Upper case is rejected as Istio does.
pub(crate) fn host(text: &str, allow_star: bool) -> Result<(), String> {
    if text == "*" {
        return if allow_star {
            Ok(())
        } else {
            Err("`*` is not allowed here".into())
        };
    }
    let name = text.strip_prefix("*.").unwrap_or(text);
    if is_dns_subdomain(name) {
        Ok(())
    } else {
        Err(format!(
            "`{text}` is not a valid host (lower-case DNS name, optionally starting with `*.`)"
        ))
    }
}

/// True for primes (trial division is plenty for table sizes up to 65537).
pub(crate) fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vips_must_be_single_addresses() {
        assert!(vip("198.18.100.1").is_ok());
        assert!(vip("198.18.100.1/32").is_ok());
        assert!(vip("2001:db8::1/128").is_ok());
        assert!(vip("198.18.0.0/15").unwrap_err().contains("range"));
        assert!(vip("198.18.0.1/33").is_err());
        assert!(vip("example.com").is_err());
    }

    #[test]
    fn subnets_contain_their_addresses() {
        let net = cidr("198.18.0.0/15").unwrap();
        assert!(in_subnet("198.19.255.255".parse().unwrap(), net));
        assert!(!in_subnet("198.20.0.0".parse().unwrap(), net));
        assert!(in_subnet(
            "2001:db8::1".parse().unwrap(),
            cidr("::/0").unwrap()
        ));
        assert!(!in_subnet(
            "198.18.0.1".parse().unwrap(),
            cidr("::/0").unwrap()
        ));
    }

    #[test]
    fn primes() {
        assert!(is_prime(4093) && is_prime(65537) && is_prime(2));
        assert!(!is_prime(4096) && !is_prime(1) && !is_prime(0));
    }

    #[test]
    fn hosts() {
        assert!(host("reviews", false).is_ok());
        assert!(host("*.example.com", false).is_ok());
        assert!(host("*", true).is_ok());
        assert!(host("*", false).is_err());
        assert!(host("Reviews", false).is_err());
        assert!(host("a..b", false).is_err());
    }
}
