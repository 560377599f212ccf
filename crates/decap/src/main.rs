//! `decap`: the controller. `decap serve` starts everything.

use clap::Parser;

fn main() {
    // Builds run bctool as `decap bctool …` unless --bctool names another binary.
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "bctool") {
        args.remove(0);
        std::process::exit(decap::run_bctool(args));
    }
    let cli = decap::Cli::parse();
    if let Err(e) = decap::run(cli) {
        eprintln!("decap: {e:#}");
        std::process::exit(1);
    }
}
