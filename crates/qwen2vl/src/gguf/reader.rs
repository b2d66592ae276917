//! The GGUF reader: parses and checks the header once, then hands out tensor bytes borrowed
//! from the memory map (see the module docs for the rules).

use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::{
    align_up, GgmlType, MetaArray, MetaValue, ValueType, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAGIC,
    MAX_ARRAY_LEN, MAX_DIMS, MAX_NAME_LEN, MAX_STRING_LEN,
};
use crate::{Error, Result};

/// Smallest encoding of one key-value entry: key length (8), value type (4), a one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Smallest encoding of one tensor description: name length (8), n_dims (4), one dimension
/// (8), type (4), offset (8).
const MIN_TENSOR_BYTES: u64 = 8 + 4 + 8 + 4 + 8;
/// Magic, version, tensor count, key-value count.
const FIXED_HEADER_BYTES: u64 = 4 + 4 + 8 + 8;

/// One tensor's description from the table, checked against the file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    name: String,
    ggml_type: GgmlType,
    ne: [u64; MAX_DIMS],
    n_dims: u8,
    n_elements: u64,
    offset: u64,
    byte_len: Option<u64>,
}

impl TensorInfo {
    /// The tensor's name (e.g. `blk.0.attn_q.weight`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The element type.
    pub fn ggml_type(&self) -> GgmlType {
        self.ggml_type
    }

    /// The dimensions in the file's (ggml) order: `ne()[0]` is the row length.
    pub fn ne(&self) -> &[u64] {
        &self.ne[..usize::from(self.n_dims)]
    }

    /// The dimensions in PyTorch order (the reverse of [`TensorInfo::ne`]): a `(out, in)`
    /// weight stored with `ne = [in, out]` has shape `[out, in]`.
    pub fn shape(&self) -> Vec<usize> {
        // Each dimension is at most the element count, which fits in usize (checked at parse).
        self.ne().iter().rev().map(|&d| d as usize).collect()
    }

    /// The number of elements.
    pub fn n_elements(&self) -> u64 {
        self.n_elements
    }

    /// The offset of the tensor's bytes from the start of the data section.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The tensor's size in bytes, or `None` for an unknown type.
    pub fn byte_len(&self) -> Option<u64> {
        self.byte_len
    }
}

