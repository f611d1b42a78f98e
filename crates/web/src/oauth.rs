//! The OAuth2 provider single-user servers log their visitors in through:
//! authorization code with PKCE (S256), one client per server, codes used
//! once, access tokens stored hashed and scoped to that one server.

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Json;
use berth_auth::{hash_token, new_token, pkce_s256_matches};
use berth_core::Target;
use berth_store::{now_ms, NewToken, OAuthCode, TokenKind};
use serde::Deserialize;
use serde_json::json;

use crate::caller::{MaybeUser, Via};
use crate::error::{ApiError, ApiResult};
use crate::SharedHub;

const CODE_TTL_MS: i64 = 10 * 60 * 1000;
const ACCESS_TOKEN_TTL_S: i64 = 14 * 24 * 3600;

#[derive(Deserialize)]
pub struct AuthorizeQuery {
    client_id: Option<String>,
    redirect_uri: Option<String>,
    response_type: Option<String>,
    state: Option<String>,
    code_challenge: Option<String>,
    code_challenge_method: Option<String>,
}

fn oauth_page_error(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(msg).page()
}

/// `GET /hub/api/oauth2/authorize`: the browser arrives with a session; the
/// hub answers with a redirect carrying a one-time code.
pub async fn authorize(
    State(hub): State<SharedHub>,
    MaybeUser(a): MaybeUser,
    uri: axum::http::Uri,
    Query(q): Query<AuthorizeQuery>,
) -> ApiResult<Response> {
    let Some(caller) = a.caller.filter(|c| matches!(c.via, Via::Session { .. })) else {
        let here = uri.path_and_query().map(|p| p.as_str()).unwrap_or("");
        let next = percent_encoding::utf8_percent_encode(here, percent_encoding::NON_ALPHANUMERIC);
        return Ok(Redirect::to(&format!("{}login?next={next}", hub.hub_prefix())).into_response());
    };
    let client_id = q.client_id.ok_or_else(|| oauth_page_error("client_id is missing"))?;
    let client = hub
        .store
        .get_oauth_client(&client_id)
        .await?
        .ok_or_else(|| oauth_page_error(format!("unknown OAuth client {client_id:?}: is the server running?")))?;
    let redirect_uri = q.redirect_uri.unwrap_or_else(|| client.redirect_uri.clone());
    if redirect_uri != client.redirect_uri {
        return Err(oauth_page_error(format!(
            "redirect_uri {redirect_uri:?} is not the one registered for {client_id}"
        )));
    }
    if q.response_type.as_deref().unwrap_or("code") != "code" {
        return Err(oauth_page_error("only response_type=code is supported"));
    }
    if let Some(m) = q.code_challenge_method.as_deref() {
        if m != "S256" {
            return Err(oauth_page_error("only the S256 code challenge method is supported"));
        }
    }
    let target = Target::Server { user: &client.user, server: &client.server };
    if !caller.allows("access:servers", target) {
        return Err(ApiError::forbidden(format!("{} may not use {}'s server", caller.name(), client.user)).page());
    }
    let code = new_token();
    let scopes = vec![
        format!("access:servers!server={}/{}", client.user, client.server),
        format!("read:users:name!user={}", caller.name()),
        format!("read:users:groups!user={}", caller.name()),
    ];
    hub.store
        .put_oauth_code(&OAuthCode {
            code_hash: hash_token(code.expose()),
            client_id: client.id.clone(),
            user: caller.name().to_string(),
            session_id: caller.session_public_id().map(str::to_string),
            redirect_uri: client.redirect_uri.clone(),
            code_challenge: q.code_challenge.clone(),
            scopes,
            expires_at: now_ms() + CODE_TTL_MS,
        })
        .await?;
    let sep = if redirect_uri.contains('?') { '&' } else { '?' };
    let mut location = format!("{redirect_uri}{sep}code={}", code.expose());
    if let Some(state) = q.state {
        let enc = percent_encoding::utf8_percent_encode(&state, percent_encoding::NON_ALPHANUMERIC);
        location.push_str(&format!("&state={enc}"));
    }
    let mut resp = Redirect::to(&location).into_response();
    *resp.status_mut() = StatusCode::FOUND;
    Ok(resp)
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (status, Json(json!({"error": error, "error_description": description}))).into_response()
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
    pub fn decode(s: &str) -> Option<String> {
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
pub async fn token(State(hub): State<SharedHub>, headers: HeaderMap, body: Bytes) -> Response {
    let form: TokenForm = match serde_urlencoded::from_bytes(&body) {
        Ok(f) => f,
        Err(e) => return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", &format!("malformed form: {e}")),
    };
    if form.grant_type.as_deref() != Some("authorization_code") {
        return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type", "only authorization_code is supported");
    }
    let (client_id, secret) = match (form.client_id.clone(), form.client_secret.clone(), basic_auth(&headers)) {
        (Some(id), Some(s), _) => (id, s),
        (_, _, Some((id, s))) => (id, s),
        _ => return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "client credentials are missing"),
    };
    let client = match hub.store.get_oauth_client(&client_id).await {
        Ok(Some(c)) if c.secret_hash == hash_token(&secret) => c,
        Ok(_) => return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "unknown client or wrong secret"),
        Err(e) => return ApiError::from(e).into_response(),
    };
    let Some(code) = form.code.as_deref() else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "code is missing");
    };
    let grant = match hub.store.take_oauth_code(&hash_token(code)).await {
        Ok(Some(g)) => g,
        Ok(None) => return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "unknown or already used code"),
        Err(e) => return ApiError::from(e).into_response(),
    };
    if grant.client_id != client.id || grant.expires_at < now_ms() {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "the code is expired or belongs to another client",
        );
    }
    if form.redirect_uri.as_deref().is_some_and(|r| r != grant.redirect_uri) {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "redirect_uri does not match");
    }
    if let Some(challenge) = &grant.code_challenge {
        match form.code_verifier.as_deref() {
            Some(v) if pkce_s256_matches(challenge, v) => {}
            _ => return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "PKCE verification failed"),
        }
    }
    let access = new_token();
    let created = hub
        .store
        .create_token(&NewToken {
            hash: hash_token(access.expose()),
            user: grant.user.clone(),
            kind: TokenKind::OAuth,
            server: Some(client.server.clone()),
            scopes: grant.scopes.clone(),
            note: format!("OAuth access to {}", client.id),
            expires_at: Some(now_ms() + ACCESS_TOKEN_TTL_S * 1000),
            session_id: grant.session_id.clone(),
            oauth_client: Some(client.id.clone()),
        })
        .await;
    if let Err(e) = created {
        return ApiError::from(e).into_response();
    }
    let body = json!({
        "access_token": access.expose(),
        "token_type": "Bearer",
        "expires_in": ACCESS_TOKEN_TTL_S,
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
