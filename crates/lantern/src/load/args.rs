//! The training arguments LlamaGen stores next to the weights (`"args": argparse.Namespace`),
//! read from the first zip entry of a `torch.save` file with candle's non-executing pickle
//! parser. Used only to fill in what tensor shapes cannot tell (image size, model name).
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use candle_core::pickle::{Object, Stack};

/// Scalar training arguments (`image_size`, `gpt_model`, ...) as JSON values; empty when the
/// file has none or they cannot be read.
pub fn read_checkpoint_args(path: &Path) -> BTreeMap<String, serde_json::Value> {
    read(path).unwrap_or_default()
}

fn read(path: &Path) -> Option<BTreeMap<String, serde_json::Value>> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut head = [0u8; 30];
    f.read_exact(&mut head).ok()?;
    let u16_at = |i: usize| u16::from_le_bytes([head[i], head[i + 1]]) as usize;
    // Local file header of the first entry, stored (method 0). torch.save sets the sizes in a
    // trailing data descriptor, so read the pickle until its STOP opcode instead.
    if head[..4] != *b"PK\x03\x04" || u16_at(8) != 0 {
        return None;
    }
    let (name_len, extra_len) = (u16_at(26), u16_at(28));
    let mut name = vec![0u8; name_len];
    f.read_exact(&mut name).ok()?;
    if !name.ends_with(b"data.pkl") {
        return None;
    }
    std::io::copy(&mut (&mut f).take(extra_len as u64), &mut std::io::sink()).ok()?;
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut std::io::BufReader::new(f.take(64 << 20)))
        .ok()?;
    let Object::Dict(top) = stack.finalize().ok()? else {
        return None;
    };
    let args = top
        .into_iter()
        .find(|(k, _)| *k == Object::Unicode("args".into()))?
        .1;
    let fields = match args {
        Object::Build { args, .. } => *args,
        o => o,
    };
    let Object::Dict(fields) = fields else {
        return None;
    };
    let mut out = BTreeMap::new();
    for (k, v) in fields {
        let Object::Unicode(k) = k else { continue };
        let v = match v {
            Object::Int(i) => serde_json::json!(i),
            Object::Long(i) => serde_json::json!(i),
            Object::Float(x) => serde_json::json!(x),
            Object::Unicode(s) => serde_json::json!(s),
            Object::Bool(b) => serde_json::json!(b),
            _ => continue,
        };
        out.insert(k, v);
    }
    Some(out)
}
