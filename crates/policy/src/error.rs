use thiserror::Error;

/// Errors loading a policy. Each names the file and rule so it can be fixed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// A policy file or directory could not be read.
    #[error("cannot read policy {0}: {1}")]
    Io(String, std::io::Error),
    /// TOML syntax or an unknown key.
    #[error("policy file {0}: {1}")]
    Syntax(String, String),
    /// A rule that is not meaningful.
    #[error("policy file {file}, rule '{rule}': {why}")]
    Rule {
        /// The file.
        file: String,
        /// The rule name.
        rule: String,
        /// What is wrong and how to fix it.
        why: String,
    },
    /// The directory has no rules at all.
    #[error(
        "no policy rules found in {0}: add a *.toml file with [[rule]] tables (see policies/example.toml)"
    )]
    Empty(String),
}
