//! Compiles `proto/` with protox (no system protoc) and keeps the descriptor
//! set for gRPC server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = "../../proto";
    let files = ["sigil/v1/ca.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={proto_root}/{f}");
    }
    let fds = protox::compile(files, [proto_root])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("sigil_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
