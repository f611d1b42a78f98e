//! Server-rendered pages: one layout, escaping done in one place.
//!
//! The pages run no inline script and no `on…=` handler: the hub's
//! Content-Security-Policy ([`crate::headers`]) allows script from the hub's
//! own files only. A page that needs script links one with [`script`] and
//! hands it data through `data-` attributes (escaped with [`esc`]).
//!
//! Every page carries the hub's announcement, when an admin set one: the
//! authentication middleware reads it once per page request and puts it in
//! [`ANNOUNCEMENT`] for the handler's task, where [`page`] and
//! [`bare_page`] find it (escaped like everything else).

use axum::response::Html;

tokio::task_local! {
    /// The announcement for the page being rendered (see the module docs).
    pub static ANNOUNCEMENT: Option<String>;
}

/// The announcement banner, or "" (no announcement, or outside a request).
fn announcement_banner() -> String {
    match ANNOUNCEMENT.try_with(|a| a.clone()).ok().flatten() {
        Some(m) => format!(r#"<div class="announcement" id="announcement" role="status">{}</div>"#, esc(&m)),
        None => String::new(),
    }
}

/// Escapes text for HTML bodies and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = r#"
*{box-sizing:border-box}body{margin:0;font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#1d2330;background:#f5f6f8}
header{background:#1d2330;color:#fff;padding:.6rem 1.2rem;display:flex;gap:1.2rem;align-items:center}
header a{color:#cfd6e4;text-decoration:none}header a:hover{color:#fff}header .brand{font-weight:700;color:#fff;font-size:1.1rem}
header .who{margin-left:auto;display:flex;gap:.8rem;align-items:center}header form{margin:0}
header button{background:none;border:1px solid #56607a;color:#cfd6e4;border-radius:4px;padding:.15rem .6rem;cursor:pointer}
main{max-width:960px;margin:1.5rem auto;padding:0 1rem}
.card{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:1.2rem 1.4rem;margin-bottom:1rem}
h1{font-size:1.4rem;margin:.2rem 0 1rem}h2{font-size:1.1rem}
label{display:block;margin:.6rem 0 .2rem;font-weight:600}
input[type=text],input[type=password],input[type=number],select{width:100%;max-width:24rem;padding:.45rem .6rem;border:1px solid #c5cbd6;border-radius:4px;font:inherit}
button,.button{background:#2f6fde;color:#fff;border:0;border-radius:4px;padding:.45rem 1rem;font:inherit;cursor:pointer;text-decoration:none;display:inline-block}
button.secondary{background:#e8ebf0;color:#1d2330}button.danger{background:#c8372d}
.alert{padding:.6rem .9rem;border-radius:6px;margin:.8rem 0}.alert p{margin:0}
.alert-success{background:#e3f4e6;border:1px solid #a9d8b1}.alert-info{background:#e5effc;border:1px solid #aac6ee}
.alert-danger{background:#fbe7e5;border:1px solid #eeb1aa}.alert-warning{background:#fdf1d8;border:1px solid #ecc77a}.alert form{display:inline;margin-left:.6rem}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.4rem .5rem;border-bottom:1px solid #e6e9ef;vertical-align:middle}
td form{display:inline;margin:0}td button{padding:.2rem .6rem;font-size:.85rem}
.muted{color:#6b7385}.badge{display:inline-block;padding:0 .45rem;border-radius:10px;font-size:.8rem;background:#e8ebf0}
.badge.ok{background:#e3f4e6}.badge.warn{background:#fdf1d8}.badge.err{background:#fbe3e3}code{background:#eef0f4;padding:.1rem .3rem;border-radius:3px;word-break:break-all}
.progress{height:1.2rem;background:#e8ebf0;border-radius:6px;overflow:hidden}.progress>div{height:100%;background:#2f6fde;width:0;transition:width .3s}
.progress>div.failed{background:#c8372d}
.announcement{background:#fdf1d8;border-bottom:1px solid #ecd08f;padding:.55rem 1.2rem;white-space:pre-wrap}
.subnav{display:flex;gap:1rem;margin:-.4rem 0 1rem}.subnav a.here{font-weight:700;text-decoration:none;color:inherit}
"#;

/// Who the page is shown to, for the header.
pub struct Viewer<'a> {
    pub name: &'a str,
    pub admin: bool,
    pub xsrf: &'a str,
    /// Markup shown above every page's body (made by the page code, escaped there).
    pub banner: Option<&'a str>,
}

/// A full page with the header, navigation and the viewer's name.
pub fn page(base: &str, title: &str, viewer: Option<&Viewer<'_>>, body: &str) -> Html<String> {
    let nav = match viewer {
        Some(v) => {
            let admin = if v.admin {
                format!(
                    r#"<a href="{base}hub/authorize">Users</a><a href="{base}hub/admin/servers">Servers</a><a href="{base}hub/admin/events">Events</a>"#
                )
            } else {
                String::new()
            };
            format!(
                r#"<a href="{base}hub/home">Home</a><a href="{base}hub/token">Tokens</a><a href="{base}hub/keys">SSH keys</a>{admin}
<span class="who"><span>{name}</span><a href="{base}hub/change-password">Change password</a>
<form method="post" action="{base}hub/logout"><input type="hidden" name="_xsrf" value="{xsrf}"><button type="submit">Log out</button></form></span>"#,
                name = esc(v.name),
                xsrf = esc(v.xsrf),
            )
        }
        None => format!(
            r#"<span class="who"><a href="{base}hub/login">Log in</a><a href="{base}hub/signup">Sign up</a></span>"#
        ),
    };
    Html(format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{title} · berth</title><style>{STYLE}</style></head><body>
<header><a class="brand" href="{base}hub/">berth</a>{nav}</header>{announcement}
<main>{banner}{body}</main></body></html>"#,
        title = esc(title),
        banner = viewer.and_then(|v| v.banner).unwrap_or(""),
        announcement = announcement_banner(),
    ))
}

/// A page without navigation (errors).
pub fn bare_page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{} · berth</title><style>{STYLE}</style></head><body>
<header><span class="brand">berth</span></header>{}<main><div class="card">{body}</div></main></body></html>"#,
        esc(title),
        announcement_banner(),
    ))
}

#[derive(Clone, Copy)]
pub enum Level {
    Success,
    Info,
    Danger,
}

/// An alert in NativeAuthenticator's markup, so scripts that read it work.
pub fn alert(level: Level, msg: &str) -> String {
    let class = match level {
        Level::Success => "success",
        Level::Info => "info",
        Level::Danger => "danger",
    };
    format!(r#"<div class="alert alert-{class}" role="alert"><p>{}</p></div>"#, esc(msg))
}

/// The `<script>` element for one of the hub's static files ([`crate::assets`]),
/// versioned by its content; `hub_prefix` is `<base>hub/`.
pub fn script(hub_prefix: &str, name: &str) -> String {
    match crate::assets::url(hub_prefix, name) {
        Some(src) => format!(r#"<script src="{}" defer></script>"#, esc(&src)),
        None => {
            tracing::error!(file = name, "a page links a static file the hub does not have");
            String::new()
        }
    }
}

pub fn xsrf_input(token: &str) -> String {
    format!(r#"<input type="hidden" name="_xsrf" value="{}">"#, esc(token))
}

#[cfg(test)]
mod tests {
    #[test]
    fn scripts_are_files_of_the_hub() {
        let tag = super::script("/b/hub/", "pending.js");
        assert!(tag.starts_with(r#"<script src="/b/hub/static/pending.js?v="#), "{tag}");
        assert!(tag.ends_with(r#"" defer></script>"#), "{tag}");
        assert_eq!(super::script("/b/hub/", "missing.js"), "");
    }

    #[test]
    fn the_layout_has_no_inline_script() {
        let v = super::Viewer { name: "<al>", admin: true, xsrf: "x\"y", banner: None };
        for page in [super::page("/", "T", Some(&v), "<p>b</p>").0, super::bare_page("T", "<p>b</p>").0] {
            assert!(!page.contains("<script"), "{page}");
            let lower = page.to_ascii_lowercase();
            let handler = lower.match_indices(" on").any(|(i, _)| {
                let rest = &lower[i + 3..];
                let n = rest.chars().take_while(|c| c.is_ascii_alphabetic()).count();
                n > 0 && rest[n..].starts_with('=')
            });
            assert!(!handler, "no on…= handlers: {page}");
        }
    }

    #[tokio::test]
    async fn the_announcement_is_on_every_page_as_text() {
        let v = super::Viewer { name: "al", admin: false, xsrf: "x", banner: None };
        let msg = Some(r#"<script>alert(1)</script> & "down" at 5"#.to_string());
        let pages = super::ANNOUNCEMENT
            .scope(msg, async { [super::page("/", "T", Some(&v), "b").0, super::bare_page("T", "b").0] })
            .await;
        for page in pages {
            assert!(page.contains(r#"<div class="announcement" id="announcement" role="status">&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;down&quot; at 5</div>"#), "{page}");
            assert!(!page.contains("<script"), "{page}");
        }
        let none = super::page("/", "T", Some(&v), "b").0;
        assert!(!none.contains("announcement\""), "no banner outside a request or without one");
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(super::esc(r#"<a href="x">'&'</a>"#), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
    }
}
