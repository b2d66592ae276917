//! `GET /openapi.json` over real HTTP: the served document is `src/openapi.json`, and every
//! operation it lists is answered by the running server (not 404, not 405).

use std::time::Duration;

use qwen2vl_server::ServerConfig;
use serde_json::Value;

mod common;

#[test]
fn served_document_lists_operations_the_server_answers() {
    let addr = common::start_engine(2, 4, ServerConfig::default());
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into();
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
