//! The state file's journal: one record per acknowledged change of the API layer, appended and
//! fsynced, so a change costs what it touches instead of a rewrite of every rule.
//!
//! The journal lives beside the state file (`<state file>.journal`). Its first line names the
//! *generation* of the snapshot it extends (the state file says its own generation on its second
//! line); a journal of another generation is stale (the snapshot was rewritten after it, see
//! [`super::RuleStore`]'s compaction) and is ignored. Each record is a header line
//! `#J <op> <length> <xxh3-64 hex>` and `length` bytes of body: for `apply` the resources as the
//! state file writes them, for `delete` one `kind namespace name` line per resource.
//!
//! A record cut short at the end of the file (a crash during an append that was therefore never
//! acknowledged) is dropped and cut off; anything else that does not read back exactly (a
//! checksum that disagrees, an unknown operation, text that is not a record) is refused with its
//! offset, like a damaged state file.

use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
};

/// First line of a journal; the generation follows.
const JOURNAL_HEADER: &str = "# mesh state journal for generation ";
/// Start of a record's header line.
const RECORD: &str = "#J ";

/// One change of the API layer.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// Resources applied (kubectl-apply semantics: same identity replaces), as state-file YAML.
    Apply(String),
    /// Resources deleted: (kind, namespace, name).
    Delete(Vec<(String, String, String)>),
}

impl Change {
    fn encode(&self) -> (&'static str, String) {
        match self {
            Change::Apply(yaml) => ("apply", yaml.clone()),
            Change::Delete(keys) => (
                "delete",
                keys.iter()
                    .map(|(k, ns, n)| format!("{k} {ns} {n}\n"))
                    .collect(),
            ),
        }
    }
}

/// The path of the journal of `state_file`.
pub fn path_of(state_file: &Path) -> PathBuf {
    let mut name = state_file.as_os_str().to_owned();
    name.push(".journal");
    PathBuf::from(name)
}

/// What a journal held.
#[derive(Debug, Default)]
pub struct Replay {
    /// The changes, in order (empty when the journal is missing or of another generation).
    pub changes: Vec<Change>,
    /// Bytes of valid records (what later appends follow).
    pub bytes: u64,
    /// Whether a torn record at the end was dropped.
    pub torn_tail: bool,
}

/// Reads the journal at `path` for snapshot `generation`. Errors say what is wrong and where.
pub fn read(path: &Path, generation: u64) -> Result<Replay, String> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Replay::default()),
        Err(e) => return Err(e.to_string()),
    };
    let Some(header_end) = bytes.iter().position(|b| *b == b'\n') else {
        // Not even a complete header: created by a crash before its first record.
        return Ok(Replay::default());
    };
    let header = std::str::from_utf8(&bytes[..header_end]).map_err(|_| "header is not text")?;
    let written_for: u64 = header
        .strip_prefix(JOURNAL_HEADER)
        .and_then(|g| g.parse().ok())
        .ok_or_else(|| format!("first line {header:?} is not a mesh journal header"))?;
    if written_for != generation {
        // The snapshot was rewritten after these records: they are in it already.
        return Ok(Replay::default());
    }
    let mut replay = Replay::default();
    let mut at = header_end + 1;
    while at < bytes.len() {
        let Some(line_len) = bytes[at..].iter().position(|b| *b == b'\n') else {
            replay.torn_tail = true;
            break;
        };
        let line = std::str::from_utf8(&bytes[at..at + line_len])
            .map_err(|_| format!("byte {at}: record header is not text"))?;
        let fields: Vec<&str> = line
            .strip_prefix(RECORD)
            .map(|l| l.split(' ').collect())
            .unwrap_or_default();
        let [op, len, sum] = fields[..] else {
            return Err(format!("byte {at}: {line:?} is not a record header"));
        };
        let len: usize = len
            .parse()
            .map_err(|_| format!("byte {at}: record length {len:?} is not a number"))?;
        let body_at = at + line_len + 1;
        if body_at + len > bytes.len() {
            replay.torn_tail = true;
            break;
        }
        let body = &bytes[body_at..body_at + len];
        if format!("{:016x}", xxhash_rust::xxh3::xxh3_64(body)) != sum {
            return Err(format!(
                "byte {at}: the record's checksum disagrees with its body"
            ));
        }
        let body =
            std::str::from_utf8(body).map_err(|_| format!("byte {at}: record body is not text"))?;
        replay.changes.push(match op {
            "apply" => Change::Apply(body.to_owned()),
            "delete" => Change::Delete(
                body.lines()
                    .map(|l| {
                        let mut parts = l.splitn(3, ' ');
                        match (parts.next(), parts.next(), parts.next()) {
                            (Some(k), Some(ns), Some(n)) => {
                                Ok((k.to_owned(), ns.to_owned(), n.to_owned()))
                            }
                            _ => Err(format!(
                                "byte {at}: delete line {l:?} is not kind namespace name"
                            )),
                        }
                    })
                    .collect::<Result<_, _>>()?,
            ),
            other => return Err(format!("byte {at}: unknown record {other:?}")),
        });
        at = body_at + len;
    }
    replay.bytes = at as u64;
    Ok(replay)
}