enum Backing {
    Map(Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Map(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// A checked GGUF file: its metadata and tensor table, and its bytes (memory-mapped by
/// [`GgufFile::open`]) from which [`GgufFile::tensor_bytes`] borrows without copying.
pub struct GgufFile {
    backing: Backing,
    path: Option<PathBuf>,
    origin: String,
    header: Header,
}

/// What parsing the header yields.
#[derive(Debug)]
struct Header {
    version: u32,
    alignment: u64,
    /// Where the data section starts (the end of the header, padded when there are tensors).
    data_start: u64,
    /// Key-value pairs in file order.
    metadata: Vec<(String, MetaValue)>,
    /// Indices into `metadata`, sorted by key.
    meta_index: Vec<u32>,
    /// Tensors in table order.
    tensors: Vec<TensorInfo>,
    /// Indices into `tensors`, sorted by name.
    tensor_index: Vec<u32>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("origin", &self.origin)
            .field("version", &self.header.version)
            .field("metadata", &self.header.metadata.len())
            .field("tensors", &self.header.tensors.len())
            .finish()
    }
}

macro_rules! getters {
    ($($(#[$doc:meta])* $get:ident, $opt:ident, $variant:ident, $t:ty, $what:literal;)*) => {$(
        $(#[$doc])*
        ///
        /// An error names the key and the expected type when the key is missing or holds
        /// another type (values are not converted between types, as in llama.cpp's loader).
        pub fn $get(&self, key: &str) -> Result<$t> {
            self.$opt(key)?.ok_or_else(|| self.missing(key, $what))
        }

        /// Like the getter without `_opt`, but a missing key is `Ok(None)` (a key of another
        /// type is still an error).
        pub fn $opt(&self, key: &str) -> Result<Option<$t>> {
            match self.get(key) {
                None => Ok(None),
                Some(MetaValue::$variant(v)) => Ok(Some(*v)),
                Some(other) => Err(self.wrong_type(key, other, $what)),
            }
        }
    )*};
}

macro_rules! array_getters {
    ($($(#[$doc:meta])* $get:ident, $opt:ident, $variant:ident, $t:ty, $what:literal;)*) => {$(
        $(#[$doc])*
        ///
        /// An error names the key and the expected type when the key is missing or holds
        /// another type.
        pub fn $get(&self, key: &str) -> Result<&[$t]> {
            self.$opt(key)?.ok_or_else(|| self.missing(key, $what))
        }

        /// Like the getter without `_opt`, but a missing key is `Ok(None)` (a key of another
        /// type is still an error).
        pub fn $opt(&self, key: &str) -> Result<Option<&[$t]>> {
            match self.get(key) {
                None => Ok(None),
                Some(MetaValue::Array(MetaArray::$variant(v))) => Ok(Some(v.as_slice())),
                Some(other) => Err(self.wrong_type(key, other, $what)),
            }
        }
    )*};
}

impl GgufFile {
    /// Maps the file at `path` and checks its header (see the module docs for the rules).
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = std::fs::File::open(path).map_err(|e| Error::Model {
            what: format!("cannot open the GGUF file ({e})"),
            path: path.to_path_buf(),
        })?;
        // SAFETY: the file is opened read-only; like every mmap-based loader (and weights.rs)
        // we rely on nobody truncating or rewriting a checkpoint while it is in use.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::Model {
            what: format!("cannot map the GGUF file ({e})"),
            path: path.to_path_buf(),
        })?;
        let mut f = Self::build(Backing::Map(map), path.display().to_string())?;
        f.path = Some(path.to_path_buf());
        Ok(f)
    }

    /// Checks `bytes` as a whole GGUF file and keeps them (tests, small files, files already
    /// in memory).
    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> Result<GgufFile> {
        Self::build(Backing::Owned(bytes.into()), "(in memory)".to_string())
    }

    fn build(backing: Backing, origin: String) -> Result<GgufFile> {
        let header = parse(backing.bytes())
            .map_err(|m| Error::Weights(format!("GGUF file {origin}: {m}")))?;
        Ok(GgufFile {
            backing,
            path: None,
            origin,
            header,
        })
    }

    /// Where the file came from (its path, or "(in memory)"), as errors name it.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The path given to [`GgufFile::open`], if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.header.version
    }

    /// The data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.header.alignment
    }

    /// The offset in the file where the data section starts.
    pub fn data_start(&self) -> u64 {
        self.header.data_start
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        self.backing.bytes()
    }

    /// The key-value pairs in file order.
    pub fn metadata(&self) -> impl ExactSizeIterator<Item = (&str, &MetaValue)> {
        self.header.metadata.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        let m = &self.header.metadata;
        self.header
            .meta_index
            .binary_search_by(|&i| m[i as usize].0.as_str().cmp(key))
            .ok()
            .map(|j| &m[self.header.meta_index[j] as usize].1)
    }

    /// Empties the array values of `keys` (keeping each key and its element type), freeing
    /// their memory; other keys and missing ones are left alone.
    ///
    /// For metadata that is read once at load: a Qwen2 vocabulary's `tokenizer.ggml.tokens`
    /// and `.merges` are 300 thousand strings, ~22 MiB of heap for as long as the model is
    /// loaded, after the tokenizer has made its own copy (see
    /// [`crate::gguf::model::GgufModel::release_vocabulary`]).
    pub fn release_arrays(&mut self, keys: &[&str]) {
        for (key, value) in &mut self.header.metadata {
            if let (true, MetaValue::Array(a)) = (keys.contains(&key.as_str()), value) {
                *a = a.emptied();
            }
        }
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    fn missing(&self, key: &str, what: &str) -> Error {
        Error::Weights(format!(
            "GGUF file {}: key '{key}' is missing; expected a value of type {what}",
            self.origin
        ))
    }

    fn wrong_type(&self, key: &str, found: &MetaValue, what: &str) -> Error {
        Error::Weights(format!(
            "GGUF file {}: key '{key}' has type {}; expected type {what}",
            self.origin,
            found.type_description()
        ))
    }

    getters! {
        /// The u8 value of `key`.
        get_u8, get_u8_opt, U8, u8, "u8";
        /// The i8 value of `key`.
        get_i8, get_i8_opt, I8, i8, "i8";
        /// The u16 value of `key`.
        get_u16, get_u16_opt, U16, u16, "u16";
        /// The i16 value of `key`.
        get_i16, get_i16_opt, I16, i16, "i16";
        /// The u32 value of `key` (e.g. `qwen2vl.block_count`).
        get_u32, get_u32_opt, U32, u32, "u32";
        /// The i32 value of `key`.
        get_i32, get_i32_opt, I32, i32, "i32";
        /// The u64 value of `key`.
        get_u64, get_u64_opt, U64, u64, "u64";
        /// The i64 value of `key`.
        get_i64, get_i64_opt, I64, i64, "i64";
        /// The f32 value of `key` (e.g. `qwen2vl.rope.freq_base`).
        get_f32, get_f32_opt, F32, f32, "f32";
        /// The f64 value of `key`.
        get_f64, get_f64_opt, F64, f64, "f64";
        /// The bool value of `key`.
        get_bool, get_bool_opt, Bool, bool, "bool";
    }

    /// The string value of `key` (e.g. `general.architecture`).
    ///
    /// An error names the key and the expected type when the key is missing or holds
    /// another type.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.get_str_opt(key)?
            .ok_or_else(|| self.missing(key, "string"))
    }

    /// Like [`GgufFile::get_str`], but a missing key is `Ok(None)`.
    pub fn get_str_opt(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Str(s)) => Ok(Some(s)),
            Some(other) => Err(self.wrong_type(key, other, "string")),
        }
    }

    array_getters! {
        /// The string array of `key` (e.g. `tokenizer.ggml.tokens`).
        get_str_array, get_str_array_opt, Str, String, "array of string";
        /// The i32 array of `key` (e.g. `qwen2vl.rope.dimension_sections`).
        get_i32_array, get_i32_array_opt, I32, i32, "array of i32";
        /// The u32 array of `key`.
        get_u32_array, get_u32_array_opt, U32, u32, "array of u32";
        /// The f32 array of `key` (e.g. `clip.vision.image_mean`).
        get_f32_array, get_f32_array_opt, F32, f32, "array of f32";
        /// The u8 array of `key`.
        get_u8_array, get_u8_array_opt, U8, u8, "array of u8";
    }

    /// Drops the mapped pages of `data` (a slice of this file's bytes, already copied out)
    /// from the process's resident set; pages shared with a neighbour are kept. A later read
    /// faults them back in from the file. Nothing happens for an in-memory file.
    pub fn release(&self, data: &[u8]) {
        if let Backing::Map(map) = &self.backing {
            crate::mapped::release_pages(map, data);
        }
    }

    /// The tensors in table order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    /// The tensor called `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        let t = &self.header.tensors;
        self.header
            .tensor_index
            .binary_search_by(|&i| t[i as usize].name.as_str().cmp(name))
            .ok()
            .map(|j| &t[self.header.tensor_index[j] as usize])
    }

    /// The tensor called `name`, or an error naming it.
    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor(name).ok_or_else(|| {
            Error::Weights(format!(
                "GGUF file {}: no tensor '{name}' (the file has {} tensors)",
                self.origin,
                self.header.tensors.len()
            ))
        })
    }

    /// The bytes of tensor `name`, borrowed from the file (no copy). An error names a missing
    /// tensor, or a tensor whose type this module does not know (its type id).
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.tensor_info(name)?;
        self.bytes_of(t)
    }

    /// The bytes of `t` (a tensor of this file, from [`GgufFile::tensors`]), borrowed from
    /// the file.
    pub fn bytes_of(&self, t: &TensorInfo) -> Result<&[u8]> {
        let Some(len) = t.byte_len else {
            return Err(Error::Weights(format!(
                "GGUF file {}: tensor '{}' has ggml type id {}, which this reader does not know; known: {}",
                self.origin,
                t.name,
                t.ggml_type.id(),
                super::known_type_names()
            )));
        };
        // In bounds for this file's tensors (checked at parse: data start + offset + length
        // <= file length); a `TensorInfo` of another file may not be.
        let start = self.header.data_start.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(len));
        match (start, end) {
            (Some(s), Some(e)) if e <= self.bytes().len() as u64 => {
                Ok(&self.bytes()[s as usize..e as usize])
            }
            _ => Err(Error::Internal(format!(
                "GGUF file {}: tensor '{}' is not one of this file's (its bytes lie outside it)",
                self.origin, t.name
            ))),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing.
// ---------------------------------------------------------------------------------------------

type Msg = std::result::Result<(), String>;

/// A position in the file with bounds-checked reads; every failure says where it happened.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.data.len() - self.pos) as u64
    }

    /// The next `n` bytes, or an error naming `what` was being read.
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> std::result::Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "truncated: {} at byte {} needs {n} bytes but the file ends at byte {} ({} left)",
                what(),
                self.pos,
                self.data.len(),
                self.remaining()
            ));
        }
        let s = &self.data[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(
        &mut self,
        what: &dyn Fn() -> String,
    ) -> std::result::Result<[u8; N], String> {
        let b = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> std::result::Result<u32, String> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> std::result::Result<u64, String> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A string: u64 length (≤ 2^30 and ≤ the bytes left, checked before anything is
    /// allocated), then UTF-8 bytes, borrowed.
    fn str(&mut self, what: &dyn Fn() -> String) -> std::result::Result<&'a str, String> {
        let at = self.pos;
        let len = self.u64(&|| format!("the length of {}", what()))?;
        if len > MAX_STRING_LEN || len > self.remaining() {
            return Err(format!(
                "{} at byte {at} has length {len}; allowed: at most {} (the bytes left in the file, and at most 2^30)",
                what(),
                self.remaining().min(MAX_STRING_LEN)
            ));
        }
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes).map_err(|e| {
            format!(
                "{} at byte {at} is not UTF-8 ({e}); allowed: UTF-8 text",
                what()
            )
        })
    }
}

