//! Embeds the eBPF object built by `cargo xtask build-ebpf` (feature `ebpf` only), so the
//! agent ships as one binary. LLMSCOPE_EBPF_OBJECT overrides where the object is read from.
//! Without the object (a fresh clone: `cargo check`, rust-analyzer) the crate still builds,
//! with a warning, and such a binary refuses to start, saying how to build the object.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LLMSCOPE_EBPF_OBJECT");
    println!("cargo::rustc-check-cfg=cfg(llmscope_no_ebpf_object)");
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
        println!(
            "cargo:warning=the eBPF object {} does not exist: this build cannot load its \
             programs (run `cargo xtask build-ebpf`; `cargo xtask run` and `cargo xtask test` \
             do it for you)",
            object.display()
        );
        println!("cargo:rustc-cfg=llmscope_no_ebpf_object");
        return;
    }
    println!(
        "cargo:rustc-env=LLMSCOPE_EBPF_OBJECT={}",
        object.canonicalize().unwrap().display()
    );
}
