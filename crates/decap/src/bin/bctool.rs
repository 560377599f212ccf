//! bctool: see the `decap-bctool` crate.

fn main() {
    std::process::exit(decap::run_bctool(std::env::args_os().collect()));
}
