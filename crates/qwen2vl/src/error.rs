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
        /// The image or video of the conversation it concerns, when it concerns one (the
        /// server turns it into the request field to blame, e.g. `messages[2].content[1]`).
        item: Option<Item>,
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
            item: None,
        }
    }

    /// A bad input about one image or video of the conversation: its `what` prefixed with the
    /// item ("image 2 (message 1): …") and [`Error::BadInput::item`] set; other errors
    /// unchanged.
    pub fn about(self, it: Item) -> Self {
        match self.prefixed(it) {
            Error::BadInput { what, allowed, .. } => Error::BadInput {
                what,
                allowed,
                item: Some(it),
            },
            other => other,
        }
    }

    /// The item a bad input concerns, if any.
    pub fn item(&self) -> Option<Item> {
        match self {
            Error::BadInput { item, .. } => *item,
            _ => None,
        }
    }
}

/// Whether an [`Item`] is an image or a video.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemKind {
    /// An image (`{"type": "image"}` content part).
    Image,
    /// A video (`{"type": "video"}` content part).
    Video,
}

/// One image or video of a conversation, as an error names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Item {
    /// Image or video.
    pub kind: ItemKind,
    /// 1-based, counted over the whole conversation per kind (the 2nd image is 2 even when it
    /// is the first of its message).
    pub index: usize,
    /// 1-based index of the message that holds it.
    pub message: usize,
}

impl std::fmt::Display for Item {
    /// "image 2 (message 1)".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            ItemKind::Image => "image",
            ItemKind::Video => "video",
        };
        write!(f, "{kind} {} (message {})", self.index, self.message)
    }
}

impl Error {
    /// A bad input's `what` prefixed with `prefix` ("image 2 (message 1): …", "clip.mp4: …");
    /// other errors unchanged.
    pub fn prefixed(self, prefix: impl std::fmt::Display) -> Self {
        match self {
            Error::BadInput {
                what,
                allowed,
                item,
            } => Error::BadInput {
                what: format!("{prefix}: {what}"),
                allowed,
                item,
            },
            other => other,
        }
    }
}

/// The library's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn about_names_the_item_in_the_message_and_as_a_field() {
        let it = Item {
            kind: ItemKind::Video,
            index: 2,
            message: 3,
        };
        let e = Error::bad_input("not an MP4", "MP4 or WebM").about(it);
        assert_eq!(e.item(), Some(it));
        assert_eq!(
            e.to_string(),
            "video 2 (message 3): not an MP4; allowed: MP4 or WebM"
        );
        // A later prefix (the file name) keeps the item.
        let e = e.prefixed("clip.mp4");
        assert_eq!(e.item(), Some(it));
        assert!(e.to_string().starts_with("clip.mp4: video 2"), "{e}");
        // Other errors carry no item and are left as they are.
        let other = Error::Internal("x".into()).about(it);
        assert_eq!(other.item(), None);
        assert!(matches!(other, Error::Internal(_)));
    }
}
