//! `GET /openapi.json` over real HTTP: the served document is `src/openapi.json`, and every
//! operation it lists is answered by the running server (not 404, not 405).

use std::time::Duration;

use qwen2vl_server::ServerConfig;
use serde_json::Value;

mod common;

#[test]
fn served_document_lists_operations_the_server_answers() {
    let addr = common::start_engine(2, 4, ServerConfig::default());
    let agent = common::agent(Duration::from_secs(120));
    let mut r = agent
        .get(&format!("http://{addr}/openapi.json"))
        .call()
        .unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("application/json"), "{ct}");
    let body = r.body_mut().read_to_string().unwrap();
    assert_eq!(body, qwen2vl_server::openapi::DOCUMENT);
    let doc: Value = serde_json::from_str(&body).unwrap();
    let mut checked = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            let url = format!("http://{addr}{path}");
            let resp = match method.as_str() {
                "get" => agent.get(&url).call(),
                "post" => agent
                    .post(&url)
                    .header("content-type", "application/json")
                    .send(r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}"#),
                other => panic!("unexpected method {other} on {path}"),
            };
            let status = resp.unwrap().status().as_u16();
            assert!(
                status != 404 && status != 405,
                "{method} {path} answered {status}"
            );
            assert!(
                ops[method]["responses"].get(status.to_string()).is_some(),
                "{method} {path} answered {status}, which the document does not list"
            );
            checked += 1;
        }
    }
    assert!(checked >= 6, "{checked} operations");
}

/// Checks `v` against an OpenAPI 3.0 schema of `doc` (the keywords the document uses:
/// `$ref`, `type`, `nullable`, `enum`, `required`, `properties`, `items`, `oneOf`, `anyOf`,
/// `allOf`, `minimum`, `maximum`, `minItems`, `maxItems`). Returns where it does not conform.
fn conforms(doc: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let target = doc
            .pointer(&r[1..])
            .ok_or_else(|| format!("unresolved {r}"))?;
        return conforms(doc, target, v, at);
    }
    if v.is_null() && schema.get("nullable") == Some(&Value::Bool(true)) {
        return Ok(());
    }
    let fail = |what: String| Err(format!("{at}: {what} (value {v})"));
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for s in all {
            conforms(doc, s, v, at)?;
        }
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(alts) = schema.get(key).and_then(Value::as_array) {
            let ok = alts
                .iter()
                .filter(|s| conforms(doc, s, v, at).is_ok())
                .count();
            if ok == 0 || (key == "oneOf" && ok > 1) {
                return fail(format!("{ok} of the {key} alternatives match"));
            }
        }
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            return fail(format!("not one of {e:?}"));
        }
    }
    let ty = schema.get("type").and_then(Value::as_str);
    let type_ok = match ty {
        None => true,
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        Some(other) => return fail(format!("unknown type {other}")),
    };
    if !type_ok {
        return fail(format!("not of type {}", ty.unwrap_or("")));
    }
    if let (Some(x), Some(min)) = (v.as_f64(), schema.get("minimum").and_then(Value::as_f64)) {
        if x < min {
            return fail(format!("below the minimum {min}"));
        }
    }
    if let (Some(x), Some(max)) = (v.as_f64(), schema.get("maximum").and_then(Value::as_f64)) {
        if x > max {
            return fail(format!("above the maximum {max}"));
        }
    }
    if let Some(items) = v.as_array() {
        let n = items.len() as u64;
        if schema
            .get("minItems")
            .and_then(Value::as_u64)
            .is_some_and(|m| n < m)
            || schema
                .get("maxItems")
                .and_then(Value::as_u64)
                .is_some_and(|m| n > m)
        {
            return fail(format!("{n} items"));
        }
        if let Some(s) = schema.get("items") {
            for (i, x) in items.iter().enumerate() {
                conforms(doc, s, x, &format!("{at}[{i}]"))?;
            }
        }
    }
    if let Some(obj) = v.as_object() {
        for k in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let k = k.as_str().unwrap_or_default();
            if !obj.contains_key(k) {
                return fail(format!("no required {k}"));
            }
        }
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (k, s) in props {
                if let Some(x) = obj.get(k) {
                    conforms(doc, s, x, &format!("{at}.{k}"))?;
                }
            }
        }
    }
    Ok(())
}

/// Every request example of the document is answered 200 by the server, with a JSON body
/// matching `ChatCompletion` or, streamed, events whose data match `ChatCompletionChunk`
/// and end with `[DONE]`; a refused request's body matches `ErrorResponse`. The checker is
/// tested too: a wrong value fails it.
#[test]
fn documented_examples_get_answers_that_match_the_document() {
    let doc: Value = serde_json::from_str(qwen2vl_server::openapi::DOCUMENT).unwrap();
    let schema = |name: &str| serde_json::json!({ "$ref": format!("#/components/schemas/{name}") });
    let wrong =
        serde_json::json!({"error": {"message": "m", "type": "t", "param": 3, "code": null}});
    assert!(conforms(&doc, &schema("ErrorResponse"), &wrong, "").is_err());

    let addr = common::start_engine(2, 4, ServerConfig::default());
    let agent = common::agent(Duration::from_secs(120));
    let url = format!("http://{addr}/v1/chat/completions");
    let post = |body: &Value| {
        let mut r = agent
            .post(&url)
            .header("content-type", "application/json")
            .send(body.to_string())
            .unwrap();
        let status = r.status().as_u16();
        (status, r.body_mut().read_to_string().unwrap())
    };
    let examples = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]
        ["application/json"]["examples"]
        .as_object()
        .unwrap();
    assert!(examples.len() >= 5, "{} examples", examples.len());
    for (name, ex) in examples {
        let body = &ex["value"];
        conforms(&doc, &schema("ChatCompletionRequest"), body, name).unwrap();
        let (status, text) = post(body);
        assert_eq!(status, 200, "example {name}: {text}");
        if body["stream"] == Value::Bool(true) {
            let data: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect();
            assert_eq!(data.last(), Some(&"[DONE]"), "example {name}");
            for d in &data[..data.len() - 1] {
                let chunk: Value = serde_json::from_str(d).unwrap();
                conforms(&doc, &schema("ChatCompletionChunk"), &chunk, name).unwrap();
            }
        } else {
            let answer: Value = serde_json::from_str(&text).unwrap();
            conforms(&doc, &schema("ChatCompletion"), &answer, name).unwrap();
        }
    }
    let (status, text) = post(&serde_json::json!({"messages": [], "temperature": -1}));
    assert_eq!(status, 400);
    let err: Value = serde_json::from_str(&text).unwrap();
    conforms(&doc, &schema("ErrorResponse"), &err, "400").unwrap();
}
