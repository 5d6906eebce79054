//! Generates the tonic/prost code from `proto/*.proto` with protox, so a fresh
//! machine needs no system `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/avalon.proto");
    let fds = protox::compile(["avalon.proto"], ["proto"])?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
