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

    /// A chunk whose bytes are not what the manifest promises (size or sha256): fetching it
    /// again may help, unlike a format error.
    #[error("{location}: {message}")]
    Integrity {
        location: String,
        chunk: usize,
        message: String,
    },

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

    #[error("prompt has {prompt_tokens} tokens; the model's context is {context} tokens")]
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

    /// A stable name for the kind of error, used as the JS error's `name`.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Io { .. } => "LoadError",
            Error::Integrity { .. } => "IntegrityError",
            Error::Config { .. }
            | Error::Format { .. }
            | Error::TensorShape { .. }
            | Error::MissingTensor { .. }
            | Error::UnexpectedTensor { .. }
            | Error::Tokenizer(_) => "FormatError",
            Error::PromptTooLong { .. } | Error::InvalidOption { .. } => "OptionError",
            Error::Device(_) => "DeviceError",
            Error::State(_) => "StateError",
        }
    }

    /// What the error is about — file, field, tensor, chunk or option — as key/value pairs.
    pub fn details(&self) -> Vec<(&'static str, String)> {
        match self {
            Error::Io { path, .. } => vec![("file", path.clone())],
            Error::Integrity {
                location, chunk, ..
            } => vec![("file", location.clone()), ("chunk", chunk.to_string())],
            Error::Config { field, .. } => {
                vec![("file", "config.json".into()), ("field", field.clone())]
            }
            Error::Format { file, .. } => vec![("file", file.clone())],
            Error::TensorShape { name, file, .. } | Error::UnexpectedTensor { name, file } => {
                vec![("tensor", name.clone()), ("file", file.clone())]
            }
            Error::MissingTensor { name } => vec![("tensor", name.clone())],
            Error::PromptTooLong { .. } => vec![("option", "prompt".into())],
            Error::InvalidOption { option, .. } => vec![("option", option.clone())],
            Error::Tokenizer(_) | Error::Device(_) | Error::State(_) => Vec::new(),
        }
    }

    pub fn option(option: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidOption {
            option: option.into(),
            message: message.into(),
        }
    }
}
