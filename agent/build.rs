//! Embeds the eBPF object built by `cargo xtask build-ebpf` (feature `ebpf` only), so the
//! agent ships as one binary. LLMSCOPE_EBPF_OBJECT overrides where the object is read from.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LLMSCOPE_EBPF_OBJECT");
    if std::env::var_os("CARGO_FEATURE_EBPF").is_none() {
        return;
    }
    let object = std::env::var_os("LLMSCOPE_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/ebpf/bpfel-unknown-none/release/agent-ebpf")
        });
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.is_file() {
        panic!(
            "the eBPF object {} does not exist: run `cargo xtask build-ebpf` first \
             (`cargo xtask run` and `cargo xtask test` do it for you), or build without the \
             `ebpf` feature",
            object.display()
        );
    }
    println!(
        "cargo:rustc-env=LLMSCOPE_EBPF_OBJECT={}",
        object.canonicalize().unwrap().display()
    );
}
