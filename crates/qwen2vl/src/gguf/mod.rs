//! GGUF files: a strict reader over a memory map and a streaming writer.
//!
//! # What GGUF is
//!
//! GGUF is the single-file checkpoint format of ggml / llama.cpp: a small header of typed
//! key-value metadata (architecture, hyper-parameters, the tokenizer's vocabulary and merges,
//! the chat template) followed by a table of tensor descriptions and the tensors' raw bytes,
//! each in a ggml type ([`GgmlType`]: f32, f16, bf16, or a block-quantized format such as
//! q8_0 or q4_K). llama.cpp's converter writes Qwen2-VL as two such files: the text model
//! (`general.architecture = "qwen2vl"`) and the vision projector (`mmproj`,
//! `general.architecture = "clip"`, `clip.projector_type = "qwen2vl_merger"`).
//!
//! # Layout (version 3, little-endian; version 2 is laid out the same)
//!
//! ```text
//! magic      4 bytes  "GGUF"
//! version    u32      2 or 3
//! n_tensors  u64
//! n_kv       u64
//! n_kv times:      key: string, value type: u32, value
//!                  (an array value: element type u32, count u64, the elements)
//! n_tensors times: name: string, n_dims: u32, ne[0..n_dims]: u64 each, ggml type: u32,
//!                  offset: u64 (from the start of the data section)
//! padding          zeros up to a multiple of the alignment (`general.alignment`, default 32)
//! data section     each tensor's bytes at its offset, every offset a multiple of the alignment
//! ```
//!
//! A string is a u64 byte length then that many UTF-8 bytes (no terminator). Value type ids:
//! u8 0, i8 1, u16 2, i16 3, u32 4, i32 5, f32 6, bool 7 (one byte), string 8, array 9,
//! u64 10, i64 11, f64 12.
//!
//! # Shapes: `ne` order and PyTorch order
//!
//! ggml lists dimensions fastest-first: `ne[0]` is the row length (the number of contiguous
//! elements), `ne[1]` the number of rows, and so on. A PyTorch / safetensors `(out, in)`
//! weight is stored with the same bytes as `ne = [in, out]`: the order is reversed, the data
//! is not transposed. [`TensorInfo::ne`] gives the file's order, [`TensorInfo::shape`] the
//! PyTorch order. Quantized types pack `ne[0]` in blocks of [`GgmlType::block_size`]
//! elements, [`GgmlType::type_size`] bytes each, row after row, so `ne[0]` must be a multiple
//! of the block size.
//!
//! # The rules the reader enforces
//!
//! The file is untrusted input (a user downloads it). [`GgufFile`] follows the rules of
//! llama.cpp's own reader (`gguf_init_from_file_impl` in `ggml/src/gguf.cpp`) and adds the
//! checks that reader leaves to later stages, so that a corrupt or hostile file is an
//! [`Error::Weights`](crate::Error::Weights) naming what is wrong (the key, the tensor, the
//! byte offset) and what is allowed, found in microseconds, with no panic and no allocation
//! larger than a small multiple of the file:
//!
//! - magic `GGUF`; version 2 or 3 (1 is refused by llama.cpp too; a version whose low 16
//!   bits are zero is reported as a big-endian file, which only little-endian readers meet);
//! - the tensor and key-value counts are bounded by the bytes left: `count × the smallest
//!   encoding of one entry ≤ remaining`, checked before any table is allocated; and since
//!   that bound is still large in a multi-gigabyte file, a table reserves at most 65,536
//!   entries up front and grows with the entries actually read;
//! - every string and array length is checked against the bytes left (and against
//!   llama.cpp's 2^30 limits) before anything is allocated; strings must be UTF-8;
//! - array elements are scalars or strings: an array of arrays is refused (llama.cpp refuses
//!   it too); value type ids above 12 are refused;
//! - keys are non-empty and unique, tensor names are non-empty, shorter than 64 bytes
//!   (ggml's `GGML_MAX_NAME`) and unique;
//! - `general.alignment`, when present, is a u32 power of two (default 32);
//! - a tensor has 1 to 4 dimensions, each at least 1; the element count (at most
//!   `i64::MAX`, as in ggml) and the byte size are computed with checked arithmetic;
//!   `ne[0]` is a multiple of the type's block size;
//! - every tensor's offset is a multiple of the alignment and its bytes lie inside the file
//!   (`data start + offset + byte length ≤ file length`), and no two tensors overlap.
//!   llama.cpp additionally requires the tensors to be packed in table order
//!   (`offset == sum of the padded sizes before it`); this reader accepts any order, since
//!   the three checks above are what makes reading safe. The data section starts at the end
//!   of the header rounded up to the alignment (when there are tensors), as in llama.cpp;
//!   the padding after the last tensor is not required.
//!
//! Stricter than llama.cpp (which accepts them): invalid UTF-8 in keys, names and strings, a
//! zero dimension, a tensor with no dimensions, an empty tensor name. Looser: unknown tensor
//! types (below) and tensors out of table order.
//!
//! A tensor of a type id this module does not know ([`GgmlType::Unknown`]) does not fail the
//! file (an unused tensor in a new format should not stop a load): its offset is checked, and
//! reading it ([`GgufFile::tensor_bytes`]) is an error naming the type id. Booleans are read
//! like llama.cpp does: any non-zero byte is `true`.
//!
//! # Writing
//!
//! [`GgufWriter`] collects the metadata and the tensors' descriptions (name, type, `ne`), then
//! [`GgufWriter::begin`] writes the header to any [`std::io::Write`] and returns a
//! [`TensorStream`] that takes each tensor's bytes in order (whole or in chunks) and pads
//! them to the alignment: the file is streamed, never held in memory. It writes version 3,
//! refuses anything the reader (or llama.cpp's) would refuse, and lays tensors out the way
//! llama.cpp's own writer does (in order, each padded), so llama.cpp, gguf-py and this reader
//! all accept its output.
//!
//! # Models
//!
//! [`model::GgufModel`] reads llama.cpp's Qwen2-VL pair (text model and vision `mmproj`):
//! config, tokenizer, chat template and preprocessing from the metadata, and the map from
//! the Hugging Face tensor names the engine asks for to the GGUF tensors, which
//! [`crate::weights::Weights::from_gguf`] serves.