/// Parses and checks the whole header of `data` (a complete file).
fn parse(data: &[u8]) -> std::result::Result<Header, String> {
    let mut c = Cursor { data, pos: 0 };
    if (data.len() as u64) < FIXED_HEADER_BYTES {
        if data.len() >= 4 && data[..4] != MAGIC {
            return Err(bad_magic(&data[..4]));
        }
        return Err(format!(
            "truncated: the file is {} bytes, shorter than the {FIXED_HEADER_BYTES}-byte GGUF header (magic, version, tensor and key counts)",
            data.len()
        ));
    }
    let magic: [u8; 4] = c.array(&|| "the magic".into())?;
    if magic != MAGIC {
        return Err(bad_magic(&magic));
    }
    let version = c.u32(&|| "the version".into())?;
    check_version(version)?;
    let n_tensors = c.u64(&|| "the tensor count".into())?;
    let n_kv = c.u64(&|| "the key-value count".into())?;
    let left = c.remaining();
    if n_kv > left / MIN_KV_BYTES {
        return Err(format!(
            "the key-value count {n_kv} cannot fit in the {left} bytes after the header; allowed: at most {} (each entry takes at least {MIN_KV_BYTES} bytes)",
            left / MIN_KV_BYTES
        ));
    }
    if n_tensors > left / MIN_TENSOR_BYTES {
        return Err(format!(
            "the tensor count {n_tensors} cannot fit in the {left} bytes after the header; allowed: at most {} (each tensor description takes at least {MIN_TENSOR_BYTES} bytes)",
            left / MIN_TENSOR_BYTES
        ));
    }

    // Key-value pairs. The count is bounded by the bytes left, but in a multi-gigabyte file
    // that bound is large: reserve little and let the table grow with the entries read.
    let mut metadata: Vec<(String, MetaValue)> = Vec::with_capacity(reserve(n_kv));
    for i in 0..n_kv {
        let at = c.pos;
        let key = c.str(&|| format!("key {i}"))?;
        if key.is_empty() {
            return Err(format!(
                "key {i} at byte {at} is empty; allowed: a non-empty name"
            ));
        }
        let value = read_value(&mut c, i, key)?;
        metadata.push((key.to_string(), value));
    }
    let meta_index = sorted_index(&metadata, |e| e.0.as_str());
    if let Some((a, b)) = first_duplicate(&meta_index, |i| metadata[i].0.as_str()) {
        return Err(format!(
            "key '{}' appears twice (entries {a} and {b}); allowed: each key once",
            metadata[a].0
        ));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        None => u64::from(DEFAULT_ALIGNMENT),
        Some((_, MetaValue::U32(a))) if a.is_power_of_two() => u64::from(*a),
        Some((_, v)) => {
            return Err(format!(
                "key '{ALIGNMENT_KEY}' is {} {}; allowed: a u32 power of two (default {DEFAULT_ALIGNMENT})",
                v.type_description(),
                match v {
                    MetaValue::Array(_) => String::new(),
                    v => format!("{v:?}"),
                }
            ))
        }
    };

    // Tensor descriptions, again bounded by the bytes left.
    let left = c.remaining();
    if n_tensors > left / MIN_TENSOR_BYTES {
        return Err(format!(
            "the tensor count {n_tensors} cannot fit in the {left} bytes after the metadata (byte {}); allowed: at most {}",
            c.pos,
            left / MIN_TENSOR_BYTES
        ));
    }
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(reserve(n_tensors));
    for i in 0..n_tensors {
        tensors.push(read_tensor_info(&mut c, i, alignment)?);
    }
    let tensor_index = sorted_index(&tensors, |t| t.name.as_str());
    if let Some((a, b)) = first_duplicate(&tensor_index, |i| tensors[i].name.as_str()) {
        return Err(format!(
            "tensor name '{}' appears twice (tensors {a} and {b}); allowed: each name once",
            tensors[a].name
        ));
    }

    // The data section: after the header, padded to the alignment (llama.cpp pads only when
    // there are tensors).
    let header_end = c.pos as u64;
    let file_len = data.len() as u64;
    let data_start = if tensors.is_empty() {
        header_end
    } else {
        match align_up(header_end, alignment) {
            Some(s) if s <= file_len => s,
            _ => {
                return Err(format!(
                    "truncated: the data section starts at byte {header_end} padded to the alignment {alignment}, past the end of the {file_len}-byte file"
                ))
            }
        }
    };
    check_extents(&tensors, data_start, file_len)?;
    Ok(Header {
        version,
        alignment,
        data_start,
        metadata,
        meta_index,
        tensors,
        tensor_index,
    })
}

