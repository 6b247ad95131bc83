//! Retry decisions in Envoy's `retryOn` vocabulary, which Istio passes through.
//!
//! `5xx` covers any 5xx response and tries that got no response (connect failure, reset,
//! per-try timeout); `gateway-error` covers 502/503/504 and the same no-response cases;
//! `connect-failure`, `refused-stream` and `reset` name those cases alone; `retriable-4xx`
//! is 409; `retriable-status-codes` the listed codes; gRPC's `unavailable`/`cancelled`/...
//! look at the `grpc-status` header of the response.

use crate::compile::{RetryOn, RetryPlan};

/// How one try ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TryOutcome {
    /// A response arrived (status, grpc-status header if any).
    Response(u16, Option<u32>),
    /// The TCP connection to the backend could not be made.
    ConnectFailure,
    /// HTTP/2 REFUSED_STREAM.
    RefusedStream,
    /// The connection broke before a response.
    Reset,
    /// The per-try timeout passed.
    Timeout,
}

/// Whether `outcome` may be retried under `policy` (attempts are counted by the caller).
pub fn retriable(policy: &RetryPlan, outcome: TryOutcome) -> bool {
    policy
        .retry_on
        .iter()
        .any(|condition| match (condition, outcome) {
            (RetryOn::FiveXx, TryOutcome::Response(s, _)) => s >= 500,
            (RetryOn::FiveXx, _) => true,
            (RetryOn::GatewayError, TryOutcome::Response(s, _)) => matches!(s, 502..=504),
            (RetryOn::GatewayError, _) => true,
            (RetryOn::ConnectFailure, TryOutcome::ConnectFailure) => true,
            // Envoy counts a connect timeout as a connect failure and a per-try timeout as a reset.
            (
                RetryOn::Reset,
                TryOutcome::Reset | TryOutcome::Timeout | TryOutcome::ConnectFailure,
            ) => true,
            (RetryOn::RefusedStream, TryOutcome::RefusedStream) => true,
            (RetryOn::Retriable4xx, TryOutcome::Response(409, _)) => true,
            (RetryOn::RetriableStatusCodes, TryOutcome::Response(s, _)) => {
                policy.retriable_status_codes.contains(&s)
            }
            (RetryOn::Cancelled, TryOutcome::Response(_, Some(1))) => true,
            (RetryOn::DeadlineExceeded, TryOutcome::Response(_, Some(4))) => true,
            (RetryOn::ResourceExhausted, TryOutcome::Response(_, Some(8))) => true,
            (RetryOn::Unavailable, TryOutcome::Response(_, Some(14))) => true,
            (RetryOn::Internal, TryOutcome::Response(_, Some(13))) => true,
            _ => false,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_condition_can_match_something() {
        let outcomes = [
            TryOutcome::Response(500, None),
            TryOutcome::Response(503, None),
            TryOutcome::Response(409, None),
            TryOutcome::Response(200, Some(1)),
            TryOutcome::Response(200, Some(4)),
            TryOutcome::Response(200, Some(8)),
            TryOutcome::Response(200, Some(13)),
            TryOutcome::Response(200, Some(14)),
            TryOutcome::ConnectFailure,
            TryOutcome::RefusedStream,
            TryOutcome::Reset,
        ];
        for condition in RetryOn::ALL {
            let mut p = policy(condition.name());
            p.retriable_status_codes = vec![500];
            assert!(
                outcomes.iter().any(|o| retriable(&p, *o)),
                "{condition} never retries"
            );
        }
    }

    fn policy(on: &str) -> RetryPlan {
        RetryPlan {
            attempts: 3,
            per_try_timeout: None,
            retry_on: on.split(',').filter_map(RetryOn::parse).collect(),
            retriable_status_codes: vec![],
        }
    }

    #[test]
    fn five_xx_covers_all_5xx_and_no_response() {
        let p = policy("5xx");
        assert!(retriable(&p, TryOutcome::Response(500, None)));
        assert!(retriable(&p, TryOutcome::Response(503, None)));
        assert!(!retriable(&p, TryOutcome::Response(404, None)));
        assert!(retriable(&p, TryOutcome::Timeout));
        assert!(retriable(&p, TryOutcome::ConnectFailure));
    }

    #[test]
    fn gateway_error_is_502_to_504() {
        let p = policy("gateway-error");
        assert!(!retriable(&p, TryOutcome::Response(500, None)));
        assert!(retriable(&p, TryOutcome::Response(504, None)));
        assert!(retriable(&p, TryOutcome::Reset));
    }

    #[test]
    fn narrow_conditions() {
        let p = policy("connect-failure,refused-stream,retriable-4xx");
        assert!(retriable(&p, TryOutcome::ConnectFailure));
        assert!(retriable(&p, TryOutcome::RefusedStream));
        assert!(retriable(&p, TryOutcome::Response(409, None)));
        assert!(!retriable(&p, TryOutcome::Response(503, None)));
        assert!(!retriable(&p, TryOutcome::Reset));
        assert!(retriable(&policy("reset"), TryOutcome::Timeout));
    }

    #[test]
    fn istio_default_retries_503_and_connect_failures_only() {
        let p = RetryPlan::istio_default();
        assert_eq!(p.attempts, 2);
        assert!(retriable(&p, TryOutcome::Response(503, None)));
        assert!(!retriable(&p, TryOutcome::Response(500, None)));
        assert!(retriable(&p, TryOutcome::ConnectFailure));
        assert!(
            retriable(&p, TryOutcome::Response(200, Some(14))),
            "grpc unavailable"
        );
        assert!(!retriable(&p, TryOutcome::Timeout));
    }
}
