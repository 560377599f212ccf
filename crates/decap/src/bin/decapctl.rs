//! decapctl: see the `decap-ctl` crate.

use clap::{CommandFactory, FromArgMatches};

fn main() {
    // decapctl carries the version of the decap it was built with.
    let matches = decap_ctl::Cli::command()
        .version(decap::VERSION)
        .get_matches();
    let cli = match decap_ctl::Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("decapctl: cannot start: {e}");
            std::process::exit(2);
        }
    };
    match runtime.block_on(decap_ctl::main(cli)) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("decapctl: {e:#}");
            std::process::exit(1);
        }
    }
}
