//! Signing in and out, the session cookie, and the checks every state-changing request
//! passes (CSRF token, Origin).

use std::sync::Arc;

use askama::Template;
use axum::Form;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;

use super::{ConsoleError, html};
use crate::app::App;
use crate::auth::secret_hash;
use crate::platform::https::ClientAddr;
use crate::store;
use crate::users::{self, Caller, Role};

pub const COOKIE: &str = "lifeboat_session";
/// Failed sign-ins within [`FAILURE_WINDOW_SECS`] after which the next is refused unchecked.
const MAX_FAILURES_PER_NAME: i64 = 5;
const MAX_FAILURES_PER_ADDRESS: i64 = 20;
const FAILURE_WINDOW_SECS: i64 = 15 * 60;

/// A signed-in console user, with where the request came from (for the audit log).
#[derive(Debug, Clone)]
pub struct Viewer {
    pub caller: Caller,
    pub name: String,
    pub csrf: String,
    token_hash: Vec<u8>,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
}

impl Viewer {
    /// 403 unless the user's role is at least `role`.
    pub fn require(&self, role: Role) -> Result<(), ConsoleError> {
        if self.caller.role >= role {
            Ok(())
        } else {
            Err(ConsoleError::forbidden(format!(
                "this page needs the {} role; you are signed in as {}",
                role.as_str(),
                self.caller.role.as_str()
            ))
            .framed(self))
        }
    }

    /// 403 unless `token` is this session's CSRF token.
    pub fn check_csrf(&self, token: &str) -> Result<(), ConsoleError> {
        // Compared as hashes: equal-length digests, so the comparison leaks nothing useful.
        if secret_hash(token.as_bytes()) == secret_hash(self.csrf.as_bytes()) {
            Ok(())
        } else {
            Err(ConsoleError::forbidden("the form's security token is missing or stale: reload the page and try again"))
        }
    }

    /// An audit event of this user, from this request.
    pub fn event<'a>(&'a self, actor: &'a str, action: &'a str) -> store::audit::Event<'a> {
        store::audit::Event {
            actor_user: Some(self.caller.user),
            role: Some(self.caller.role.as_str()),
            ip: self.ip.as_deref(),
            user_agent: self.user_agent.as_deref(),
            ..store::audit::Event::new(self.caller.tenant, actor, action)
        }
    }

    /// Who the audit log says acted: the user's name and id.
    pub fn actor(&self) -> String {
        format!("{} ({})", self.name, self.caller.user)
    }
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

fn client_ip(parts: &Parts) -> Option<String> {
    parts.extensions.get::<axum::extract::ConnectInfo<ClientAddr>>().map(|c| c.0.0.ip().to_string())
}

fn user_agent(headers: &HeaderMap) -> Option<String> {
    headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).map(|s| s.chars().take(300).collect())
}

/// A POST from another site (its `Origin` names another host) is refused before anything
/// else; browsers send `Origin` on every cross-site POST.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else { return true };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
    origin.split_once("://").is_some_and(|(_, h)| h == host)
}

impl FromRequestParts<Arc<App>> for Viewer {
    type Rejection = ConsoleError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, ConsoleError> {
        let next = parts.uri.path_and_query().map_or("/".to_owned(), |p| p.as_str().to_owned());
        let sign_in = || ConsoleError::SignIn { next: next.clone() };
        if parts.method != axum::http::Method::GET && !same_origin(&parts.headers) {
            return Err(ConsoleError::forbidden("a request from another site was refused"));
        }
        let token = cookie(&parts.headers, COOKIE).and_then(|c| URL_SAFE_NO_PAD.decode(c).ok()).ok_or_else(sign_in)?;
        let token_hash = secret_hash(&token);
        let client = app.db.get().await.map_err(|e| ConsoleError::internal("getting a database connection", e))?;
        let row = store::console::session(&client, &token_hash, app.console.idle.as_secs() as i64)
            .await
            .map_err(|e| ConsoleError::internal("checking a session", e))?
            .ok_or_else(sign_in)?;
        let role = Role::parse(&row.role).ok_or_else(sign_in)?;
        Ok(Viewer {
            caller: Caller { tenant: row.tenant, user: row.user, role },
            name: row.name,
            csrf: row.csrf,
            token_hash,
            ip: client_ip(parts),
            user_agent: user_agent(&parts.headers),
        })
    }
}

/// Where a request came from, for handlers without a session (sign-in).
#[derive(Debug, Clone)]
pub struct Origin {
    ip: Option<String>,
    user_agent: Option<String>,
    same_origin: bool,
}

impl<S: Send + Sync> FromRequestParts<S> for Origin {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self {
            ip: client_ip(parts),
            user_agent: user_agent(&parts.headers),
            same_origin: same_origin(&parts.headers),
        })
    }
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    next: String,
    error: Option<String>,
    name: String,
}

#[derive(Debug, Deserialize)]
pub struct NextQuery {
    next: Option<String>,
}

/// Only a path of this site: never `//elsewhere`, `https://…`, or what a browser turns
/// into one (it drops tabs and newlines, reads `\\` as `/`): a leading `/`, not `//`,
/// and nothing but URL characters after it.
pub(super) fn safe_next(next: Option<&str>) -> String {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "/-_.~%?=&+:".contains(c);
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && n.len() <= 2000 && n.chars().all(allowed) => {
            n.to_owned()
        }
        _ => "/".to_owned(),
    }
}

pub async fn login_page(Query(q): Query<NextQuery>) -> Result<Response, ConsoleError> {
    html(&LoginPage { next: safe_next(q.next.as_deref()), error: None, name: String::new() })
}

#[derive(Debug, Deserialize)]
pub struct LoginForm {
    name: String,
    password: String,
    next: Option<String>,
}

