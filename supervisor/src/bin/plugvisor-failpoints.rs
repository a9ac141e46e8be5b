//! `plugvisor-failpoints`: the `plugvisor` command built with the
//! `failpoints` feature, so the crash points of `plugvisor::failpoints`
//! can be armed (`FAILPOINTS`). For the kill -9 tests only.
#[path = "../main.rs"]
mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