/// How many entries to reserve for a table whose count the file claims: at most 65,536, so
/// memory follows the entries actually read (a count only bounded by the bytes left may still
/// be hundreds of millions in a large file) while a real vocabulary grows in a few steps.
fn reserve(claimed: u64) -> usize {
    claimed.min(1 << 16) as usize
}

fn bad_magic(magic: &[u8]) -> String {
    format!(
        "not a GGUF file: it starts with {:?} (bytes {:02x?}); allowed: the magic \"GGUF\"",
        String::from_utf8_lossy(magic),
        magic
    )
}

fn check_version(version: u32) -> Msg {
    match version {
        2 | 3 => Ok(()),
        1 => Err(
            "GGUF version 1 is not supported (llama.cpp dropped it too); allowed: 2 or 3".into(),
        ),
        v if v & 0xffff == 0 && matches!(v.swap_bytes(), 2 | 3) => Err(format!(
            "GGUF version {v:#x} is version {} written big-endian; allowed: little-endian files, version 2 or 3",
            v.swap_bytes()
        )),
        v => Err(format!(
            "GGUF version {v} is not supported; allowed: 2 or 3"
        )),
    }
}

/// Indices of `items`, sorted by `key`.
fn sorted_index<T>(items: &[T], key: impl Fn(&T) -> &str) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..items.len() as u32).collect();
    idx.sort_unstable_by(|&a, &b| {
        key(&items[a as usize])
            .cmp(key(&items[b as usize]))
            .then(a.cmp(&b))
    });
    idx
}

