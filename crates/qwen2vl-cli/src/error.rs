//! The CLI's one error type and its exit codes (the README's table): every command returns
//! it, `main` prints it as one `error: ` line and exits with [`CliError::exit_code`].

/// A CLI failure with the exit code scripts can rely on.
#[derive(Debug)]
pub enum CliError {
    /// Bad flags or input, including a model path that is not a usable model (exit 2).
    Usage(String),
    /// The model could not be found or downloaded: unknown repo, no network (exit 3).
    Unavailable(String),
    /// Stopped by the user with Ctrl-C (exit 130, the shell's convention).
    Interrupted,
    /// Everything else (exit 1).
    Failed(String),
}

impl CliError {
    /// The process exit code (documented in the README).
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Unavailable(_) => 3,
            CliError::Interrupted => 130,
            CliError::Failed(_) => 1,
        }
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Usage(m) | CliError::Unavailable(m) | CliError::Failed(m) => f.write_str(m),
            CliError::Interrupted => f.write_str("interrupted"),
        }
    }
}

impl From<qwen2vl::Error> for CliError {
    fn from(e: qwen2vl::Error) -> Self {
        match e {
            qwen2vl::Error::BadInput { .. }
            | qwen2vl::Error::Model { .. }
            | qwen2vl::Error::Config { .. } => CliError::Usage(e.to_string()),
            _ => CliError::Failed(e.to_string()),
        }
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        CliError::Failed(e.to_string())
    }
}
