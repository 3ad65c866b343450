//! A minimal reader for NumPy `.npy` files holding a 2-D integer matrix (the official LANTERN
//! neighbour table `top_{V-1}_indices.npy`): format versions 1-3, C order, little endian.
use crate::{Error, Result};
use std::io::Read;
use std::path::Path;

/// Element type of an integer `.npy` matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NpyInt {
    U16,
    U32,
    I32,
    I64,
}

impl NpyInt {
    fn size(self) -> usize {
        match self {
            NpyInt::U16 => 2,
            NpyInt::U32 | NpyInt::I32 => 4,
            NpyInt::I64 => 8,
        }
    }

    /// Reads element `i` of a little-endian byte row as i64.
    fn get(self, bytes: &[u8], i: usize) -> i64 {
        let s = self.size();
        let b = &bytes[i * s..(i + 1) * s];
        match self {
            NpyInt::U16 => u16::from_le_bytes([b[0], b[1]]) as i64,
            NpyInt::U32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64,
            NpyInt::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64,
            NpyInt::I64 => i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        }
    }
}

/// Header of an `.npy` file: element type and 2-D shape.
#[derive(Debug)]
pub(crate) struct NpyHeader {
    pub dtype: NpyInt,
    pub rows: usize,
    pub cols: usize,
}

/// Finds the value text after `'key':` in the header dict.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pat1 = format!("'{key}'");
    let pat2 = format!("\"{key}\"");
    let start = header
        .find(&pat1)
        .map(|i| i + pat1.len())
        .or_else(|| header.find(&pat2).map(|i| i + pat2.len()))?;
    let rest = header[start..].trim_start();
    rest.strip_prefix(':').map(str::trim_start)
}

fn parse_header(path: &Path, text: &str) -> Result<NpyHeader> {
    let bad = |msg: &str| {
        Error::load(
            path,
            format!("{msg} (expected a 2-D integer .npy neighbour table)"),
        )
    };
    let descr = dict_value(text, "descr").ok_or_else(|| bad("no 'descr' in the .npy header"))?;
    let q = descr.chars().next().ok_or_else(|| bad("empty 'descr'"))?;
    let descr = descr[1..]
        .split(q)
        .next()
        .ok_or_else(|| bad("unterminated 'descr'"))?;
    let dtype = match descr {
        "<u2" | "|u2" => NpyInt::U16,
        "<u4" => NpyInt::U32,
        "<i4" => NpyInt::I32,
        "<i8" => NpyInt::I64,
        other => {
            return Err(bad(&format!(
                "element type `{other}` is not supported (use uint16, uint32, int32 or int64, little endian)"
            )))
        }
    };
    let fortran = dict_value(text, "fortran_order")
        .ok_or_else(|| bad("no 'fortran_order' in the .npy header"))?;
    if fortran.starts_with("True") {
        return Err(bad(
            "Fortran-order arrays are not supported; save with np.ascontiguousarray",
        ));
    }
    let shape = dict_value(text, "shape").ok_or_else(|| bad("no 'shape' in the .npy header"))?;
    let inner = shape
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("malformed 'shape'"))?;
    let dims: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| bad("malformed 'shape'"))?;
    if dims.len() != 2 {
        return Err(bad(&format!("array has shape {dims:?}, not 2-D")));
    }
    Ok(NpyHeader {
        dtype,
        rows: dims[0],
        cols: dims[1],
    })
}

/// Reads an integer `.npy` matrix row by row (the official 16384 x 16383 table is 537 MB),
/// handing the first `keep(header)` values of every row to `on_row(header, row_index, values)`.
pub(crate) fn read_npy_rows(
    path: &Path,
    keep: impl FnOnce(&NpyHeader) -> Result<usize>,
    mut on_row: impl FnMut(&NpyHeader, usize, &[i64]) -> Result<()>,
) -> Result<NpyHeader> {
    let file = std::fs::File::open(path).map_err(|e| Error::load(path, e.to_string()))?;
    let mut r = std::io::BufReader::with_capacity(1 << 20, file);
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)
        .map_err(|_| Error::load(path, "file too short to be a .npy file"))?;
    if &magic[..6] != b"\x93NUMPY" {
        return Err(Error::load(path, "not a .npy file (bad magic); pass the official top_*_indices.npy or a lantern .safetensors table"));
    }
    let header_len = match magic[6] {
        1 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b)
                .map_err(|e| Error::load(path, e.to_string()))?;
            u16::from_le_bytes(b) as usize
        }
        2 | 3 => {
            let mut b = [0u8; 4];
            r.read_exact(&mut b)
                .map_err(|e| Error::load(path, e.to_string()))?;
            u32::from_le_bytes(b) as usize
        }
        v => {
            return Err(Error::load(
                path,
                format!("unsupported .npy format version {v}"),
            ))
        }
    };
    if header_len > 1 << 20 {
        return Err(Error::load(path, "implausibly large .npy header"));
    }
    let mut hb = vec![0u8; header_len];
    r.read_exact(&mut hb)
        .map_err(|_| Error::load(path, "truncated .npy header"))?;
    let text = String::from_utf8_lossy(&hb);
    let header = parse_header(path, &text)?;
    let k = keep(&header)?;
    let row_bytes = header
        .cols
        .checked_mul(header.dtype.size())
        .ok_or_else(|| Error::load(path, "shape overflows"))?;
    let mut buf = vec![0u8; row_bytes];
    let mut vals = vec![0i64; k];
    for row in 0..header.rows {
        r.read_exact(&mut buf).map_err(|_| {
            Error::load(
                path,
                "file ends before the data its header announces (truncated download?)",
            )
        })?;
        for (j, x) in vals.iter_mut().enumerate() {
            *x = header.dtype.get(&buf, j);
        }
        on_row(&header, row, &vals)?;
    }
    Ok(header)
}