/// The first pair of equal keys (smaller index first) in a sorted index.
fn first_duplicate<'a>(idx: &[u32], key: impl Fn(usize) -> &'a str) -> Option<(usize, usize)> {
    idx.windows(2)
        .map(|w| (w[0] as usize, w[1] as usize))
        .filter(|&(a, b)| key(a) == key(b))
        .min_by_key(|&(_, b)| b)
}

/// One value of entry `i` (`key`), after its key.
fn read_value(c: &mut Cursor<'_>, i: u64, key: &str) -> std::result::Result<MetaValue, String> {
    let at = c.pos;
    let type_id = c.u32(&|| format!("the value type of key '{key}'"))?;
    let vt = value_type(type_id, key, at, "value")?;
    if vt != ValueType::Array {
        return read_scalar(c, vt, &|| format!("the value of key '{key}'"));
    }
    let at = c.pos;
    let elem_id = c.u32(&|| format!("the element type of array '{key}'"))?;
    let et = value_type(elem_id, key, at, "array element")?;
    if et == ValueType::Array {
        return Err(format!(
            "key '{key}' (entry {i}) at byte {at} is an array of arrays; allowed: arrays of numbers, bools or strings (llama.cpp refuses nested arrays too)"
        ));
    }
    let at = c.pos;
    let n = c.u64(&|| format!("the length of array '{key}'"))?;
    // Smallest encoding of one element: its fixed size, or a string's 8-byte length.
    let min = et.fixed_size().unwrap_or(8);
    let left = c.remaining();
    if n > MAX_ARRAY_LEN || n > left / min {
        return Err(format!(
            "array '{key}' at byte {at} has {n} elements of type {}; allowed: at most {} (the bytes left, {left}, hold at most {} and the limit is 2^30)",
            et.name(),
            (left / min).min(MAX_ARRAY_LEN),
            left / min
        ));
    }
    let what = || format!("the elements of array '{key}'");
    Ok(MetaValue::Array(match et {
        ValueType::Str => {
            // n * 8 <= the bytes left; still reserve little (see `reserve`).
            let mut v = Vec::with_capacity(reserve(n));
            for j in 0..n {
                v.push(
                    c.str(&|| format!("element {j} of array '{key}'"))?
                        .to_string(),
                );
            }
            MetaArray::Str(v)
        }
        ValueType::U8 => MetaArray::U8(c.take(n, &what)?.to_vec()),
        ValueType::I8 => MetaArray::I8(c.take(n, &what)?.iter().map(|&b| b as i8).collect()),
        ValueType::Bool => MetaArray::Bool(c.take(n, &what)?.iter().map(|&b| b != 0).collect()),
        ValueType::U16 => MetaArray::U16(le(c.take(n * 2, &what)?, u16::from_le_bytes)),
        ValueType::I16 => MetaArray::I16(le(c.take(n * 2, &what)?, i16::from_le_bytes)),
        ValueType::U32 => MetaArray::U32(le(c.take(n * 4, &what)?, u32::from_le_bytes)),
        ValueType::I32 => MetaArray::I32(le(c.take(n * 4, &what)?, i32::from_le_bytes)),
        ValueType::F32 => MetaArray::F32(le(c.take(n * 4, &what)?, f32::from_le_bytes)),
        ValueType::U64 => MetaArray::U64(le(c.take(n * 8, &what)?, u64::from_le_bytes)),
        ValueType::I64 => MetaArray::I64(le(c.take(n * 8, &what)?, i64::from_le_bytes)),
        ValueType::F64 => MetaArray::F64(le(c.take(n * 8, &what)?, f64::from_le_bytes)),
        ValueType::Array => unreachable!("refused above"),
    }))
}