pub mod export;
pub mod model;
mod reader;
mod writer;

pub use reader::{GgufFile, TensorInfo};
pub use writer::{GgufWriter, TensorStream};

/// The first four bytes of every GGUF file.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// The version the writer writes.
pub const VERSION: u32 = 3;
/// The alignment of the data section and of each tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u32 = 32;
/// The key that sets the alignment (a u32 power of two).
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// Most dimensions of a tensor (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
/// Longest tensor name in bytes (ggml's `GGML_MAX_NAME` is 64 including the NUL).
pub const MAX_NAME_LEN: usize = 63;
/// Longest string, in bytes (llama.cpp's `GGUF_MAX_STRING_LENGTH`).
pub const MAX_STRING_LEN: u64 = 1 << 30;
/// Most elements of one metadata array (llama.cpp's `GGUF_MAX_ARRAY_ELEMENTS`).
pub const MAX_ARRAY_LEN: u64 = 1 << 30;

/// A tensor's element type, with ggml's ids (`enum ggml_type` in `ggml.h`).
///
/// Ids that ggml removed (4, 5, 31–33, 36–38) and ids this module does not know are kept as
/// [`GgmlType::Unknown`]: a file may hold such a tensor, but its size is unknown, so reading
/// it is an error.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
    Q2_0,
    /// A type id this module does not know (the raw id from the file).
    Unknown(u32),
}

/// Elements per super-block of the k-quants (ggml's `QK_K`).
const QK_K: u64 = 256;

