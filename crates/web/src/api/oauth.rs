//! The HTTP side of the OAuth2 provider single-user servers log their
//! visitors in through; the rules are `berth_hub::oauth`.

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Json;
use berth_hub::oauth::{Authorization, AuthorizeRequest, OAuthError, TokenRequest};
use serde::Deserialize;
use serde_json::json;

use crate::error::{ApiError, ApiResult};
use crate::extract::{MaybeUser, PageForm};
use crate::html::{self, esc, xsrf_input};
use crate::SharedHub;

#[derive(Deserialize, Clone)]
pub(super) struct AuthorizeQuery {
    client_id: Option<String>,
    redirect_uri: Option<String>,
    response_type: Option<String>,
    state: Option<String>,
    code_challenge: Option<String>,
    code_challenge_method: Option<String>,
}

/// `GET /hub/api/oauth2/authorize`: the browser arrives with a session; the
/// hub answers with a redirect carrying a one-time code — or, when the
/// visitor is not the server's owner, first asks whether to go on.
pub(super) async fn authorize(
    State(hub): State<SharedHub>,
    MaybeUser(a): MaybeUser,
    uri: axum::http::Uri,
    Query(q): Query<AuthorizeQuery>,
) -> ApiResult<Response> {
    authorize_as(hub, a, uri, q, false).await
}

/// `POST /hub/api/oauth2/authorize`: the visitor said yes on the question page.
pub(super) async fn authorize_consented(
    State(hub): State<SharedHub>,
    MaybeUser(a): MaybeUser,
    uri: axum::http::Uri,
    PageForm(q): PageForm<AuthorizeQuery>,
) -> ApiResult<Response> {
    authorize_as(hub, a, uri, q, true).await
}

async fn authorize_as(
    hub: SharedHub,
    a: crate::extract::RequestAuth,
    uri: axum::http::Uri,
    q: AuthorizeQuery,
    consented: bool,
) -> ApiResult<Response> {
    let Some(caller) = a.caller.clone().filter(|c| c.is_session()) else {
        let here = uri.path_and_query().map(|p| p.as_str()).unwrap_or("");
        let next = percent_encoding::utf8_percent_encode(here, percent_encoding::NON_ALPHANUMERIC);
        return Ok(Redirect::to(&format!("{}login?next={next}", hub.hub_prefix())).into_response());
    };
    let req = AuthorizeRequest {
        client_id: q.client_id.clone(),
        redirect_uri: q.redirect_uri.clone(),
        response_type: q.response_type.clone(),
        state: q.state.clone(),
        code_challenge: q.code_challenge.clone(),
        code_challenge_method: q.code_challenge_method.clone(),
    };
    match hub.oauth_authorize(&caller, req, consented).await.map_err(|e| ApiError::from(e).page())? {
        Authorization::Redirect(location) => {
            let mut resp = Redirect::to(&location).into_response();
            *resp.status_mut() = StatusCode::FOUND;
            Ok(resp)
        }
        Authorization::Consent { owner, server } => Ok(consent_page(&hub, &a, &q, &owner, &server)),
    }
}

