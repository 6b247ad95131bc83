//! Backend choice inside a cluster and outlier ejection.
//!
//! Per request: weighted round robin, weighted random, least request (power of two choices,
//! weighted picks) or a consistent hash (header, cookie, query parameter, client address) over a
//! weighted Maglev table, the same construction the kernel path uses. Ejected backends receive
//! nothing until their ejection time is up; when every backend is ejected the cluster is in
//! panic and all of them are used (Envoy's behaviour), since refusing everything helps no one.

use std::{
    sync::{
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use rand::Rng;

use crate::compile::{maglev, LoadBalancerPlan, OutlierPlan};

/// Run-time state of one backend.
#[derive(Debug)]
pub struct BackendState {
    /// Where it listens.
    pub address: std::net::SocketAddr,
    /// Endpoint weight (> 0).
    pub weight: u32,
    /// Requests in flight to it (least request).
    pub active: AtomicU32,
    /// Requests sent to it (stats).
    pub requests: AtomicU64,
    outlier: Mutex<OutlierState>,
}

/// Consecutive-error counters and ejection of one backend.
#[derive(Debug, Default, Clone)]
pub struct OutlierState {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    times_ejected: u32,
}

/// What one try to a backend came to, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TryResult {
    /// A response with this status.
    Status(u16),
    /// Could not connect, reset, or no answer in time: counts as a gateway error (as Envoy's
    /// locally originated failures do when not split out).
    Failed,
}

impl OutlierState {
    /// Whether the backend is ejected at `now`; an expired ejection ends here.
    pub fn ejected(&mut self, now: Instant) -> bool {
        match self.ejected_until {
            Some(until) if until > now => true,
            Some(_) => {
                self.ejected_until = None;
                self.consecutive_5xx = 0;
                self.consecutive_gateway = 0;
                false
            }
            None => false,
        }
    }

    /// Counts a result; returns true when it crosses a threshold (the caller decides whether
    /// the ejection is allowed by maxEjectionPercent and then calls [`OutlierState::eject`]).
    pub fn record(&mut self, result: TryResult, policy: &OutlierPlan) -> bool {
        let (is_5xx, is_gateway) = match result {
            TryResult::Status(s) => (s >= 500, matches!(s, 502..=504)),
            TryResult::Failed => (true, true),
        };
        if is_5xx {
            self.consecutive_5xx += 1;
        } else {
            self.consecutive_5xx = 0;
        }
        if is_gateway {
            self.consecutive_gateway += 1;
        } else {
            self.consecutive_gateway = 0;
        }
        policy
            .consecutive_5xx
            .is_some_and(|n| self.consecutive_5xx >= n)
            || policy
                .consecutive_gateway_errors
                .is_some_and(|n| self.consecutive_gateway >= n)
    }

    /// Ejects for `base_ejection_time x times ejected` (Envoy's growing ejection). Like
    /// Envoy's ejection sweep, which runs every `interval` from `epoch` (the cluster's start),
    /// the backend comes back at the first sweep after that time.
    pub fn eject(&mut self, now: Instant, policy: &OutlierPlan, epoch: Instant) {
        self.times_ejected += 1;
        let until = now + policy.base_ejection_time * self.times_ejected.min(10);
        let interval = policy.interval.as_nanos().max(1);
        let sweeps = until.duration_since(epoch).as_nanos().div_ceil(interval);
        let at_sweep = u64::try_from(sweeps * interval)
            .map(|n| epoch + Duration::from_nanos(n))
            .unwrap_or(until);
        self.ejected_until = Some(at_sweep);
        self.consecutive_5xx = 0;
        self.consecutive_gateway = 0;
    }
}

impl BackendState {
    /// A backend with no history.
    pub fn new(address: std::net::SocketAddr, weight: u32) -> Self {
        Self {
            address,
            weight: weight.max(1),
            active: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            outlier: Mutex::new(OutlierState::default()),
        }
    }

    fn ejected(&self, now: Instant) -> bool {
        self.outlier
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ejected(now)
    }
}

/// Key material a consistent hash may use.
pub struct HashInput<'a> {
    /// Request headers.
    pub headers: &'a http::HeaderMap,
    /// Raw query string.
    pub query: Option<&'a str>,
    /// Client address.
    pub client: std::net::IpAddr,
    /// A cookie value generated for this request when the hash cookie was missing.
    pub generated_cookie: Option<&'a str>,
}