/// Every known type: (type, ggml id, name, block size in elements, bytes per block). The
/// sizes are those of ggml's `type_traits` (`ggml/src/ggml.c`, `ggml-common.h`).
const TYPES: [(GgmlType, u32, &str, u64, u64); 35] = [
    (GgmlType::F32, 0, "f32", 1, 4),
    (GgmlType::F16, 1, "f16", 1, 2),
    (GgmlType::Q4_0, 2, "q4_0", 32, 2 + 16),
    (GgmlType::Q4_1, 3, "q4_1", 32, 2 + 2 + 16),
    (GgmlType::Q5_0, 6, "q5_0", 32, 2 + 4 + 16),
    (GgmlType::Q5_1, 7, "q5_1", 32, 2 + 2 + 4 + 16),
    (GgmlType::Q8_0, 8, "q8_0", 32, 2 + 32),
    (GgmlType::Q8_1, 9, "q8_1", 32, 2 + 2 + 32),
    (
        GgmlType::Q2_K,
        10,
        "q2_K",
        QK_K,
        2 + 2 + QK_K / 16 + QK_K / 4,
    ),
    (
        GgmlType::Q3_K,
        11,
        "q3_K",
        QK_K,
        2 + QK_K / 4 + QK_K / 8 + 12,
    ),
    (GgmlType::Q4_K, 12, "q4_K", QK_K, 2 + 2 + QK_K / 2 + 12),
    (
        GgmlType::Q5_K,
        13,
        "q5_K",
        QK_K,
        2 + 2 + QK_K / 2 + QK_K / 8 + 12,
    ),
    (
        GgmlType::Q6_K,
        14,
        "q6_K",
        QK_K,
        2 + QK_K / 2 + QK_K / 4 + QK_K / 16,
    ),
    (GgmlType::Q8_K, 15, "q8_K", QK_K, 4 + QK_K + QK_K / 8),
    (GgmlType::IQ2_XXS, 16, "iq2_xxs", QK_K, 2 + QK_K / 4),
    (
        GgmlType::IQ2_XS,
        17,
        "iq2_xs",
        QK_K,
        2 + QK_K / 4 + QK_K / 32,
    ),
    (
        GgmlType::IQ3_XXS,
        18,
        "iq3_xxs",
        QK_K,
        2 + QK_K / 4 + QK_K / 8,
    ),
    (GgmlType::IQ1_S, 19, "iq1_s", QK_K, 2 + QK_K / 8 + QK_K / 16),
    (GgmlType::IQ4_NL, 20, "iq4_nl", 32, 2 + 16),
    (
        GgmlType::IQ3_S,
        21,
        "iq3_s",
        QK_K,
        2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4,
    ),
    (GgmlType::IQ2_S, 22, "iq2_s", QK_K, 2 + QK_K / 4 + QK_K / 16),
    (
        GgmlType::IQ4_XS,
        23,
        "iq4_xs",
        QK_K,
        2 + 2 + QK_K / 2 + QK_K / 64,
    ),
    (GgmlType::I8, 24, "i8", 1, 1),
    (GgmlType::I16, 25, "i16", 1, 2),
    (GgmlType::I32, 26, "i32", 1, 4),
    (GgmlType::I64, 27, "i64", 1, 8),
    (GgmlType::F64, 28, "f64", 1, 8),
    (
        GgmlType::IQ1_M,
        29,
        "iq1_m",
        QK_K,
        QK_K / 8 + QK_K / 16 + QK_K / 32,
    ),
    (GgmlType::BF16, 30, "bf16", 1, 2),
    (GgmlType::TQ1_0, 34, "tq1_0", QK_K, 2 + 4 * 13),
    (GgmlType::TQ2_0, 35, "tq2_0", QK_K, 2 + 64),
    (GgmlType::MXFP4, 39, "mxfp4", 32, 1 + 16),
    (GgmlType::NVFP4, 40, "nvfp4", 64, 4 + 32),
    (GgmlType::Q1_0, 41, "q1_0", 128, 2 + 16),
    (GgmlType::Q2_0, 42, "q2_0", 64, 2 + 16),
];

impl GgmlType {
    /// The type with ggml id `id` ([`GgmlType::Unknown`] for ids this module does not know).
    pub fn from_id(id: u32) -> GgmlType {
        TYPES
            .iter()
            .find(|t| t.1 == id)
            .map_or(GgmlType::Unknown(id), |t| t.0)
    }

