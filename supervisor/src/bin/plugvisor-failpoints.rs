//! `plugvisor-failpoints`: the `plugvisor` command built with the
//! `failpoints` feature, so the crash points of `plugvisor::failpoints`
//! can be armed (`FAILPOINTS`). For the kill -9 tests only.
fn main() -> std::process::ExitCode {
    plugvisor::cli::main()
}