fn value_type(id: u32, key: &str, at: usize, what: &str) -> std::result::Result<ValueType, String> {
    ValueType::from_id(id).ok_or_else(|| {
        format!(
            "key '{key}' has {what} type id {id} at byte {at}; allowed: 0 to 12 (u8, i8, u16, i16, u32, i32, f32, bool, string, array, u64, i64, f64)"
        )
    })
}

/// Little-endian values of `N` bytes each.
fn le<T, const N: usize>(bytes: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|b| {
            let mut a = [0u8; N];
            a.copy_from_slice(b);
            f(a)
        })
        .collect()
}

fn read_scalar(
    c: &mut Cursor<'_>,
    vt: ValueType,
    what: &dyn Fn() -> String,
) -> std::result::Result<MetaValue, String> {
    Ok(match vt {
        ValueType::U8 => MetaValue::U8(c.array::<1>(what)?[0]),
        ValueType::I8 => MetaValue::I8(c.array::<1>(what)?[0] as i8),
        ValueType::Bool => MetaValue::Bool(c.array::<1>(what)?[0] != 0),
        ValueType::U16 => MetaValue::U16(u16::from_le_bytes(c.array(what)?)),
        ValueType::I16 => MetaValue::I16(i16::from_le_bytes(c.array(what)?)),
        ValueType::U32 => MetaValue::U32(u32::from_le_bytes(c.array(what)?)),
        ValueType::I32 => MetaValue::I32(i32::from_le_bytes(c.array(what)?)),
        ValueType::F32 => MetaValue::F32(f32::from_le_bytes(c.array(what)?)),
        ValueType::U64 => MetaValue::U64(u64::from_le_bytes(c.array(what)?)),
        ValueType::I64 => MetaValue::I64(i64::from_le_bytes(c.array(what)?)),
        ValueType::F64 => MetaValue::F64(f64::from_le_bytes(c.array(what)?)),
        ValueType::Str => MetaValue::Str(c.str(what)?.to_string()),
        ValueType::Array => unreachable!("arrays are read by read_value"),
    })
}

