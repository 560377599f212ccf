//! bctool: see the `decap-bctool` crate.

use clap::Parser;

fn main() {
    let cli = decap_bctool::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bctool: cannot start: {e}");
            std::process::exit(70);
        }
    };
    match runtime.block_on(decap_bctool::main(cli)) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("bctool: {e:#}");
            std::process::exit(70);
        }
    }
}
