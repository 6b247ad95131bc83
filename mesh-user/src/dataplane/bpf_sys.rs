//! The few map operations aya 0.14 does not expose, as direct `bpf()` system calls and `mmap`:
//! batch updates, deletes and lookups (`BPF_MAP_{UPDATE,DELETE,LOOKUP}_BATCH`, Linux 5.6+), a
//! shared mapping of a `BPF_F_MMAPABLE` array (Linux 5.5+), and creating a map of a given shape
//! from userspace (the pin directory's layout record and migrated maps, see
//! [`super::pins`]).
//!
//! Why: an apply of 30 000 services writes tens of thousands of map entries and millions of
//! Maglev slots. One system call per entry (aya's `insert`/`set`) costs about a microsecond
//! each; a batch call writes thousands of entries at once, and the Maglev pool is written and
//! read back through memory shared with the kernel, with no system call at all. No crate on the
//! approved list wraps these (libbpf-sys would bring a C build of libbpf for three calls).

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
    ptr::NonNull,
};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `union bpf_attr`'s map-creation member, up to the fields used here.
#[repr(C)]
#[derive(Default)]
struct CreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// `union bpf_attr`'s single-element member.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `BPF_NOEXIST`: add only when the key is absent.
pub const NOEXIST: u64 = 1;

fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, fully initialised `bpf_attr` prefix of the size passed; the
    // pointers in it reference buffers the caller keeps alive for the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut A, std::mem::size_of::<A>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The shape of a map: what the kernel reports for it and what a map is created with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapShape {
    /// `BPF_MAP_TYPE_*`.
    pub map_type: u32,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes (per CPU for per-CPU maps).
    pub value_size: u32,
    /// Capacity.
    pub max_entries: u32,
    /// `BPF_F_*` creation flags.
    pub map_flags: u32,
}

