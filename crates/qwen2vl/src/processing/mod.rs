//! Messages → model inputs: image preprocessing, chat template, tokenizer.

pub mod fetch;
pub mod image;
pub mod messages;
pub mod processor;
pub mod sizes;
pub mod template;
#[cfg(test)]
mod test_util;
pub mod tokenizer;
pub mod video;
