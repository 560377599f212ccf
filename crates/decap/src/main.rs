//! `decap`: the controller. `decap serve` starts everything.

use clap::Parser;

fn main() {
    // Builds run bctool as `decap bctool …` unless --bctool names another
    // binary; inside the sandbox this binary is called `bctool` itself.
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let called_bctool = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .is_some_and(|n| n == "bctool");
    if called_bctool {
        std::process::exit(decap::run_bctool(args));
    }
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
