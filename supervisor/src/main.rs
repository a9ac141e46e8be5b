//! The `plugvisor` command; the verbs live in `plugvisor::cli`, one file
//! each.
fn main() -> std::process::ExitCode {
    plugvisor::cli::main()
}