    fn entry(self) -> Option<&'static (GgmlType, u32, &'static str, u64, u64)> {
        TYPES.iter().find(|t| t.0 == self)
    }

    /// The ggml id written in files.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::Unknown(id) => id,
            t => t.entry().map_or(u32::MAX, |e| e.1),
        }
    }

    /// ggml's name (`ggml_type_name`): "f32", "q8_0", "q4_K", …; "unknown" for
    /// [`GgmlType::Unknown`].
    pub fn name(self) -> &'static str {
        self.entry().map_or("unknown", |e| e.2)
    }

    /// Elements per block (1 for plain types such as f32), or `None` for an unknown type.
    pub fn block_size(self) -> Option<u64> {
        self.entry().map(|e| e.3)
    }

    /// Bytes per block, or `None` for an unknown type.
    pub fn type_size(self) -> Option<u64> {
        self.entry().map(|e| e.4)
    }

    /// Whether the type's sizes are known.
    pub fn is_known(self) -> bool {
        self.entry().is_some()
    }

    /// Every type this module knows, in id order.
    pub fn known() -> impl Iterator<Item = GgmlType> {
        TYPES.iter().map(|t| t.0)
    }

    /// The byte size of a tensor of this type with dimensions `ne` (ggml order), or a message
    /// saying why there is none: an unknown type, no dimensions or more than [`MAX_DIMS`], a
    /// zero dimension, `ne[0]` not a multiple of the block size, or an element count above
    /// `i64::MAX` (ggml's limit) or a size that does not fit in a u64.
    pub fn byte_size(self, ne: &[u64]) -> std::result::Result<u64, String> {
        let n = n_elements(ne)?;
        let (Some(block), Some(size)) = (self.block_size(), self.type_size()) else {
            return Err(format!(
                "type id {} is not a ggml type this reader knows; known: {}",
                self.id(),
                known_type_names()
            ));
        };
        if !ne[0].is_multiple_of(block) {
            return Err(format!(
                "ne[0] = {} is not a multiple of the {} block size {block}; allowed: rows of whole blocks",
                ne[0],
                self.name()
            ));
        }
        (n / block)
            .checked_mul(size)
            .ok_or_else(|| format!("{} {} elements take more than 2^64 bytes", n, self.name()))
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GgmlType::Unknown(id) => write!(f, "unknown ggml type id {id}"),
            t => f.write_str(t.name()),
        }
    }
}

/// "f32 (0), f16 (1), …" for messages.
fn known_type_names() -> String {
    TYPES
        .iter()
        .map(|t| format!("{} ({})", t.2, t.1))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The number of elements of a tensor with dimensions `ne`: 1 to [`MAX_DIMS`] dimensions,
/// each at least 1, the product at most `i64::MAX` (as in ggml, whose `ne` are `int64_t`).
pub(crate) fn n_elements(ne: &[u64]) -> std::result::Result<u64, String> {
    if ne.is_empty() || ne.len() > MAX_DIMS {
        return Err(format!("{} dimensions; allowed: 1 to {MAX_DIMS}", ne.len()));
    }
    let mut n: u64 = 1;
    for (i, &d) in ne.iter().enumerate() {
        if d == 0 {
            return Err(format!("ne[{i}] is 0; allowed: every dimension at least 1"));
        }
        n = n
            .checked_mul(d)
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| {
                format!(
                    "ne {ne:?} has more than i64::MAX elements (the product overflows); allowed: at most {}",
                    i64::MAX
                )
            })?;
    }
    Ok(n)
}

/// `x` rounded up to a multiple of `align` (a power of two), or `None` on overflow.
pub(crate) fn align_up(x: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    x.checked_add(align - 1).map(|v| v & !(align - 1))
}

/// The type of a metadata value, with the ids of the file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    Str,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    /// The type with format id `id`, if there is one (0 to 12).
    pub fn from_id(id: u32) -> Option<ValueType> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => Str,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The format id.
    pub fn id(self) -> u32 {
        use ValueType::*;
        match self {
            U8 => 0,
            I8 => 1,
            U16 => 2,
            I16 => 3,
            U32 => 4,
            I32 => 5,
            F32 => 6,
            Bool => 7,
            Str => 8,
            Array => 9,
            U64 => 10,
            I64 => 11,
            F64 => 12,
        }
    }

    /// "u8", "i32", "f32", "bool", "string", "array", … for messages.
    pub fn name(self) -> &'static str {
        use ValueType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            Str => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }

    /// Bytes of one value of this type on disk, for fixed-size types (not strings, arrays).
    pub(crate) fn fixed_size(self) -> Option<u64> {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => Some(1),
            U16 | I16 => Some(2),
            U32 | I32 | F32 => Some(4),
            U64 | I64 | F64 => Some(8),
            Str | Array => None,
        }
    }
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(MetaArray),
}

/// A metadata array: one typed vector (never a vector of [`MetaValue`]s, so a 152k-token
/// vocabulary costs what its strings cost).
#[derive(Clone, Debug, PartialEq)]
pub enum MetaArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    Str(Vec<String>),
}

