//! `decap-runner`: what waits, warm, in a build's environment until a build
//! arrives, then becomes bctool (see the `decap-runner` crate).

fn main() {
    let args = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned());
    let code = match decap_runner::Args::parse(args) {
        Ok(args) => decap_runner::main(args),
        Err(e) => {
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "decap-runner: {e}");
            2
        }
    };
    std::process::exit(code);
}
