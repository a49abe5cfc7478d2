//! GGUF files: a bounds-checked reader over a private copy-on-write memory map, tensors as
//! zero-copy views into it, and a writer.
//!
//! The mapping is private (`MAP_PRIVATE`): the adapter patcher writes fused weights into it,
//! the kernel copies only the pages it touches, and the file on disk never changes.

mod reader;
mod value;
mod writer;

pub use reader::{parse_header, Header};
pub use value::{Value, ValueType};
pub use writer::GgufWriter;

use crate::quant::GgmlType;
use crate::{Error, Result};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

pub const MAGIC: [u8; 4] = *b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: usize = 4;

/// Metadata key/value pairs in file order, with lookup by key.
#[derive(Clone, Debug, Default)]
pub struct Metadata {
    entries: Vec<(String, Value)>,
    index: HashMap<String, usize>,
}

impl Metadata {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.entries[i].1)
    }

    /// Inserts or replaces `key`, keeping the position of a replaced key.
    pub fn insert(&mut self, key: String, value: Value) {
        match self.index.get(&key) {
            Some(&i) => self.entries[i].1 = value,
            None => {
                self.index.insert(key.clone(), self.entries.len());
                self.entries.push((key, value));
            }
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<Value> {
        let i = self.index.remove(key)?;
        let (_, v) = self.entries.remove(i);
        for j in self.index.values_mut() {
            if *j > i {
                *j -= 1;
            }
        }
        Some(v)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A required string.
    pub fn str(&self, key: &str) -> Result<&str> {
        self.required(key)?
            .as_str()
            .ok_or_else(|| Error::metadata(key, "expected a string"))
    }

    /// A required non-negative integer.
    pub fn u64(&self, key: &str) -> Result<u64> {
        self.required(key)?
            .as_u64()
            .ok_or_else(|| Error::metadata(key, "expected a non-negative integer"))
    }

    /// A required number.
    pub fn f64(&self, key: &str) -> Result<f64> {
        self.required(key)?
            .as_f64()
            .ok_or_else(|| Error::metadata(key, "expected a number"))
    }

    /// An optional value, converted with `f`; present with the wrong type is an error.
    pub fn opt<T>(&self, key: &str, f: impl Fn(&Value) -> Option<T>) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => f(v)
                .map(Some)
                .ok_or_else(|| Error::metadata(key, format!("unexpected value {v}"))),
        }
    }

    /// A required array.
    pub fn array(&self, key: &str) -> Result<&[Value]> {
        self.required(key)?
            .as_array()
            .ok_or_else(|| Error::metadata(key, "expected an array"))
    }

    fn required(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| Error::metadata(key, "missing"))
    }
}

/// One tensor's description: where its bytes are and how to read them.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `shape[0]` is the row length (the contiguous dimension).
    pub shape: Vec<u64>,
    pub ty: GgmlType,
    /// Offset of the data relative to the start of the data section.
    pub offset: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Elements per row (`shape[0]`).
    pub fn row_len(&self) -> u64 {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Number of rows: the product of every dimension but the first.
    pub fn n_rows(&self) -> u64 {
        self.shape.iter().skip(1).product()
    }
}

/// An open GGUF file: the parsed header and the private mapping of the whole file.
pub struct GgufFile {
    path: PathBuf,
    header: Header,
    map: memmap2::MmapMut,
    /// 2 MiB chunks of the mapping already moved to anonymous memory (see
    /// [`GgufFile::make_private`]).
    #[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
    private: Vec<bool>,
}

