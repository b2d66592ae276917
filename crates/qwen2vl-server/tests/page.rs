//! The chat web page at `/` over real HTTP: served with a strict policy, complete, offline,
//! and outside the API key.

use std::net::SocketAddr;
use std::time::Duration;

use qwen2vl_server::page::{ASSETS, CONTENT_SECURITY_POLICY};
use qwen2vl_server::ServerConfig;

mod common;
use common::Resp;

fn start(config: ServerConfig) -> SocketAddr {
    common::start_engine(2, 4, config)
}

fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Resp {
    let mut req = common::agent(Duration::from_secs(60)).get(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    common::read_response(req.call())
}

/// The values of `attr="..."` in `html`.
fn attribute_values<'a>(html: &'a str, attr: &str) -> Vec<&'a str> {
    let needle = format!("{attr}=\"");
    let mut out = Vec::new();
    let mut rest = html;
    while let Some(k) = rest.find(&needle) {
        rest = &rest[k + needle.len()..];
        let end = rest.find('"').unwrap();
        out.push(&rest[..end]);
        rest = &rest[end..];
    }
    out
}

fn assert_page_headers(r: &Resp, path: &str) {
    assert_eq!(
        r.header("content-security-policy"),
        Some(CONTENT_SECURITY_POLICY),
        "{path}"
    );
    assert_eq!(
        r.header("x-content-type-options"),
        Some("nosniff"),
        "{path}"
    );
}

#[test]
fn the_page_is_html_with_a_strict_policy() {
    let addr = start(ServerConfig::default());
    let r = get(addr, "/", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    assert_page_headers(&r, "/");
    assert!(r.body.starts_with("<!DOCTYPE html>"), "{}", &r.body[..40]);
    for part in [
        "default-src 'none'",
        "script-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(CONTENT_SECURITY_POLICY.contains(part), "{part}");
    }
    assert!(!CONTENT_SECURITY_POLICY.contains("unsafe"));
    // No inline script or style the policy would block: every script has a src.
    assert_eq!(r.body.matches("<script").count(), 1);
    assert!(r.body.contains("<script src=\"/assets/app.js\""));
    assert!(!r.body.contains("<style"));
    assert!(!r.body.contains(" style="));
    // No inline event handlers (` onclick=` and the like).
    for (k, _) in r.body.match_indices(" on") {
        let name: String = r.body[k + 3..]
            .chars()
            .take_while(|c| c.is_ascii_alphabetic())
            .collect();
        assert!(
            !r.body[k + 3 + name.len()..].starts_with('='),
            "inline handler on{name}"
        );
    }
}

#[test]
fn every_asset_the_page_references_is_served_with_its_type() {
    let addr = start(ServerConfig::default());
    let html = get(addr, "/", &[]).body;
    let mut referenced: Vec<&str> = attribute_values(&html, "src");
    referenced.extend(attribute_values(&html, "href"));
    referenced.retain(|u| !u.starts_with("data:"));
    assert!(referenced.contains(&"/assets/app.js"), "{referenced:?}");
    assert!(referenced.contains(&"/assets/app.css"), "{referenced:?}");
    for path in &referenced {
        assert!(path.starts_with('/'), "{path} is not on this server");
        let r = get(addr, path, &[]);
        assert_eq!(r.status, 200, "{path}");
        let expected = if path.ends_with(".js") {
            "text/javascript; charset=utf-8"
        } else if path.ends_with(".css") {
            "text/css; charset=utf-8"
        } else {
            panic!("unexpected asset {path}")
        };
        assert_eq!(r.header("content-type"), Some(expected), "{path}");
        assert_page_headers(&r, path);
        assert!(!r.body.is_empty(), "{path}");
    }
    // And every embedded asset is one the page uses.
    for a in ASSETS.iter().filter(|a| a.path != "/") {
        assert!(referenced.contains(&a.path), "{} is not referenced", a.path);
    }
}

#[test]
fn the_page_refers_to_no_other_host() {
    for a in ASSETS {
        let lower = a.body.to_ascii_lowercase();
        for scheme in ["http://", "https://", "//cdn", "ws://", "wss://"] {
            assert!(!lower.contains(scheme), "{} contains {scheme}", a.path);
        }
        assert!(!lower.contains("@import"), "{}", a.path);
    }
    // Model output goes in as text, never as markup.
    let js = ASSETS
        .iter()
        .find(|a| a.path == "/assets/app.js")
        .unwrap()
        .body;
    for sink in [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
    ] {
        assert!(!js.contains(sink), "app.js uses {sink}");
    }
    assert!(js.contains("textContent"));
}

#[test]
fn the_page_needs_no_api_key_but_the_api_does() {
    let addr = start(ServerConfig {
        api_key: Some("s3cret".into()),
        ..ServerConfig::default()
    });
    for a in ASSETS {
        let r = get(addr, a.path, &[]);
        assert_eq!(r.status, 200, "{}", a.path);
        assert_eq!(r.body, a.body, "{}", a.path);
    }
    assert_eq!(get(addr, "/v1/models", &[]).status, 401);
    assert_eq!(get(addr, "/metrics", &[]).status, 401);
    let ok = [("authorization", "Bearer s3cret")];
    assert_eq!(get(addr, "/v1/models", &ok).status, 200);
    // Only the page's own files are outside the key.
    for path in [
        "/assets/other.js",
        "/assets/",
        "/index.html",
        "/v1/",
        "/assets/app.js/x",
    ] {
        assert_eq!(get(addr, path, &[]).status, 401, "{path}");
    }
}

#[test]
fn unknown_paths_are_404() {
    let addr = start(ServerConfig::default());
    for path in [
        "/assets/other.js",
        "/assets/",
        "/assets",
        "/index.htm",
        "/app.js",
        "/assets/app.js/x",
        "/static/app.css",
    ] {
        let r = get(addr, path, &[]);
        assert_eq!(r.status, 404, "{path}");
        assert!(r.body.contains("no route"), "{path}: {}", r.body);
    }
}
