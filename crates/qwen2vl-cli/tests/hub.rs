//! `--model owner/name` and `qwen2vl download` against a fake Hugging Face Hub: a small HTTP
//! server in this file that serves the tiny fixture model the way huggingface.co does
//! (`/api/models/{repo}/revision/{rev}`, `/{repo}/resolve/{rev}/{file}` with `etag`,
//! `x-repo-commit`, Range requests answered 206, weights behind a redirect to a "CDN" with
//! `x-linked-etag`). Every test gets its own server and a fresh `HF_HOME`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// The commit every revision of the fake repo resolves to.
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
/// The repo the fake hub serves.
const REPO: &str = "test-org/tiny-qwen2vl";
/// A repo that answers 401 unless the request carries `Bearer {TOKEN}`.
const GATED: &str = "test-org/gated-qwen2vl";
const TOKEN: &str = "hf_test_secret";
/// A sharded repo: `model.safetensors.index.json` and two shards.
const SHARDED: &str = "test-org/tiny-qwen2vl-untied";
/// A repo whose info is an HTML page, as a web server that is not a hub would answer.
const NOT_A_HUB: &str = "test-org/html";
/// A repo whose files answer a redirect without a Location header.
const NO_LOCATION: &str = "test-org/no-location";
/// Files the fake repos also hold that qwen2vl must not download.
const EXTRAS: &[&str] = &["README.md", "pytorch_model.bin", "onnx/model.onnx"];

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-qwen2vl")
}

/// The tiny fixture's files, by name.
fn fixture_files() -> BTreeMap<String, Vec<u8>> {
    files_of(&tiny())
}

