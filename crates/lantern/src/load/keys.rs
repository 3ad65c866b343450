//! The one place where checkpoint families' tensor names meet. Canonical names are the original
//! LlamaGen ones (`layers.i.attention.wqkv.weight`, ...); LANTERN's HF-style names
//! (`model.layers.i.self_attn.q_proj.weight`, ...) are mapped onto them, with `q/k/v_proj`
//! concatenated into `wqkv` (rows `[q | k | v]`, spec §1.7).

/// Where the tensor for a canonical name comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A stored tensor of this name.
    Direct(String),
    /// Stored tensors concatenated along dim 0 (fused `wqkv` from HF `q/k/v_proj`).
    Concat(Vec<String>),
}

/// Prefixes wrappers add to every key (DDP `module.`, `torch.compile` `_orig_mod.`).
pub const WRAPPER_PREFIXES: [&str; 2] = ["module.", "_orig_mod."];

/// (original suffix, HF suffix) pairs inside `layers.i.`.
const LAYER_MAP: [(&str, &str); 6] = [
    ("attention.wo.weight", "self_attn.o_proj.weight"),
    ("feed_forward.w1.weight", "mlp.gate_proj.weight"),
    ("feed_forward.w3.weight", "mlp.up_proj.weight"),
    ("feed_forward.w2.weight", "mlp.down_proj.weight"),
    ("attention_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
];

/// The HF-style name(s) of a canonical (original) LlamaGen tensor name.
pub fn original_to_hf(name: &str) -> Option<Source> {
    match name {
        "tok_embeddings.weight" => return Some(Source::Direct("model.embed_tokens.weight".into())),
        "norm.weight" => return Some(Source::Direct("model.norm.weight".into())),
        "output.weight" => return Some(Source::Direct("lm_head.weight".into())),
        _ => {}
    }
    if let Some(rest) = name.strip_prefix("cls_embedding.") {
        return Some(Source::Direct(format!("model.cls_embedding.{rest}")));
    }
    let rest = name.strip_prefix("layers.")?;
    let (idx, suffix) = rest.split_once('.')?;
    let base = format!("model.layers.{idx}.");
    if suffix == "attention.wqkv.weight" {
        return Some(Source::Concat(
            ["q_proj", "k_proj", "v_proj"]
                .iter()
                .map(|p| format!("{base}self_attn.{p}.weight"))
                .collect(),
        ));
    }
    LAYER_MAP
        .iter()
        .find(|(o, _)| *o == suffix)
        .map(|(_, h)| Source::Direct(format!("{base}{h}")))
}

/// The canonical name of a stored HF-style tensor name (inverse of [`original_to_hf`]);
/// `q/k/v_proj` map to the fused `wqkv`.
pub fn hf_to_original(name: &str) -> Option<String> {
    match name {
        "model.embed_tokens.weight" => return Some("tok_embeddings.weight".into()),
        "model.norm.weight" => return Some("norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    if let Some(rest) = name.strip_prefix("model.cls_embedding.") {
        return Some(format!("cls_embedding.{rest}"));
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (idx, suffix) = rest.split_once('.')?;
    if matches!(
        suffix,
        "self_attn.q_proj.weight" | "self_attn.k_proj.weight" | "self_attn.v_proj.weight"
    ) {
        return Some(format!("layers.{idx}.attention.wqkv.weight"));
    }
    LAYER_MAP
        .iter()
        .find(|(_, h)| *h == suffix)
        .map(|(o, _)| format!("layers.{idx}.{o}"))
}

/// Resolves a canonical name against the stored names: the name itself when stored, otherwise
/// its HF-style counterpart(s) when all of them are stored.
pub fn resolve(name: &str, has: impl Fn(&str) -> bool) -> Option<Source> {
    if has(name) {
        return Some(Source::Direct(name.to_string()));
    }
    match original_to_hf(name)? {
        Source::Direct(n) if has(&n) => Some(Source::Direct(n)),
        Source::Concat(v) if v.iter().all(|n| has(n)) => Some(Source::Concat(v)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for n in [
            "tok_embeddings.weight",
            "output.weight",
            "norm.weight",
            "cls_embedding.uncond_embedding",
            "layers.3.attention.wo.weight",
            "layers.0.feed_forward.w3.weight",
            "layers.12.ffn_norm.weight",
        ] {
            let Some(Source::Direct(h)) = original_to_hf(n) else {
                panic!("{n}")
            };
            assert_eq!(hf_to_original(&h).as_deref(), Some(n));
        }
        let Some(Source::Concat(v)) = original_to_hf("layers.1.attention.wqkv.weight") else {
            panic!()
        };
        assert_eq!(v[1], "model.layers.1.self_attn.k_proj.weight");
        assert_eq!(
            hf_to_original(&v[2]).as_deref(),
            Some("layers.1.attention.wqkv.weight")
        );
        assert_eq!(original_to_hf("layers.1.foo"), None);
    }
}
