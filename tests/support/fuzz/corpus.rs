//! A fuzz target's corpus: `tests/fuzz-corpus/<target>/` (seeds `seed-*` and regressions
//! `regression-*`, raw bytes) plus extra seed files or directories the target names (e.g.
//! `config/` and the bad-input corpus for the config target).

use std::path::{Path, PathBuf};

/// The inputs a target replays first and mutates.
#[derive(Clone, Debug)]
pub struct Corpus {
    /// Target name (`config`, `admin`, `packets`).
    pub target: String,
    /// `tests/fuzz-corpus/<target>`.
    pub dir: PathBuf,
    /// Extra seed files or directories (read recursively; only `extensions` files).
    extra: Vec<PathBuf>,
    /// File extensions taken from `extra` (empty: all).
    extensions: Vec<String>,
}

impl Corpus {
    /// The corpus of `target` in the repository.
    pub fn new(target: &str) -> Corpus {
        Corpus {
            target: target.to_owned(),
            dir: super::repo_root().join("tests/fuzz-corpus").join(target),
            extra: Vec::new(),
            extensions: Vec::new(),
        }
    }

    /// The config target's corpus: its directory plus every YAML file of `config/` and of
    /// mesh-user's bad-input and warn-input corpora.
    pub fn config() -> Corpus {
        Corpus::new("config").with_extra(
            &[
                "config",
                "mesh-user/tests/bad-input",
                "mesh-user/tests/warn-input",
            ],
            &["yaml", "yml"],
        )
    }

    /// The same corpus reported under another name (one corpus, several runs: `packets-xdp`
    /// and `packets-tc` share `packets/`).
    pub fn named(mut self, name: &str) -> Corpus {
        self.target = name.to_owned();
        self
    }

    /// Adds seed files from `dirs` (relative to the repository root), files ending in one of
    /// `extensions`.
    pub fn with_extra(mut self, dirs: &[&str], extensions: &[&str]) -> Corpus {
        let root = super::repo_root();
        self.extra.extend(dirs.iter().map(|d| root.join(d)));
        self.extensions = extensions.iter().map(|e| e.to_string()).collect();
        self
    }

    /// Every input, named by its path relative to the repository, sorted: the corpus
    /// directory's files, then the extra seeds.
    pub fn inputs(&self) -> Vec<(String, Vec<u8>)> {
        let mut files = Vec::new();
        collect(&self.dir, &[], &mut files);
        for extra in &self.extra {
            collect(extra, &self.extensions, &mut files);
        }
        let root = super::repo_root();
        files
            .into_iter()
            .filter_map(|path| {
                let bytes = std::fs::read(&path).ok()?;
                let name = path
                    .strip_prefix(&root)
                    .unwrap_or(&path)
                    .display()
                    .to_string();
                Some((name, bytes))
            })
            .collect()
    }

    /// Just the bytes of [`Corpus::inputs`] (what mutation starts from); never empty.
    pub fn seeds(&self) -> Vec<Vec<u8>> {
        let mut seeds: Vec<Vec<u8>> = self.inputs().into_iter().map(|(_, b)| b).collect();
        if seeds.is_empty() {
            seeds.push(Vec::new());
        }
        seeds
    }

    /// Counts of seed and regression files in the corpus directory (for reports).
    pub fn counts(&self) -> (usize, usize) {
        let mut files = Vec::new();
        collect(&self.dir, &[], &mut files);
        let named = |prefix: &str| {
            files
                .iter()
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(prefix))
                })
                .count()
        };
        (named("seed-"), named("regression-"))
    }

    /// Writes a failing input as `regression-<hash>` when `MESH_FUZZ_SAVE=1`; returns its path.
    pub fn save_regression(&self, input: &[u8]) -> Option<PathBuf> {
        if std::env::var("MESH_FUZZ_SAVE").ok().as_deref() != Some("1") {
            return None;
        }
        std::fs::create_dir_all(&self.dir).ok()?;
        let path = self.dir.join(format!("regression-{:016x}", fnv1a(input)));
        std::fs::write(&path, input).ok()?;
        Some(path)
    }
}

/// Files under `path` (a file or a directory, recursively), sorted, filtered by extension.
fn collect(path: &Path, extensions: &[String], out: &mut Vec<PathBuf>) {
    if path.is_file() {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if extensions.is_empty() || extensions.iter().any(|e| e == ext) {
            out.push(path.to_path_buf());
        }
        return;
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        let hidden = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if !hidden {
            collect(&p, extensions, out);
        }
    }
}

/// FNV-1a: a stable name for a regression file.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
