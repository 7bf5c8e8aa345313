//! CUDA attribution, userspace side: which files to probe (`library`), attaching the probes
//! once per file (`attach`), and the duty cycle of the kernel-launch probes (`launches`).

pub mod attach;
pub mod launches;
pub mod library;
