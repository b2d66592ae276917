//! The GGUF writer: metadata and tensor descriptions first, then the tensors' bytes streamed
//! in order (see the module docs).

use std::collections::HashSet;
use std::io::Write;

use super::{
    align_up, GgmlType, MetaArray, MetaValue, ValueType, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAGIC,
    MAX_ARRAY_LEN, MAX_NAME_LEN, MAX_STRING_LEN, VERSION,
};
use crate::{Error, Result};

fn writer_err(msg: String) -> Error {
    Error::Weights(format!("GGUF writer: {msg}"))
}

/// A tensor planned for the file.
#[derive(Clone, Debug)]
struct Planned {
    name: String,
    ggml_type: GgmlType,
    ne: Vec<u64>,
    byte_len: u64,
    offset: u64,
}

/// Builds a GGUF file (version 3): add the metadata and the tensors' descriptions, then
/// [`GgufWriter::begin`] writing to any [`Write`] and stream the tensors' bytes through the
/// [`TensorStream`] it returns.
///
/// ```
/// use qwen2vl::gguf::{GgmlType, GgufFile, GgufWriter};
///
/// let mut w = GgufWriter::new();
/// w.add("general.architecture", "qwen2vl")?;
/// w.add("qwen2vl.rope.dimension_sections", vec![16i32, 24, 24, 0])?;
/// w.add_tensor("output_norm.weight", GgmlType::F32, &[4])?;
/// let mut stream = w.begin(Vec::new())?;
/// stream.write_tensor("output_norm.weight", &[0u8; 16])?;
/// let bytes = stream.finish()?;
///
/// let f = GgufFile::from_bytes(bytes)?;
/// assert_eq!(f.get_i32_array("qwen2vl.rope.dimension_sections")?, &[16, 24, 24, 0]);
/// assert_eq!(f.tensor_bytes("output_norm.weight")?, &[0u8; 16]);
/// # Ok::<(), qwen2vl::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct GgufWriter {
    alignment: u32,
    metadata: Vec<(String, MetaValue)>,
    keys: HashSet<String>,
    tensors: Vec<Planned>,
    names: HashSet<String>,
    /// The data section's length so far (each tensor padded to the alignment).
    data_len: u64,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    /// An empty file with the default alignment (32, no `general.alignment` key).
    pub fn new() -> GgufWriter {
        GgufWriter {
            alignment: DEFAULT_ALIGNMENT,
            metadata: Vec::new(),
            keys: HashSet::new(),
            tensors: Vec::new(),
            names: HashSet::new(),
            data_len: 0,
        }
    }

    /// An empty file with another alignment (a power of two), written as the u32 key
    /// `general.alignment` (first in the metadata) when it is not the default 32.
    pub fn with_alignment(alignment: u32) -> Result<GgufWriter> {
        if !alignment.is_power_of_two() {
            return Err(writer_err(format!(
                "alignment {alignment}; allowed: a power of two"
            )));
        }
        let mut w = GgufWriter::new();
        w.alignment = alignment;
        if alignment != DEFAULT_ALIGNMENT {
            w.keys.insert(ALIGNMENT_KEY.to_string());
            w.metadata
                .push((ALIGNMENT_KEY.to_string(), MetaValue::U32(alignment)));
        }
        Ok(w)
    }

    /// The alignment of the data section and of each tensor.
    pub fn alignment(&self) -> u32 {
        self.alignment
    }

    /// Adds one key-value pair (keys are written in the order they are added). Refuses an
    /// empty or repeated key, `general.alignment` (set it with [`GgufWriter::with_alignment`]),
    /// and strings or arrays over the format's 2^30 limits.
    pub fn add(&mut self, key: &str, value: impl Into<MetaValue>) -> Result<()> {
        let value = value.into();
        if key.is_empty() {
            return Err(writer_err("an empty key; allowed: a non-empty name".into()));
        }
        if key.len() as u64 > MAX_STRING_LEN {
            return Err(writer_err(format!(
                "a key of {} bytes; allowed: at most 2^30",
                key.len()
            )));
        }
        if key == ALIGNMENT_KEY {
            return Err(writer_err(format!(
                "key '{ALIGNMENT_KEY}' is set by GgufWriter::with_alignment, not added"
            )));
        }
        if self.keys.contains(key) {
            return Err(writer_err(format!(
                "key '{key}' added twice; allowed: each key once"
            )));
        }
        check_value(key, &value)?;
        self.keys.insert(key.to_string());
        self.metadata.push((key.to_string(), value));
        Ok(())
    }

    /// Plans a tensor `name` of type `ggml_type` with dimensions `ne` in ggml order (`ne[0]`
    /// the row length; a PyTorch `(out, in)` weight is `[in, out]`) and returns the number of
    /// bytes its data must have. Refuses an empty, repeated or too long (over 63 bytes) name,
    /// an unknown type, 0 or more than 4 dimensions, a zero dimension, `ne[0]` not a multiple
    /// of the type's block size, and sizes that overflow.
    pub fn add_tensor(&mut self, name: &str, ggml_type: GgmlType, ne: &[u64]) -> Result<u64> {
        if name.is_empty() || name.len() > MAX_NAME_LEN {
            return Err(writer_err(format!(
                "tensor name {name:?} has {} bytes; allowed: 1 to {MAX_NAME_LEN} bytes (ggml's GGML_MAX_NAME)",
                name.len()
            )));
        }
        if self.names.contains(name) {
            return Err(writer_err(format!(
                "tensor '{name}' added twice; allowed: each name once"
            )));
        }
        let byte_len = ggml_type
            .byte_size(ne)
            .map_err(|m| writer_err(format!("tensor '{name}' ({ggml_type}, ne {ne:?}): {m}")))?;
        let align = u64::from(self.alignment);
        let end = align_up(byte_len, align)
            .and_then(|p| self.data_len.checked_add(p))
            .ok_or_else(|| {
                writer_err(format!(
                    "tensor '{name}': the data section would exceed 2^64 bytes"
                ))
            })?;
        self.names.insert(name.to_string());
        self.tensors.push(Planned {
            name: name.to_string(),
            ggml_type,
            ne: ne.to_vec(),
            byte_len,
            offset: self.data_len,
        });
        self.data_len = end;
        Ok(byte_len)
    }

    /// The header as it will be written: everything before the data section, padded to the
    /// alignment when there are tensors.
    fn encode_header(&self) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&MAGIC);
        h.extend_from_slice(&VERSION.to_le_bytes());
        h.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        h.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_str(&mut h, key);
            put_value(&mut h, value);
        }
        for t in &self.tensors {
            put_str(&mut h, &t.name);
            h.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
            for d in &t.ne {
                h.extend_from_slice(&d.to_le_bytes());
            }
            h.extend_from_slice(&t.ggml_type.id().to_le_bytes());
            h.extend_from_slice(&t.offset.to_le_bytes());
        }
        if !self.tensors.is_empty() {
            let align = self.alignment as usize;
            h.resize(h.len().div_ceil(align) * align, 0);
        }
        h
    }

    /// The size of the header (everything before the first tensor's bytes).
    pub fn header_len(&self) -> u64 {
        self.encode_header().len() as u64
    }

    /// The size of the whole file.
    pub fn file_len(&self) -> u64 {
        self.header_len() + self.data_len
    }

    /// Writes the header to `w` and returns the stream that takes the tensors' bytes. Put a
    /// [`std::io::BufWriter`] around a file. A stream dropped before
    /// [`TensorStream::finish`] leaves an incomplete file.
    pub fn begin<W: Write>(self, mut w: W) -> Result<TensorStream<W>> {
        let header = self.encode_header();
        w.write_all(&header)?;
        Ok(TensorStream {
            w,
            alignment: u64::from(self.alignment),
            tensors: self.tensors,
            next: 0,
            written: 0,
        })
    }
}

