//! The repository files tests read: the shipped config, and the README's commands
//! (so that what the README shows is what is tested).

use std::path::{Path, PathBuf};

/// The config shipped at the repository root (the four demo sources, local model).
pub fn shipped_config() -> PathBuf {
    repo_root().join("kbsync.toml")
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root exists")
}

/// The output README.md shows under `$ command` (the lines after it up to the end of
/// its code block, less the indentation of the `$ command` line: a block in a numbered
/// list is indented).
pub fn shown_in_readme(command: &str) -> String {
    let readme = readme();
    let mut lines = readme.lines();
    let prompt = format!("$ {command}");
    let indent = lines
        .by_ref()
        .find(|line| line.trim_start() == prompt)
        .map(|line| line.len() - line.trim_start().len())
        .unwrap_or_else(|| panic!("README.md shows no `{prompt}`"));
    lines
        .take_while(|line| !line.trim_start().starts_with("```"))
        .map(|line| line.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The code block of README.md whose first line is `first_line`, that line included.
pub fn readme_block_starting(first_line: &str) -> String {
    let readme = readme();
    let after = readme
        .split_once(&format!("```toml\n{first_line}\n"))
        .unwrap_or_else(|| panic!("README.md has no toml block starting with {first_line}"))
        .1;
    let body = after
        .split_once("```")
        .expect("the end of the code block")
        .0;
    format!("{first_line}\n{body}")
}

fn readme() -> String {
    std::fs::read_to_string(repo_root().join("README.md")).expect("README.md")
}