impl MetaArray {
    /// An empty array of the same element type.
    pub fn emptied(&self) -> MetaArray {
        match self {
            MetaArray::U8(_) => MetaArray::U8(Vec::new()),
            MetaArray::I8(_) => MetaArray::I8(Vec::new()),
            MetaArray::U16(_) => MetaArray::U16(Vec::new()),
            MetaArray::I16(_) => MetaArray::I16(Vec::new()),
            MetaArray::U32(_) => MetaArray::U32(Vec::new()),
            MetaArray::I32(_) => MetaArray::I32(Vec::new()),
            MetaArray::U64(_) => MetaArray::U64(Vec::new()),
            MetaArray::I64(_) => MetaArray::I64(Vec::new()),
            MetaArray::F32(_) => MetaArray::F32(Vec::new()),
            MetaArray::F64(_) => MetaArray::F64(Vec::new()),
            MetaArray::Bool(_) => MetaArray::Bool(Vec::new()),
            MetaArray::Str(_) => MetaArray::Str(Vec::new()),
        }
    }
}

impl MetaValue {
    /// The value's type ([`ValueType::Array`] for arrays).
    pub fn value_type(&self) -> ValueType {
        match self {
            MetaValue::U8(_) => ValueType::U8,
            MetaValue::I8(_) => ValueType::I8,
            MetaValue::U16(_) => ValueType::U16,
            MetaValue::I16(_) => ValueType::I16,
            MetaValue::U32(_) => ValueType::U32,
            MetaValue::I32(_) => ValueType::I32,
            MetaValue::U64(_) => ValueType::U64,
            MetaValue::I64(_) => ValueType::I64,
            MetaValue::F32(_) => ValueType::F32,
            MetaValue::F64(_) => ValueType::F64,
            MetaValue::Bool(_) => ValueType::Bool,
            MetaValue::Str(_) => ValueType::Str,
            MetaValue::Array(_) => ValueType::Array,
        }
    }

    /// "u32", "string", "array of i32 (4 elements)", … for messages.
    pub fn type_description(&self) -> String {
        match self {
            MetaValue::Array(a) => format!(
                "array of {} ({} elements)",
                a.element_type().name(),
                a.len()
            ),
            v => v.value_type().name().to_string(),
        }
    }

    /// The value as an i128 if it is an integer of any width (for lenient callers).
    pub fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            MetaValue::U8(v) => v.into(),
            MetaValue::I8(v) => v.into(),
            MetaValue::U16(v) => v.into(),
            MetaValue::I16(v) => v.into(),
            MetaValue::U32(v) => v.into(),
            MetaValue::I32(v) => v.into(),
            MetaValue::U64(v) => v.into(),
            MetaValue::I64(v) => v.into(),
            _ => return None,
        })
    }
}

