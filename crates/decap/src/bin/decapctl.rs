//! decapctl: see the `decap-ctl` crate.

use clap::Parser;

fn main() {
    let cli = decap_ctl::Cli::parse();
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
