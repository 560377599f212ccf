//! `decap`: the controller. `decap serve` starts everything.

use clap::Parser;

fn main() {
    let cli = decap::Cli::parse();
    match decap::run(cli) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("decap: {e:#}");
            std::process::exit(1);
        }
    }
}
