//! Compiles the gRPC definitions in `proto/` (Nomad's plugin services and go-plugin's internal
//! services) into one Rust file, included by `src/driver/nomad/proto.rs`.

use std::io;

const PROTOS: &[&str] = &[
    "proto/hclspec.proto",
    "proto/attribute.proto",
    "proto/recoverable_error.proto",
    "proto/rpc_status.proto",
    "proto/base.proto",
    "proto/driver.proto",
    "proto/plugin/grpc_controller.proto",
    "proto/plugin/grpc_stdio.proto",
    "proto/plugin/grpc_broker.proto",
];

fn main() -> io::Result<()> {
    println!("cargo:rerun-if-changed=proto");

    tonic_prost_build::configure()
        .include_file("nomad_plugin.rs")
        .compile_protos(PROTOS, &["proto"])
        .map_err(|error| {
            io::Error::new(
                error.kind(),
                format!(
                    "failed to compile the protobuf files in proto/: {error}\n\
                     protoc and the well-known .proto files are required: \
                     `apt-get install protobuf-compiler libprotobuf-dev` on Debian"
                ),
            )
        })
}
