use clap::Parser;

use proxy_daemon::config::Args;
use proxy_daemon::{daemon, logging, panic};

fn main() {
    let args = Args::parse();
    logging::init(args.log_format, args.log_level_file.as_deref());
    panic::install_hook();
    let result = daemon::run(args);
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "exiting");
    }
    logging::stop();
    std::process::exit(if result.is_ok() { 0 } else { 1 });
}
