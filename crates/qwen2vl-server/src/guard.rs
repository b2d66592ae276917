//! What is checked before a handler runs: the `Host` header (a web page the user visits must
//! not reach a local server through DNS rebinding), the request body's `Content-Type` (a page
//! can post `text/plain` without a CORS preflight, never `application/json`) and its read
//! deadline, and the JSON answer to a method a route does not take.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;

use crate::error::ApiError;
use crate::AppState;

/// Bytes of an over-long body read and dropped before the 413 is sent.
const DRAIN_AFTER_LIMIT: usize = 1 << 20;

/// Host names always served when the check is on: this machine's loopback names.
pub const LOOPBACK_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "[::1]"];

/// Which `Host` headers are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPolicy {
    /// Any host (bound to a public address with no `--allowed-host`, or `--allowed-host '*'`).
    Any,
    /// Only these names (lower case, no port), on any port.
    Only(Vec<String>),
}

impl HostPolicy {
    /// The policy for a server listening on `local` (`None`: not known, treated as
    /// loopback) with the extra names `allowed` (`None`: none given). On loopback the Host
    /// must be a loopback name or an allowed one; elsewhere any Host is served unless names
    /// were given. A `*` among them turns the check off.
    pub fn new(allowed: Option<&[String]>, local: Option<SocketAddr>) -> HostPolicy {
        let given: Vec<String> = allowed
            .unwrap_or_default()
            .iter()
            .map(|h| normalize(h))
            .filter(|h| !h.is_empty())
            .collect();
        if given.iter().any(|h| h == "*") {
            return HostPolicy::Any;
        }
        let loopback = local.is_none_or(|a| a.ip().is_loopback());
        if given.is_empty() && !loopback {
            return HostPolicy::Any;
        }
        let mut names: Vec<String> = LOOPBACK_HOSTS.iter().map(|h| h.to_string()).collect();
        names.extend(given);
        HostPolicy::Only(names)
    }

    /// Whether a `Host` value (`name`, `name:port`, `[v6]:port`) is served.
    pub fn allows(&self, host: &str) -> bool {
        match self {
            HostPolicy::Any => true,
            HostPolicy::Only(names) => {
                let h = normalize(host);
                names.contains(&h)
            }
        }
    }
}

/// A host name without its port, in lower case, without a trailing dot.
fn normalize(host: &str) -> String {
    let host = host.trim();
    let name = if host.starts_with('[') {
        // [v6] or [v6]:port
        match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Refuses a request whose `Host` (or absolute-form authority) is not allowed. A request
/// without a Host header (HTTP/1.0 tools) is served: browsers always send one.
pub async fn check_host(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let policy = &st.hosts;
    let header_host = req
        .headers()
        .get(header::HOST)
        .map(|v| v.to_str().unwrap_or("\u{fffd}").to_string());
    let uri_host = req.uri().authority().map(|a| a.as_str().to_string());
    for host in header_host.iter().chain(uri_host.iter()) {
        if !policy.allows(host) {
            return ApiError::client(
                StatusCode::FORBIDDEN,
                format!(
                    "the Host {host:?} is not served here; allowed: localhost, 127.0.0.1 and \
                     [::1] (any port), and the names given to the server with --allowed-host \
                     NAME (--allowed-host '*' serves any host)"
                ),
            )
            .with_code("host_not_allowed")
            .into_response();
        }
    }
    next.run(req).await
}

/// Whether a Content-Type is JSON: `application/json`, optionally with parameters, and a
/// `charset` only of UTF-8 (what JSON is).
fn is_json(content_type: &HeaderValue) -> bool {
    let Ok(v) = content_type.to_str() else {
        return false;
    };
    let mut parts = v.split(';');
    let mime = parts.next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/json") {
        return false;
    }
    parts.all(|p| match p.split_once('=') {
        Some((k, v)) if k.trim().eq_ignore_ascii_case("charset") => {
            let v = v.trim().trim_matches('"');
            v.eq_ignore_ascii_case("utf-8") || v.eq_ignore_ascii_case("utf8")
        }
        _ => true,
    })
}

/// For the JSON endpoints: refuses a body that is not `Content-Type: application/json` (415),
/// and reads the body within the server's body deadline (408 beyond) and size limit (413
/// beyond) before the handler sees it.
pub async fn json_body(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Err(e) = check_json_type(req.headers().get(header::CONTENT_TYPE)) {
        return e.into_response();
    }
    let (parts, body) = req.into_parts();
    let limits = &st.config.limits;
    match read_body(body, limits.max_body_bytes, st.config.body_read_timeout).await {
        Ok(bytes) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Err(e) => e.into_response(),
    }
}

/// The 415 for a body that is not declared JSON.
fn check_json_type(content_type: Option<&HeaderValue>) -> Result<(), ApiError> {
    let got = match content_type {
        Some(ct) if is_json(ct) => return Ok(()),
        Some(v) => format!("Content-Type {:?}", v.to_str().unwrap_or("(not text)")),
        None => "no Content-Type".to_string(),
    };
    Err(ApiError::client(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        format!(
            "the request body must be JSON; got {got}; allowed: Content-Type: \
             application/json (optionally with ; charset=utf-8)"
        ),
    ))
}

/// Why a body was not read.
enum BodyError {
    /// Over the limit (the 413).
    TooLarge,
    /// The connection failed while reading it.
    Read(String),
}

/// The whole body, within `limit` bytes and `deadline`.
async fn read_body(body: Body, limit: usize, deadline: Duration) -> Result<Bytes, ApiError> {
    match tokio::time::timeout(deadline, read_within(body, limit)).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(BodyError::TooLarge)) => Err(ApiError::client(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is too large; allowed: at most {limit} bytes"),
        )),
        Ok(Err(BodyError::Read(e))) => Err(ApiError::client(
            StatusCode::BAD_REQUEST,
            format!("cannot read the request body: {e}"),
        )),
        Err(_) => Err(ApiError::client(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body was not received within {}; allowed: a whole body \
                 within the server's --body-read-timeout",
                secs(deadline)
            ),
        )),
    }
}

