//! Generated gRPC types for Medallion's public pipeline API and internal stage API.
//! Domain code converts these at the edge; nothing else should pass them around.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("medallion.v1");
}

/// Encoded `FileDescriptorSet` of every Medallion proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/medallion_descriptor.bin"));
