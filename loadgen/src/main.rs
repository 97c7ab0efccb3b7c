//! `loadgen`: drives the outbox engine end to end, checks what comes out,
//! measures the baselines it is compared with, and runs the benchmark
//! suite.
//!
//! Exit codes: 0 the run passed; 1 an error (unreachable database or
//! broker, failed transaction, a suite run that could not be measured...);
//! 2 bad usage; 3 the run finished but events were lost or arrived out of
//! order (the report is still written).

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;

mod broker;
mod cli;
mod clock;
mod drain;
mod hgrm;
mod kafka;
mod nodes;
mod plan;
mod plot;
mod progress;
mod report;
mod run;
mod suite;
mod timeseries;
mod verifier;
mod writer;

use cli::{Cli, Command};
use report::{Finished, Meta};
use run::WriteOnly;

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

/// A checked config, or exit 2 with the message.
macro_rules! checked {
    ($validated:expr) => {
        match $validated {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {e:#}");
                return Ok(ExitCode::from(EXIT_USAGE));
            }
        }
    };
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let meta = |name: &Option<String>| Meta {
        name: name.clone(),
        ..Meta::default()
    };
    match cli.command {
        Command::Run(args) => {
            let config = checked!(args.validate());
            let finished = if args.no_verify {
                run::write_only(
                    &args.database_url,
                    config,
                    meta(&args.report.name),
                    WriteOnly::WithEngine,
                )
                .await?
                .1
            } else {
                run::e2e(&args.database_url, config, meta(&args.report.name))
                    .await?
                    .1
            };
            finish(&finished, args.report.out.as_deref(), args.report.json)
        }
        Command::DbCeiling(args) => {
            let config = checked!(args.validate());
            let (_, finished) = run::write_only(
                &args.database_url,
                config,
                meta(&args.report.name),
                WriteOnly::DbCeiling,
            )
            .await?;
            finish(&finished, args.report.out.as_deref(), args.report.json)
        }
        Command::BrokerCeiling(args) => {
            let config = checked!(args.validate());
            let (_, finished) = broker::run(config, meta(&args.report.name)).await?;
            finish(&finished, args.report.out.as_deref(), args.report.json)
        }
        Command::Drain(args) => {
            let config = checked!(args.validate());
            let engine = nodes::Engine::locate(&args.outbox_bin).await?;
            let opts = drain::Options {
                engine: &engine,
                engine_args: &args.engine_args,
                log_dir: &args.log_dir,
            };
            let (_, finished) =
                drain::run(&args.database_url, config, opts, meta(&args.report.name)).await?;
            finish(&finished, args.report.out.as_deref(), args.report.json)
        }
        Command::Suite(args) => {
            let config = checked!(args.validate());
            let outcome = suite::run(&args.database_url, config).await?;
            Ok(if outcome.errors > 0 {
                eprintln!("suite: {} run(s) could not be measured", outcome.errors);
                ExitCode::FAILURE
            } else if outcome.failed > 0 {
                eprintln!("suite: {} run(s) failed their checks", outcome.failed);
                ExitCode::from(EXIT_CHECK_FAILED)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

/// Writes the files (with `--out`), prints the summary or the JSON, and
/// turns failed checks into exit code 3.
fn finish(finished: &Finished, out: Option<&Path>, json: bool) -> anyhow::Result<ExitCode> {
    if let Some(dir) = out {
        finished.write(dir)?;
        eprintln!(
            "loadgen: wrote {}/report.json, summary.md, {}",
            dir.display(),
            finished.file_names().join(", ")
        );
    }
    if json {
        print!("{}", finished.json);
    } else {
        print!("{}", finished.markdown);
    }
    for f in &finished.failures {
        eprintln!("FAILED: {f}");
    }
    Ok(if finished.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_CHECK_FAILED)
    })
}
