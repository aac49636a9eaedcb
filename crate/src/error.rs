//! One error type for the whole crate: every variant says what is wrong and where.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("{path}: {message}")]
    Io { path: String, message: String },

    #[error("config.json: field `{field}`: {message}")]
    Config { field: String, message: String },

    #[error("{file}: {message}")]
    Format { file: String, message: String },

    #[error("tensor `{name}`: expected shape {expected:?}, found {found:?} (in {file})")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
        file: String,
    },

    #[error("tensor `{name}` is missing from the checkpoint")]
    MissingTensor { name: String },

    #[error("tensor `{name}` in {file} is not part of a Phi model")]
    UnexpectedTensor { name: String, file: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("prompt has {prompt_tokens} tokens; the model's context (max_position_embeddings) is {context}")]
    PromptTooLong {
        prompt_tokens: usize,
        context: usize,
    },

    #[error("option `{option}`: {message}")]
    InvalidOption { option: String, message: String },

    #[error("device: {0}")]
    Device(String),

    #[error("generation: {0}")]
    State(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<String>, err: impl std::fmt::Display) -> Self {
        Error::Io {
            path: path.into(),
            message: err.to_string(),
        }
    }

    pub fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn format(file: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Format {
            file: file.into(),
            message: message.into(),
        }
    }

    pub fn option(option: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidOption {
            option: option.into(),
            message: message.into(),
        }
    }
}
