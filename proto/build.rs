//! Generates the gRPC types from merge.proto. protoc comes from $PROTOC, else
//! from PATH, else from the protoc-bin-vendored crate, so a fresh clone builds
//! with no system package.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=merge.proto");
    let on_path = std::process::Command::new("protoc")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if std::env::var_os("PROTOC").is_none() && !on_path {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    tonic_prost_build::configure().compile_protos(&["merge.proto"], &["."])?;
    Ok(())
}
