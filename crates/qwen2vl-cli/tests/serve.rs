//! `qwen2vl serve` as a user starts it: the binary listens, answers, and refuses bad flags.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qwen2vl"))
}

fn model() -> String {
    format!(
        "{}/../../tests/fixtures/tiny-qwen2vl",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// Kills the server when the test ends, passing or not.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serve_listens_on_loopback_and_answers() {
    let mut child = Child(
        bin()
            .args([
                "serve",
                "--model",
                &model(),
                "--port",
                "0",
                "--api-key",
                "k",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = child.0.stderr.take().unwrap();
    let mut line = String::new();
    BufReader::new(stderr).read_line(&mut line).unwrap();
    let url = line
        .trim()
        .rsplit(' ')
        .next()
        .filter(|u| u.starts_with("http://127.0.0.1:"))
        .unwrap_or_else(|| panic!("no listening line: {line:?}"))
        .to_string();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let health = agent.get(format!("{url}/health")).call().unwrap();
    assert_eq!(health.status(), 200);
    let denied = agent.get(format!("{url}/v1/models")).call().unwrap();
    assert_eq!(denied.status(), 401);
    let mut r = agent
        .post(format!("{url}/v1/chat/completions"))
        .header("authorization", "Bearer k")
        .header("content-type", "application/json")
        .send(r#"{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}"#)
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value =
        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() >= 1);
}

#[test]
fn serve_refuses_a_bad_host_and_a_missing_media_dir() {
    for args in [
        vec!["--host", "not an address!"],
        vec!["--allowed-media-dir", "/no/such/dir"],
    ] {
        let m = model();
        let mut all = vec!["serve", "--model", m.as_str(), "--port", "0"];
        all.extend(args.iter().copied());
        let o = bin().args(&all).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{all:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.starts_with("error: "), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
}

#[test]
fn serve_help_has_an_example_and_the_security_flags() {
    let o = bin().args(["serve", "--help"]).output().unwrap();
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    for want in [
        "Example: qwen2vl serve ",
        "--api-key",
        "--cors-origin",
        "--allow-remote-media",
        "--allowed-media-dir",
        "--max-body-bytes",
        "[default: 127.0.0.1]",
    ] {
        assert!(help.contains(want), "{want}:\n{help}");
    }
}
