pub mod identity;
pub mod metrics;
#[cfg(target_os = "linux")]
pub mod proc;
pub mod tracker;
