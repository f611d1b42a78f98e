//! SSH public keys: the keys page, `/hub/api/users/<name>/keys`, and the
//! parsing both share. The SSH gateway (`berth-ssh`) authenticates against
//! what is registered here.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Json;
use berth_core::Target;
use berth_store::{NewSshKey, SshKey, StoreError};
use serde::Deserialize;
use serde_json::{json, Value};
use ssh_key::{Algorithm, HashAlg, PublicKey};

use crate::accounts::PageForm;
use crate::api::{existing_user, JsonBody};
use crate::caller::{ApiCaller, PageUser};
use crate::error::{ApiError, ApiResult};
use crate::html::{self, alert, esc, xsrf_input, Level, Viewer};
use crate::model::iso;
use crate::SharedHub;

/// Longest key line accepted (an RSA 16384-bit key is about 2.8 KB).
const MAX_KEY_LEN: usize = 8 * 1024;
/// Keys one user may register.
const MAX_KEYS: usize = 100;
/// Smallest RSA modulus accepted, in bits.
const MIN_RSA_BITS: usize = 2048;

/// A key line, checked and reduced to what the store keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedKey {
    pub algorithm: String,
    /// `<algorithm> <base64>`, without the comment.
    pub public_key: String,
    pub comment: String,
    /// `SHA256:…`, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
}

/// Parses one OpenSSH public key line (`ssh-ed25519 AAAA… comment`).
pub fn parse_key(line: &str) -> Result<ParsedKey, String> {
    let line = line.trim();
    if line.is_empty() {
        return Err("the key is empty; paste the contents of your .pub file (for example ~/.ssh/id_ed25519.pub)".into());
    }
    if line.len() > MAX_KEY_LEN {
        return Err(format!("the key is longer than {MAX_KEY_LEN} characters"));
    }
    if line.contains("PRIVATE KEY") {
        return Err("this is a private key: never share it; paste the public key (the .pub file) instead".into());
    }
    if line.lines().count() > 1 {
        return Err("paste one key per request (one line)".into());
    }
    if line.starts_with("---- BEGIN SSH2 PUBLIC KEY") {
        return Err("this is an RFC 4716 key; convert it with `ssh-keygen -i -f KEY` and paste the result".into());
    }
    let first = line.split_whitespace().next().unwrap_or("");
    if !first.starts_with("ssh-") && !first.starts_with("ecdsa-") && !first.starts_with("sk-") {
        return Err(format!(
            "not an OpenSSH public key: it should start with its type, e.g. ssh-ed25519 (found {:?}); \
authorized_keys options are not supported",
            first.chars().take(40).collect::<String>()
        ));
    }
    let key =
        PublicKey::from_openssh(line).map_err(|e| format!("the key cannot be read ({e}); copy the whole line"))?;
    match key.algorithm() {
        Algorithm::Ed25519 | Algorithm::Ecdsa { .. } => {}
        Algorithm::Rsa { .. } => {
            let bits = key.key_data().rsa().map(|k| k.n().as_positive_bytes().map(|b| b.len() * 8).unwrap_or(0));
            if let Some(bits) = bits.filter(|b| *b < MIN_RSA_BITS) {
                return Err(format!("this RSA key has {bits} bits; at least {MIN_RSA_BITS} are required"));
            }
        }
        Algorithm::Dsa => return Err("DSA keys are too weak and are refused; use ed25519".into()),
        other => return Err(format!("{} keys are not supported; use ed25519, ECDSA or RSA", other.as_str())),
    }
    let comment = key.comment().to_string();
    let bare = PublicKey::new(key.key_data().clone(), "");
    let public_key = bare.to_openssh().map_err(|e| format!("the key cannot be re-encoded: {e}"))?;
    Ok(ParsedKey {
        algorithm: key.algorithm().as_str().to_string(),
        public_key: public_key.trim().to_string(),
        comment: comment.chars().take(200).collect(),
        fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
    })
}

/// The fingerprint the gateway looks keys up by.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

pub fn key_model(k: &SshKey) -> Value {
    json!({
        "id": k.id,
        "fingerprint": k.fingerprint,
        "algorithm": k.algorithm,
        "key": k.public_key,
        "comment": k.comment,
        "created": iso(k.created),
        "last_used": k.last_used.map(iso),
    })
}

