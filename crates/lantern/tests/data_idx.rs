//! The IDX reader on the real Fashion-MNIST files and on damaged copies.
use lantern::data::idx::read_idx;
use lantern::data::{fashion_mnist, Split, FASHION_MNIST_DIR};
use std::io::Write;
use std::path::Path;

#[test]
fn reads_fashion_mnist_splits() -> anyhow::Result<()> {
    let dir = Path::new(FASHION_MNIST_DIR);
    let train = fashion_mnist(dir, Split::Train)?;
    let test = fashion_mnist(dir, Split::Test)?;
    assert_eq!((train.len(), test.len()), (60000, 10000));
    assert_eq!((train.height, train.width, train.channels), (28, 28, 1));
    assert!(train.labels.iter().all(|&l| l < 10));
    // every class is present in the test split, 1000 each
    for c in 0..10 {
        assert_eq!(test.labels.iter().filter(|&&l| l == c).count(), 1000);
    }
    Ok(())
}

#[test]
fn truncated_and_foreign_files_are_clear_errors() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("lantern-idx-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // a valid header announcing 2 images of 2x2, with only 5 of the 8 bytes
    let p = dir.join("short-idx3-ubyte");
    std::fs::File::create(&p)?.write_all(&[
        0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2, 1, 2, 3, 4, 5,
    ])?;
    let e = read_idx(&p).unwrap_err().to_string();
    assert!(e.contains("truncated") && e.contains("8 bytes"), "{e}");
    let p = dir.join("png-idx3-ubyte");
    std::fs::write(&p, b"\x89PNG\r\n\x1a\n....")?;
    assert!(read_idx(&p)
        .unwrap_err()
        .to_string()
        .contains("not an IDX file"));
    let p = dir.join("bad.gz");
    std::fs::write(&p, b"not gzip")?;
    assert!(read_idx(&p).unwrap_err().to_string().contains("gzip"));
    let e = fashion_mnist(&dir, Split::Test).unwrap_err().to_string();
    assert!(e.contains("apt-get install dataset-fashion-mnist"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
