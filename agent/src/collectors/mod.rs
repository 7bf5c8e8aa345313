//! One collector per file, each behind [`crate::metrics::Collector`].

pub mod kernel;
pub mod process;
