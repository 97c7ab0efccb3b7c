//! `loadgen`: drives the outbox engine end to end and checks what comes out.
//!
//! Exit codes: 0 the run passed; 1 an error (unreachable database or
//! broker, failed transaction...); 2 bad usage; 3 the run finished but
//! events were lost or arrived out of order.

use std::process::ExitCode;

use clap::Parser;

mod cli;
mod clock;
mod plan;
mod progress;
mod report;
mod run;
mod verifier;
mod writer;

use cli::{Cli, Command};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Bad flags, as clap reports them.
const EXIT_USAGE: u8 = 2;
/// The run finished and its report says events were lost or reordered.
const EXIT_CHECK_FAILED: u8 = 3;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(EXIT_USAGE),
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => {
            let out = args.out.clone();
            let json = args.json;
            let config = match args.validate() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return Ok(ExitCode::from(EXIT_USAGE));
                }
            };
            let report = run::run(args, config).await?;
            if let Some(dir) = &out {
                report.write(dir)?;
                eprintln!(
                    "loadgen: wrote {}/report.json and summary.md",
                    dir.display()
                );
            }
            if json {
                println!("{}", report.to_json()?);
            } else {
                print!("{}", report.markdown());
            }
            let failures = report.failures();
            for f in &failures {
                eprintln!("FAILED: {f}");
            }
            Ok(if failures.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_CHECK_FAILED)
            })
        }
    }
}
