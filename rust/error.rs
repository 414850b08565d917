//! Errors of the native kernels.

use std::fmt;

/// Everything that can go wrong in a kernel call. None of these is a panic: every kernel validates
/// its inputs and reports the first problem it finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelError {
    /// A cost array holds a NaN; `array` is the lowest index of an array that does.
    NanCost { array: usize },
    /// A score matrix holds a NaN; `row` is the lowest row that does.
    NanScore { row: usize },
    /// Any other invalid argument, with a message meant for the caller.
    Invalid(String),
}

impl KernelError {
    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        KernelError::Invalid(msg.into())
    }

    /// The message, with the name of the offending cost array when `names` gives one.
    pub fn message(&self, names: Option<&[String]>) -> String {
        match self {
            KernelError::NanCost { array } => match names.and_then(|n| n.get(*array)) {
                Some(name) => format!("cost array {array} ('{name}') contains NaN"),
                None => format!("cost array {array} contains NaN"),
            },
            KernelError::NanScore { row } => format!("scores contain NaN in row {row}"),
            KernelError::Invalid(msg) => msg.clone(),
        }
    }
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message(None))
    }
}

impl std::error::Error for KernelError {}

/// Result of a kernel.
pub type KernelResult<T> = Result<T, KernelError>;
