//! safetensors header reader: the JSON header, sharded `model.safetensors.index.json`, and the
//! Hugging Face `config.json` beside them. Reads headers, never the tensor data.
//!
//! Layout: u64 little-endian header length N, then N bytes of JSON, then the data. The JSON is an
//! object: each tensor name maps to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets
//! relative to the data, end exclusive), and `__metadata__` maps strings to strings.
//!
//! N is checked against the file's size and [`MAX_HEADER`] before anything is allocated for it;
//! every failure is one [`SafetensorsError`] naming the byte offset and what was expected.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// The largest header accepted (the `safetensors` package refuses more than 100 MB too).
pub const MAX_HEADER: u64 = 100 << 20;
/// The largest `model.safetensors.index.json` or `config.json` read.
pub const MAX_JSON_FILE: u64 = 64 << 20;

/// A malformed, truncated or lying file: where, and what was expected there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetensorsError {
    pub offset: u64,
    pub expected: String,
}

impl SafetensorsError {
    fn at(offset: u64, expected: impl Into<String>) -> SafetensorsError {
        SafetensorsError {
            offset,
            expected: expected.into(),
        }
    }
}

impl fmt::Display for SafetensorsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "safetensors byte {}: expected {}",
            self.offset, self.expected
        )
    }
}

impl std::error::Error for SafetensorsError {}

/// One tensor's header entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafeTensor {
    pub name: String,
    /// As spelled in the file: `F16`, `BF16`, `F32`, `I64`, `F8_E4M3`, ...
    pub dtype: String,
    /// Dims, outermost first (PyTorch order; the reverse of ggml's).
    pub shape: Vec<u64>,
    /// Data range relative to the start of the data, end exclusive.
    pub data_offsets: (u64, u64),
    pub bytes: u64,
}

/// A parsed safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetensorsFile {
    pub header_len: u64,
    pub metadata: Vec<(String, String)>,
    pub tensors: Vec<SafeTensor>,
    pub file_len: u64,
}

impl SafetensorsFile {
    pub fn tensor_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.bytes).sum()
    }
}

/// Bits per element of a safetensors dtype, or `None` for one this reader does not know.
pub fn dtype_bits(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 8,
        "U16" | "I16" | "F16" | "BF16" => 16,
        "U32" | "I32" | "F32" => 32,
        "U64" | "I64" | "F64" | "C64" => 64,
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        _ => return None,
    })
}

/// The byte offset in the file of position (`line`, `column`) of the header, as serde_json counts.
fn json_offset(header: &[u8], line: usize, column: usize) -> u64 {
    let mut start = 0usize;
    for _ in 1..line {
        match header[start..].iter().position(|&b| b == b'\n') {
            Some(i) => start += i + 1,
            None => break,
        }
    }
    8 + (start + column.saturating_sub(1)).min(header.len()) as u64
}

/// Where the entry for `name` starts in the file (its quoted key), for error messages.
fn key_offset(header: &[u8], name: &str) -> u64 {
    let quoted = serde_json::to_string(name).unwrap_or_default();
    let needle = quoted.as_bytes();
    header
        .windows(needle.len().max(1))
        .position(|w| w == needle)
        .map_or(8, |i| 8 + i as u64)
}

/// Parses a header from its first bytes. `head` holds at least the 8-byte length and the JSON
/// (more is ignored); `file_len` is the whole file's size, against which every offset is checked.
pub fn parse(head: &[u8], file_len: u64) -> Result<SafetensorsFile, SafetensorsError> {
    let n = header_len(head, file_len)?;
    let header = head
        .get(8..8 + n as usize)
        .ok_or_else(|| SafetensorsError::at(head.len() as u64, format!("{n} header bytes")))?;
    let root: Value = serde_json::from_slice(header).map_err(|e| {
        SafetensorsError::at(
            json_offset(header, e.line(), e.column()),
            format!("a JSON header ({e})"),
        )
    })?;
    let Value::Object(root) = root else {
        return Err(SafetensorsError::at(8, "a JSON object as the header"));
    };
    let data_len = file_len - 8 - n;
    let mut tensors = Vec::with_capacity(root.len());
    let mut metadata = Vec::new();
    for (name, entry) in &root {
        let at = key_offset(header, name);
        if name == "__metadata__" {
            let Value::Object(m) = entry else {
                return Err(SafetensorsError::at(at, "__metadata__ to be an object"));
            };
            for (k, v) in m {
                let v = v.as_str().ok_or_else(|| {
                    SafetensorsError::at(at, format!("__metadata__.{k} to be a string"))
                })?;
                metadata.push((k.clone(), v.to_string()));
            }
            continue;
        }
        tensors.push(tensor(name, entry, data_len).map_err(|e| SafetensorsError::at(at, e))?);
    }
    tensors.sort_by_key(|t| t.data_offsets);
    Ok(SafetensorsFile {
        header_len: n,
        metadata,
        tensors,
        file_len,
    })
}

/// The header length, checked against the file's size and [`MAX_HEADER`].
fn header_len(head: &[u8], file_len: u64) -> Result<u64, SafetensorsError> {
    let Some(len) = head.get(..8) else {
        return Err(SafetensorsError::at(
            head.len() as u64,
            "an 8-byte header length (the file is shorter)",
        ));
    };
    let n = u64::from_le_bytes(len.try_into().expect("8 bytes"));
    if !(2..=MAX_HEADER).contains(&n) || n > file_len.saturating_sub(8) {
        return Err(SafetensorsError::at(
            0,
            format!(
                "a header length of 2 to {} bytes (at most the {} bytes after it), not {n}",
                MAX_HEADER,
                file_len.saturating_sub(8)
            ),
        ));
    }
    Ok(n)
}

