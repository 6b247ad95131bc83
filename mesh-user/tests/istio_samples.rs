//! Conformance with Istio's own Bookinfo networking samples (`config/istio-samples/`): each one
//! goes through `meshctl validate` next to ServiceEntries for the Bookinfo hosts, the way a user
//! tries them. Every sample is accepted, with the warnings Istio's semantics call for (subsets
//! and hosts not defined yet, subsets without endpoints yet, settings mesh cannot honour but can
//! ignore safely), except the one mesh documents as unsupported (DNS resolution and TLS
//! origination to googleapis.com), which is refused with errors naming what is unsupported.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn samples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/istio-samples")
}

/// Runs `meshctl validate -f services.yaml [-f extra] -f sample`: (success, stdout + stderr).
fn validate(files: &[PathBuf]) -> (bool, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_meshctl"));
    command.arg("validate");
    for file in files {
        command.arg("-f").arg(file);
    }
    let output = command.output().expect("meshctl runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// What mesh documents for each sample: accepted with these warnings, or refused with these
/// errors (substrings, each must appear).
enum Outcome {
    Accepted(&'static [&'static str]),
    Refused(&'static [&'static str]),
}

fn no_dr(host: &str, subset: &str) -> String {
    format!("subset `{subset}` is not defined (yet): no DestinationRule for host `{host}`")
}

const UNDEPLOYED_SUBSETS: &[&str] = &[
    "subset `v2` selects no endpoint of host `details` yet",
    "subset `v2-mysql` selects no endpoint of host `ratings` yet",
    "subset `v2-mysql-vm` selects no endpoint of host `ratings` yet",
];

fn expected(sample: &str) -> Option<(Outcome, Vec<String>)> {
    use Outcome::*;
    let subsets = |pairs: &[(&str, &str)]| -> Vec<String> {
        pairs.iter().map(|(h, s)| no_dr(h, s)).collect()
    };
    let none: &[&str] = &[];
    Some(match sample {
        "bookinfo-gateway.yaml" => (Accepted(none), vec![]),
        "certmanager-gateway.yaml" => (
            Accepted(&["no ServiceEntry defines host `cert-manager-resolver` (yet"]),
            vec![],
        ),
        "destination-rule-all.yaml" => (Accepted(UNDEPLOYED_SUBSETS), vec![]),
        "destination-rule-all-mtls.yaml" => (
            Accepted(UNDEPLOYED_SUBSETS),
            ["productpage", "reviews", "ratings", "details"]
                .iter()
                .map(|host| format!("(DestinationRule default/{host}): spec.trafficPolicy.tls.mode: ISTIO_MUTUAL is not supported"))
                .collect(),
        ),
        "destination-rule-reviews.yaml" => (Accepted(none), vec![]),
        "egress-rule-google-apis.yaml" => (
            Refused(&[
                "(ServiceEntry default/googleapis): spec.resolution: DNS is not supported",
                "(DestinationRule default/originate-tls-for-googleapis): spec.trafficPolicy.portLevelSettings[0].tls.mode: SIMPLE (TLS origination to the backends) is not supported",
                // An egress host without a VIP, and no Gateway: nothing would serve it.
                "(VirtualService default/rewrite-port-for-googleapis): spec.hosts[0]: host `www.googleapis.com` has no address clients could use",
            ]),
            vec![],
        ),
        "fault-injection-details-v1.yaml" => (Accepted(none), vec![]),
        "virtual-service-all-v1.yaml" => (
            Accepted(none),
            subsets(&[
                ("productpage", "v1"),
                ("reviews", "v1"),
                ("ratings", "v1"),
                ("details", "v1"),
            ]),
        ),
        "virtual-service-details-v2.yaml" => (Accepted(none), subsets(&[("details", "v2")])),
        "virtual-service-ratings-db.yaml" => (
            Accepted(none),
            subsets(&[("reviews", "v3"), ("ratings", "v2")]),
        ),
        "virtual-service-ratings-mysql.yaml" => (
            Accepted(none),
            subsets(&[("reviews", "v3"), ("ratings", "v2-mysql")]),
        ),
        "virtual-service-ratings-mysql-vm.yaml" => (
            Accepted(none),
            subsets(&[("reviews", "v3"), ("ratings", "v2-mysql-vm")]),
        ),
        "virtual-service-ratings-test-abort.yaml" | "virtual-service-ratings-test-delay.yaml" => {
            (Accepted(none), subsets(&[("ratings", "v1")]))
        }
        "virtual-service-reviews-50-v3.yaml" => (
            Accepted(none),
            subsets(&[("reviews", "v1"), ("reviews", "v3")]),
        ),
        "virtual-service-reviews-80-20.yaml"
        | "virtual-service-reviews-90-10.yaml"
        | "virtual-service-reviews-test-v2.yaml" => (
            Accepted(none),
            subsets(&[("reviews", "v1"), ("reviews", "v2")]),
        ),
        "virtual-service-reviews-jason-v2-v3.yaml" | "virtual-service-reviews-v2-v3.yaml" => (
            Accepted(none),
            subsets(&[("reviews", "v2"), ("reviews", "v3")]),
        ),
        "virtual-service-reviews-v3.yaml" => (Accepted(none), subsets(&[("reviews", "v3")])),
        _ => return None,
    })
}

fn sample_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(samples().join("bookinfo-networking"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_bookinfo_sample_validates_next_to_service_entries() {
    let services = samples().join("services.yaml");
    let files = sample_files();
    assert_eq!(
        files.len(),
        21,
        "Istio ships 21 Bookinfo networking samples"
    );
    let mut failures = Vec::new();
    for file in &files {
        let name = file.file_name().unwrap().to_str().unwrap();
        let Some((outcome, more)) = expected(name) else {
            failures.push(format!("{name}: no documented outcome"));
            continue;
        };
        let (ok, text) = validate(&[services.clone(), file.clone()]);
        let (want_ok, wanted) = match outcome {
            Outcome::Accepted(w) => (true, w),
            Outcome::Refused(e) => (false, e),
        };
        if ok != want_ok {
            failures.push(format!(
                "{name}: expected {}, got:\n{text}",
                if want_ok { "acceptance" } else { "refusal" }
            ));
            continue;
        }
        let wanted: Vec<String> = wanted.iter().map(|s| s.to_string()).chain(more).collect();
        for want in &wanted {
            if !text.contains(want.as_str()) {
                failures.push(format!("{name}: missing {want:?} in:\n{text}"));
            }
        }
        // No warning nobody expected, and every warning names its file.
        for line in text.lines().filter(|l| l.starts_with("warning: ")) {
            if !wanted.iter().any(|w| line.contains(w.as_str())) {
                failures.push(format!("{name}: unexpected {line:?}"));
            }
            if !line.contains(".yaml: document ") {
                failures.push(format!("{name}: warning without position {line:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn virtual_services_are_clean_once_the_destination_rules_are_there() {
    let services = samples().join("services.yaml");
    let rules = samples().join("bookinfo-networking/destination-rule-all.yaml");
    for file in sample_files() {
        let name = file.file_name().unwrap().to_str().unwrap().to_owned();
        if !name.starts_with("virtual-service-") {
            continue;
        }
        let (ok, text) = validate(&[services.clone(), rules.clone(), file]);
        assert!(ok, "{name}:\n{text}");
        let on_rules: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("warning: ") && l.contains("(VirtualService "))
            .collect();
        assert!(on_rules.is_empty(), "{name}: {on_rules:#?}");
    }
}