/// Tensor description `i`: name, dimensions, type, offset (checked on its own; the extents
/// are checked against the file and each other afterwards).
fn read_tensor_info(
    c: &mut Cursor<'_>,
    i: u64,
    alignment: u64,
) -> std::result::Result<TensorInfo, String> {
    let at = c.pos;
    let name = c.str(&|| format!("the name of tensor {i}"))?;
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "tensor {i} at byte {at} has a name of {} bytes; allowed: 1 to {MAX_NAME_LEN} bytes (ggml's GGML_MAX_NAME)",
            name.len()
        ));
    }
    let at = c.pos;
    let n_dims = c.u32(&|| format!("the dimension count of tensor '{name}'"))?;
    if n_dims == 0 || n_dims as usize > MAX_DIMS {
        return Err(format!(
            "tensor '{name}' has {n_dims} dimensions (byte {at}); allowed: 1 to {MAX_DIMS}"
        ));
    }
    let mut ne = [1u64; MAX_DIMS];
    for (j, d) in ne.iter_mut().enumerate().take(n_dims as usize) {
        *d = c.u64(&|| format!("ne[{j}] of tensor '{name}'"))?;
    }
    let dims = &ne[..n_dims as usize];
    let n_elements =
        super::n_elements(dims).map_err(|m| format!("tensor '{name}' (byte {at}): {m}"))?;
    if usize::try_from(n_elements).is_err() {
        return Err(format!(
            "tensor '{name}' has {n_elements} elements; allowed: at most {} on this machine",
            usize::MAX
        ));
    }
    let type_id = c.u32(&|| format!("the type of tensor '{name}'"))?;
    let ggml_type = GgmlType::from_id(type_id);
    let byte_len = if ggml_type.is_known() {
        Some(
            ggml_type
                .byte_size(dims)
                .map_err(|m| format!("tensor '{name}' ({ggml_type}, ne {dims:?}): {m}"))?,
        )
    } else {
        None
    };
    let at = c.pos;
    let offset = c.u64(&|| format!("the data offset of tensor '{name}'"))?;
    if !offset.is_multiple_of(alignment) {
        return Err(format!(
            "tensor '{name}' has data offset {offset} (byte {at}), not a multiple of the alignment {alignment}; allowed: aligned offsets"
        ));
    }
    Ok(TensorInfo {
        name: name.to_string(),
        ggml_type,
        ne,
        n_dims: n_dims as u8,
        n_elements,
        offset,
        byte_len,
    })
}

