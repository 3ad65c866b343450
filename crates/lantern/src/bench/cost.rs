//! Analytic memory traffic (bytes, read + write) and FLOPs of the benchmarked steps: weights read
//! once, KV cache read, new KV and outputs written; `2 * matmul params * tokens * batch` plus
//! attention (`4 * s * t * head_dim` per head) or convolution FLOPs.
use crate::models::drafter::DrafterConfig;
use crate::models::llamagen::Config;
use crate::models::vq::VqConfig;

/// Traffic and FLOPs of a target forward of `s` tokens per sequence after `past` cached ones,
/// to logits.
pub fn target_cost(c: &Config, b: usize, s: usize, past: usize, el: usize) -> (f64, f64) {
    let (d, f, hd) = (c.dim, c.ffn_hidden, c.head_dim());
    let layer_mm = d * (c.n_head + 2 * c.n_kv_head) * hd + c.n_head * hd * d + 3 * d * f;
    let mm = c.n_layer * layer_mm + c.vocab_size * d;
    let weights = (mm + c.n_layer * 2 * d + d + b * s * d) * el;
    let t = past + s;
    let kv_read = c.n_layer * 2 * b * c.n_kv_head * t * hd * el;
    let kv_write = c.n_layer * 2 * b * c.n_kv_head * s * hd * el;
    let logits = b * s * c.vocab_size * 4;
    let bytes = (weights + kv_read + kv_write + logits) as f64;
    let attn = c.n_layer * 4 * b * c.n_head * s * t * hd;
    (bytes, (2 * mm * b * s + attn) as f64)
}

/// Traffic and FLOPs of one drafter level of `s` tokens after `past` cached ones, plus the
/// target's `lm_head` on its output.
pub fn drafter_cost(c: &DrafterConfig, b: usize, s: usize, past: usize, el: usize) -> (f64, f64) {
    let (d, f, hd) = (c.hidden_size, c.intermediate_size, c.head_dim());
    let (h, kvh) = (c.num_attention_heads, c.num_key_value_heads);
    let mm = 2 * d * d + d * (h + 2 * kvh) * hd + h * hd * d + 3 * d * f + c.vocab_size * d;
    // fc bias, norm weight, token embedding rows and input features.
    let weights = (mm + 2 * d + 2 * b * s * d) * el;
    let t = past + s;
    let kv = 2 * b * kvh * (t + s) * hd * el;
    let logits = b * s * c.vocab_size * 4;
    let attn = 4 * b * h * s * t * hd;
    (
        (weights + kv + logits) as f64,
        (2 * mm * b * s + attn) as f64,
    )
}

/// Traffic and FLOPs of the drafter fed `s` committed pairs after `past` cached positions (a
/// drafter level without the output head), as a drafting computation runs it first when the
/// feed is folded into it.
pub fn feed_cost(c: &DrafterConfig, b: usize, s: usize, past: usize, el: usize) -> (f64, f64) {
    let (bytes, flops) = drafter_cost(c, b, s, past, el);
    let head_bytes = c.vocab_size * c.hidden_size * el + b * s * c.vocab_size * 4;
    let head_flops = 2 * c.vocab_size * c.hidden_size * b * s;
    (bytes - head_bytes as f64, flops - head_flops as f64)
}

/// Parameters and FLOPs of the VQ decoder (`post_quant_conv` + decoder) on a `grid`² latent.
pub fn vq_decoder_cost(cfg: &VqConfig, grid: usize) -> (usize, usize) {
    #[derive(Default)]
    struct Acc {
        params: usize,
        flops: usize,
    }
    impl Acc {
        fn conv(&mut self, cin: usize, cout: usize, k: usize, hw: usize) {
            self.params += cout * cin * k * k + cout;
            self.flops += 2 * cout * cin * k * k * hw;
        }
        fn resnet(&mut self, cin: usize, cout: usize, hw: usize) {
            self.params += 2 * cin + 2 * cout; // two group norms
            self.conv(cin, cout, 3, hw);
            self.conv(cout, cout, 3, hw);
            if cin != cout {
                self.conv(cin, cout, 1, hw);
            }
        }
        fn attn(&mut self, c: usize, hw: usize) {
            self.params += 2 * c;
            for _ in 0..4 {
                self.conv(c, c, 1, hw);
            }
            self.flops += 4 * hw * hw * c;
        }
    }
    let mut a = Acc::default();
    let n = cfg.ch_mult.len();
    let mut side = grid;
    let mut hw = side * side;
    let mut bi = cfg.ch * cfg.ch_mult[n - 1];
    a.conv(cfg.codebook_embed_dim, cfg.z_channels, 1, hw);
    a.conv(cfg.z_channels, bi, 3, hw);
    a.resnet(bi, bi, hw);
    a.attn(bi, hw);
    a.resnet(bi, bi, hw);
    for l in (0..n).rev() {
        let bo = cfg.ch * cfg.ch_mult[l];
        for _ in 0..cfg.num_res_blocks + 1 {
            a.resnet(bi, bo, hw);
            bi = bo;
            if l == n - 1 && cfg.attn_at_lowest {
                a.attn(bi, hw);
            }
        }
        if l != 0 {
            side *= 2;
            hw = side * side;
            a.conv(bi, bi, 3, hw);
        }
    }
    a.params += 2 * bi;
    a.conv(bi, cfg.in_channels, 3, hw);
    (a.params, a.flops)
}
