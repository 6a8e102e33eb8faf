//! Bearer-token authentication of gRPC calls, as every client sends it.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;

/// The token cannot travel in a header.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the token contains characters not allowed in a header")]
pub struct InvalidToken;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl Bearer {
    /// Carries `token`.
    pub fn new(token: &str) -> Result<Self, InvalidToken> {
        Ok(Self(
            format!("Bearer {token}")
                .parse()
                .map_err(|_| InvalidToken)?,
        ))
    }
}

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bearer(…)")
    }
}

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}