/// Every tensor's bytes lie inside the file and no two overlap. A tensor of an unknown type
/// has an unknown length; it is given one byte (every tensor has at least one), so its start
/// must still be inside the file and outside every other tensor.
fn check_extents(tensors: &[TensorInfo], data_start: u64, file_len: u64) -> Msg {
    let data_len = file_len - data_start;
    let mut spans: Vec<(u64, u64, usize)> = Vec::with_capacity(tensors.len());
    for (i, t) in tensors.iter().enumerate() {
        let len = t.byte_len.unwrap_or(1);
        let end = t.offset.checked_add(len).filter(|&e| e <= data_len);
        let Some(end) = end else {
            return Err(format!(
                "truncated: tensor '{}' ({}, ne {:?}) needs {} bytes at data offset {} (file bytes {}..{}), past the end of the {file_len}-byte file (data section starts at byte {data_start})",
                t.name,
                t.ggml_type,
                t.ne(),
                t.byte_len.map_or("at least 1".to_string(), |l| l.to_string()),
                t.offset,
                data_start as u128 + u128::from(t.offset),
                data_start as u128 + u128::from(t.offset) + u128::from(len),
            ));
        };
        spans.push((t.offset, end, i));
    }
    spans.sort_unstable();
    for w in spans.windows(2) {
        let ((a0, a1, a), (b0, b1, b)) = (w[0], w[1]);
        if b0 < a1 {
            return Err(format!(
                "tensors '{}' (data bytes {a0}..{a1}) and '{}' (data bytes {b0}..{b1}) overlap; allowed: disjoint tensors",
                tensors[a].name, tensors[b].name
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufWriter;

    /// A small valid file: two keys, two tensors (f32 [4, 2] and q8_0 [32]).
    fn small() -> Vec<u8> {
        let mut w = GgufWriter::new();
        w.add("general.architecture", "qwen2vl").unwrap();
        w.add("qwen2vl.block_count", 2u32).unwrap();
        w.add_tensor("a", GgmlType::F32, &[4, 2]).unwrap();
        w.add_tensor("b", GgmlType::Q8_0, &[32]).unwrap();
        let mut s = w.begin(Vec::new()).unwrap();
        s.write_tensor("a", &[1u8; 32]).unwrap();
        s.write_tensor("b", &[2u8; 34]).unwrap();
        s.finish().unwrap()
    }

    fn err(bytes: Vec<u8>) -> String {
        match GgufFile::from_bytes(bytes) {
            Ok(_) => panic!("parsed"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn reads_a_small_file() {
        let f = GgufFile::from_bytes(small()).unwrap();
        assert_eq!(f.version(), 3);
        assert_eq!(f.alignment(), 32);
        assert_eq!(f.get_str("general.architecture").unwrap(), "qwen2vl");
        assert_eq!(f.get_u32("qwen2vl.block_count").unwrap(), 2);
        assert_eq!(f.tensors().len(), 2);
        let a = f.tensor("a").unwrap();
        assert_eq!(a.ne(), &[4, 2]);
        assert_eq!(a.shape(), vec![2, 4]);
        assert_eq!(f.tensor_bytes("a").unwrap(), &[1u8; 32]);
        assert_eq!(f.tensor_bytes("b").unwrap(), &[2u8; 34]);
        assert_eq!(f.data_start() % 32, 0);
    }

    #[test]
    fn getters_name_the_key_and_type() {
        let f = GgufFile::from_bytes(small()).unwrap();
        let e = f.get_u32("qwen2vl.context_length").unwrap_err().to_string();
        assert!(
            e.contains("'qwen2vl.context_length' is missing; expected a value of type u32"),
            "{e}"
        );
        let e = f.get_f32("qwen2vl.block_count").unwrap_err().to_string();
        assert!(
            e.contains("'qwen2vl.block_count' has type u32; expected type f32"),
            "{e}"
        );
        let e = f
            .get_str_array("general.architecture")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("has type string; expected type array of string"),
            "{e}"
        );
        assert_eq!(f.get_u32_opt("nope").unwrap(), None);
        assert!(f.get_u32_opt("general.architecture").is_err());
        let e = f.tensor_bytes("c").unwrap_err().to_string();
        assert!(e.contains("no tensor 'c'"), "{e}");
    }

    #[test]
    fn the_header_checks_come_in_order() {
        let good = small();
        let mut b = good.clone();
        b[0] = b'X';
        assert!(err(b).contains("not a GGUF file"));
        let mut b = good.clone();
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert!(err(b).contains("version 1 is not supported"));
        let mut b = good.clone();
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert!(err(b).contains("big-endian"));
        let mut b = good.clone();
        b[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(err(b).contains("tensor count 1152921504606846976 cannot fit"));
        let mut b = good;
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(err(b).contains("key-value count 18446744073709551615 cannot fit"));
    }
}