impl GgufFile {
    /// Maps `path` copy-on-write and parses its header. Reads no tensor data.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let with_path = |e: Error| match e {
            Error::Gguf { msg, .. } => Error::Gguf {
                path: Some(path.clone()),
                msg,
            },
            e => e,
        };
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if len < 24 {
            return Err(with_path(Error::gguf(format!(
                "truncated: the file is {len} bytes, smaller than a GGUF header (24 bytes)"
            ))));
        }
        // SAFETY: the mapping is private, so our writes never reach the file; another
        // process truncating the file while it is mapped would fault, as with every mmap
        // loader (llama.cpp included).
        let map = unsafe { memmap2::MmapOptions::new().map_copy(&file) }
            .map_err(|e| Error::io(&path, e))?;
        let header = parse_header(&map).map_err(with_path)?;
        Ok(GgufFile {
            path,
            header,
            map,
            private: Vec::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn version(&self) -> u32 {
        self.header.version
    }

    pub fn metadata(&self) -> &Metadata {
        &self.header.metadata
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.header.tensors.iter().find(|t| t.name == name)
    }

    /// The bytes of a tensor of this file (a view into the mapping).
    pub fn tensor_data(&self, t: &TensorInfo) -> Result<&[u8]> {
        let r = self.range(t)?;
        Ok(&self.map[r])
    }

    /// Mutable bytes of a tensor: writes go to private copies of the touched pages.
    pub fn tensor_data_mut(&mut self, t: &TensorInfo) -> Result<&mut [u8]> {
        let r = self.range(t)?;
        Ok(&mut self.map[r])
    }

    /// The whole mapping (tensor views are ranges of it).
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The whole mapping, writable: writes go to private copies of the touched pages and never
    /// reach the file (the adapter patcher writes here).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.map
    }

    /// Moves the 2 MiB-aligned chunks inside `range` of the mapping to anonymous memory that
    /// the kernel may back with transparent huge pages, keeping their contents and
    /// addresses. For ranges about to be patched densely: every page would be copied on
    /// write anyway, so this costs no memory, and huge pages make the scattered writes of a
    /// patch (and later reads) cheaper in the TLB. Chunks done before are skipped; the
    /// unaligned ends of `range` stay as they are. Elsewhere than Linux and Android, or if
    /// the kernel refuses, nothing changes.
    pub fn make_private(&mut self, range: std::ops::Range<usize>) {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            const CHUNK: usize = 2 << 20;
            let base = self.map.as_mut_ptr() as usize;
            let end = range.end.min(self.map.len());
            let first = (base + range.start).div_ceil(CHUNK) * CHUNK;
            let last = (base + end) / CHUNK * CHUNK;
            if self.private.is_empty() {
                self.private = vec![false; self.map.len() / CHUNK + 2];
            }
            let mut buf = Vec::new();
            let mut a = first;
            while a + CHUNK <= last {
                let k = (a - base) / CHUNK;
                if !self.private[k] {
                    let off = a - base;
                    buf.clear();
                    buf.extend_from_slice(&self.map[off..off + CHUNK]);
                    // SAFETY (the mmap below): [a, a + CHUNK) lies inside our own mapping,
                    // which `&mut self` borrows exclusively; MAP_FIXED replaces exactly those
                    // pages, and the contents are written back before anyone can read them.
                    // The mapping's munmap on drop covers the new pages too.
                    let map_anon = || unsafe {
                        libc::mmap(
                            a as *mut libc::c_void,
                            CHUNK,
                            libc::PROT_READ | libc::PROT_WRITE,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                            -1,
                            0,
                        ) as usize
                            == a
                    };
                    // A failed MAP_FIXED may already have dropped the old pages (older
                    // kernels): retry once, and if memory cannot be had at all, stop rather
                    // than leave a hole in the weights.
                    if !map_anon() && !map_anon() {
                        eprintln!("sparrow: out of memory while making model pages private");
                        std::process::abort();
                    }
                    // SAFETY: `a` is the start of the chunk just mapped.
                    unsafe { libc::madvise(a as *mut libc::c_void, CHUNK, libc::MADV_HUGEPAGE) };
                    self.map[off..off + CHUNK].copy_from_slice(&buf);
                    self.private[k] = true;
                }
                a += CHUNK;
            }
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        let _ = range;
    }

    /// The absolute byte range of `t` in the mapping, checked (a `TensorInfo` from another
    /// file must not read out of bounds).
    pub fn range(&self, t: &TensorInfo) -> Result<std::ops::Range<usize>> {
        let start = self.header.data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(t.n_bytes));
        match (start, end) {
            (Some(s), Some(e)) if e <= self.map.len() as u64 => Ok(s as usize..e as usize),
            _ => Err(Error::tensor(&t.name, "range lies outside the mapped file")),
        }
    }
}
