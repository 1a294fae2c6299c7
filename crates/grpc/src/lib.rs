//! Sigil's gRPC CSR API: the `sigil.v1.CertificateAuthority` service over mTLS.
//!
//! This crate turns a gRPC call and its TLS peer into an authority request:
//! caller identity from the client certificate (SPIFFE URI SAN, else DNS SAN),
//! or a verified bootstrap token, and maps authority errors to gRPC statuses.
//! It holds no business rules: the authority decides and audits.

mod service;
pub mod tokens;

pub use service::{
    CaService, MAX_CSR_LEN, Notice, Notifier, REFUSAL_AUDITS_PER_MINUTE, REFUSAL_CERTIFICATE,
    REFUSAL_KEY, RETRY_AFTER_KEY, ServiceConfig, server,
};

/// Generated protobuf and tonic code for `proto/sigil/v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("sigil.v1");
}

/// The encoded descriptor set of `proto/`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("sigil_descriptor");

/// The reflection service (v1) for everything in `proto/`.
pub fn reflection_service() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::Error,
> {
    // Unauthenticated, like the API's own messages it is held to their size
    // limit (tonic's default would allow 4 MiB).
    Ok(tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .build_v1()?
        .max_decoding_message_size(service::MAX_MESSAGE_LEN))
}

/// When a client should renew: two thirds into the lifetime.
pub fn renew_after(not_before: i64, not_after: i64) -> i64 {
    not_before + (not_after - not_before) * 2 / 3
}
