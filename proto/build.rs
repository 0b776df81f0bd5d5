use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc keeps the build free of system packages.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("ferry_descriptor.bin"))
        // The admin messages double as the REST gateway's JSON bodies, so both
        // transports return the same data from one implementation.
        .type_attribute(".ferry.admin.v1", "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default)]")
        .compile_protos(&["proto/admin.proto", "proto/cluster.proto"], &["proto"])?;

    // The Restate service protocol to handler deployments: plain messages (no
    // services, not part of the reflection descriptors), with `bytes` fields as
    // `Bytes` so payloads decoded from a frame share its buffer.
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .bytes(".ferry.service_protocol")
        .compile_protos(&["proto/service_protocol.proto"], &["proto"])?;

    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
