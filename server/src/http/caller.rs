//! Who is calling: `Authorization: Bearer <credential>` turned into a [`Caller`] (401
//! without a valid one), and the role check (403 for a role too small).

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};

use super::error::{ApiError, internal};
use crate::app::App;
use crate::users::{self, Caller, Role};

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, ApiError> {
        let unauthorized = |m: &str| ApiError(StatusCode::UNAUTHORIZED, m.to_string());
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("an Authorization: Bearer credential is required"))?;
        let credential = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <credential>`"))?;
        let client = app.db.get().await.map_err(|e| internal("getting a database connection", e))?;
        users::authenticate(&client, credential.trim())
            .await
            .map_err(|e| internal("checking a credential", e))?
            .ok_or_else(|| unauthorized("unknown or revoked credential"))
    }
}

pub fn require(caller: &Caller, role: Role) -> Result<(), ApiError> {
    if caller.role >= role {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("this needs the {} role; you have {}", role.as_str(), caller.role.as_str()),
        ))
    }
}