fn login_again(status: StatusCode, form: &LoginForm, error: &str) -> Result<Response, ConsoleError> {
    let page = LoginPage { next: safe_next(form.next.as_deref()), error: Some(error.into()), name: form.name.clone() };
    let mut resp = html(&page)?;
    *resp.status_mut() = status;
    Ok(resp)
}

pub async fn login(
    State(app): State<Arc<App>>,
    origin: Origin,
    Form(form): Form<LoginForm>,
) -> Result<Response, ConsoleError> {
    if !origin.same_origin {
        return Err(ConsoleError::forbidden("a sign-in from another site was refused"));
    }
    let ip = origin.ip;
    let client = app.db.get().await.map_err(|e| ConsoleError::internal("getting a database connection", e))?;
    let (by_name, by_ip) = store::console::recent_failures(&client, &form.name, ip.as_deref(), FAILURE_WINDOW_SECS)
        .await
        .map_err(|e| ConsoleError::internal("checking sign-in attempts", e))?;
    if by_name >= MAX_FAILURES_PER_NAME || by_ip >= MAX_FAILURES_PER_ADDRESS {
        tracing::warn!(user.name = %form.name, client.ip = ip.as_deref().unwrap_or("-"), "sign-in refused: too many failures");
        return login_again(
            StatusCode::TOO_MANY_REQUESTS,
            &form,
            "Too many failed sign-ins. Wait 15 minutes, or ask an administrator.",
        );
    }
    // Counted before the password is checked, so that parallel guesses all count; taken
    // back when it was right.
    let attempt = store::console::record_failure(&client, &form.name, ip.as_deref())
        .await
        .map_err(|e| ConsoleError::internal("recording a sign-in attempt", e))?;
    let caller = {
        // At most a few argon2 checks (19 MiB each) at once, whoever asks.
        static CHECKS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);
        let _permit = CHECKS.acquire().await.map_err(|e| ConsoleError::internal("checking a password", e))?;
        users::sign_in(&client, &form.name, &form.password)
            .await
            .map_err(|e| ConsoleError::internal("checking a password", e))?
    };
    let Some(caller) = caller else {
        tracing::info!(user.name = %form.name, client.ip = ip.as_deref().unwrap_or("-"), "console sign-in failed");
        return login_again(StatusCode::UNAUTHORIZED, &form, "Wrong name or password.");
    };
    store::console::forget_attempt(&client, attempt)
        .await
        .map_err(|e| ConsoleError::internal("recording a sign-in", e))?;
    let token = crate::keys::random_32().map_err(|e| ConsoleError::internal("making a session", e))?;
    let csrf =
        URL_SAFE_NO_PAD.encode(crate::keys::random_32().map_err(|e| ConsoleError::internal("making a session", e))?);
    let ua = origin.user_agent;
    let new = store::console::NewSession {
        token_hash: &secret_hash(&token),
        tenant: caller.tenant,
        user: caller.user,
        csrf: &csrf,
        absolute_secs: app.console.absolute.as_secs() as i64,
        ip: ip.as_deref(),
        user_agent: ua.as_deref(),
    };
    store::console::create_session(&client, &new).await.map_err(|e| ConsoleError::internal("making a session", e))?;
    let (name, _) = store::users::get(&client, caller.tenant, caller.user)
        .await
        .map_err(|e| ConsoleError::internal("reading a user", e))?
        .unwrap_or_else(|| (form.name.clone(), String::new()));
    let actor = format!("{name} ({})", caller.user);
    let event = store::audit::Event {
        actor_user: Some(caller.user),
        role: Some(caller.role.as_str()),
        ip: ip.as_deref(),
        user_agent: ua.as_deref(),
        ..store::audit::Event::new(caller.tenant, &actor, "sign-in")
    };
    store::audit::record(&**client, &event).await.map_err(|e| ConsoleError::internal("writing the audit log", e))?;
    tracing::info!(user.id = %caller.user, role = caller.role.as_str(), "console sign-in");
    let secure = if app.console.secure_cookies { "; Secure" } else { "" };
    let set = format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        URL_SAFE_NO_PAD.encode(token),
        app.console.absolute.as_secs()
    );
    let mut resp = Redirect::to(&safe_next(form.next.as_deref())).into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&set).map_err(|e| ConsoleError::internal("setting a cookie", e))?,
    );
    Ok(resp)
}

#[cfg(test)]
mod tests {
    #[test]
    fn next_stays_on_this_site() {
        for bad in ["//evil.example", "/\t/evil.example", "/\\evil.example", "https://evil.example", "/a\nb", "x"] {
            assert_eq!(super::safe_next(Some(bad)), "/", "{bad:?}");
        }
        assert_eq!(super::safe_next(Some("/devices/00008030-0A?x=1&y=%2F")), "/devices/00008030-0A?x=1&y=%2F");
        assert_eq!(super::safe_next(None), "/");
    }
}

#[derive(Debug, Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    pub csrf: String,
}

pub async fn logout(
    State(app): State<Arc<App>>,
    v: Viewer,
    Form(form): Form<CsrfForm>,
) -> Result<Response, ConsoleError> {
    v.check_csrf(&form.csrf)?;
    let client = app.db.get().await.map_err(|e| ConsoleError::internal("getting a database connection", e))?;
    store::console::end_session(&client, &v.token_hash)
        .await
        .map_err(|e| ConsoleError::internal("ending a session", e))?;
    let actor = v.actor();
    store::audit::record(&**client, &v.event(&actor, "sign-out"))
        .await
        .map_err(|e| ConsoleError::internal("writing the audit log", e))?;
    let mut resp = Redirect::to("/login").into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("lifeboat_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    Ok(resp)
}
