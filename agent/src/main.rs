use std::process::ExitCode;

use clap::Parser;
use llmscope::config::Config;

fn main() -> ExitCode {
    let config = Config::parse();
    if let Some(llmscope::config::Command::Top(args)) = config.command {
        return match llmscope::top::run(args, config.common.listen_address) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Err(problems) = config.validate() {
        for p in &problems {
            eprintln!("error: {p}");
        }
        eprintln!("\nFor more information, try '--help'.");
        return ExitCode::from(2);
    }
    bounded_malloc_arenas();
    llmscope::logging::init(&config.common.log_level, config.common.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("llmscope-http")
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(llmscope::agent::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// glibc gives each thread that allocates its own malloc arena; memory freed in one stays
/// there, so a burst (ten thousand processes tracked and expired) left the agent's RSS twice
/// what it was (measured by the soak test). One arena is plenty for the agent's few
/// threads; the sampler also hands free memory back to the kernel once a second.
fn bounded_malloc_arenas() {
    // SAFETY: mallopt only changes allocator settings; called before any thread starts.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
}