/// Refuses strings and arrays the readers would refuse (over 2^30 bytes or elements).
fn check_value(key: &str, value: &MetaValue) -> Result<()> {
    let long = |s: &String| s.len() as u64 > MAX_STRING_LEN;
    let too_long = match value {
        MetaValue::Str(s) => long(s),
        MetaValue::Array(MetaArray::Str(v)) => v.iter().any(long),
        _ => false,
    };
    if too_long {
        return Err(writer_err(format!(
            "key '{key}' holds a string over 2^30 bytes; allowed: at most 2^30"
        )));
    }
    if let MetaValue::Array(a) = value {
        if a.len() as u64 > MAX_ARRAY_LEN {
            return Err(writer_err(format!(
                "key '{key}' holds an array of {} elements; allowed: at most 2^30",
                a.len()
            )));
        }
    }
    Ok(())
}

fn put_str(h: &mut Vec<u8>, s: &str) {
    h.extend_from_slice(&(s.len() as u64).to_le_bytes());
    h.extend_from_slice(s.as_bytes());
}

fn put_value(h: &mut Vec<u8>, v: &MetaValue) {
    h.extend_from_slice(&v.value_type().id().to_le_bytes());
    match v {
        MetaValue::U8(x) => h.push(*x),
        MetaValue::I8(x) => h.push(*x as u8),
        MetaValue::Bool(x) => h.push(u8::from(*x)),
        MetaValue::U16(x) => h.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => h.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => h.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => h.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => h.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U64(x) => h.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => h.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => h.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Str(s) => put_str(h, s),
        MetaValue::Array(a) => {
            h.extend_from_slice(&a.element_type().id().to_le_bytes());
            h.extend_from_slice(&(a.len() as u64).to_le_bytes());
            put_array(h, a);
        }
    }
}

