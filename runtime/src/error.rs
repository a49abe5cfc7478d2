//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in the runtime. Messages name the file, tensor or key and
/// what was wrong with it, so that a user can act on them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A GGUF file that is malformed: truncated, inconsistent or hostile.
    #[error("invalid GGUF{}: {msg}", .path.as_ref().map(|p| format!(" file {}", p.display())).unwrap_or_default())]
    Gguf { path: Option<PathBuf>, msg: String },
    /// A metadata key that the model needs is missing or has the wrong type.
    #[error("metadata key `{key}`: {msg}")]
    Metadata { key: String, msg: String },
    /// A tensor is missing, has the wrong shape or an unsupported type.
    #[error("tensor `{name}`: {msg}")]
    Tensor { name: String, msg: String },
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An adapter that cannot be read, or that does not fit the base model it is applied to.
    #[error("adapter {}: {msg}", .path.display())]
    Adapter { path: PathBuf, msg: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn gguf(msg: impl Into<String>) -> Self {
        Error::Gguf {
            path: None,
            msg: msg.into(),
        }
    }
    pub(crate) fn tensor(name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Tensor {
            name: name.into(),
            msg: msg.into(),
        }
    }
    pub(crate) fn metadata(key: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Metadata {
            key: key.into(),
            msg: msg.into(),
        }
    }
    pub(crate) fn adapter(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Adapter {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