/// An open journal that changes are appended to.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    /// Bytes of valid content.
    len: u64,
}

impl Journal {
    /// Opens the journal after a [`read`] that found `valid` bytes of records for `generation`
    /// (a torn tail beyond them is cut off); starts a fresh one when there were none.
    pub fn open(path: &Path, generation: u64, valid: u64) -> std::io::Result<Self> {
        if valid == 0 {
            return Self::reset(path, generation);
        }
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        if file.metadata()?.len() != valid {
            file.set_len(valid)?;
            file.sync_all()?;
        }
        Ok(Journal {
            path: path.to_owned(),
            file,
            len: valid,
        })
    }

    /// An empty journal for snapshot `generation`, replacing whatever was there atomically.
    pub fn reset(path: &Path, generation: u64) -> std::io::Result<Self> {
        let header = format!("{JOURNAL_HEADER}{generation}\n");
        super::write_atomically(path, header.as_bytes())?;
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Journal {
            path: path.to_owned(),
            file,
            len: header.len() as u64,
        })
    }

    /// Bytes in the journal.
    pub fn bytes(&self) -> u64 {
        self.len
    }

    /// Appends `change` and waits until it is on disk. On failure the journal is cut back to
    /// what it held, so a half-written record never precedes a later one.
    pub fn append(&mut self, change: &Change) -> std::io::Result<()> {
        let (op, body) = change.encode();
        let mut record = format!(
            "{RECORD}{op} {} {:016x}\n",
            body.len(),
            xxhash_rust::xxh3::xxh3_64(body.as_bytes())
        )
        .into_bytes();
        record.extend_from_slice(body.as_bytes());
        let written = (|| {
            use std::io::{Seek, SeekFrom};
            self.file.seek(SeekFrom::Start(self.len))?;
            self.file.write_all(&record)?;
            self.file.sync_data()
        })();
        match written {
            Ok(()) => {
                self.len += record.len() as u64;
                Ok(())
            }
            Err(e) => {
                let _ = self.file.set_len(self.len);
                let _ = self.file.sync_data();
                Err(e)
            }
        }
    }

    /// Where the journal is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_and_a_torn_tail_is_dropped() {
        let dir = std::env::temp_dir().join(format!("mesh-journal-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.yaml.journal");
        let mut journal = Journal::reset(&path, 3).unwrap();
        let changes = [
            Change::Apply("kind: X\n".into()),
            Change::Delete(vec![("ServiceEntry".into(), "default".into(), "s1".into())]),
        ];
        for change in &changes {
            journal.append(change).unwrap();
        }
        let replay = read(&path, 3).unwrap();
        assert_eq!(replay.changes, changes);
        assert!(!replay.torn_tail);
        assert!(
            read(&path, 4).unwrap().changes.is_empty(),
            "another generation"
        );
        // Cut anywhere inside the last record: the first one stays, nothing is refused.
        let full = fs::read(&path).unwrap();
        let second = full.len() - ("ServiceEntry default s1\n".len() + 10);
        fs::write(&path, &full[..second]).unwrap();
        let replay = read(&path, 3).unwrap();
        assert_eq!(replay.changes, changes[..1]);
        assert!(replay.torn_tail);
        let mut journal = Journal::open(&path, 3, replay.bytes).unwrap();
        journal.append(&changes[1]).unwrap();
        assert_eq!(read(&path, 3).unwrap().changes, changes);
        // A flipped byte inside a complete record is refused.
        let mut damaged = fs::read(&path).unwrap();
        let header_len = damaged.iter().position(|b| *b == b'\n').unwrap();
        let body = damaged[header_len + 1..]
            .iter()
            .position(|b| *b == b'\n')
            .unwrap()
            + header_len
            + 3;
        damaged[body] ^= 1;
        fs::write(&path, &damaged).unwrap();
        assert!(read(&path, 3).unwrap_err().contains("checksum"));
        fs::write(&path, format!("{JOURNAL_HEADER}3\nnonsense\n")).unwrap();
        assert!(read(&path, 3).unwrap_err().contains("not a record"));
        fs::remove_dir_all(dir).unwrap();
    }
}
