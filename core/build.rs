//! Generates Rust for the mesh's wire protocols from `proto/*.proto` (protoc required:
//! Debian package `protobuf-compiler`, installed by `scripts/setup.sh`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/workload.proto",
        "proto/authorization.proto",
        "proto/discovery.proto",
        "proto/ca.proto",
        "proto/l7.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        // Ordered maps: resources encode the same bytes every time, so versions derived
        // from them are stable.
        .btree_map(".")
        .build_server(true)
        .build_client(true)
        .compile_protos(&protos, &["proto"])
        .map_err(|e| format!("compiling core/proto (is protoc installed? apt-get install protobuf-compiler): {e}"))?;
    Ok(())
}