impl MetaArray {
    /// The elements' type.
    pub fn element_type(&self) -> ValueType {
        match self {
            MetaArray::U8(_) => ValueType::U8,
            MetaArray::I8(_) => ValueType::I8,
            MetaArray::U16(_) => ValueType::U16,
            MetaArray::I16(_) => ValueType::I16,
            MetaArray::U32(_) => ValueType::U32,
            MetaArray::I32(_) => ValueType::I32,
            MetaArray::U64(_) => ValueType::U64,
            MetaArray::I64(_) => ValueType::I64,
            MetaArray::F32(_) => ValueType::F32,
            MetaArray::F64(_) => ValueType::F64,
            MetaArray::Bool(_) => ValueType::Bool,
            MetaArray::Str(_) => ValueType::Str,
        }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        match self {
            MetaArray::U8(v) => v.len(),
            MetaArray::I8(v) => v.len(),
            MetaArray::U16(v) => v.len(),
            MetaArray::I16(v) => v.len(),
            MetaArray::U32(v) => v.len(),
            MetaArray::I32(v) => v.len(),
            MetaArray::U64(v) => v.len(),
            MetaArray::I64(v) => v.len(),
            MetaArray::F32(v) => v.len(),
            MetaArray::F64(v) => v.len(),
            MetaArray::Bool(v) => v.len(),
            MetaArray::Str(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

macro_rules! from_scalar {
    ($($t:ty => $v:ident),* $(,)?) => {$(
        impl From<$t> for MetaValue {
            fn from(x: $t) -> Self {
                MetaValue::$v(x)
            }
        }
        impl From<Vec<$t>> for MetaValue {
            fn from(x: Vec<$t>) -> Self {
                MetaValue::Array(MetaArray::$v(x))
            }
        }
        impl From<Vec<$t>> for MetaArray {
            fn from(x: Vec<$t>) -> Self {
                MetaArray::$v(x)
            }
        }
    )*};
}

from_scalar!(
    u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, u64 => U64,
    i64 => I64, f32 => F32, f64 => F64, bool => Bool, String => Str,
);

impl From<&str> for MetaValue {
    fn from(x: &str) -> Self {
        MetaValue::Str(x.to_string())
    }
}

impl From<Vec<&str>> for MetaValue {
    fn from(x: Vec<&str>) -> Self {
        MetaValue::Array(MetaArray::Str(x.into_iter().map(str::to_string).collect()))
    }
}

impl From<MetaArray> for MetaValue {
    fn from(x: MetaArray) -> Self {
        MetaValue::Array(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_ids_and_sizes_match_ggml() {
        // A few spelled out (ggml-common.h's static_asserts), the rest by the table.
        let expect = [
            (GgmlType::F32, 0, 1, 4),
            (GgmlType::F16, 1, 1, 2),
            (GgmlType::Q4_0, 2, 32, 18),
            (GgmlType::Q4_1, 3, 32, 20),
            (GgmlType::Q5_0, 6, 32, 22),
            (GgmlType::Q5_1, 7, 32, 24),
            (GgmlType::Q8_0, 8, 32, 34),
            (GgmlType::Q8_1, 9, 32, 36),
            (GgmlType::Q2_K, 10, 256, 84),
            (GgmlType::Q3_K, 11, 256, 110),
            (GgmlType::Q4_K, 12, 256, 144),
            (GgmlType::Q5_K, 13, 256, 176),
            (GgmlType::Q6_K, 14, 256, 210),
            (GgmlType::Q8_K, 15, 256, 292),
            (GgmlType::BF16, 30, 1, 2),
        ];
        for (t, id, block, size) in expect {
            assert_eq!(t.id(), id, "{t}");
            assert_eq!(GgmlType::from_id(id), t);
            assert_eq!(t.block_size(), Some(block), "{t}");
            assert_eq!(t.type_size(), Some(size), "{t}");
        }
        for t in GgmlType::known() {
            assert_eq!(GgmlType::from_id(t.id()), t);
        }
        for id in [4, 5, 31, 32, 33, 36, 37, 38, 43, u32::MAX] {
            assert_eq!(GgmlType::from_id(id), GgmlType::Unknown(id));
            assert_eq!(GgmlType::Unknown(id).id(), id);
            assert!(GgmlType::Unknown(id).block_size().is_none());
        }
        assert_eq!(GgmlType::Q4_K.name(), "q4_K");
        assert_eq!(GgmlType::Unknown(99).to_string(), "unknown ggml type id 99");
    }

    #[test]
    fn byte_sizes_are_checked() {
        assert_eq!(GgmlType::F32.byte_size(&[3, 2]), Ok(24));
        assert_eq!(GgmlType::Q8_0.byte_size(&[64, 3]), Ok(2 * 3 * 34));
        assert_eq!(GgmlType::Q4_K.byte_size(&[256, 1, 1, 2]), Ok(288));
        let e = GgmlType::Q8_0.byte_size(&[33, 2]).unwrap_err();
        assert!(
            e.contains("ne[0] = 33") && e.contains("block size 32"),
            "{e}"
        );
        let e = GgmlType::F32.byte_size(&[]).unwrap_err();
        assert!(e.contains("0 dimensions"), "{e}");
        let e = GgmlType::F32.byte_size(&[1, 2, 3, 4, 5]).unwrap_err();
        assert!(e.contains("5 dimensions"), "{e}");
        let e = GgmlType::F32.byte_size(&[4, 0]).unwrap_err();
        assert!(e.contains("ne[1] is 0"), "{e}");
        let e = GgmlType::F32.byte_size(&[1 << 32, 1 << 32]).unwrap_err();
        assert!(e.contains("overflows"), "{e}");
        // Elements fit in i64 but bytes not in u64.
        let e = GgmlType::F64.byte_size(&[1 << 62]).unwrap_err();
        assert!(e.contains("2^64 bytes"), "{e}");
        let e = GgmlType::Unknown(77).byte_size(&[4]).unwrap_err();
        assert!(e.contains("type id 77"), "{e}");
    }

    #[test]
    fn align_up_rounds_to_powers_of_two() {
        assert_eq!(align_up(0, 32), Some(0));
        assert_eq!(align_up(1, 32), Some(32));
        assert_eq!(align_up(32, 32), Some(32));
        assert_eq!(align_up(33, 1), Some(33));
        assert_eq!(align_up(u64::MAX - 3, 32), None);
    }
}
