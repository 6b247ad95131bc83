//! Figures a test measured, for the docs: never written by hand.
//!
//! Every run writes its block to `target/figures/<name>.md`. With `MESH_UPDATE_DOCS=1` it also
//! replaces the block between `<!-- generated: <name> ... -->` and `<!-- end generated: <name>
//! -->` in the document that shows it, so what the document says is what a run measured.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The workspace root (the tests crate lives one level below it).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Records block `name` of `doc` (a path relative to the repository, e.g. `docs/fleet.md`);
/// returns the file written under `target/figures/`.
pub fn publish(doc: &str, name: &str, body: &str) -> Result<PathBuf> {
    let dir = repo_root().join("target/figures");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join(format!("{name}.md"));
    std::fs::write(&file, body)?;
    if std::env::var("MESH_UPDATE_DOCS").is_ok_and(|v| v == "1") {
        let path = repo_root().join(doc);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {doc}"))?;
        let updated = replace_block(&text, name, body).with_context(|| format!("in {doc}"))?;
        std::fs::write(&path, updated).with_context(|| format!("writing {doc}"))?;
    }
    Ok(file)
}

/// `text` with the body of generated block `name` replaced by `body`.
fn replace_block(text: &str, name: &str, body: &str) -> Result<String> {
    let begin = format!("<!-- generated: {name} ");
    let end = format!("<!-- end generated: {name} -->");
    let Some(start) = text.find(&begin) else {
        bail!("no line starting with {begin:?}");
    };
    let body_start = start + text[start..].find('\n').context("marker line")? + 1;
    let Some(stop) = text[body_start..].find(&end).map(|i| body_start + i) else {
        bail!("no {end:?} after the block's start");
    };
    Ok(format!(
        "{}{}\n{}",
        &text[..body_start],
        body.trim_end(),
        &text[stop..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_only_the_named_block() {
        let doc = "a\n<!-- generated: x (by y) -->\nold\n<!-- end generated: x -->\nb\n";
        let out = replace_block(doc, "x", "new 1\nnew 2\n").unwrap();
        assert_eq!(
            out,
            "a\n<!-- generated: x (by y) -->\nnew 1\nnew 2\n<!-- end generated: x -->\nb\n"
        );
        assert!(replace_block(doc, "z", "n").is_err());
    }
}
