//! A kube client that acts as another user (a service account), so that the API server's
//! RBAC, not only the agent's own scope check, bounds what a revision can write: Flux's
//! lockdown, with the `Impersonate-User` header kubectl's `--as` sends.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response};
use kube::client::Body;

/// The username of service account `name` in `namespace`, as RBAC subjects name it.
pub fn service_account_user(namespace: &str, name: &str) -> String {
    format!("system:serviceaccount:{namespace}:{name}")
}

/// Why a client acting as `user` could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot impersonate {user:?}: not a valid header value")]
pub struct InvalidUser {
    pub user: String,
}

/// `client`, sending every request as `user`; the agent's own credentials authenticate it.
pub fn acting_as(client: &kube::Client, user: &str) -> Result<kube::Client, InvalidUser> {
    let user_header = HeaderValue::from_str(user).map_err(|_| InvalidUser {
        user: user.to_owned(),
    })?;
    let service = Impersonating {
        inner: client.clone(),
        user: user_header,
    };
    Ok(kube::Client::new(service, client.default_namespace()))
}

#[derive(Clone)]
struct Impersonating {
    inner: kube::Client,
    user: HeaderValue,
}

impl tower_service::Service<Request<Body>> for Impersonating {
    type Response = Response<Body>;
    type Error = kube::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, kube::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The inner client buffers; it is asked for readiness when the request is sent.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        request
            .headers_mut()
            .insert("Impersonate-User", self.user.clone());
        let inner = self.inner.clone();
        Box::pin(async move { inner.send(request).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_accounts_are_named_as_rbac_names_them() {
        assert_eq!(
            service_account_user("apps", "deployer"),
            "system:serviceaccount:apps:deployer"
        );
    }
}