fn put_array(h: &mut Vec<u8>, a: &MetaArray) {
    macro_rules! each_le {
        ($v:expr) => {
            for x in $v {
                h.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match a {
        MetaArray::U8(v) => h.extend_from_slice(v),
        MetaArray::I8(v) => h.extend(v.iter().map(|&x| x as u8)),
        MetaArray::Bool(v) => h.extend(v.iter().map(|&x| u8::from(x))),
        MetaArray::U16(v) => each_le!(v),
        MetaArray::I16(v) => each_le!(v),
        MetaArray::U32(v) => each_le!(v),
        MetaArray::I32(v) => each_le!(v),
        MetaArray::F32(v) => each_le!(v),
        MetaArray::U64(v) => each_le!(v),
        MetaArray::I64(v) => each_le!(v),
        MetaArray::F64(v) => each_le!(v),
        MetaArray::Str(v) => {
            for s in v {
                put_str(h, s);
            }
        }
    }
    debug_assert_ne!(a.element_type(), ValueType::Array);
}

/// Takes the tensors' bytes, in the order they were added, after the header; pads each one
/// to the alignment.
pub struct TensorStream<W: Write> {
    w: W,
    alignment: u64,
    tensors: Vec<Planned>,
    /// The tensor being written.
    next: usize,
    /// Bytes of it written so far.
    written: u64,
}

impl<W: Write> TensorStream<W> {
    /// The tensor whose bytes come next: its name and byte length (`None` when all are
    /// written).
    pub fn next_tensor(&self) -> Option<(&str, u64)> {
        self.tensors
            .get(self.next)
            .map(|t| (t.name.as_str(), t.byte_len))
    }

    /// Writes all the bytes of tensor `name`, which must be the next one, with its exact
    /// length.
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let Some(t) = self.tensors.get(self.next) else {
            return Err(writer_err(format!(
                "tensor '{name}' written after all {} tensors",
                self.tensors.len()
            )));
        };
        if t.name != name || self.written != 0 {
            return Err(writer_err(format!(
                "tensor '{name}' written while tensor '{}' is due ({} of its {} bytes written); allowed: the tensors in the order they were added",
                t.name, self.written, t.byte_len
            )));
        }
        if data.len() as u64 != t.byte_len {
            return Err(writer_err(format!(
                "tensor '{name}' ({}, ne {:?}) given {} bytes; allowed: exactly {}",
                t.ggml_type,
                t.ne,
                data.len(),
                t.byte_len
            )));
        }
        self.write_data(data)
    }

    /// Writes the next `chunk` of the current tensor's bytes (a tensor may come in any
    /// number of chunks; a chunk may not run past the tensor's end). The padding follows the
    /// tensor's last byte.
    pub fn write_data(&mut self, chunk: &[u8]) -> Result<()> {
        let Some(t) = self.tensors.get(self.next) else {
            return Err(writer_err(format!(
                "{} bytes written after all {} tensors",
                chunk.len(),
                self.tensors.len()
            )));
        };
        let left = t.byte_len - self.written;
        if chunk.len() as u64 > left {
            return Err(writer_err(format!(
                "{} bytes given for tensor '{}', which has {left} bytes left of {}",
                chunk.len(),
                t.name,
                t.byte_len
            )));
        }
        self.w.write_all(chunk)?;
        self.written += chunk.len() as u64;
        if self.written == t.byte_len {
            let pad = align_up(t.byte_len, self.alignment).unwrap_or(t.byte_len) - t.byte_len;
            const ZEROS: [u8; 256] = [0; 256];
            let mut pad = pad as usize;
            while pad > 0 {
                let n = pad.min(ZEROS.len());
                self.w.write_all(&ZEROS[..n])?;
                pad -= n;
            }
            self.next += 1;
            self.written = 0;
        }
        Ok(())
    }

    /// Checks that every tensor was written, flushes, and returns the writer.
    pub fn finish(mut self) -> Result<W> {
        if let Some(t) = self.tensors.get(self.next) {
            return Err(writer_err(format!(
                "finished with tensor '{}' incomplete ({} of {} bytes) and {} tensors not written",
                t.name,
                self.written,
                t.byte_len,
                self.tensors.len() - self.next
            )));
        }
        self.w.flush()?;
        Ok(self.w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufFile;

    #[test]
    fn offsets_are_padded_and_the_length_is_known() {
        let mut w = GgufWriter::with_alignment(64).unwrap();
        assert_eq!(w.add_tensor("x", GgmlType::F16, &[3]).unwrap(), 6);
        assert_eq!(w.add_tensor("y", GgmlType::Q4_0, &[64, 2]).unwrap(), 72);
        let expect = w.file_len();
        let header = w.header_len();
        assert_eq!(header % 64, 0);
        let mut s = w.begin(Vec::new()).unwrap();
        assert_eq!(s.next_tensor(), Some(("x", 6)));
        s.write_tensor("x", &[7; 6]).unwrap();
        s.write_data(&[8; 40]).unwrap();
        s.write_data(&[9; 32]).unwrap();
        assert_eq!(s.next_tensor(), None);
        let bytes = s.finish().unwrap();
        assert_eq!(bytes.len() as u64, expect);
        let f = GgufFile::from_bytes(bytes).unwrap();
        assert_eq!(f.alignment(), 64);
        assert_eq!(f.get_u32("general.alignment").unwrap(), 64);
        assert_eq!(f.tensor("y").unwrap().offset(), 64);
        assert_eq!(f.data_start(), header);
    }

    #[test]
    fn misuse_is_refused() {
        assert!(GgufWriter::with_alignment(0).is_err());
        assert!(GgufWriter::with_alignment(48).is_err());
        let mut w = GgufWriter::new();
        w.add("a", 1u8).unwrap();
        let e = w.add("a", 2u8).unwrap_err().to_string();
        assert!(e.contains("key 'a' added twice"), "{e}");
        assert!(w.add("", 1u8).is_err());
        assert!(w.add(ALIGNMENT_KEY, 64u32).is_err());
        let e = w.add_tensor("t", GgmlType::Q8_0, &[31]).unwrap_err();
        assert!(e.to_string().contains("not a multiple"), "{e}");
        assert!(w.add_tensor("t", GgmlType::Unknown(99), &[4]).is_err());
        assert!(w.add_tensor(&"n".repeat(64), GgmlType::F32, &[1]).is_err());
        assert!(w.add_tensor("t", GgmlType::F32, &[0]).is_err());
        assert!(w.add_tensor("t", GgmlType::F32, &[1, 1, 1, 1, 1]).is_err());
        w.add_tensor("t", GgmlType::F32, &[2]).unwrap();
        assert!(w.add_tensor("t", GgmlType::F32, &[2]).is_err());
        w.add_tensor("u", GgmlType::F32, &[1]).unwrap();
        let mut s = w.begin(Vec::new()).unwrap();
        let e = s.write_tensor("u", &[0; 4]).unwrap_err().to_string();
        assert!(e.contains("while tensor 't' is due"), "{e}");
        let e = s.write_tensor("t", &[0; 7]).unwrap_err().to_string();
        assert!(e.contains("given 7 bytes; allowed: exactly 8"), "{e}");
        assert!(s.write_data(&[0; 9]).is_err());
        s.write_data(&[0; 3]).unwrap();
        assert!(s.write_tensor("t", &[0; 8]).is_err());
        s.write_data(&[0; 5]).unwrap();
        let e = s.finish().unwrap_err().to_string();
        assert!(e.contains("tensor 'u' incomplete"), "{e}");
    }
}
