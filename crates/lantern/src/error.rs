//! The library's error type: one variant per kind of failure, each message a single line that
//! names the problem and, where there is one, the fix.
use std::path::PathBuf;

/// Errors returned by the lantern library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or parsed as a checkpoint.
    #[error("cannot load {path}: {msg}")]
    Load { path: PathBuf, msg: String },
    /// A checkpoint tensor has the wrong shape.
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}: {hint}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
        hint: String,
    },
    /// A configuration or parameter value is invalid.
    #[error("invalid {what}: {msg}")]
    Invalid { what: String, msg: String },
    /// An output file could not be written.
    #[error("cannot write {path}: {msg}")]
    Write { path: PathBuf, msg: String },
    /// An I/O error.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// An error from candle.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::Invalid`] for a bad parameter or configuration value.
    pub fn invalid(what: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Invalid {
            what: what.into(),
            msg: msg.into(),
        }
    }

    /// An [`Error::Load`] for a file that cannot be read as expected.
    pub fn load(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Load {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
