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
    let (_child, url) = serve(&["--api-key", "k"]);
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
        "--allowed-host",
        "--max-connections",
        "--header-read-timeout",
        "--shutdown-grace",
        "--preprocess-threads",
        "--preprocess-timeout",
        "--health-stall-after",
        "[default: 127.0.0.1]",
    ] {
        assert!(help.contains(want), "{want}:\n{help}");
    }
}

/// Runs the binary with `args` (and `env`), killed after 60 s: a flag that hangs fails.
fn output_within(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = bin();
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("QWEN2VL_API_KEY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(o) => o.unwrap(),
        Err(_) => {
            // SAFETY: kill(2) on the child this test started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{args:?} did not exit within 60 s");
        }
    }
}

#[test]
fn serve_refuses_an_empty_api_key_and_a_zero_queue() {
    let m = model();
    let base = ["serve", "--model", m.as_str(), "--port", "0"];
    // Extra flags, environment, and what the error must name.
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (vec!["--api-key", ""], vec![], "API key"),
        (vec!["--api-key", "  "], vec![], "API key"),
        (vec![], vec![("QWEN2VL_API_KEY", "")], "API key"),
        (vec!["--max-queue", "0"], vec![], "--max-queue"),
        (vec!["--max-connections", "0"], vec![], "--max-connections"),
        (
            vec!["--header-read-timeout", "0"],
            vec![],
            "--header-read-timeout",
        ),
        (vec!["--allowed-host", ""], vec![], "--allowed-host"),
        (
            vec!["--preprocess-threads", "0"],
            vec![],
            "--preprocess-threads",
        ),
        (
            vec!["--preprocess-timeout", "0"],
            vec![],
            "--preprocess-timeout",
        ),
    ];
    for (extra, env, needle) in cases {
        let mut all = base.to_vec();
        all.extend(extra.iter().copied());
        let o = output_within(&all, &env);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{all:?} {env:?}: {err}");
        assert!(err.starts_with("error: "), "{err}");
        assert!(err.contains(needle), "{needle}: {err}");
        assert!(
            err.contains("allowed") || err.contains("non-empty"),
            "{err}"
        );
    }
}

#[test]
fn run_refuses_a_thread_count_out_of_range() {
    let m = model();
    for n in ["100000", "0"] {
        let o = output_within(
            &[
                "run",
                "--model",
                &m,
                "--threads",
                n,
                "--max-new-tokens",
                "1",
                "Hi",
            ],
            &[],
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{n}: {err}");
        assert!(err.contains(&format!("--threads {n}")), "{err}");
        assert!(err.contains("allowed: 1 to "), "{err}");
    }
    let o = output_within(
        &[
            "run",
            "--model",
            &m,
            "--threads",
            "1",
            "--max-new-tokens",
            "1",
            "Hi",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `qwen2vl serve` with `extra` flags; the child and its base URL.
fn serve(extra: &[&str]) -> (Child, String) {
    let m = model();
    let mut args = vec!["serve", "--model", m.as_str(), "--port", "0"];
    args.extend_from_slice(extra);
    let mut child = Child(
        bin()
            .args(&args)
            .env_remove("QWEN2VL_API_KEY")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = child.0.stderr.take().unwrap();
    let mut reader = BufReader::new(stderr);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let url = line
        .trim()
        .rsplit(' ')
        .next()
        .filter(|u| u.starts_with("http://127.0.0.1:"))
        .unwrap_or_else(|| panic!("no listening line: {line:?}"))
        .to_string();
    // Keep reading stderr so that the child never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = String::new();
        while reader.read_line(&mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
    });
    (child, url)
}

#[test]
fn sigterm_ends_streams_with_a_finish_chunk_and_done_and_exits_0() {
    use std::io::Read;
    let grace = 2;
    let (mut child, url) = serve(&["--shutdown-grace", &grace.to_string()]);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    // /v1/models names the model by its directory, not its absolute path.
    let mut r = agent.get(format!("{url}/v1/models")).call().unwrap();
    let models: serde_json::Value =
        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(models["data"][0]["id"], "tiny-qwen2vl", "{models}");
    assert!(!models.to_string().contains(&model()));
    // A long stream.
    let mut r = agent
        .post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .send(
            r#"{"messages": [{"role": "user", "content": "Go on forever"}], "max_tokens": 30000,
                "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}"#,
        )
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut body = BufReader::new(r.body_mut().as_reader());
    let mut events: Vec<String> = Vec::new();
    let mut line = String::new();
    // Wait for generated text, then SIGTERM.
    while body.read_line(&mut line).unwrap() > 0 {
        let l = std::mem::take(&mut line);
        if let Some(d) = l.trim_end().strip_prefix("data: ") {
            events.push(d.to_string());
            if events.len() >= 3 {
                break;
            }
        }
    }
    let pid = child.0.id() as i32;
    // SAFETY: kill(2) on the child this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let sent = std::time::Instant::now();
    let mut rest = String::new();
    body.read_to_string(&mut rest).unwrap();
    // The answer went on through the grace period, then was cut (30000 tokens take far
    // longer): SIGTERM drained it rather than killing the process.
    let ran = sent.elapsed();
    assert!(
        ran >= Duration::from_millis(grace * 1000 - 300),
        "the stream ended {ran:?} after SIGTERM"
    );
    events.extend(
        rest.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(str::to_string),
    );
    // The stream ends properly: a chunk with a finish_reason, the usage chunk, [DONE].
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let chunks: Vec<serde_json::Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap_or_else(|_| panic!("{e}")))
        .collect();
    let finish = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
        .collect::<Vec<_>>();
    assert_eq!(finish.len(), 1, "{events:?}");
    let usage = &chunks.last().unwrap()["usage"];
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!(completion > 0 && completion < 30000, "{usage}");
    // No new connections once it is shutting down.
    let addr = url.trim_start_matches("http://").to_string();
    assert!(std::net::TcpStream::connect(&addr).is_err());
    // The process exits 0 within the grace period (and a few seconds).
    let deadline = Duration::from_secs(grace + 10);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(sent.elapsed() < deadline, "still running after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0), "{status:?}");
}