/// The question a visitor answers before another user's server learns who they are.
fn consent_page(
    hub: &SharedHub,
    a: &crate::extract::RequestAuth,
    q: &AuthorizeQuery,
    owner: &str,
    server: &str,
) -> Response {
    let hidden = [
        ("client_id", &q.client_id),
        ("redirect_uri", &q.redirect_uri),
        ("response_type", &q.response_type),
        ("state", &q.state),
        ("code_challenge", &q.code_challenge),
        ("code_challenge_method", &q.code_challenge_method),
    ]
    .iter()
    .filter_map(|(k, v)| v.as_ref().map(|v| format!(r#"<input type="hidden" name="{k}" value="{}">"#, esc(v))))
    .collect::<String>();
    let what = if server.is_empty() { format!("{owner}'s server") } else { format!("{owner}'s server {server}") };
    let who = a.caller.as_ref().map(|c| c.name().to_string()).unwrap_or_default();
    let body = format!(
        r#"<div class="card"><h1>Log in to {what}?</h1>
<p>This server belongs to <b>{owner}</b>, and runs code {owner} controls. Going on tells it that you are <b>{who}</b>
and lets it act on this server in your name; it gets nothing else of your account.</p>
<form method="post" action="{p}api/oauth2/authorize">{x}{hidden}<button type="submit" id="consent">Continue as {who}</button>
<a class="button secondary" href="{p}home">Cancel</a></form></div>"#,
        what = esc(&what),
        owner = esc(owner),
        who = esc(&who),
        p = hub.hub_prefix(),
        x = xsrf_input(&a.xsrf),
    );
    html::page(&hub.cfg.base_url, "Log in to a server", a.viewer().as_ref(), &body).into_response()
}

fn oauth_error(e: OAuthError) -> Response {
    let status = match e.error {
        "invalid_client" => StatusCode::UNAUTHORIZED,
        "server_error" => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    };
    (status, Json(json!({"error": e.error, "error_description": e.description}))).into_response()
}

#[derive(Deserialize, Default)]
struct TokenForm {
    grant_type: Option<String>,
    code: Option<String>,
    redirect_uri: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    code_verifier: Option<String>,
}

fn basic_auth(h: &HeaderMap) -> Option<(String, String)> {
    use base64_decode::decode;
    let v = h.get(header::AUTHORIZATION)?.to_str().ok()?;
    let b64 = v.strip_prefix("Basic ").or_else(|| v.strip_prefix("basic "))?;
    let raw = decode(b64.trim())?;
    let (id, secret) = raw.split_once(':')?;
    Some((id.to_string(), secret.to_string()))
}

/// A minimal standard base64 decoder for HTTP Basic credentials.
mod base64_decode {
    pub(super) fn decode(s: &str) -> Option<String> {
        let mut bits = 0u32;
        let mut n = 0;
        let mut out = Vec::new();
        for c in s.bytes() {
            let v = match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' => 62,
                b'/' => 63,
                b'=' => break,
                _ => return None,
            } as u32;
            bits = (bits << 6) | v;
            n += 6;
            if n >= 8 {
                n -= 8;
                out.push((bits >> n) as u8);
                bits &= (1 << n) - 1;
            }
        }
        String::from_utf8(out).ok()
    }
}

/// `POST /hub/api/oauth2/token`: the single-user server trades the code for
/// an access token, authenticating with its client secret (its API token).
pub(super) async fn token(State(hub): State<SharedHub>, headers: HeaderMap, body: Bytes) -> Response {
    let bad = |error: &'static str, description: String| oauth_error(OAuthError { error, description });
    let form: TokenForm = match serde_urlencoded::from_bytes(&body) {
        Ok(f) => f,
        Err(e) => return bad("invalid_request", format!("malformed form: {e}")),
    };
    let (client_id, client_secret) = match (form.client_id, form.client_secret, basic_auth(&headers)) {
        (Some(id), Some(s), _) => (id, s),
        (_, _, Some((id, s))) => (id, s),
        _ => {
            return oauth_error(OAuthError {
                error: "invalid_client",
                description: "client credentials are missing".into(),
            })
        }
    };
    let req = TokenRequest {
        grant_type: form.grant_type,
        code: form.code,
        redirect_uri: form.redirect_uri,
        client_id,
        client_secret,
        code_verifier: form.code_verifier,
    };
    let grant = match hub.oauth_token(req).await {
        Ok(g) => g,
        Err(e) => return oauth_error(e),
    };
    let body = json!({
        "access_token": grant.access_token,
        "token_type": "Bearer",
        "expires_in": grant.expires_in,
        "scope": grant.scopes.join(" "),
    });
    let mut resp = Json(body).into_response();
    resp.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    resp.headers_mut().insert(header::PRAGMA, header::HeaderValue::from_static("no-cache"));
    resp
}

#[cfg(test)]
mod tests {
    #[test]
    fn basic_credentials() {
        // "client:s3cret" in standard base64, made with Python's base64 module.
        assert_eq!(super::base64_decode::decode("Y2xpZW50OnMzY3JldA==").as_deref(), Some("client:s3cret"));
        assert_eq!(super::base64_decode::decode("!!"), None);
    }
}
