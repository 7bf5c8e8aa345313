//! A real llama.cpp server for the tests: built from the llama.cpp tree that the
//! `llama-cpp-python` source distribution on PyPI vendors (pinned), with CMake, once, and
//! cached under ~/.cache/llmscope keyed by that version; and a tiny model with random weights
//! and a real vocabulary written by the tree's own gguf-py
//! (agent/tests/fixtures/llama/tiny_model.py).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::setup;

const SDIST: &str = "llama-cpp-python==0.3.36";
const TREE: &str = "llama_cpp_python-0.3.36/vendor/llama.cpp";

/// (llama-server, tiny model), built when missing.
pub fn fixture() -> Result<(PathBuf, PathBuf)> {
    setup::ensure_debian_packages(&[("cmake", "cmake"), ("g++", "g++")])?;
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let dir = Path::new(&home).join(".cache/llmscope/llama");
    let tree = dir.join(TREE);
    let server = tree.join("build/bin/llama-server");
    let model = dir.join("tiny-llama.gguf");
    if !server.is_file() {
        println!(
            "xtask: building a real llama-server from the {SDIST} source distribution (once; about 9 minutes on two cores)"
        );
        std::fs::create_dir_all(&dir)?;
        if !tree.is_dir() {
            setup::run(
                Command::new("python3")
                    .args(["-m", "pip", "download", "--quiet", "--no-deps"])
                    .args(["--no-binary", "llama-cpp-python", SDIST, "-d"])
                    .arg(&dir),
            )?;
            setup::run(
                Command::new("tar")
                    .arg("-C")
                    .arg(&dir)
                    .arg("-xzf")
                    .arg(dir.join("llama_cpp_python-0.3.36.tar.gz")),
            )?;
        }
        setup::run(Command::new("cmake").current_dir(&tree).args([
            "-B",
            "build",
            "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_CURL=OFF",
            "-DGGML_NATIVE=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_SERVER=ON",
        ]))?;
        setup::run(Command::new("cmake").current_dir(&tree).args([
            "--build",
            "build",
            "--target",
            "llama-server",
            "-j2",
        ]))?;
    }
    if !model.is_file() {
        setup::ensure_python_module("numpy", "numpy")?;
        let partial = dir.join("tiny-llama.gguf.partial");
        setup::run(
            Command::new("python3")
                .arg(setup::workspace_root().join("agent/tests/fixtures/llama/tiny_model.py"))
                .arg(tree.join("gguf-py"))
                .arg(tree.join("models/ggml-vocab-llama-spm.gguf"))
                .arg(&partial),
        )?;
        std::fs::rename(&partial, &model)?;
    }
    Ok((server, model))
}
