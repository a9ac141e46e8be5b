//! Building this crate needs the `bpf-linker` binary, a dependency cargo
//! cannot express; rebuild when it changes (e.g. `cargo xtask setup`
//! installed the LLVM-matched one).
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(e) => println!("cargo:warning=bpf-linker not found ({e}); run `cargo xtask setup`"),
    }
}
