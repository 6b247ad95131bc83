//! Reading the guest's results channel into per-binary outcomes, and the kernel x test-binary
//! matrix (terminal and `docs/kernels.md`). A cell says `passed` only when the test runner's own
//! summary line (`test result: ok. N passed; ...`) came back with N > 0 and exit code 0.

use std::fmt::Write as _;

/// The outcome of one test binary on one kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Passed {
        passed: u32,
        ignored: u32,
        notes: Vec<String>,
    },
    Failed(String),
    Skipped(String),
}

impl Outcome {
    pub fn cell(&self) -> String {
        match self {
            Outcome::Passed {
                passed,
                ignored,
                notes,
            } => {
                let mut s = format!("passed ({passed} tests");
                if *ignored > 0 {
                    let _ = write!(s, ", {ignored} ignored");
                }
                s.push(')');
                for n in notes {
                    let _ = write!(s, "; {n}");
                }
                s
            }
            Outcome::Failed(why) => format!("**failed**: {why}"),
            Outcome::Skipped(why) => format!("skipped: {why}"),
        }
    }

    pub fn is_failure(&self) -> bool {
        matches!(self, Outcome::Failed(_))
    }
}

/// The outcome of binary `name` from the whole results text of one boot. `killed` says why the
/// host stopped the VM, if it did.
pub fn outcome(results: &str, name: &str, timeout_secs: u64, killed: Option<&str>) -> Outcome {
    let begin = format!("MESH-VM: BEGIN {name}");
    let end_prefix = format!("MESH-VM: END {name} rc=");
    let lines: Vec<&str> = results.lines().map(|l| l.trim_end_matches('\r')).collect();
    let skip = format!("MESH-VM: SKIP {name} ");
    let Some(start) = lines.iter().position(|l| *l == begin) else {
        if let Some(why) = lines.iter().find_map(|l| l.strip_prefix(skip.as_str())) {
            return Outcome::Skipped(why.to_string());
        }
        if let Some(fatal) = lines.iter().find_map(|l| l.strip_prefix("MESH-VM: FATAL ")) {
            return Outcome::Failed(format!("guest set-up failed: {fatal}"));
        }
        return Outcome::Failed(match killed {
            Some(k) => format!("never started: {k}"),
            None => "never started: the VM stopped before (see the console log)".into(),
        });
    };
    let body = &lines[start + 1..];
    let end = body.iter().position(|l| l.starts_with(&end_prefix));
    let Some(end) = end else {
        return Outcome::Failed(match killed {
            Some(k) => format!("did not finish: {k}"),
            None => "did not finish: the VM stopped during the run (see the console log)".into(),
        });
    };
    let rc: i32 = body[end][end_prefix.len()..].trim().parse().unwrap_or(-1);
    let body = &body[..end];
    let summary = body
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("test result: "));
    let failed_tests: Vec<&str> = body
        .iter()
        .filter_map(|l| l.strip_prefix("test ")?.strip_suffix(" ... FAILED"))
        .collect();
    let notes: Vec<String> = body
        .iter()
        .filter_map(|l| {
            l.split_once("MESH-SKIP: ")
                .map(|(_, r)| format!("skipped inside: {r}"))
        })
        .collect();
    if rc == 137 {
        let cut = format!("MESH-VM: CUT {name} ");
        let cut = lines.iter().find_map(|l| l.strip_prefix(cut.as_str()));
        return match cut {
            Some(why) if failed_tests.is_empty() => {
                let passed = body.iter().filter(|l| l.ends_with(" ... ok")).count();
                Outcome::Skipped(format!("{why}; {passed} tests had passed"))
            }
            _ if !failed_tests.is_empty() => Outcome::Failed(format!(
                "{} failed ({}), then killed",
                failed_tests.len(),
                failed_tests.join(", ")
            )),
            _ => Outcome::Failed(format!(
                "killed after the in-guest timeout ({timeout_secs} s)"
            )),
        };
    }
    match summary {
        Some(s) if rc == 0 && s.starts_with("ok.") => {
            let passed = count(s, "passed");
            let ignored = count(s, "ignored");
            if passed == 0 {
                Outcome::Skipped(if count(s, "filtered out") > 0 {
                    "no test matches the filter".into()
                } else {
                    "the binary holds no test that runs by default".into()
                })
            } else {
                Outcome::Passed {
                    passed,
                    ignored,
                    notes,
                }
            }
        }
        Some(_) if !failed_tests.is_empty() => {
            let shown: Vec<&str> = failed_tests.iter().take(4).copied().collect();
            let more = failed_tests.len().saturating_sub(shown.len());
            let mut why = format!("{} failed: {}", failed_tests.len(), shown.join(", "));
            if more > 0 {
                let _ = write!(why, " and {more} more");
            }
            Outcome::Failed(why)
        }
        Some(s) => Outcome::Failed(format!("exit code {rc}, runner said `{s}`")),
        None => Outcome::Failed(format!(
            "exit code {rc} without the test runner's summary line"
        )),
    }
}