/// The files of a fixture directory, by name.
fn files_of(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_str().unwrap().to_string();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

/// A stable content hash used as the etag (hf-hub does not check it against the content).
fn etag(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in data {
        h = (h ^ *b as u64).wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}{:08x}", data.len())
}

/// Shared state of the fake hub.
struct State {
    /// Repo id → file name → content.
    repos: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// Requests seen: "GET /path range".
    log: Mutex<Vec<String>>,
    /// When set, the next full download of this file sends half its body and hangs up.
    drop_once: Mutex<Option<String>>,
    stop: AtomicBool,
}

/// A fake hub on 127.0.0.1; stopped (and its port closed) on drop.
struct Hub {
    state: Arc<State>,
    port: u16,
    thread: Option<JoinHandle<()>>,
}

impl Hub {
    fn start() -> Hub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State {
            repos: {
                let mut small = fixture_files();
                for x in EXTRAS {
                    small.insert(x.to_string(), b"not for qwen2vl".to_vec());
                }
                let sharded = files_of(&tiny().with_file_name("tiny-qwen2vl-untied"));
                BTreeMap::from([
                    (REPO.to_string(), small.clone()),
                    (GATED.to_string(), small),
                    (SHARDED.to_string(), sharded),
                    (NO_LOCATION.to_string(), fixture_files()),
                ])
            },
            log: Mutex::new(Vec::new()),
            drop_once: Mutex::new(None),
            stop: AtomicBool::new(false),
        });
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.stop.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    let st = st.clone();
                    std::thread::spawn(move || {
                        let _ = serve(conn, &st, port);
                    });
                }
            }
        });
        Hub {
            state,
            port,
            thread: Some(thread),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> Vec<String> {
        self.state.log.lock().unwrap().clone()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Answers one request (connections are not kept alive).
fn serve(conn: TcpStream, st: &State, port: u16) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let range = headers.get("range").cloned().unwrap_or_default();
    st.log
        .lock()
        .unwrap()
        .push(format!("{method} {path} {range}").trim().to_string());
    let mut out = conn;
    let authorized = headers.get("authorization").map(String::as_str)
        == Some(&format!("Bearer {TOKEN}") as &str);

    let repo_of = |p: &str| -> Option<(String, String)> {
        // {owner}/{name}/{rest}
        let mut it = p.splitn(3, '/');
        let (o, n, rest) = (it.next()?, it.next()?, it.next().unwrap_or(""));
        Some((format!("{o}/{n}"), rest.to_string()))
    };
    let known = |repo: &str| st.repos.contains_key(repo);
    let refuse = |repo: &str| repo == GATED && !authorized;

    if let Some(rest) = path.strip_prefix("/api/models/") {
        let Some((repo, rest)) = repo_of(rest) else {
            return respond(&mut out, 400, &[], b"bad request");
        };
        if repo == NOT_A_HUB {
            return respond(&mut out, 200, &[], b"<html>a web page</html>");
        }
        if !known(&repo) || !rest.starts_with("revision/") {
            return respond(&mut out, 404, &[], br#"{"error":"Repository not found"}"#);
        }
        if refuse(&repo) {
            return respond(
                &mut out,
                401,
                &[],
                br#"{"error":"Access to model is restricted"}"#,
            );
        }
        let siblings: Vec<String> = st.repos[&repo]
            .keys()
            .map(|f| format!(r#"{{"rfilename":"{f}"}}"#))
            .collect();
        let body = format!(
            r#"{{"id":"{repo}","sha":"{COMMIT}","siblings":[{}]}}"#,
            siblings.join(",")
        );
        return respond(
            &mut out,
            200,
            &[("Content-Type", "application/json".into())],
            body.as_bytes(),
        );
    }
    if let Some(rest) = path.strip_prefix("/cdn/") {
        // The "CDN": plain content with Range support, no hub headers.
        let Some(data) = repo_of(rest).and_then(|(repo, file)| st.repos.get(&repo)?.get(&file))
        else {
            return respond(&mut out, 404, &[], b"no such object");
        };
        return send_file(&mut out, st, rest, data, &range, &[]);
    }
    let Some((repo, rest)) = repo_of(path.trim_start_matches('/')) else {
        return respond(&mut out, 404, &[], b"not found");
    };
    let Some((_rev, file)) = rest
        .strip_prefix("resolve/")
        .and_then(|r| r.split_once('/'))
    else {
        return respond(&mut out, 404, &[], b"not found");
    };
    if !known(&repo) {
        return respond(
            &mut out,
            404,
            &[("X-Error-Code", "RepoNotFound".into())],
            b"",
        );
    }
    if refuse(&repo) {
        return respond(&mut out, 401, &[("X-Error-Code", "GatedRepo".into())], b"");
    }
    let Some(data) = st.repos[&repo].get(file) else {
        return respond(
            &mut out,
            404,
            &[("X-Error-Code", "EntryNotFound".into())],
            b"",
        );
    };
    let tag = format!("\"{}\"", etag(data));
    if repo == NO_LOCATION {
        return respond(
            &mut out,
            302,
            &[("ETag", tag), ("X-Repo-Commit", COMMIT.into())],
            b"",
        );
    }
    if file.ends_with(".safetensors") {
        // LFS files: the hub redirects to a CDN and names the content in x-linked-etag.
        return respond(
            &mut out,
            302,
            &[
                (
                    "Location",
                    format!("http://127.0.0.1:{port}/cdn/{repo}/{file}"),
                ),
                ("X-Linked-Etag", tag),
                ("X-Linked-Size", data.len().to_string()),
                ("X-Repo-Commit", COMMIT.into()),
                ("ETag", "\"pointer-etag\"".into()),
            ],
            b"",
        );
    }
    send_file(
        &mut out,
        st,
        file,
        data,
        &range,
        &[("ETag", tag), ("X-Repo-Commit", COMMIT.into())],
    )
}

/// Sends `data` (or the requested `bytes=a-b` / `bytes=a-` range of it, as 206).
fn send_file(
    out: &mut TcpStream,
    st: &State,
    name: &str,
    data: &[u8],
    range: &str,
    extra: &[(&str, String)],
) -> std::io::Result<()> {
    let total = data.len();
    let (start, end) = match range.strip_prefix("bytes=").and_then(|r| r.split_once('-')) {
        Some((a, b)) => {
            let a: usize = a.parse().unwrap_or(0);
            let b: usize = if b.is_empty() {
                total.saturating_sub(1)
            } else {
                b.parse().unwrap_or(total - 1).min(total - 1)
            };
            (a, b)
        }
        None => (0, total - 1),
    };
    if start >= total {
        return respond(
            out,
            416,
            &[("Content-Range", format!("bytes */{total}"))],
            b"",
        );
    }
    let body = &data[start..=end];
    let mut headers: Vec<(&str, String)> = extra.to_vec();
    let status = if range.is_empty() {
        200
    } else {
        headers.push(("Content-Range", format!("bytes {start}-{end}/{total}")));
        206
    };
    let full_download = body.len() > 1;
    let drop_now = full_download && {
        let mut d = st.drop_once.lock().unwrap();
        if d.as_deref() == Some(name) {
            *d = None;
            true
        } else {
            false
        }
    };
    if drop_now {
        // Announce the whole body, send half of it, hang up.
        write_head(out, status, &headers, body.len())?;
        out.write_all(&body[..body.len() / 2])?;
        out.flush()?;
        return out.shutdown(std::net::Shutdown::Both);
    }
    respond(out, status, &headers, body)
}

fn write_head(
    out: &mut TcpStream,
    status: u16,
    headers: &[(&str, String)],
    len: usize,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        _ => "Other",
    };
    let mut head =
        format!("HTTP/1.1 {status} {reason}\r\nContent-Length: {len}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())
}

fn respond(
    out: &mut TcpStream,
    status: u16,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    write_head(out, status, headers, body.len())?;
    out.write_all(body)?;
    out.flush()
}

/// A fresh directory unique to one test, used as HF_HOME.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qwen2vl-hub-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs the binary with a clean Hugging Face environment: HF_HOME, HF_ENDPOINT and `extra`.
fn qwen2vl(home: &Path, endpoint: &str, extra: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qwen2vl"));
    for var in [
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_TOKEN_PATH",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("HF_HOME", home).env("HF_ENDPOINT", endpoint);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.args(args).output().expect("binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The snapshot directory the standard layout puts the fake repo's files in.
fn snapshot(home: &Path) -> PathBuf {
    home.join("hub/models--test-org--tiny-qwen2vl/snapshots")
        .join(COMMIT)
}

/// Asserts a one-line, exit-3 failure whose message mentions every needle.
fn assert_unavailable(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(3), "stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(err.starts_with("error: "), "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr should mention {n:?}: {err}");
    }
}

/// Every fixture file is in the snapshot, byte for byte, as a link into blobs/.
fn assert_complete_snapshot(home: &Path) {
    let snap = snapshot(home);
    for (name, data) in fixture_files() {
        let p = snap.join(&name);
        assert!(
            std::fs::symlink_metadata(&p)
                .unwrap()
                .file_type()
                .is_symlink(),
            "{name} should link into blobs/"
        );
        assert!(
            std::fs::read(&p).unwrap() == data,
            "{name} differs from the fixture"
        );
    }
    let blobs = home.join("hub/models--test-org--tiny-qwen2vl/blobs");
    for e in std::fs::read_dir(blobs).unwrap() {
        let n = e.unwrap().file_name().into_string().unwrap();
        assert!(!n.ends_with(".part"), "partial download left behind: {n}");
    }
}

fn token_ids(o: &Output) -> Vec<u64> {
    assert!(o.status.success(), "{}", stderr(o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    v["token_ids"]
        .as_array()
        .expect("token_ids")
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

const RUN: &[&str] = &[
    "--json",
    "--max-new-tokens",
    "3",
    "--temperature",
    "0",
    "hi",
];

#[test]
fn download_fills_the_standard_cache_layout() {
    let hub = Hub::start();
    let home = scratch("layout");
    let o = qwen2vl(&home, &hub.endpoint(), &[], &["download", REPO]);
    assert!(o.status.success(), "{}", stderr(&o));
    let printed = String::from_utf8(o.stdout.clone()).unwrap();
    assert_eq!(printed.trim(), snapshot(&home).to_str().unwrap());
    assert_complete_snapshot(&home);
    let log = hub.log();
    for x in EXTRAS {
        assert!(
            !log.iter().any(|l| l.contains(x)),
            "{x} was fetched: {log:?}"
        );
    }
    let main_ref = home.join("hub/models--test-org--tiny-qwen2vl/refs/main");
    assert_eq!(std::fs::read_to_string(main_ref).unwrap().trim(), COMMIT);
    // Not a terminal: one plain line per file on stderr, no bar escape codes.
    let err = stderr(&o);
    assert!(err.contains("downloading config.json"), "{err}");
    assert!(!err.contains('\x1b'), "{err}");

    // Everything cached: a second download asks for the repo info only.
    let before = hub.log().len();
    let o = qwen2vl(&home, &hub.endpoint(), &[], &["download", "--quiet", REPO]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stderr.is_empty(), "--quiet: {}", stderr(&o));
    let after = hub.log();
    assert_eq!(after.len() - before, 1, "{:?}", &after[before..]);
    assert!(after[before].contains("/api/models/"), "{after:?}");

    // A tag is recorded under refs/ too.
    let o = qwen2vl(
        &home,
        &hub.endpoint(),
        &[],
        &["download", "-q", &format!("{REPO}@v1.0")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let tag_ref = home.join("hub/models--test-org--tiny-qwen2vl/refs/v1.0");
    assert_eq!(std::fs::read_to_string(tag_ref).unwrap().trim(), COMMIT);
}

#[test]
fn hub_model_runs_like_the_local_dir_and_then_offline() {
    let hub = Hub::start();
    let home = scratch("run");
    let endpoint = hub.endpoint();
    let local = tiny();
    let mut args = vec!["run", "--model", local.to_str().unwrap()];
    args.extend_from_slice(RUN);
    let expected = token_ids(&qwen2vl(&home, &endpoint, &[], &args));
    assert_eq!(expected.len(), 3);
    assert!(hub.log().is_empty(), "a local dir must not touch the hub");

    let mut args = vec!["run", "--model", REPO];
    args.extend_from_slice(RUN);
    assert_eq!(token_ids(&qwen2vl(&home, &endpoint, &[], &args)), expected);
    assert!(snapshot(&home).join("model.safetensors").is_file());
    drop(hub);

    // The server is gone: HF_HUB_OFFLINE=1 runs from the cache...
    let o = qwen2vl(&home, &endpoint, &[("HF_HUB_OFFLINE", "1")], &args);
    assert_eq!(token_ids(&o), expected);
    // ...and so does a plain run, with a warning that the hub is unreachable.
    let o = qwen2vl(&home, &endpoint, &[], &args);
    assert_eq!(token_ids(&o), expected);
    assert!(
        stderr(&o).contains("warning: cannot reach"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn unknown_repo_is_exit_3() {
    let hub = Hub::start();
    let home = scratch("unknown");
    let o = qwen2vl(&home, &hub.endpoint(), &[], &["download", "test-org/nope"]);
    assert_unavailable(&o, &["test-org/nope", "404", "--model /path/to/dir"]);
    let o = qwen2vl(
        &home,
        &hub.endpoint(),
        &[],
        &["run", "--model", "test-org/nope", "hi"],
    );
    assert_unavailable(&o, &["test-org/nope", "404"]);
}

#[test]
fn gated_repo_needs_hf_token() {
    let hub = Hub::start();
    let home = scratch("gated");
    let o = qwen2vl(&home, &hub.endpoint(), &[], &["download", GATED]);
    assert_unavailable(&o, &["401", "HF_TOKEN"]);

    let o = qwen2vl(
        &home,
        &hub.endpoint(),
        &[("HF_TOKEN", TOKEN)],
        &["download", "-q", GATED],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let dir = PathBuf::from(String::from_utf8(o.stdout).unwrap().trim());
    assert!(dir.join("model.safetensors").is_file());

    // The token file under HF_HOME works as well (fresh cache, so it must download again).
    let home = scratch("gated-file");
    std::fs::write(home.join("token"), format!("{TOKEN}\n")).unwrap();
    let o = qwen2vl(&home, &hub.endpoint(), &[], &["download", "-q", GATED]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn offline_with_an_empty_cache_is_exit_3() {
    let hub = Hub::start();
    let home = scratch("offline");
    let o = qwen2vl(
        &home,
        &hub.endpoint(),
        &[("HF_HUB_OFFLINE", "1")],
        &["run", "--model", REPO, "hi"],
    );
    assert_unavailable(&o, &["HF_HUB_OFFLINE", "--model /path/to/dir"]);
    assert!(hub.log().is_empty(), "offline must not touch the network");
}

#[test]
fn connection_refused_is_exit_3() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let home = scratch("refused");
    let endpoint = format!("http://127.0.0.1:{port}");
    let o = qwen2vl(&home, &endpoint, &[], &["download", REPO]);
    assert_unavailable(&o, &["cannot reach", "HF_ENDPOINT", "--model /path/to/dir"]);
}

#[test]
fn not_a_dir_nor_a_repo_id_is_a_usage_error() {
    let home = scratch("usage");
    let o = qwen2vl(
        &home,
        "http://127.0.0.1:9",
        &[],
        &["run", "--model", "./missing-dir", "hi"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("owner/name"), "{}", stderr(&o));
    let o = qwen2vl(&home, "http://127.0.0.1:9", &[], &["download", "a/b/c"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn a_dropped_connection_is_resumed() {
    let hub = Hub::start();
    *hub.state.drop_once.lock().unwrap() = Some("test-org/tiny-qwen2vl/model.safetensors".into());
    let home = scratch("drop");
    let o = qwen2vl(&home, &hub.endpoint(), &[], &["download", "-q", REPO]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_complete_snapshot(&home);
    let size = fixture_files()["model.safetensors"].len();
    let resumed: Vec<String> = hub
        .log()
        .into_iter()
        .filter(|l| {
            l.starts_with("GET /cdn/test-org/tiny-qwen2vl/model.safetensors bytes=")
                && !l.ends_with("=0-")
        })
        .filter(|l| !l.ends_with("=0-0"))
        .collect();
    assert_eq!(resumed.len(), 1, "one resumed request: {:?}", hub.log());
    let from: usize = resumed[0]
        .rsplit('=')
        .next()
        .unwrap()
        .trim_end_matches('-')
        .parse()
        .unwrap();
    assert!(from > 0 && from < size, "{resumed:?}");
}

#[test]
fn a_partial_file_in_the_cache_is_resumed() {
    let hub = Hub::start();
    let home = scratch("part");
    let files = fixture_files();
    let data = &files["tokenizer.json"];
    let blobs = home.join("hub/models--test-org--tiny-qwen2vl/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let keep = data.len() / 3;
    std::fs::write(blobs.join(format!("{}.part", etag(data))), &data[..keep]).unwrap();
    let o = qwen2vl(&home, &hub.endpoint(), &[], &["download", "-q", REPO]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_complete_snapshot(&home);
    let wanted = format!("GET /test-org/tiny-qwen2vl/resolve/main/tokenizer.json bytes={keep}-");
    assert!(hub.log().contains(&wanted), "{:?}", hub.log());
}

#[test]
fn an_overlong_partial_file_is_discarded() {
    let hub = Hub::start();
    let home = scratch("overlong");
    let files = fixture_files();
    let data = &files["config.json"];
    let blobs = home.join("hub/models--test-org--tiny-qwen2vl/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let mut junk = data.clone();
    junk.extend_from_slice(b"garbage after the end");
    std::fs::write(blobs.join(format!("{}.part", etag(data))), junk).unwrap();
    let o = qwen2vl(&home, &hub.endpoint(), &[], &["download", "-q", REPO]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_complete_snapshot(&home);
}

#[test]
fn a_sharded_repo_fetches_every_shard_and_runs() {
    let hub = Hub::start();
    let home = scratch("sharded");
    let o = qwen2vl(&home, &hub.endpoint(), &[], &["download", "-q", SHARDED]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dir = PathBuf::from(String::from_utf8(o.stdout).unwrap().trim());
    let local = tiny().with_file_name("tiny-qwen2vl-untied");
    for (name, data) in files_of(&local) {
        assert!(std::fs::read(dir.join(&name)).unwrap() == data, "{name}");
    }
    assert!(dir.join("model-00002-of-00002.safetensors").is_file());

    let mut args = vec!["run", "--model", local.to_str().unwrap()];
    args.extend_from_slice(RUN);
    let expected = token_ids(&qwen2vl(&home, &hub.endpoint(), &[], &args));
    let mut args = vec!["run", "--model", SHARDED];
    args.extend_from_slice(RUN);
    let o = qwen2vl(&home, &hub.endpoint(), &[("HF_HUB_OFFLINE", "1")], &args);
    assert_eq!(token_ids(&o), expected);

    // A missing shard makes the cached snapshot unusable offline, with a message naming it.
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let o = qwen2vl(&home, &hub.endpoint(), &[("HF_HUB_OFFLINE", "1")], &args);
    assert_unavailable(&o, &["model-00002-of-00002.safetensors", "HF_HUB_OFFLINE"]);
}

#[test]
fn an_endpoint_that_is_not_a_hub_is_exit_3() {
    let hub = Hub::start();
    let home = scratch("html");
    let o = qwen2vl(&home, &hub.endpoint(), &[], &["download", NOT_A_HUB]);
    assert_unavailable(&o, &["unexpected answer", "HF_ENDPOINT"]);
}

#[test]
fn a_cached_commit_needs_no_network() {
    let hub = Hub::start();
    let home = scratch("commit");
    let endpoint = hub.endpoint();
    let o = qwen2vl(&home, &endpoint, &[], &["download", "-q", REPO]);
    assert!(o.status.success(), "{}", stderr(&o));
    drop(hub);
    // No HF_HUB_OFFLINE: a branch would try the hub and warn, a cached commit does not.
    let o = qwen2vl(
        &home,
        &endpoint,
        &[],
        &["download", &format!("{REPO}@{COMMIT}")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stderr.is_empty(), "{}", stderr(&o));
    assert_eq!(
        String::from_utf8(o.stdout).unwrap().trim(),
        snapshot(&home).to_str().unwrap()
    );
    let o = qwen2vl(&home, &endpoint, &[], &["download", REPO]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("warning: cannot reach"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_python_partial_download_is_resumed_unless_locked() {
    let hub = Hub::start();
    let home = scratch("incomplete");
    let files = fixture_files();
    let (tok, cfg) = (&files["tokenizer.json"], &files["tokenizer_config.json"]);
    let blobs = home.join("hub/models--test-org--tiny-qwen2vl/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let keep = tok.len() / 4;
    std::fs::write(
        blobs.join(format!("{}.incomplete", etag(tok))),
        &tok[..keep],
    )
    .unwrap();
    // A Python process "downloading" tokenizer_config.json holds its lock: leave it alone.
    let busy = blobs.join(format!("{}.incomplete", etag(cfg)));
    std::fs::write(&busy, &cfg[..10]).unwrap();
    let locks = home.join("hub/.locks/models--test-org--tiny-qwen2vl");
    std::fs::create_dir_all(&locks).unwrap();
    let lock = std::fs::File::create(locks.join(format!("{}.lock", etag(cfg)))).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);

    let o = qwen2vl(&home, &hub.endpoint(), &[], &["download", "-q", REPO]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_complete_snapshot(&home);
    let log = hub.log();
    let wanted = format!("GET /test-org/tiny-qwen2vl/resolve/main/tokenizer.json bytes={keep}-");
    assert!(log.contains(&wanted), "{log:?}");
    let whole = "GET /test-org/tiny-qwen2vl/resolve/main/tokenizer_config.json bytes=0-";
    assert!(log.iter().any(|l| l == whole), "{log:?}");
    assert!(busy.is_file(), "a locked Python partial file must stay");
    drop(lock);
}

#[test]
fn a_malformed_hub_answer_is_an_error_not_a_panic() {
    let hub = Hub::start();
    let home = scratch("no-location");
    let o = qwen2vl(&home, &hub.endpoint(), &[], &["download", NO_LOCATION]);
    assert_unavailable(&o, &["unexpected answer", NO_LOCATION]);
}
