//! GGUF v2/v3 header reader: metadata and tensor infos, never the tensor data.
//!
//! Layout (little-endian): magic `GGUF`, u32 version, u64 tensor count, u64 metadata count, the
//! metadata key/value pairs, the tensor infos (name, u32 n_dims, u64 dims, u32 ggml type, u64 offset
//! relative to the data section), then padding to `general.alignment` (default 32) and the data.
//!
//! Every count is bounded by the bytes left in the file before anything is allocated for it, and
//! every failure is one [`GgufError`] naming the byte offset and what was expected there.

use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use super::ggml_type::GgmlType;

/// Default alignment of the data section (`GGUF_DEFAULT_ALIGNMENT`).
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Arrays nested deeper than this are rejected (real files nest at most one level).
const MAX_DEPTH: u32 = 8;

/// A malformed, truncated or lying file: where, and what was expected there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufError {
    pub offset: u64,
    pub expected: String,
}

impl GgufError {
    fn at(offset: u64, expected: impl Into<String>) -> GgufError {
        GgufError {
            offset,
            expected: expected.into(),
        }
    }
}

impl fmt::Display for GgufError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GGUF byte {}: expected {}", self.offset, self.expected)
    }
}

impl std::error::Error for GgufError {}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// One tensor's header entry.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dims, ne[0] first (the row length).
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset of the data relative to the data section.
    pub offset: u64,
    /// Exact bytes of the data (`ggml_nbytes`).
    pub bytes: u64,
}

/// A parsed GGUF header.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufFile {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_offset: u64,
    pub file_len: u64,
}

#[cfg(test)]
impl GgufFile {
    /// A header of `kv` and no tensors, for tests of what is read from the metadata.
    pub(crate) fn of_metadata(kv: Vec<(&str, Value)>) -> GgufFile {
        GgufFile {
            version: 3,
            metadata: kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            tensors: vec![],
            alignment: 32,
            data_offset: 0,
            file_len: 0,
        }
    }
}

impl GgufFile {
    /// The metadata value under `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Sum of every tensor's bytes.
    pub fn tensor_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.bytes).sum()
    }
}

struct Reader<R> {
    inner: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Reader<R> {
    fn err(&self, expected: impl Into<String>) -> GgufError {
        GgufError::at(self.pos, expected)
    }

    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let mut b = [0u8; N];
        if self.remaining() < N as u64 || self.inner.read_exact(&mut b).is_err() {
            return Err(self.err(format!("{what} ({N} bytes) before end of file")));
        }
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        self.bytes::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        self.bytes::<8>(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let at = self.pos;
        let n = self.u64(&format!("{what} length"))?;
        if n > self.remaining() {
            return Err(GgufError::at(
                at,
                format!(
                    "{what} length at most {} (bytes left), got {n}",
                    self.remaining()
                ),
            ));
        }
        let mut buf = vec![0u8; n as usize];
        if self.inner.read_exact(&mut buf).is_err() {
            return Err(self.err(format!("{what} ({n} bytes)")));
        }
        let start = self.pos;
        self.pos += n;
        String::from_utf8(buf).map_err(|_| GgufError::at(start, format!("{what} in UTF-8")))
    }

    /// The fewest bytes a value of type `ty` can take, or `None` for an unknown type.
    fn min_size(ty: u32) -> Option<u64> {
        Some(match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 => 8,
            9 => 12,
            10..=12 => 8,
            _ => return None,
        })
    }

    fn value(&mut self, ty: u32, ty_at: u64, depth: u32) -> Result<Value, GgufError> {
        Ok(match ty {
            0 => Value::U8(self.bytes::<1>("u8")?[0]),
            1 => Value::I8(self.bytes::<1>("i8")?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.bytes("u16")?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes("i16")?)),
            4 => Value::U32(self.u32("u32")?),
            5 => Value::I32(i32::from_le_bytes(self.bytes("i32")?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes("f32")?)),
            7 => {
                let at = self.pos;
                match self.bytes::<1>("bool")?[0] {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    b => return Err(GgufError::at(at, format!("bool 0 or 1, got {b}"))),
                }
            }
            8 => Value::String(self.string("string")?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(GgufError::at(
                        ty_at,
                        format!("arrays nested at most {MAX_DEPTH} deep"),
                    ));
                }
                let elem_at = self.pos;
                let elem = self.u32("array element type")?;
                let min = Self::min_size(elem).ok_or_else(|| {
                    GgufError::at(elem_at, format!("array element type 0..=12, got {elem}"))
                })?;
                let count_at = self.pos;
                let n = self.u64("array length")?;
                if n.checked_mul(min).map_or(true, |b| b > self.remaining()) {
                    return Err(GgufError::at(count_at, format!("array length whose {min}-byte elements fit in the {} bytes left, got {n}", self.remaining())));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(elem, elem_at, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64("u64")?),
            11 => Value::I64(i64::from_le_bytes(self.bytes("i64")?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes("f64")?)),
            _ => {
                return Err(GgufError::at(
                    ty_at,
                    format!("metadata value type 0..=12, got {ty}"),
                ))
            }
        })
    }
}

