//! `greenlightctl`: see `greenlightctl --help`.

fn main() {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start: {error}");
            std::process::exit(2);
        }
    };
    std::process::exit(runtime.block_on(greenlight::ctl::run(std::env::args_os())));
}
