//! CUDA attribution, userspace side: which files to probe (`library`), where their functions
//! are (`symbols`, once per file), attaching the probes once per file and removing them when
//! unused (`attach`), and the duty cycle of the kernel-launch probes (`launches`), which needs
//! what a probe hit costs on this host (`calibrate`).

pub mod attach;
pub mod calibrate;
pub mod launches;
pub mod library;
pub mod symbols;
