//! Mutations of seed inputs, as proptest strategies: a seed and a short list of edits (bit
//! flips, byte sets, inserts, deletes, duplicated ranges, splices from another seed, truncation,
//! and tokens from a per-target dictionary such as YAML scalars or HTTP header names). proptest
//! shrinks a failing case by dropping edits and moving positions toward 0, so a saved
//! regression is a seed plus the few edits that matter.

use std::sync::Arc;

use proptest::{collection::vec, prelude::*};

/// One edit; positions are taken modulo the input's length at the time it applies.
#[derive(Clone, Debug)]
pub enum Edit {
    /// Flip one bit.
    Flip { at: usize, bit: u8 },
    /// Overwrite one byte.
    Set { at: usize, byte: u8 },
    /// Insert dictionary token `token`.
    Token { at: usize, token: usize },
    /// Overwrite the word at `at` (up to the next space, newline or punctuation) with a token.
    ReplaceWord { at: usize, token: usize },
    /// Delete up to `len` bytes.
    Delete { at: usize, len: usize },
    /// Repeat a range `times` times.
    Duplicate { at: usize, len: usize, times: u8 },
    /// Insert a range of another seed.
    Splice {
        at: usize,
        seed: usize,
        from: usize,
        len: usize,
    },
    /// Cut the input at `at`.
    Truncate { at: usize },
}

fn edit(tokens: usize) -> impl Strategy<Value = Edit> {
    let at = any::<usize>();
    let tokens = tokens.max(1);
    prop_oneof![
        (at, 0u8..8).prop_map(|(at, bit)| Edit::Flip { at, bit }),
        (at, any::<u8>()).prop_map(|(at, byte)| Edit::Set { at, byte }),
        (at, 0..tokens).prop_map(|(at, token)| Edit::Token { at, token }),
        (at, 0..tokens).prop_map(|(at, token)| Edit::ReplaceWord { at, token }),
        (at, 1usize..64).prop_map(|(at, len)| Edit::Delete { at, len }),
        (at, 1usize..64, 1u8..8).prop_map(|(at, len, times)| Edit::Duplicate { at, len, times }),
        (at, any::<usize>(), any::<usize>(), 1usize..128).prop_map(|(at, seed, from, len)| {
            Edit::Splice {
                at,
                seed,
                from,
                len,
            }
        }),
        at.prop_map(|at| Edit::Truncate { at }),
    ]
}

/// A seed from `seeds` with 1 to 8 edits applied.
pub fn mutated(
    seeds: Vec<Vec<u8>>,
    dictionary: &'static [&'static str],
) -> impl Strategy<Value = Vec<u8>> {
    let seeds = Arc::new(seeds);
    let n = seeds.len().max(1);
    (0..n, vec(edit(dictionary.len()), 1..8)).prop_map(move |(i, edits)| {
        let mut out = seeds.get(i).cloned().unwrap_or_default();
        for e in &edits {
            apply(&mut out, e, &seeds, dictionary);
        }
        out
    })
}

/// Applies one edit in place.
pub fn apply(out: &mut Vec<u8>, edit: &Edit, seeds: &[Vec<u8>], dictionary: &[&str]) {
    let pos = |at: usize, len: usize| if len == 0 { 0 } else { at % (len + 1) };
    let token = |t: usize| dictionary.get(t).map(|s| s.as_bytes()).unwrap_or(b"");
    match *edit {
        Edit::Flip { at, bit } if !out.is_empty() => {
            let i = at % out.len();
            out[i] ^= 1 << bit;
        }
        Edit::Set { at, byte } if !out.is_empty() => {
            let i = at % out.len();
            out[i] = byte;
        }
        Edit::Token { at, token: t } => {
            let i = pos(at, out.len());
            out.splice(i..i, token(t).iter().copied());
        }
        Edit::ReplaceWord { at, token: t } => {
            let start = pos(at, out.len());
            let end = out[start..]
                .iter()
                .position(|b| b" \n\r\t,:[]{}\"'/&=?".contains(b))
                .map_or(out.len(), |p| start + p);
            out.splice(start..end, token(t).iter().copied());
        }
        Edit::Delete { at, len } => {
            let i = pos(at, out.len());
            let end = (i + len).min(out.len());
            out.drain(i..end);
        }
        Edit::Duplicate { at, len, times } => {
            let i = pos(at, out.len());
            let end = (i + len).min(out.len());
            let piece: Vec<u8> = out[i..end].to_vec();
            for _ in 0..times {
                out.splice(end..end, piece.iter().copied());
            }
        }
        Edit::Splice {
            at,
            seed,
            from,
            len,
        } => {
            if let Some(other) = seeds.get(seed % seeds.len().max(1)) {
                let f = pos(from, other.len());
                let piece = &other[f..(f + len).min(other.len())];
                let i = pos(at, out.len());
                out.splice(i..i, piece.iter().copied());
            }
        }
        Edit::Truncate { at } => {
            let i = pos(at, out.len());
            out.truncate(i);
        }
        _ => {}
    }
}

/// `bytes` as a readable, escaped string (for failure messages).
pub fn escape(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(4096)];
    let mut s: String = shown.escape_ascii().to_string();
    if bytes.len() > shown.len() {
        s.push_str(&format!("... ({} more bytes)", bytes.len() - shown.len()));
    }
    s
}