/// Reads the body; past `limit` bytes the rest is read and dropped (a little of it, so that
/// the client, still writing, gets to read the 413 rather than a reset).
async fn read_within(body: Body, limit: usize) -> Result<Bytes, BodyError> {
    let mut stream = body.into_data_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut over = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| BodyError::Read(e.to_string()))?;
        if over > 0 || buf.len() + chunk.len() > limit {
            over += chunk.len();
            if over > DRAIN_AFTER_LIMIT {
                break;
            }
            continue;
        }
        buf.extend_from_slice(&chunk);
    }
    if over > 0 {
        return Err(BodyError::TooLarge);
    }
    Ok(Bytes::from(buf))
}

fn secs(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

/// The methods each route takes, for the 405 answer.
fn allowed_methods(path: &str) -> &'static str {
    if path == "/v1/chat/completions" {
        "POST"
    } else {
        "GET, HEAD"
    }
}

/// 405 in the OpenAI error shape, with `Allow`.
pub async fn method_not_allowed(req: Request) -> Response {
    let path = req.uri().path().to_string();
    let allowed = allowed_methods(&path);
    let mut resp = ApiError::client(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "method {} is not allowed on {path}; allowed: {allowed}",
            req.method()
        ),
    )
    .with_code("method_not_allowed")
    .into_response();
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allowed));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_with_ports_and_brackets() {
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let p = HostPolicy::new(None, Some(local));
        for ok in [
            "localhost",
            "LOCALHOST:8080",
            "127.0.0.1:1",
            "[::1]:8080",
            "[::1]",
            "localhost.",
        ] {
            assert!(p.allows(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "127.0.0.2",
            "[::2]:80",
            "",
        ] {
            assert!(!p.allows(bad), "{bad}");
        }
        let p = HostPolicy::new(Some(&["my.box:9000".into()]), Some(local));
        assert!(p.allows("my.box:8080") && p.allows("localhost") && !p.allows("other"));
        let public: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert_eq!(HostPolicy::new(None, Some(public)), HostPolicy::Any);
        assert!(!HostPolicy::new(Some(&["a.b".into()]), Some(public)).allows("c.d"));
        assert_eq!(
            HostPolicy::new(Some(&["*".into()]), Some(local)),
            HostPolicy::Any
        );
        assert!(HostPolicy::new(None, None).allows("localhost:1"));
        assert!(!HostPolicy::new(None, None).allows("x"));
    }

    #[test]
    fn json_content_types() {
        for ok in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/json;charset=\"UTF-8\"",
        ] {
            assert!(is_json(&HeaderValue::from_static(ok)), "{ok}");
        }
        for bad in [
            "text/plain",
            "application/jsonx",
            "application/x-www-form-urlencoded",
            "application/json; charset=latin1",
            "multipart/form-data; boundary=x",
        ] {
            assert!(!is_json(&HeaderValue::from_static(bad)), "{bad}");
        }
    }
}