fn tensor(name: &str, entry: &Value, data_len: u64) -> Result<SafeTensor, String> {
    let what = |s: &str| format!("tensor '{name}': {s}");
    let Value::Object(e) = entry else {
        return Err(what("an object with dtype, shape and data_offsets"));
    };
    let dtype = field_str(e, "dtype").ok_or_else(|| what("a string dtype"))?;
    let bits = dtype_bits(dtype).ok_or_else(|| what(&format!("a known dtype, not '{dtype}'")))?;
    let shape = u64_array(e, "shape").ok_or_else(|| what("shape as an array of integers"))?;
    let offs = u64_array(e, "data_offsets")
        .filter(|o| o.len() == 2)
        .ok_or_else(|| what("data_offsets as [begin, end]"))?;
    let (begin, end) = (offs[0], offs[1]);
    if begin > end || end > data_len {
        return Err(what(&format!(
            "data_offsets within the {data_len} data bytes with begin <= end, not [{begin}, {end}]"
        )));
    }
    let elems = shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or_else(|| what("a shape whose element count fits in 64 bits"))?;
    let bits_total = elems
        .checked_mul(bits)
        .ok_or_else(|| what("a size that fits in 64 bits"))?;
    if bits_total % 8 != 0 {
        return Err(what("a whole number of bytes"));
    }
    let bytes = bits_total / 8;
    if end - begin != bytes {
        return Err(what(&format!(
            "data_offsets spanning {bytes} bytes ({dtype} {shape:?}), not {}",
            end - begin
        )));
    }
    Ok(SafeTensor {
        name: name.to_string(),
        dtype: dtype.to_string(),
        shape,
        data_offsets: (begin, end),
        bytes,
    })
}

fn field_str<'a>(e: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    e.get(k).and_then(Value::as_str)
}

fn u64_array(e: &Map<String, Value>, k: &str) -> Option<Vec<u64>> {
    e.get(k)?.as_array()?.iter().map(Value::as_u64).collect()
}

/// Opens one `.safetensors` file and parses its header, reading only the header's bytes.
pub fn open(path: &Path) -> Result<SafetensorsFile, String> {
    let ctx = |e: &dyn fmt::Display| format!("{}: {e}", path.display());
    let mut f = File::open(path).map_err(|e| ctx(&e))?;
    let file_len = f.metadata().map_err(|e| ctx(&e))?.len();
    let mut len = [0u8; 8];
    let got = read_up_to(&mut f, &mut len).map_err(|e| ctx(&e))?;
    let n = header_len(&len[..got], file_len).map_err(|e| ctx(&e))?;
    // n is bounded by MAX_HEADER and the file's size, so this allocation is too.
    let mut head = len.to_vec();
    head.resize(8 + n as usize, 0);
    let got = read_up_to(&mut f, &mut head[8..]).map_err(|e| ctx(&e))?;
    head.truncate(8 + got);
    parse(&head, file_len).map_err(|e| ctx(&e))
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..])? {
            0 => break,
            k => got += k,
        }
    }
    Ok(got)
}

/// Reads a small JSON file (index or config), refusing one larger than [`MAX_JSON_FILE`].
pub fn read_json(path: &Path) -> Result<Value, String> {
    let len = std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    if len > MAX_JSON_FILE {
        return Err(format!(
            "{}: {len} bytes; expected a JSON file of at most {MAX_JSON_FILE} bytes",
            path.display()
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        format!(
            "{}: byte {}: expected JSON ({e})",
            path.display(),
            json_offset(&bytes, e.line(), e.column()) - 8
        )
    })
}

/// A sharded model: every shard named by `model.safetensors.index.json`'s `weight_map`, opened,
/// with each mapped tensor checked to be in the shard the map names.
pub fn open_index(index: &Path) -> Result<Vec<(PathBuf, SafetensorsFile)>, String> {
    let err = |s: String| format!("{}: {s}", index.display());
    let json = read_json(index)?;
    let map = json
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| err("expected a weight_map object".into()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut shards: Vec<String> = Vec::new();
    for (tensor, shard) in map {
        let shard = shard
            .as_str()
            .ok_or_else(|| err(format!("weight_map.{tensor}: expected a file name")))?;
        // Shards lie beside the index: a path that leaves the folder is refused.
        if shard.is_empty() || shard.contains('/') || shard.contains('\\') || shard == ".." {
            return Err(err(format!(
                "weight_map.{tensor}: expected a file name beside the index, not '{shard}'"
            )));
        }
        if !shards.iter().any(|s| s == shard) {
            shards.push(shard.to_string());
        }
    }
    shards.sort();
    let files: Vec<(PathBuf, SafetensorsFile)> = shards
        .iter()
        .map(|s| {
            let p = dir.join(s);
            open(&p).map(|f| (p, f))
        })
        .collect::<Result<_, _>>()?;
    for (tensor, shard) in map {
        let shard = shard.as_str().unwrap_or_default();
        let (p, f) = files
            .iter()
            .find(|(p, _)| p.file_name().and_then(|n| n.to_str()) == Some(shard))
            .expect("every shard was opened");
        if !f.tensors.iter().any(|t| &t.name == tensor) {
            return Err(err(format!(
                "weight_map puts '{tensor}' in {}, which does not hold it",
                p.display()
            )));
        }
    }
    Ok(files)
}

pub mod config;

#[cfg(test)]
mod tests;