/// The backends of one cluster with the balancing state.
#[derive(Debug)]
pub struct Balancer {
    /// Backends (sorted by address, as compiled).
    pub backends: Vec<BackendState>,
    policy: LoadBalancerPlan,
    outlier: Option<OutlierPlan>,
    /// Weighted Maglev table for hashing policies.
    table: Vec<u32>,
    cursor: AtomicUsize,
    /// Start of the outlier sweeps.
    epoch: Instant,
}

/// Table size for L7 consistent hashing: prime, small enough to build per apply.
const HASH_TABLE_SIZE: u32 = 1021;

impl Balancer {
    /// Balancer over `backends` (address, weight).
    pub fn new(
        backends: &[(std::net::SocketAddr, u32)],
        policy: LoadBalancerPlan,
        outlier: Option<OutlierPlan>,
    ) -> Self {
        let hashing = matches!(
            policy,
            LoadBalancerPlan::HashHeader { .. }
                | LoadBalancerPlan::HashCookie { .. }
                | LoadBalancerPlan::HashSourceIp
                | LoadBalancerPlan::HashQueryParameter { .. }
        );
        let table = if hashing && !backends.is_empty() {
            let keys: Vec<String> = backends.iter().map(|(a, _)| a.to_string()).collect();
            let total: f64 = backends.iter().map(|(_, w)| f64::from(*w)).sum();
            let shares: Vec<f64> = backends
                .iter()
                .map(|(_, w)| f64::from(*w) / total)
                .collect();
            maglev::build_table(&keys, &shares, HASH_TABLE_SIZE)
        } else {
            Vec::new()
        };
        Self {
            backends: backends
                .iter()
                .map(|(a, w)| BackendState::new(*a, *w))
                .collect(),
            policy,
            outlier,
            table,
            cursor: AtomicUsize::new(0),
            epoch: Instant::now(),
        }
    }

    /// The hashing policy's cookie, if it is one (for Set-Cookie on generated values).
    pub fn policy(&self) -> &LoadBalancerPlan {
        &self.policy
    }

    /// Picks a backend index, avoiding `avoid` (the previous try's backend) when another
    /// eligible one exists. `None` only when the cluster has no backend.
    pub fn pick(&self, input: &HashInput, avoid: Option<usize>) -> Option<usize> {
        let n = self.backends.len();
        if n == 0 {
            return None;
        }
        // Ejections exist only with outlier detection; with none (or all ejected: panic
        // mode) every backend is eligible and nothing is allocated.
        let healthy: Option<Vec<bool>> = self.outlier.as_ref().and_then(|_| {
            let now = Instant::now();
            let h: Vec<bool> = self.backends.iter().map(|b| !b.ejected(now)).collect();
            (h.contains(&false) && h.contains(&true)).then_some(h)
        });
        let healthy_at = |i: usize| healthy.as_ref().is_none_or(|h| h[i]);
        let count = (0..n).filter(|i| healthy_at(*i)).count();
        let avoid = avoid.filter(|_| count > 1 && !self.is_hashing());
        let eligible = |i: usize| healthy_at(i) && Some(i) != avoid;
        let weight = |i: usize| u64::from(self.backends[i].weight);
        let total: u64 = (0..n).filter(|i| eligible(*i)).map(weight).sum();
        let nth_weighted = |mut point: u64| -> usize {
            let mut last = 0;
            for i in (0..n).filter(|i| eligible(*i)) {
                if point < weight(i) {
                    return i;
                }
                point -= weight(i);
                last = i;
            }
            last
        };
        let mut rng = rand::rng();
        let weighted = |rng: &mut rand::rngs::ThreadRng| nth_weighted(rng.random_range(0..total));
        Some(match &self.policy {
            LoadBalancerPlan::Random => weighted(&mut rng),
            LoadBalancerPlan::RoundRobin => {
                nth_weighted((self.cursor.fetch_add(1, Ordering::Relaxed) as u64) % total)
            }
            LoadBalancerPlan::LeastRequest => {
                let a = weighted(&mut rng);
                let b = weighted(&mut rng);
                let load = |i: usize| self.backends[i].active.load(Ordering::Relaxed);
                if load(b) < load(a) {
                    b
                } else {
                    a
                }
            }
            _ => match self.hash_key(input) {
                // No key (header absent): Envoy picks at random.
                None => weighted(&mut rng),
                Some(key) => {
                    let hash = xxhash_rust::xxh3::xxh3_64(key.as_bytes());
                    let start = (hash % self.table.len() as u64) as usize;
                    // Walk the table from the key's slot to the first eligible backend, so an
                    // ejected backend's keys spread over the others and come back after.
                    (0..self.table.len())
                        .map(|k| self.table[(start + k) % self.table.len()] as usize)
                        .find(|i| eligible(*i))
                        .unwrap_or_else(|| nth_weighted(0))
                }
            },
        })
    }

