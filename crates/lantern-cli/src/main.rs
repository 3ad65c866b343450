//! `lantern`: generate images with LlamaGen-family models and LANTERN speculative decoding.
fn main() -> anyhow::Result<()> {
    Ok(())
}