/// Creates a map of `shape` named `name` (the kernel keeps 15 bytes of it).
pub fn create_map(name: &str, shape: &MapShape) -> io::Result<std::os::fd::OwnedFd> {
    let mut attr = CreateAttr {
        map_type: shape.map_type,
        key_size: shape.key_size,
        value_size: shape.value_size,
        max_entries: shape.max_entries,
        map_flags: shape.map_flags,
        ..Default::default()
    };
    for (slot, byte) in attr.map_name[..15].iter_mut().zip(name.bytes()) {
        *slot = byte;
    }
    let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
    // SAFETY: BPF_MAP_CREATE returned a new file descriptor that nothing else owns.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

/// Writes one entry (`flags`: 0, or [`NOEXIST`] to keep an existing one).
pub fn update_elem(fd: BorrowedFd<'_>, key: &[u8], value: &[u8], flags: u64) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        flags,
        ..Default::default()
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

/// Bytes of `T` as stored in a map (all map types here are `#[repr(C)]` plain data).
fn bytes<T: aya::Pod>(items: &[T]) -> &[u8] {
    // SAFETY: Pod types have no padding bytes left uninitialised and any bit pattern is valid.
    unsafe { std::slice::from_raw_parts(items.as_ptr().cast(), std::mem::size_of_val(items)) }
}

/// Writes `keys[i] -> values[i]` for every i. `values` holds `value_size` bytes per key (per-CPU
/// maps: the per-CPU values, each rounded up to 8 bytes, one after the other).
pub fn update_batch<K: aya::Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[u8],
    value_size: usize,
) -> io::Result<()> {
    update_batch_raw(
        fd,
        bytes(keys),
        std::mem::size_of::<K>(),
        values,
        value_size,
    )
}

/// [`update_batch`] with keys as bytes, `key_size` bytes each.
pub fn update_batch_raw(
    fd: BorrowedFd<'_>,
    key_bytes: &[u8],
    key_size: usize,
    values: &[u8],
    value_size: usize,
) -> io::Result<()> {
    let count = key_bytes.len() / key_size.max(1);
    assert_eq!(values.len(), count * value_size, "one value per key");
    let mut done = 0usize;
    while done < count {
        let mut attr = BatchAttr {
            keys: key_bytes[done * key_size..].as_ptr() as u64,
            values: values[done * value_size..].as_ptr() as u64,
            count: (count - done).min(u32::MAX as usize) as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let result = bpf(BPF_MAP_UPDATE_BATCH, &mut attr);
        // `count` says how many were written, also on error.
        done += attr.count as usize;
        match result {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted && attr.count > 0 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Deletes `keys` (all must exist).
pub fn delete_batch<K: aya::Pod>(fd: BorrowedFd<'_>, keys: &[K]) -> io::Result<()> {
    let key_bytes = bytes(keys);
    let mut done = 0usize;
    while done < keys.len() {
        let mut attr = BatchAttr {
            keys: key_bytes[done * std::mem::size_of::<K>()..].as_ptr() as u64,
            count: (keys.len() - done).min(u32::MAX as usize) as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let result = bpf(BPF_MAP_DELETE_BATCH, &mut attr);
        done += attr.count as usize;
        match result {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted && attr.count > 0 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Every entry of a hash or array map, read in batches of `chunk` entries.
pub fn lookup_all<K: aya::Pod + Default, V: aya::Pod + Default>(
    fd: BorrowedFd<'_>,
    chunk: usize,
) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    lookup_each(fd, chunk, |k: &K, v: &V| out.push((*k, *v)))?;
    Ok(out)
}

/// Calls `each` on every entry of a hash or array map, read in batches of `chunk` entries
/// (a hash map's bucket must fit in one batch: `chunk` of a few thousand is plenty).
pub fn lookup_each<K: aya::Pod + Default, V: aya::Pod + Default>(
    fd: BorrowedFd<'_>,
    chunk: usize,
    mut each: impl FnMut(&K, &V),
) -> io::Result<()> {
    let (key_size, value_size) = (std::mem::size_of::<K>(), std::mem::size_of::<V>());
    lookup_each_raw(fd, key_size, value_size, chunk, |k, v| {
        // SAFETY: the slices hold exactly one K and one V; Pod types accept any bytes.
        let (k, v) = unsafe {
            (
                k.as_ptr().cast::<K>().read_unaligned(),
                v.as_ptr().cast::<V>().read_unaligned(),
            )
        };
        each(&k, &v)
    })
}

/// [`lookup_each`] with keys and values as bytes: `key_size` and `value_size` bytes each (per-CPU
/// maps: the per-CPU values, each rounded up to 8 bytes, one after the other).
pub fn lookup_each_raw(
    fd: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    chunk: usize,
    mut each: impl FnMut(&[u8], &[u8]),
) -> io::Result<()> {
    let mut keys = vec![0u8; chunk * key_size];
    let mut values = vec![0u8; chunk * value_size];
    // The batch cursor: a bucket index for hash maps, a key for arrays; 8 bytes covers both.
    let mut cursor = [0u64; 1];
    let mut next = [0u64; 1];
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { cursor.as_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let got = attr.count as usize;
        for i in 0..got {
            each(
                &keys[i * key_size..(i + 1) * key_size],
                &values[i * value_size..(i + 1) * value_size],
            );
        }
        match result {
            Ok(_) => {}
            // ENOENT: no more entries after these.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        }
        cursor = next;
        first = false;
    }
}

/// A `BPF_F_MMAPABLE` array of `u32` mapped into this process: reads and writes go straight to
/// the memory the kernel program reads (each element occupies 8 bytes, the kernel's array
/// element size for a 4-byte value).
pub struct MappedU32Array {
    base: NonNull<u32>,
    entries: usize,
    len_bytes: usize,
}

// SAFETY: the mapping is plain shared memory; access goes through &self/&mut self.
unsafe impl Send for MappedU32Array {}

impl MappedU32Array {
    /// Maps `entries` elements of the array behind `fd`.
    pub fn map(fd: BorrowedFd<'_>, entries: usize) -> io::Result<Self> {
        let len_bytes = (entries * 8).max(1);
        // SAFETY: a fresh shared mapping of the map's memory; the kernel checks the length.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            base: NonNull::new(ptr.cast()).expect("mmap never returns null on success"),
            entries,
            len_bytes,
        })
    }

    /// Reads `out.len()` elements starting at `offset`.
    pub fn read(&self, offset: usize, out: &mut [u32]) {
        assert!(offset + out.len() <= self.entries, "read past the array");
        for (i, slot) in out.iter_mut().enumerate() {
            // SAFETY: in bounds (checked above); volatile because the kernel shares the memory.
            *slot = unsafe { self.base.as_ptr().add(2 * (offset + i)).read_volatile() };
        }
    }

    /// Writes `values` starting at `offset`.
    pub fn write(&mut self, offset: usize, values: impl ExactSizeIterator<Item = u32>) {
        assert!(
            offset + values.len() <= self.entries,
            "write past the array"
        );
        for (i, v) in values.enumerate() {
            // SAFETY: in bounds (checked above).
            unsafe { self.base.as_ptr().add(2 * (offset + i)).write_volatile(v) };
        }
    }
}

impl Drop for MappedU32Array {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `map` mapped.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len_bytes) };
    }
}