/// `N word` from a libtest summary (`ok. 12 passed; 0 failed; 1 ignored; ...`).
fn count(summary: &str, word: &str) -> u32 {
    summary
        .split([';', '.'])
        .find_map(|part| part.trim().strip_suffix(word)?.trim().parse().ok())
        .unwrap_or(0)
}

/// One kernel's column.
pub struct Column {
    pub label: String,
    /// Release and origin, or why it was not booted.
    pub about: String,
    pub outcomes: Vec<Outcome>,
}

/// The matrix as a Markdown table: one row per test binary, one column per kernel.
pub fn table(rows: &[String], columns: &[Column]) -> String {
    let mut s = String::from("| test binary |");
    for c in columns {
        let _ = write!(s, " {} |", c.label);
    }
    s.push_str("\n|---|");
    for _ in columns {
        s.push_str("---|");
    }
    s.push('\n');
    for (i, row) in rows.iter().enumerate() {
        let _ = write!(s, "| `{row}` |");
        for c in columns {
            let _ = write!(s, " {} |", c.outcomes[i].cell());
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: &str = "MESH-VM: BOOTED kernel=6.1\r\n\
        MESH-VM: BEGIN golden_packets\r\n\
        running 2 tests\r\n\
        test a ... ok\r\n\
        test b ... ok\r\n\
        test result: ok. 2 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 3.2s\r\n\
        MESH-VM: END golden_packets rc=0\r\n\
        MESH-VM: BEGIN l4_forwarding\r\n\
        test x ... FAILED\r\n\
        test result: FAILED. 3 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out\r\n\
        MESH-VM: END l4_forwarding rc=101\r\n\
        MESH-VM: BEGIN shift\r\n\
        test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 5 filtered out\r\n\
        MESH-VM: END shift rc=0\r\n\
        MESH-VM: BEGIN control_plane\r\n\
        MESH-VM: END control_plane rc=0\r\n\
        MESH-VM: BEGIN l7_proxy\r\n\
        MESH-VM: SKIP vm_nic the run's time budget of 60 s was spent after 61 s\r\n\
        MESH-VM: BEGIN container_host\r\n\
        test p ... ok\r\n\
        test q ... \r\n\
        MESH-VM: CUT container_host stopped after 9 s, at the end of the run's time budget\r\n\
        MESH-VM: END container_host rc=137\r\n";

    #[test]
    fn passed_needs_the_runners_summary() {
        assert_eq!(
            outcome(RUN, "golden_packets", 60, None),
            Outcome::Passed {
                passed: 2,
                ignored: 1,
                notes: vec![]
            }
        );
        assert!(matches!(
            outcome(RUN, "control_plane", 60, None),
            Outcome::Failed(_)
        ));
    }

    #[test]
    fn failures_name_the_tests() {
        assert_eq!(
            outcome(RUN, "l4_forwarding", 60, None),
            Outcome::Failed("1 failed: x".into())
        );
    }

    #[test]
    fn filtered_out_is_skipped_and_unfinished_is_failed() {
        assert_eq!(
            outcome(RUN, "shift", 60, None),
            Outcome::Skipped("no test matches the filter".into())
        );
        assert!(
            matches!(outcome(RUN, "l7_proxy", 60, Some("killed")), Outcome::Failed(w) if w.contains("killed"))
        );
        assert!(
            matches!(outcome(RUN, "sandbox", 60, None), Outcome::Failed(w) if w.contains("never started"))
        );
    }

    #[test]
    fn a_binary_past_the_budget_is_skipped_with_the_reason() {
        assert_eq!(
            outcome(RUN, "vm_nic", 60, None),
            Outcome::Skipped("the run's time budget of 60 s was spent after 61 s".into())
        );
        assert_eq!(
            outcome(RUN, "container_host", 60, None),
            Outcome::Skipped(
                "stopped after 9 s, at the end of the run's time budget; 1 tests had passed".into()
            )
        );
    }
}
