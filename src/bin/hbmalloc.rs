//! The `hbmalloc` command-line tool.
//!
//! `hbmalloc demo` runs an inference-shaped workload on the default backend (CUDA where a GPU is
//! present, the simulated device elsewhere) and prints what the allocator did. `inspect`,
//! `estimate` and `fit` answer from a model file's header (or a preset) how much memory a
//! llama.cpp run needs and how to make it fit.

use clap::error::ErrorKind;
use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[path = "hbmalloc/demo.rs"]
mod demo;
#[path = "hbmalloc/estimate_cmd.rs"]
mod estimate_cmd;
#[path = "hbmalloc/replay.rs"]
mod replay;

#[derive(Parser)]
#[command(
    name = "hbmalloc",
    version,
    about = "GPU memory manager for LLM inference: demo, and memory estimates from model files",
    after_help = "configuration: HBMALLOC_CONF=key:value,... (backend:auto|cuda|sim, sim_capacity:16GiB,\n  stream_safety:batched|eager|off, pending_limit:auto|64MiB, backtrace:on|off, leak_report:...)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an inference-shaped workload through the caching pool and report.
    Demo(demo::DemoArgs),
    /// Print a model file's metadata and tensor table (name, type, shape, bytes).
    Inspect(estimate_cmd::InspectArgs),
    /// Estimate memory per component and per device for a llama.cpp run.
    Estimate(estimate_cmd::EstimateArgs),
    /// Find the llama.cpp settings that fit the given free memory (the degradation ladder).
    Fit(estimate_cmd::FitArgs),
    /// Replay a recorded allocation trace (HBMALLOC_CONF=trace:FILE) and report memory held.
    Replay(replay::ReplayArgs),
    /// Print the version.
    Version,
}

fn main() -> ExitCode {
    // SAFETY: restoring the default SIGPIPE action before any thread starts: `hbmalloc ... | head`
    // then ends quietly, as command-line tools do, instead of panicking on a closed stdout.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version: print as asked, exit 0.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::MissingSubcommand | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            eprintln!(
                "hbmalloc: give a command: demo, inspect, estimate, fit, replay, version (try --help)"
            );
            return ExitCode::from(2);
        }
        Err(e) => {
            // One line: clap's first line (it names the argument and what was wrong), with the
            // indented lines that follow a first line ending in ':' (the missing arguments).
            let text = e.render().to_string();
            let mut lines = text.lines();
            let mut line = lines.next().unwrap_or("bad usage").to_string();
            if line.ends_with(':') {
                let named: Vec<&str> = lines
                    .take_while(|l| l.starts_with(' '))
                    .map(str::trim)
                    .collect();
                line = format!("{} {}", line, named.join(", "));
            }
            eprintln!(
                "hbmalloc: {} (try --help)",
                line.trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Inspect(a) => estimate_cmd::inspect(a),
        Command::Estimate(a) => estimate_cmd::estimate(a),
        Command::Fit(a) => estimate_cmd::fit(a),
        Command::Replay(a) => replay::run(a),
        Command::Version => {
            println!("hbmalloc {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
    }
}
