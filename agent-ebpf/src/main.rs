//! llmscope's eBPF programs. Each program is a thin exported function around a fallible
//! helper; the helpers live in one module per concern.
#![no_std]
#![no_main]
// Inline asm for BPF's atomic add (cuda.rs): unstable for this architecture.
#![feature(asm_experimental_arch)]

mod cuda;
mod http;
mod library;
mod maps;
mod process;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects any path that could get here.
    loop {}
}

/// Programs using GPL-only helpers (bpf_probe_read_*, bpf_get_current_task_btf) must say so.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
