//! The `loadgen` binary: parses the command line, starts the runtime,
//! calls into the library (`loadgen::*`) and maps the outcome to an exit
//! code.
//!
//! Exit codes: 0 the run passed; 1 an error (unreachable database or
//! broker, failed transaction, a suite run that could not be measured...);
//! 2 bad usage; 3 the run finished but events were lost or arrived out of
//! order (the report is still written).

use std::process::ExitCode;

use clap::Parser;

use loadgen::cli::{Cli, Command, ReportArgs};
use loadgen::report::{AnyReport, Meta};
use loadgen::run::WriteOnly;
use loadgen::{broker, drain, nodes, render, run, suite};

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
            let report: AnyReport = if args.no_verify {
                run::write_only(
                    &args.database_url,
                    config,
                    meta(&args.report.name),
                    WriteOnly::WithEngine,
                )
                .await?
                .into()
            } else {
                run::e2e(&args.database_url, config, meta(&args.report.name))
                    .await?
                    .into()
            };
            finish(&report, &args.report)
        }
        Command::DbCeiling(args) => {
            let config = checked!(args.validate());
            let report = run::write_only(
                &args.database_url,
                config,
                meta(&args.report.name),
                WriteOnly::DbCeiling,
            )
            .await?;
            finish(&report.into(), &args.report)
        }
        Command::BrokerCeiling(args) => {
            let config = checked!(args.validate());
            let report = broker::run(config, meta(&args.report.name)).await?;
            finish(&report.into(), &args.report)
        }
        Command::Drain(args) => {
            let config = checked!(args.validate());
            let engine = nodes::Engine::locate(&args.outbox_bin).await?;
            let opts = drain::Options {
                engine: &engine,
                engine_args: &args.engine_args,
                log_dir: &args.log_dir,
            };
            let report =
                drain::run(&args.database_url, config, opts, meta(&args.report.name)).await?;
            finish(&report.into(), &args.report)
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
        Command::Render(args) => {
            for dir in &args.dirs {
                let (written, notes) = render::render_dir(dir)?;
                eprintln!(
                    "loadgen: rendered {}: {}",
                    dir.display(),
                    written.join(", ")
                );
                for n in notes {
                    eprintln!("loadgen: {}: {n}", dir.display());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Writes report.json and what is drawn from it (with `--out`), prints
/// the summary or the JSON, and turns failed checks into exit code 3.
fn finish(report: &AnyReport, args: &ReportArgs) -> anyhow::Result<ExitCode> {
    let rendered = match &args.out {
        Some(dir) => {
            let rendered = render::write_run(dir, report)?;
            eprintln!(
                "loadgen: wrote {}/report.json, {}",
                dir.display(),
                rendered.names().join(", ")
            );
            rendered
        }
        None => render::render(report)?,
    };
    if args.json {
        print!("{}", report.to_json()?);
    } else {
        print!("{}", rendered.summary());
    }
    for f in report.failures() {
        eprintln!("FAILED: {f}");
    }
    Ok(if report.failures().is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_CHECK_FAILED)
    })
}