    fn is_hashing(&self) -> bool {
        !self.table.is_empty()
    }

    fn hash_key(&self, input: &HashInput) -> Option<String> {
        match &self.policy {
            LoadBalancerPlan::HashHeader { name } => input
                .headers
                .get(name.as_str())
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            LoadBalancerPlan::HashCookie { name, .. } => cookie(input.headers, name)
                .or(input.generated_cookie)
                .map(str::to_string),
            LoadBalancerPlan::HashQueryParameter { name } => {
                super::matching::query_values(input.query, name)
                    .next()
                    .map(str::to_string)
            }
            LoadBalancerPlan::HashSourceIp => Some(input.client.to_string()),
            _ => None,
        }
    }

    /// Counts a try's result for outlier detection and ejects when a threshold is crossed and
    /// maxEjectionPercent allows (at least one backend may always be ejected).
    pub fn record(&self, backend: usize, result: TryResult) {
        let Some(policy) = &self.outlier else {
            return;
        };
        let now = Instant::now();
        let crossed = self.backends[backend]
            .outlier
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(result, policy);
        if !crossed {
            return;
        }
        let ejected = self.backends.iter().filter(|b| b.ejected(now)).count();
        let allowed = (self.backends.len() * policy.max_ejection_percent as usize / 100).max(1);
        if ejected < allowed {
            self.backends[backend]
                .outlier
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .eject(now, policy, self.epoch);
            tracing::warn!(backend = %self.backends[backend].address, "outlier detection ejected a backend");
        }
    }

    /// Whether backend `i` is ejected now.
    pub fn is_ejected(&self, i: usize) -> bool {
        self.backends[i].ejected(Instant::now())
    }
}

