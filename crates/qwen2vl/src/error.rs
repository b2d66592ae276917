//! One error type for the whole library.
//!
//! Anything a user sent (a path, an image, a prompt, a sampling value) that cannot be used is
//! [`Error::BadInput`]: it names *what* was wrong and *what is allowed*, so a CLI or server can
//! show it as is. Internal faults (a tensor op failing, an I/O error on a file we chose, a
//! broken invariant: [`Error::Internal`]) and an engine that stopped ([`Error::Shutdown`]) are
//! the other variants.

use std::path::PathBuf;

/// The library's error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Something the user sent cannot be used.
    #[error("{what}; allowed: {allowed}")]
    BadInput {
        /// What was wrong, naming the item (e.g. "image 2 of message 1 is not a PNG").
        what: String,
        /// What is allowed instead.
        allowed: String,
    },
    /// A model directory or file is missing or unreadable.
    #[error("{what}: {path}")]
    Model {
        /// What was expected there.
        what: String,
        /// The path that was tried.
        path: PathBuf,
    },
    /// A config file exists but does not parse.
    #[error("malformed {file}: {message}")]
    Config {
        /// The file (e.g. `config.json`).
        file: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A checkpoint does not match the model it claims to be.
    #[error("weights: {0}")]
    Weights(String),
    /// The tokenizer or chat template failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A chat template failed to render.
    #[error("chat template: {0}")]
    Template(String),
    /// A tensor operation failed (an internal fault, not the user's).
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    /// An I/O error.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A fault of the library's own (a broken invariant, a caught panic): never the user's.
    #[error("internal fault: {0}")]
    Internal(String),
    /// The engine stopped before it could finish the request: retry on a running one.
    #[error("the engine shut down: {0}")]
    Shutdown(String),
}

impl Error {
    /// Shorthand for [`Error::BadInput`].
    pub fn bad_input(what: impl Into<String>, allowed: impl Into<String>) -> Self {
        Error::BadInput {
            what: what.into(),
            allowed: allowed.into(),
        }
    }
}

impl Error {
    /// A bad input's `what` prefixed with `prefix` ("image 2 (message 1): …", "clip.mp4: …");
    /// other errors unchanged.
    pub fn prefixed(self, prefix: impl std::fmt::Display) -> Self {
        match self {
            Error::BadInput { what, allowed } => Error::BadInput {
                what: format!("{prefix}: {what}"),
                allowed,
            },
            other => other,
        }
    }
}

/// The library's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
