//! Generates the `plugvisor.v1` gRPC client (and the server the bench's
//! bare baseline, `bare-echo`, implements) from the daemon's own contract,
//! `supervisor/proto/plugvisor/v1/plugin.proto` (and the MQTT report's
//! messages, `plugvisor/report/v1/report.proto`), with protox (no system
//! `protoc`), so the black-box tests speak exactly what the daemon serves
//! without linking the daemon's library.
use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("../supervisor/proto");
    println!("cargo:rerun-if-changed={}", include.display());
    let fds = protox::compile(["plugvisor/v1/plugin.proto"], [&include])?;
    tonic_build::configure()
        .build_server(true)
        .compile_fds(fds)?;
    // The messages a node reports over MQTT, for the tests' subscriber.
    let report = protox::compile(["plugvisor/report/v1/report.proto"], [&include])?;
    tonic_build::configure()
        .build_server(false)
        .build_client(false)
        .compile_fds(report)?;
    Ok(())
}
