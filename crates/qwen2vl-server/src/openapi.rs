//! `GET /openapi.json`: the OpenAPI 3.0 document of this API (`openapi.json` beside this
//! file, compiled in). It describes what the handlers do: the request fields `request/`
//! reads, the response types of `openai.rs`, the SSE stream of `chat.rs` and the error shape
//! of `error.rs`, with every status a route answers. Schema-driven fuzzing
//! (`tools/e2e/schemathesis_test.sh`) checks the running server against it.

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// The document, as served.
pub const DOCUMENT: &str = include_str!("openapi.json");

/// The handler of `GET /openapi.json`.
pub async fn document() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn doc() -> Value {
        serde_json::from_str(DOCUMENT).expect("openapi.json is JSON")
    }

    /// `(path, method)` of every `.route("PATH", METHOD(...))` in `lib.rs`, and the page's assets.
    fn router_routes() -> Vec<(String, String)> {
        let src = include_str!("lib.rs");
        let mut out = Vec::new();
        let mut rest = src;
        while let Some(i) = rest.find(".route(") {
            rest = &rest[i + ".route(".len()..];
            let t = rest.trim_start();
            let Some(lit) = t.strip_prefix('"') else {
                continue; // a computed path: the page's assets, added below
            };
            let Some(end) = lit.find('"') else { break };
            let path = lit[..end].to_string();
            let after = lit[end + 1..]
                .trim_start()
                .trim_start_matches(',')
                .trim_start();
            let method: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphabetic())
                .collect();
            out.push((path, method));
        }
        for a in crate::page::ASSETS {
            out.push((a.path.to_string(), "get".into()));
        }
        out
    }

    /// Every `$ref` in `v`.
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(o) => {
                for (k, x) in o {
                    match (k.as_str(), x) {
                        ("$ref", Value::String(s)) => out.push(s.clone()),
                        _ => refs(x, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }

    #[test]
    fn document_is_openapi_3_0_and_every_ref_resolves() {
        let d = doc();
        assert!(d["openapi"].as_str().unwrap().starts_with("3.0."));
        assert!(d["info"]["title"].is_string() && d["info"]["version"].is_string());
        let mut all = Vec::new();
        refs(&d, &mut all);
        assert!(all.len() > 20, "{} refs", all.len());
        for r in all {
            let ptr = r
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("external ref {r}"));
            assert!(d.pointer(ptr).is_some(), "unresolved $ref {r}");
        }
    }

    #[test]
    fn document_lists_every_route_of_the_router_and_no_other() {
        let d = doc();
        let paths = d["paths"].as_object().unwrap();
        let routes = router_routes();
        for p in [
            "/v1/chat/completions",
            "/v1/models",
            "/health",
            "/metrics",
            "/openapi.json",
            "/",
        ] {
            assert!(
                routes.iter().any(|(r, _)| r == p),
                "router_routes missed {p}: {routes:?}"
            );
        }
        for (path, method) in &routes {
            assert!(
                paths.get(path).and_then(|p| p.get(method)).is_some(),
                "the router has {method} {path}, the document does not"
            );
        }
        for (path, ops) in paths {
            for method in ops.as_object().unwrap().keys() {
                assert!(
                    routes.iter().any(|(p, m)| p == path && m == method),
                    "the document has {method} {path}, the router does not"
                );
            }
        }
    }

    #[test]
    fn every_error_answer_has_the_openai_error_shape() {
        let d = doc();
        let shape = &d["components"]["schemas"]["ErrorResponse"];
        let fields = &shape["properties"]["error"]["required"];
        assert_eq!(
            fields,
            &serde_json::json!(["message", "type", "param", "code"])
        );
        // What `ApiError` writes matches the schema's fields.
        let body = crate::ApiError::invalid("temperature", "bad").body();
        let written: Vec<&String> = body["error"].as_object().unwrap().keys().collect();
        assert_eq!(written, ["message", "type", "param", "code"]);
        let chat = &d["paths"]["/v1/chat/completions"]["post"]["responses"];
        for status in [
            "400", "401", "403", "404", "405", "413", "415", "429", "503",
        ] {
            let r = &chat[status]["$ref"];
            let r = r.as_str().unwrap_or_else(|| panic!("no {status} answer"));
            let resp = d.pointer(&r[1..]).unwrap();
            assert_eq!(
                resp["content"]["application/json"]["schema"]["$ref"],
                "#/components/schemas/ErrorResponse",
                "{status}"
            );
        }
        assert!(chat["429"]["$ref"]
            .as_str()
            .and_then(|r| d.pointer(&r[1..]))
            .is_some_and(|r| r["headers"].get("Retry-After").is_some()));
        let ok = &chat["200"]["content"];
        assert!(ok.get("application/json").is_some() && ok.get("text/event-stream").is_some());
    }
}
