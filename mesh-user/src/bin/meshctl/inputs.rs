//! Reading `-f` arguments (files, directories, stdin) into source documents: shared by
//! `apply`, `delete` and `validate`.

use std::{
    io::Read,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use mesh_user::{admin::SourceDocument, config};

/// The `-f` arguments of `apply` and `validate`.
#[derive(clap::Args)]
pub struct Files {
    /// File, directory (*.yaml, *.yml) or `-` for stdin; repeatable; all are taken together.
    #[arg(
        short = 'f',
        long = "filename",
        required = true,
        value_name = "FILE|DIR|-"
    )]
    files: Vec<String>,
}

impl Files {
    /// Reads every file named, in order.
    pub fn read(&self) -> Result<Vec<SourceDocument>> {
        read_inputs(&self.files)
    }
}

/// Reads `-f` arguments: files, directories (*.yaml, *.yml, sorted) and `-` (stdin).
pub fn read_inputs(inputs: &[String]) -> Result<Vec<SourceDocument>> {
    let mut documents = Vec::new();
    for input in inputs {
        if input == "-" {
            let mut yaml = String::new();
            std::io::stdin()
                .read_to_string(&mut yaml)
                .context("reading stdin")?;
            documents.push(SourceDocument {
                source: "<stdin>".into(),
                yaml,
            });
            continue;
        }
        let path = Path::new(input);
        let files = if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("reading directory {input}"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
                .collect();
            files.sort();
            if files.is_empty() {
                bail!("{input}: no *.yaml or *.yml files in this directory");
            }
            files
        } else {
            vec![path.to_path_buf()]
        };
        for file in files {
            let meta = std::fs::metadata(&file).with_context(|| format!("{}", file.display()))?;
            if meta.len() > config::MAX_INPUT_BYTES as u64 {
                bail!(
                    "{}: {} bytes, more than the limit of {} bytes per file",
                    file.display(),
                    meta.len(),
                    config::MAX_INPUT_BYTES
                );
            }
            let yaml = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            documents.push(SourceDocument {
                source: file.display().to_string(),
                yaml,
            });
        }
    }
    Ok(documents)
}