/// The value of cookie `name` in the request's Cookie headers.
pub fn cookie<'h>(headers: &'h http::HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Backoff before retry `n` (1-based): Envoy's 25 ms base, doubled, full jitter, capped.
pub fn retry_backoff(n: u32) -> Duration {
    let ceiling = 25u64 << n.min(4);
    Duration::from_millis(rand::rng().random_range(0..=ceiling.min(250)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u16) -> Vec<(std::net::SocketAddr, u32)> {
        (1..=n)
            .map(|i| (format!("198.18.{i}.1:80").parse().unwrap(), 1))
            .collect()
    }

    fn input<'a>(h: &'a http::HeaderMap) -> HashInput<'a> {
        HashInput {
            headers: h,
            query: None,
            client: "198.18.1.2".parse().unwrap(),
            generated_cookie: None,
        }
    }

    fn outlier(n: u32) -> OutlierPlan {
        OutlierPlan {
            consecutive_5xx: Some(n),
            consecutive_gateway_errors: None,
            interval: Duration::from_secs(1),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 100,
        }
    }

    #[test]
    fn weighted_random_follows_weights() {
        let backends = vec![
            ("198.18.2.1:80".parse().unwrap(), 3),
            ("198.18.3.1:80".parse().unwrap(), 1),
        ];
        let b = Balancer::new(&backends, LoadBalancerPlan::Random, None);
        let h = http::HeaderMap::new();
        let mut counts = [0usize; 2];
        for _ in 0..20_000 {
            counts[b.pick(&input(&h), None).unwrap()] += 1;
        }
        let share = counts[0] as f64 / 20_000.0;
        assert!((share - 0.75).abs() < 0.02, "{share}");
    }

    #[test]
    fn round_robin_cycles_by_weight() {
        let b = Balancer::new(&addrs(3), LoadBalancerPlan::RoundRobin, None);
        let h = http::HeaderMap::new();
        let picks: Vec<usize> = (0..6).map(|_| b.pick(&input(&h), None).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn least_request_prefers_the_idle_backend() {
        let b = Balancer::new(&addrs(2), LoadBalancerPlan::LeastRequest, None);
        b.backends[0].active.store(100, Ordering::Relaxed);
        let h = http::HeaderMap::new();
        let ones = (0..1000)
            .filter(|_| b.pick(&input(&h), None) == Some(1))
            .count();
        // P2C picks backend 1 unless both draws hit backend 0 (1/4 of the time).
        assert!(ones > 650, "{ones}");
    }

    #[test]
    fn header_hash_is_sticky_and_spreads() {
        let plan = LoadBalancerPlan::HashHeader {
            name: "x-user".into(),
        };
        let b = Balancer::new(&addrs(3), plan, None);
        let mut seen = std::collections::BTreeSet::new();
        for user in 0..50 {
            let mut h = http::HeaderMap::new();
            h.insert("x-user", format!("user-{user}").parse().unwrap());
            let first = b.pick(&input(&h), None).unwrap();
            for _ in 0..10 {
                assert_eq!(b.pick(&input(&h), None), Some(first), "user-{user} moved");
            }
            seen.insert(first);
        }
        assert_eq!(seen.len(), 3, "50 users should reach all 3 backends");
    }

    #[test]
    fn consecutive_5xx_eject_until_time_is_up() {
        let policy = outlier(3);
        let mut s = OutlierState::default();
        assert!(!s.record(TryResult::Status(500), &policy));
        assert!(
            !s.record(TryResult::Status(200), &policy),
            "a success resets the count"
        );
        assert!(!s.record(TryResult::Status(503), &policy));
        assert!(!s.record(TryResult::Failed, &policy));
        assert!(s.record(TryResult::Status(502), &policy));
        let now = Instant::now();
        s.eject(now, &policy, now);
        assert!(s.ejected(now + Duration::from_secs(29)));
        assert!(!s.ejected(now + Duration::from_secs(31)));
    }

    #[test]
    fn ejection_ends_at_the_first_sweep_of_the_interval() {
        let policy = OutlierPlan {
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            ..outlier(1)
        };
        let epoch = Instant::now();
        let mut s = OutlierState::default();
        // Ejected 5 s after the sweeps started: 30 s later is 35 s, the next sweep is at 40 s.
        s.eject(epoch + Duration::from_secs(5), &policy, epoch);
        assert!(s.ejected(epoch + Duration::from_secs(39)));
        assert!(!s.ejected(epoch + Duration::from_secs(40)));
    }

    #[test]
    fn ejected_backends_get_nothing_and_max_percent_holds() {
        let b = Balancer::new(
            &addrs(2),
            LoadBalancerPlan::RoundRobin,
            Some(OutlierPlan {
                max_ejection_percent: 50,
                ..outlier(2)
            }),
        );
        b.record(0, TryResult::Status(500));
        b.record(0, TryResult::Status(500));
        assert!(b.is_ejected(0));
        let h = http::HeaderMap::new();
        assert!((0..20).all(|_| b.pick(&input(&h), None) == Some(1)));
        // 50% of 2 backends: the second may not be ejected too.
        b.record(1, TryResult::Status(500));
        b.record(1, TryResult::Status(500));
        assert!(!b.is_ejected(1));
    }

    #[test]
    fn cookies_are_parsed() {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::COOKIE, "a=1; user=bob; c=3".parse().unwrap());
        assert_eq!(cookie(&h, "user"), Some("bob"));
        assert_eq!(cookie(&h, "zz"), None);
    }
}
