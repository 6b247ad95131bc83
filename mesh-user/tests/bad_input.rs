//! Every file under `tests/bad-input/` must be rejected by load + compile with an error that
//! names the file and contains the text of its first line, `# expect: <substring>`; nothing may
//! panic. Every file under `tests/warn-input/` is what Istio accepts with a warning: it must be
//! accepted, with a warning or notice that names the file and contains its first line's
//! `# warn: <substring>` (`(none)`: accepted without any). Plus inputs that cannot live in the
//! corpus (a generated oversized file, a directory).

use std::{
    io::Write,
    net::IpAddr,
    panic::{catch_unwind, AssertUnwindSafe},
    path::{Path, PathBuf},
};

use mesh_user::{
    compile::{compile_rules as compile, NodeContext},
    config::{load_path, MAX_INPUT_BYTES},
};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad-input")
}

/// Loads and compiles `path`; returns the error text (or `None` if it was accepted).
fn reject(path: &Path) -> Option<String> {
    let node = NodeContext {
        node_addresses: vec!["198.18.0.1".parse::<IpAddr>().unwrap()],
    };
    match load_path(path) {
        Err(error) => Some(error.to_string()),
        Ok(set) => compile(&set, &node).err().map(|e| e.to_string()),
    }
}

fn expectation(path: &Path) -> String {
    first_line_after(path, "# expect: ")
}

fn first_line_after(path: &Path, prefix: &str) -> String {
    let bytes = std::fs::read(path).unwrap();
    let first = bytes.split(|b| *b == b'\n').next().unwrap_or_default();
    let first = String::from_utf8_lossy(first);
    first
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("{} must start with `{prefix}<substring>`", path.display()))
        .trim()
        .to_owned()
}

/// Loads and compiles `path`, which must be accepted: its notices and warnings, one per line.
fn warnings(path: &Path) -> Result<Vec<String>, String> {
    let node = NodeContext {
        node_addresses: vec!["198.18.0.1".parse::<IpAddr>().unwrap()],
    };
    let set = load_path(path).map_err(|e| e.to_string())?;
    let state = compile(&set, &node).map_err(|e| e.to_string())?;
    Ok(set
        .notices
        .iter()
        .cloned()
        .chain(state.warnings.iter().map(ToString::to_string))
        .collect())
}

#[test]
fn every_warn_input_is_accepted_with_the_expected_warning() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/warn-input");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "{} warn inputs", files.len());
    let mut failures = Vec::new();
    for file in &files {
        let want = first_line_after(file, "# warn: ");
        let shown = file.display().to_string();
        match catch_unwind(AssertUnwindSafe(|| warnings(file))) {
            Err(_) => failures.push(format!("{shown}: panicked")),
            Ok(Err(error)) => failures.push(format!("{shown}: rejected:\n{error}")),
            Ok(Ok(found)) if want == "(none)" => {
                if !found.is_empty() {
                    failures.push(format!("{shown}: unexpected warnings {found:#?}"));
                }
            }
            Ok(Ok(found)) => {
                if !found.iter().any(|w| w.contains(&want)) {
                    failures.push(format!("{shown}: no warning contains {want:?}: {found:#?}"));
                }
                if let Some(bad) = found.iter().find(|w| !w.contains(&shown)) {
                    failures.push(format!("{shown}: warning does not name the file: {bad}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn every_bad_input_is_rejected_with_the_expected_error() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 30,
        "the corpus must hold at least 30 files, has {}",
        files.len()
    );
    let mut failures = Vec::new();
    for file in &files {
        let want = expectation(file);
        let shown = file.display().to_string();
        match catch_unwind(AssertUnwindSafe(|| reject(file))) {
            Err(_) => failures.push(format!("{shown}: panicked")),
            Ok(None) => failures.push(format!(
                "{shown}: was accepted, expected an error containing {want:?}"
            )),
            Ok(Some(message)) => {
                if !message.contains(&want) {
                    failures.push(format!(
                        "{shown}: error does not contain {want:?}:\n{message}"
                    ));
                } else if !message.contains(&shown) {
                    failures.push(format!("{shown}: error does not name the file:\n{message}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad inputs misbehaved:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n\n")
    );
}

#[test]
fn oversized_file_is_rejected_without_reading_it_all() {
    let dir = std::env::temp_dir().join(format!("mesh-bad-input-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("huge.yaml");
    let mut file = std::fs::File::create(&path).unwrap();
    let line = "# padding padding padding padding padding padding padding padding padding\n";
    let mut written = 0;
    while written <= MAX_INPUT_BYTES {
        file.write_all(line.as_bytes()).unwrap();
        written += line.len();
    }
    drop(file);
    let message = reject(&path).expect("an oversized file must be rejected");
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        message.contains("more than the limit of 4194304 bytes"),
        "{message}"
    );
    assert!(message.contains(&path.display().to_string()), "{message}");
}

#[test]
fn a_directory_without_yaml_files_is_rejected() {
    let dir = std::env::temp_dir().join(format!("mesh-empty-dir-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let message = reject(&dir).expect("an empty directory must be rejected");
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(message.contains("no resources"), "{message}");
    assert!(message.contains(&dir.display().to_string()), "{message}");
}

#[test]
fn the_shipped_examples_are_accepted() {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    for example in ["tcp-echo", "l4-split"] {
        assert_eq!(reject(&config.join(example)), None, "{example}");
    }
    // Step 2 of tcp-echo is applied on top of step 1, replacing its VirtualService.
    let mut set = load_path(&config.join("tcp-echo")).unwrap();
    set.merge(load_path(&config.join("tcp-echo/step-2-20-v2")).unwrap());
    let node = NodeContext {
        node_addresses: vec!["198.18.0.1".parse().unwrap()],
    };
    assert_eq!(compile(&set, &node).unwrap().services.len(), 1);
}