/// Registers `line` for `owner`; the messages are the ones users see.
pub async fn add_key(hub: &SharedHub, actor: &str, owner: &str, line: &str) -> ApiResult<SshKey> {
    let parsed = parse_key(line).map_err(ApiError::bad_request)?;
    if hub.store.list_ssh_keys(owner).await?.len() >= MAX_KEYS {
        return Err(ApiError::bad_request(format!("{owner} already has {MAX_KEYS} keys; remove one first")));
    }
    let key = hub
        .store
        .add_ssh_key(&NewSshKey {
            user: owner.to_string(),
            fingerprint: parsed.fingerprint.clone(),
            algorithm: parsed.algorithm,
            public_key: parsed.public_key,
            comment: parsed.comment,
        })
        .await
        .map_err(|e| match e {
            StoreError::Conflict { .. } => ApiError::conflict(format!(
                "the key {} is already registered (to this or another account); each key can belong to one account",
                parsed.fingerprint
            )),
            other => other.into(),
        })?;
    let _ = hub.store.add_event(actor, "ssh-key-add", owner, &key.fingerprint).await;
    tracing::info!(user = %owner, by = %actor, fingerprint = %key.fingerprint, "SSH key added");
    Ok(key)
}

async fn remove_key(hub: &SharedHub, actor: &str, owner: &str, which: &str) -> ApiResult<()> {
    // Accept the fingerprint with or without its `SHA256:` prefix.
    let mut r = hub.store.delete_ssh_key(owner, which).await;
    if matches!(r, Err(StoreError::NotFound { .. })) && !which.starts_with("SHA256:") {
        r = hub.store.delete_ssh_key(owner, &format!("SHA256:{which}")).await;
    }
    r.map_err(|e| match e {
        StoreError::NotFound { .. } => ApiError::not_found(format!("{owner} has no key {which}")),
        other => other.into(),
    })?;
    let _ = hub.store.add_event(actor, "ssh-key-remove", owner, which).await;
    tracing::info!(user = %owner, by = %actor, key = %which, "SSH key removed");
    Ok(())
}

