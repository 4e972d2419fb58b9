//! `fleetctl drift …`: compare two data sets as the fleet would (`compare`), and read the
//! fleet's drift verdicts per model, version, cohort and window (`show`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use fleetctl::drift_compare::{compare, render};
use fleetctl::table;
use proto::drift::DriftPolicy;

#[derive(Subcommand)]
pub enum DriftCommand {
    /// Run the drift path on two CSV files (header row; numeric and text columns; an empty cell
    /// is missing): the reference profile a bundle would carry, the current rows sketched on
    /// `--shards` simulated devices, merged and tested as the server does.
    Compare {
        #[arg(long)]
        reference: PathBuf,
        #[arg(long)]
        current: PathBuf,
        /// Simulated devices the current rows are split over.
        #[arg(long, default_value_t = 1)]
        shards: usize,
        /// Print {"dataset_drift", "summary_bytes", "features": [...]} as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: DriftCommand) -> Result<()> {
    match command {
        DriftCommand::Compare { reference, current, shards, json } => {
            let reference_table = table::read(&reference)?;
            let current_table = table::read(&current)?;
            let result =
                compare(&reference, &reference_table, &current, &current_table, shards, &DriftPolicy::default())
                    .context("drift compare failed")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&result)?);
            } else {
                print!("{}", render(&result));
            }
            Ok(())
        }
    }
}
