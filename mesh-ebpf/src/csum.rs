//! Incremental Internet checksum updates (RFC 1624, equation 3: `HC' = ~(~HC + ~m + m')`).
//!
//! All 16-bit words are taken in the packet's byte order (`from_ne_bytes` of wire bytes) on both
//! sides of the equation: the one's complement sum is byte-order independent as long as the
//! checksum field and the data are read the same way, which saves every swap.

/// Accumulates `~m + m'` for each changed 16-bit word.
#[derive(Clone, Copy)]
pub struct Delta(u32);

impl Delta {
    #[inline(always)]
    pub const fn new() -> Self {
        Delta(0)
    }

    /// One 16-bit word changed from `old` to `new`.
    #[inline(always)]
    pub fn word(&mut self, old: u16, new: u16) {
        // At most a few dozen words are ever added, so the u32 cannot overflow.
        self.0 += (!old) as u32 + new as u32;
    }

    /// `N` bytes (N even) changed from `old` to `new`.
    #[inline(always)]
    pub fn bytes<const N: usize>(&mut self, old: &[u8; N], new: &[u8; N]) {
        let mut i = 0;
        while i + 1 < N {
            self.word(
                u16::from_ne_bytes([old[i], old[i + 1]]),
                u16::from_ne_bytes([new[i], new[i + 1]]),
            );
            i += 2;
        }
    }

    /// A 2- or 4-byte field changed from `old` to `new` (its wire bytes read natively, as the
    /// skb checksum helpers take them).
    #[inline(always)]
    pub fn value(&mut self, old: u32, new: u32, size: u8) {
        if size == 2 {
            self.word(old as u16, new as u16);
        } else {
            self.bytes(&old.to_ne_bytes(), &new.to_ne_bytes());
        }
    }

    /// Applies the accumulated change to a checksum field read as `from_ne_bytes`.
    #[inline(always)]
    pub fn apply(self, csum: u16) -> u16 {
        !fold((!csum) as u32 + fold(self.0) as u32)
    }
}

/// Folds a 32-bit one's complement sum to 16 bits; two rounds absorb every carry.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Updates the checksum stored at `field` (packet memory, already bounds-checked).
///
/// # Safety
/// `field` must point at two writable bytes inside the packet.
#[inline(always)]
pub unsafe fn update(field: *mut [u8; 2], delta: Delta) {
    let new = delta.apply(u16::from_ne_bytes(unsafe { *field }));
    unsafe { *field = new.to_ne_bytes() };
}