pub async fn api_list(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    c.require("read:ssh-keys", Target::User(&name))?;
    existing_user(&hub, &name).await?;
    let keys = hub.store.list_ssh_keys(&name).await?;
    Ok(Json(Value::Array(keys.iter().map(key_model).collect())))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostKey {
    key: String,
}

pub async fn api_add(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<PostKey>,
) -> ApiResult<Response> {
    c.require("ssh-keys", Target::User(&name))?;
    existing_user(&hub, &name).await?;
    let key = add_key(&hub, c.name(), &name, &body.key).await?;
    Ok((StatusCode::CREATED, Json(key_model(&key))).into_response())
}

pub async fn api_delete(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path((name, which)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    c.require("ssh-keys", Target::User(&name))?;
    remove_key(&hub, c.name(), &name, &which).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn owner_of(user: &PageUser, name: Option<String>) -> ApiResult<String> {
    let name = name.unwrap_or_else(|| user.caller.name().to_string());
    if name != user.caller.name() && !user.caller.user.admin {
        return Err(ApiError::forbidden("only admins can see other users' keys").page());
    }
    Ok(name)
}

async fn render(hub: &SharedHub, user: &PageUser, owner: &str, notice: &str) -> ApiResult<Html<String>> {
    let keys = hub.store.list_ssh_keys(owner).await.map_err(|e| ApiError::from(e).page())?;
    let p = hub.hub_prefix();
    let x = xsrf_input(&user.xsrf);
    let action = format!("{p}keys/{}", esc(owner));
    let table = if keys.is_empty() {
        r#"<p class="muted">No SSH keys yet.</p>"#.to_string()
    } else {
        let mut rows = String::new();
        for k in &keys {
            rows.push_str(&format!(
                r#"<tr id="key-{id}"><td><code>{fp}</code></td><td>{alg}</td><td>{comment}</td><td class="muted">{created}</td><td class="muted">{last}</td>
<td><form method="post" action="{action}/{id}/delete">{x}<button class="danger" type="submit">Remove</button></form></td></tr>"#,
                id = esc(&k.id),
                fp = esc(&k.fingerprint),
                alg = esc(&k.algorithm),
                comment = esc(&k.comment),
                created = iso(k.created).get(..16).unwrap_or("").replace('T', " "),
                last = k.last_used.map(|t| iso(t).get(..16).unwrap_or("").replace('T', " ")).unwrap_or_else(|| "never".into()),
            ));
        }
        format!(
            "<table><thead><tr><th>Fingerprint</th><th>Type</th><th>Comment</th><th>Added</th><th>Last used</th><th></th></tr></thead><tbody>{rows}</tbody></table>"
        )
    };
    let whose =
        if owner == user.caller.name() { "Your SSH keys".to_string() } else { format!("SSH keys of {}", esc(owner)) };
    let body = format!(
        r#"<h1>SSH keys</h1>{notice}<div class="card"><h2>Add a key</h2>
<p class="muted">Paste a public key (the contents of <code>~/.ssh/id_ed25519.pub</code>). Then <code>ssh {user}@this-host</code>
reaches your server; <code>ssh {user}+NAME@this-host</code> reaches the named server NAME.</p>
<form method="post" action="{action}">{x}<label for="key">Public key</label>
<textarea id="key" name="key" rows="3" placeholder="ssh-ed25519 AAAA… you@laptop"></textarea>
<p><button type="submit">Add key</button></p></form></div>
<div class="card"><h2>{whose}</h2>{table}</div>"#,
        user = esc(owner),
    );
    let v = Viewer { name: user.caller.name(), admin: user.caller.user.admin, xsrf: &user.xsrf };
    Ok(html::page(&hub.cfg.base_url, "SSH keys", Some(&v), &body))
}

pub async fn page_own(State(hub): State<SharedHub>, user: PageUser) -> ApiResult<Html<String>> {
    let owner = owner_of(&user, None)?;
    render(&hub, &user, &owner, "").await
}

pub async fn page_user(
    State(hub): State<SharedHub>,
    user: PageUser,
    Path(name): Path<String>,
) -> ApiResult<Html<String>> {
    let owner = owner_of(&user, Some(name))?;
    existing_user(&hub, &owner).await.map_err(ApiError::page)?;
    render(&hub, &user, &owner, "").await
}

#[derive(Deserialize)]
pub struct KeyForm {
    #[serde(default)]
    key: String,
}

pub async fn page_add(
    State(hub): State<SharedHub>,
    user: PageUser,
    Path(name): Path<String>,
    PageForm(f): PageForm<KeyForm>,
) -> ApiResult<Html<String>> {
    let owner = owner_of(&user, Some(name))?;
    existing_user(&hub, &owner).await.map_err(ApiError::page)?;
    let notice = match add_key(&hub, user.caller.name(), &owner, &f.key).await {
        Ok(k) => alert(Level::Success, &format!("Added {}.", k.fingerprint)),
        Err(e) => alert(Level::Danger, &e.message),
    };
    render(&hub, &user, &owner, &notice).await
}

pub async fn page_delete(
    State(hub): State<SharedHub>,
    user: PageUser,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    let owner = owner_of(&user, Some(name))?;
    remove_key(&hub, user.caller.name(), &owner, &id).await.map_err(ApiError::page)?;
    Ok(Redirect::to(&format!("{}keys/{owner}", hub.hub_prefix())).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Generated with `ssh-keygen -t ed25519 -C alice@laptop` for these tests.
    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDrD+pwPLnX4GFu1Z/HSG1b/m6hD8HOWaOTzvucTpb88 alice@laptop";

    #[test]
    fn a_good_key_is_reduced_to_type_and_data_with_its_fingerprint() {
        let k = parse_key(&format!("  {ED25519}\n")).unwrap();
        assert_eq!(k.algorithm, "ssh-ed25519");
        assert_eq!(k.comment, "alice@laptop");
        assert!(k.public_key.starts_with("ssh-ed25519 AAAAC3"));
        assert!(!k.public_key.contains("alice"));
        // As `ssh-keygen -lf` printed it for this key.
        assert_eq!(k.fingerprint, "SHA256:KN4GMZVhgdcG5P1HOejXULVbPdkiA5aWo2DLWbV4kVE");
    }

    #[test]
    fn bad_keys_are_refused_with_a_reason() {
        let cases = [
            ("", "empty"),
            ("-----BEGIN OPENSSH PRIVATE KEY-----", "private key"),
            ("command=\"x\" ssh-ed25519 AAAA", "options"),
            ("ssh-ed25519 AAAA!!!notbase64", "cannot be read"),
            ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5", "cannot be read"),
        ];
        for (line, want) in cases {
            let e = parse_key(line).unwrap_err();
            assert!(e.contains(want), "{line:?}: {e}");
        }
        let two = format!("{ED25519}\n{ED25519}");
        assert!(parse_key(&two).unwrap_err().contains("one key"));
    }
}
