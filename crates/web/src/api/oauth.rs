//! The HTTP side of the OAuth2 provider single-user servers log their
//! visitors in through; the rules are `berth_hub::oauth`.

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Json;
use berth_hub::oauth::{AuthorizeRequest, OAuthError, TokenRequest, ACCESS_TOKEN_TTL_S};
use serde::Deserialize;
use serde_json::json;

use crate::error::{ApiError, ApiResult};
use crate::extract::MaybeUser;
use crate::SharedHub;

#[derive(Deserialize)]
pub(super) struct AuthorizeQuery {
    client_id: Option<String>,
    redirect_uri: Option<String>,
    response_type: Option<String>,
    state: Option<String>,
    code_challenge: Option<String>,
    code_challenge_method: Option<String>,
}

/// `GET /hub/api/oauth2/authorize`: the browser arrives with a session; the
/// hub answers with a redirect carrying a one-time code.
pub(super) async fn authorize(
    State(hub): State<SharedHub>,
    MaybeUser(a): MaybeUser,
    uri: axum::http::Uri,
    Query(q): Query<AuthorizeQuery>,
) -> ApiResult<Response> {
    let Some(caller) = a.caller.filter(|c| c.is_session()) else {
        let here = uri.path_and_query().map(|p| p.as_str()).unwrap_or("");
        let next = percent_encoding::utf8_percent_encode(here, percent_encoding::NON_ALPHANUMERIC);
        return Ok(Redirect::to(&format!("{}login?next={next}", hub.hub_prefix())).into_response());
    };
    let req = AuthorizeRequest {
        client_id: q.client_id,
        redirect_uri: q.redirect_uri,
        response_type: q.response_type,
        state: q.state,
        code_challenge: q.code_challenge,
        code_challenge_method: q.code_challenge_method,
    };
    let location = hub.oauth_authorize(&caller, req).await.map_err(|e| ApiError::from(e).page())?;
    let mut resp = Redirect::to(&location).into_response();
    *resp.status_mut() = StatusCode::FOUND;
    Ok(resp)
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