/// Parses a GGUF header from `r`, a stream of a file `file_len` bytes long.
pub fn parse<R: Read>(r: R, file_len: u64) -> Result<GgufFile, GgufError> {
    let mut r = Reader {
        inner: r,
        pos: 0,
        len: file_len,
    };
    if &r.bytes::<4>("magic \"GGUF\"")? != b"GGUF" {
        return Err(GgufError::at(0, "magic \"GGUF\""));
    }
    let version = r.u32("version")?;
    if version != 2 && version != 3 {
        return Err(GgufError::at(4, format!("version 2 or 3, got {version}")));
    }
    let n_tensors_at = r.pos;
    let n_tensors = r.u64("tensor count")?;
    let n_kv_at = r.pos;
    let n_kv = r.u64("metadata count")?;
    // A key/value takes at least 13 bytes (key length, type, one byte); a tensor info at least 32.
    let left = r.remaining();
    if n_kv > left / 13 {
        return Err(GgufError::at(
            n_kv_at,
            format!(
                "metadata count at most {} for {left} bytes left, got {n_kv}",
                left / 13
            ),
        ));
    }
    if n_tensors > left / 32 {
        return Err(GgufError::at(
            n_tensors_at,
            format!(
                "tensor count at most {} for {left} bytes left, got {n_tensors}",
                left / 32
            ),
        ));
    }
    let mut metadata = Vec::with_capacity(n_kv as usize);
    let mut alignment = DEFAULT_ALIGNMENT;
    for _ in 0..n_kv {
        let key = r.string("metadata key")?;
        let ty_at = r.pos;
        let ty = r.u32("metadata value type")?;
        let value = r.value(ty, ty_at, 0)?;
        if key == "general.alignment" {
            match value {
                Value::U32(a) if a.is_power_of_two() => alignment = a.into(),
                _ => {
                    return Err(GgufError::at(
                        ty_at,
                        "general.alignment as a u32 power of two",
                    ))
                }
            }
        }
        metadata.push((key, value));
    }
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        let name = r.string("tensor name")?;
        let nd_at = r.pos;
        let n_dims = r.u32("tensor dimension count")?;
        if !(1..=4).contains(&n_dims) {
            return Err(GgufError::at(
                nd_at,
                format!("tensor '{name}' dimension count 1..=4, got {n_dims}"),
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64("tensor dimension")?);
        }
        let ty_at = r.pos;
        let id = r.u32("tensor type")?;
        let ty = GgmlType::from_id(id).ok_or_else(|| {
            GgufError::at(
                ty_at,
                format!("tensor '{name}' of a known ggml type, got id {id}"),
            )
        })?;
        let bytes = ty
            .tensor_bytes(&dims)
            .map_err(|e| GgufError::at(nd_at, format!("tensor '{name}' dims {dims:?}: {e}")))?;
        let off_at = r.pos;
        let offset = r.u64("tensor data offset")?;
        if offset % alignment != 0 {
            return Err(GgufError::at(
                off_at,
                format!("tensor '{name}' offset a multiple of {alignment}, got {offset}"),
            ));
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ty,
            offset,
            bytes,
        });
    }
    let data_offset = r.pos.div_ceil(alignment) * alignment;
    for t in &tensors {
        let end = data_offset
            .checked_add(t.offset)
            .and_then(|o| o.checked_add(t.bytes));
        if end.map_or(true, |e| e > file_len) {
            // Named at the first byte the file lacks (or where the data would start, if earlier).
            let start = data_offset.saturating_add(t.offset);
            return Err(GgufError::at(
                start.min(file_len),
                format!(
                    "tensor '{}' data ({} bytes at data offset {}) inside the {file_len}-byte file",
                    t.name, t.bytes, t.offset
                ),
            ));
        }
    }
    Ok(GgufFile {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
        file_len,
    })
}

/// Opens and parses one GGUF file, reading only its header.
pub fn open(path: &Path) -> Result<GgufFile, String> {
    let f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let len = f
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    parse(BufReader::with_capacity(1 << 16, f), len).map_err(|e| format!("{}: {e}", path.display()))
}

/// The paths of every part of a split model, given any one part named `...-0000K-of-0000N.gguf`;
/// a single path when the name has no split suffix.
pub fn split_paths(path: &Path) -> Vec<PathBuf> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let Some(stem) = name.strip_suffix(".gguf") else {
        return vec![path.to_path_buf()];
    };
    let parts: Vec<&str> = stem.rsplitn(4, '-').collect();
    // rsplitn gives [N, "of", K, prefix].
    if parts.len() == 4 && parts[1] == "of" && parts[0].len() == 5 && parts[2].len() == 5 {
        if let (Ok(n), Ok(_)) = (parts[0].parse::<u32>(), parts[2].parse::<u32>()) {
            return (1..=n)
                .map(|i| path.with_file_name(format!("{}-{i:05}-of-{n:05}.gguf", parts[3])))
                .collect();
        }
    }
    vec![path.to_path_buf()]
}

/// Opens every part of a (possibly split) model; checks `split.count` against the parts found.
pub fn open_all(path: &Path) -> Result<Vec<GgufFile>, String> {
    let paths = split_paths(path);
    let files = paths
        .iter()
        .map(|p| open(p))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(n) = files[0].get("split.count").and_then(Value::as_u64) {
        if n != files.len() as u64 {
            return Err(format!(
                "{}: split.count is {n} but {} part(s) found by name",
                path.display(),
                files.len()
            ));
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests;
