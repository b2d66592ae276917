//! `qwen2vl chat` end to end on the tiny random-weight fixture model: scripts piped on stdin
//! (history, media, commands, save and load, failed turns) and the interactive prompt driven
//! through a pseudo-terminal (a turn, Ctrl-C during an answer, Ctrl-C and Ctrl-D to leave).
//!
//! The model's answers are random text that may contain newlines, so answers are found by
//! comparing whole outputs with those of shorter scripts, never by splitting lines.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn tiny() -> String {
    fixtures()
        .join("tiny-qwen2vl")
        .to_string_lossy()
        .into_owned()
}

fn wide_png() -> String {
    fixtures()
        .join("images/wide.png")
        .to_string_lossy()
        .into_owned()
}

/// A scratch directory unique to one test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qwen2vl-chat-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `qwen2vl chat --model <tiny> --max-new-tokens 8 --temperature 0 <args>`.
fn chat_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qwen2vl"));
    cmd.args(["chat", "--model", &tiny(), "--max-new-tokens", "8"])
        .args(["--temperature", "0"])
        .args(args);
    cmd
}

/// Runs `cmd` with `script` on a piped stdin (closed after it) and captures its output.
fn run_piped(cmd: &mut Command, script: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary runs");
    child.stdin.take().unwrap().write_all(script).unwrap();
    child.wait_with_output().unwrap()
}

/// `qwen2vl chat --model <tiny> --max-new-tokens 8 --temperature 0 -q <args>` with `script`
/// on stdin (a pipe, so not a terminal); asserts exit 0 and no panic.
fn chat(args: &[&str], script: &str) -> Output {
    let o = run_piped(
        chat_command(&["-q"])
            .args(args)
            .env("XDG_CACHE_HOME", scratch("cache")),
        script.as_bytes(),
    );
    let err = stderr(&o);
    assert!(o.status.success(), "chat failed: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    o
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("stdout is UTF-8")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The prompt token counts that `--stats` reports, one per answered turn.
fn prompt_tokens(o: &Output) -> Vec<usize> {
    stderr(o)
        .lines()
        .filter_map(|l| l.strip_prefix("[prompt "))
        .map(|l| l.split(' ').next().unwrap().parse().unwrap())
        .collect()
}

/// The answer(s) of a fresh session to a script.
fn fresh(script: &str) -> String {
    stdout(&chat(&[], script))
}

#[test]
fn two_turns_use_the_history() {
    let both = chat(&["--stats"], "Describe a cat.\nAnd a dog?\n");
    let out = stdout(&both);
    let first = fresh("Describe a cat.\n");
    assert!(first.ends_with('\n') && first.trim().len() > 1, "{first:?}");
    assert!(out.starts_with(&first), "{out:?} vs {first:?}");
    let second = &out[first.len()..];
    assert!(
        second.ends_with('\n') && second.trim().len() > 1,
        "{second:?}"
    );
    // The same line in a fresh session gets another answer: the second turn saw the first.
    assert_ne!(second, fresh("And a dog?\n"));
    // The second prompt holds the first question and answer (8 tokens) besides its own.
    let tokens = prompt_tokens(&both);
    assert_eq!(tokens.len(), 2, "{}", stderr(&both));
    assert!(tokens[1] > tokens[0] + 8, "{tokens:?}");
    // Nothing but the stats on stderr with -q, nothing but answers on stdout.
    assert_eq!(stderr(&both).lines().count(), 2, "{}", stderr(&both));
    assert!(!out.contains(">>>"), "{out:?}");
}

#[test]
fn quiet_off_keeps_stdout_to_the_answers() {
    // Without -q the status lines go to stderr; stdout is the same answers.
    let script = format!("/image {}\nWhat is it?\n/reset\n", wide_png());
    let o = run_piped(
        chat_command(&[]).env("XDG_CACHE_HOME", scratch("quiet-off")),
        script.as_bytes(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("(image attached"), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("(conversation cleared)"),
        "{}",
        stderr(&o)
    );
    let quiet = chat(&[], &script);
    assert_eq!(stdout(&o), stdout(&quiet));
    assert!(stderr(&quiet).is_empty(), "{}", stderr(&quiet));
}

#[test]
fn image_then_question() {
    let with = chat(
        &["--stats"],
        &format!("/image {}\nWhat is in the picture?\n", wide_png()),
    );
    let err = stderr(&with);
    let line = err.lines().find(|l| l.starts_with("[prompt ")).expect(&err);
    // wide.png becomes image tokens in the prompt.
    assert!(!line.contains("(0 image"), "{line}");
    let answer = stdout(&with);
    assert!(answer.trim().len() > 1, "{answer:?}");
    assert_ne!(answer, fresh("What is in the picture?\n"));
    // The attachment belongs to one message only: the next turn has no new image.
    let two = chat(
        &["--stats"],
        &format!("/image {}\nWhat is it?\nAnd now?\n", wide_png()),
    );
    let tokens = prompt_tokens(&two);
    assert_eq!(tokens.len(), 2);
    let image_tokens = |o: &Output| -> Vec<usize> {
        stderr(o)
            .lines()
            .filter_map(|l| l.split_once(" tokens (").map(|(_, r)| r))
            .map(|r| r.split(' ').next().unwrap().parse().unwrap())
            .collect()
    };
    let imgs = image_tokens(&two);
    assert_eq!(imgs[0], imgs[1], "the same one image in both prompts");
    assert!(imgs[0] > 0);
}

#[test]
fn save_then_load_resumes() {
    let dir = scratch("save");
    let file = dir.join("conv.json");
    let file_s = file.to_string_lossy().into_owned();
    let img = wide_png();
    let first = chat(
        &["--system", "Be terse.", "--image", &img],
        &format!("Describe it.\n/save {file_s}\nWhat colour?\n"),
    );
    let out1 = stdout(&first);

    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let msgs = saved["messages"].as_array().expect("a messages list");
    assert_eq!(msgs.len(), 3, "{saved:#}");
    assert_eq!(
        msgs[0],
        serde_json::json!({"role": "system", "content": "Be terse."})
    );
    assert_eq!(msgs[1]["role"], "user");
    let parts = msgs[1]["content"].as_array().unwrap();
    assert_eq!(parts.len(), 2, "{saved:#}");
    assert_eq!(parts[0]["type"], "image");
    let path = parts[0]["image"].as_str().unwrap();
    assert!(
        Path::new(path).is_absolute() && path.ends_with("wide.png"),
        "{path}"
    );
    assert_eq!(
        parts[1],
        serde_json::json!({"type": "text", "text": "Describe it."})
    );
    assert_eq!(msgs[2]["role"], "assistant");
    let answer1 = msgs[2]["content"].as_str().unwrap();
    assert!(out1.starts_with(&format!("{answer1}\n")), "{out1:?}");

    // Resumed from another directory, the same turn gets the same answer.
    let resumed = run_piped(
        chat_command(&["-q", "--load", &file_s])
            .current_dir(&dir)
            .env("XDG_CACHE_HOME", &dir),
        b"What colour?\n",
    );
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    let out2 = stdout(&resumed);
    assert_eq!(format!("{answer1}\n{out2}"), out1);
    assert_ne!(
        out2,
        fresh("What colour?\n"),
        "the loaded history was not used"
    );

    // A bad file is a usage error (exit 2) before any model work.
    let bad = dir.join("bad.json");
    std::fs::write(&bad, "{\"messages\": 3}").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_qwen2vl"))
        .args(["chat", "--model", &tiny(), "-q", "--load"])
        .arg(&bad)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).starts_with("error: "), "{}", stderr(&o));
}

#[test]
fn bad_image_path_then_the_session_goes_on() {
    let o = chat(&[], "/image no/such/picture.png\nhi\n");
    let err = stderr(&o);
    assert!(
        err.lines()
            .any(|l| l.starts_with("error: ") && l.contains("no/such/picture.png")),
        "{err}"
    );
    // The bad image was not attached: the answer is the plain one.
    assert_eq!(stdout(&o), fresh("hi\n"));

    // A file that exists but is no image fails the turn itself: an error, nothing printed
    // on stdout for it, and the turn is not in the history of the next one.
    let not_image = fixtures().join("tiny-qwen2vl/config.json");
    let o = chat(
        &[],
        &format!("/image {}\nWhat is it?\nhi\n", not_image.display()),
    );
    let err = stderr(&o);
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error: ")).count(),
        1,
        "{err}"
    );
    assert_eq!(stdout(&o), fresh("hi\n"));
}

#[test]
fn unknown_command_and_help() {
    let o = chat(&[], "/frobnicate now\nhi\n/help\n");
    let err = stderr(&o);
    let unknown: Vec<_> = err.lines().filter(|l| l.contains("frobnicate")).collect();
    assert_eq!(unknown.len(), 1, "{err}");
    assert!(unknown[0].contains("unknown command"), "{err}");
    assert!(err.contains("/save FILE"), "help goes to stderr: {err}");
    assert_eq!(stdout(&o), fresh("hi\n"));
}

/// The cached prompt token counts that `--stats` reports, one per answered turn.
fn cached_tokens(o: &Output) -> Vec<usize> {
    stderr(o)
        .lines()
        .filter(|l| l.starts_with("[prompt "))
        .map(|l| {
            let (head, _) = l.split_once(" cached)").expect(l);
            head.rsplit(' ').next().unwrap().parse().unwrap()
        })
        .collect()
}

#[test]
fn later_turns_prefill_only_what_is_new_and_answer_as_without_the_cache() {
    // Turn 1 has an image; turns 2 and 3 reuse its keys and values; /system changes the
    // first block of the prompt (it holds the system text), so turn 4 starts from scratch;
    // after each /reset the prompt is the system message and "hi": turn 6 is turn 5 again.
    let script = format!(
        "/image {}\nWhat is it?\nAnd the colours?\nAnything else?\n/system Be brief.\nhi\n/reset\nhi\n/reset\nhi\n",
        wide_png()
    );
    let on = chat(&["--stats"], &script);
    let off = chat(&["--stats", "--prefix-cache-mb", "0"], &script);
    assert_eq!(
        stdout(&on),
        stdout(&off),
        "the cache never changes an answer"
    );
    let (prompt, cached) = (prompt_tokens(&on), cached_tokens(&on));
    assert_eq!(prompt, prompt_tokens(&off));
    assert_eq!(cached.len(), 6, "{}", stderr(&on));
    assert_eq!(cached_tokens(&off), vec![0; 6], "{}", stderr(&off));
    assert_eq!(cached[0], 0, "nothing is cached before the first turn");
    for turn in 1..3 {
        // Everything but the new message and the last answer's partial block of 16.
        assert!(
            cached[turn] + 16 >= prompt[turn - 1] && cached[turn] < prompt[turn],
            "turn {}: {cached:?} of {prompt:?}",
            turn + 1
        );
        assert_eq!(cached[turn] % 16, 0, "whole blocks: {cached:?}");
    }
    assert_eq!(cached[3], 0, "another system message: {cached:?}");
    // The whole of turn 5's prompt but its last position (which gives the first token).
    assert_eq!(prompt[5], prompt[4]);
    assert!(prompt[3] > prompt[4], "turn 4 had the history: {prompt:?}");
    assert_eq!(
        cached[5],
        (prompt[5] - 1) / 16 * 16,
        "{cached:?} of {prompt:?}"
    );
}

#[test]
fn reset_forgets_the_turns() {
    let first = fresh("Describe a cat.\n");
    let o = chat(&[], "Describe a cat.\n/reset\nAnd a dog?\n");
    assert_eq!(stdout(&o), format!("{first}{}", fresh("And a dog?\n")));
    // /reset keeps the system message.
    let sys = ["--system", "Answer in French."];
    let o = stdout(&chat(&sys, "Describe a cat.\n/reset\nAnd a dog?\n"));
    let a = stdout(&chat(&sys, "Describe a cat.\n"));
    let b = stdout(&chat(&sys, "And a dog?\n"));
    assert_eq!(o, format!("{a}{b}"));
    assert_ne!(
        b,
        fresh("And a dog?\n"),
        "the system message changes answers"
    );
}

#[test]
fn system_command_and_quit() {
    let sys = stdout(&chat(&["--system", "Answer in French."], "hi\n"));
    let o = chat(&[], "/system Answer in French.\nhi\n/quit\nhello\n");
    assert_eq!(stdout(&o), sys, "/system replaces it; /quit stops reading");
    let o = chat(&[], "hi\n/exit\nhello\n");
    assert_eq!(stdout(&o), fresh("hi\n"));
    // `//` sends a line starting with `/` as a message.
    let o = chat(&[], "//etc\n");
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
    assert!(stdout(&o).trim().len() > 1, "{:?}", stdout(&o));
    assert_ne!(stdout(&o), fresh("etc\n"), "the message keeps its slash");
}

/// Sends SIGINT (what Ctrl-C sends) to a child process.
fn sigint(child: &std::process::Child) {
    let ok = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// A `chat` child with stdin left open, so the test decides when the script ends.
fn spawn_piped(args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_qwen2vl"))
        .args(["chat", "--model", &tiny(), "--temperature", "0", "-q"])
        .args(args)
        .env("XDG_CACHE_HOME", scratch("sigint"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn sigint_in_a_script_stops_the_answer_then_exits_130_when_idle() {
    use std::io::Read;
    // 30000 tokens take minutes: only the signal ends this answer in time.
    let mut child = spawn_piped(&["--max-new-tokens", "30000", "--ignore-eos"]);
    let mut stdin = child.stdin.take().unwrap();
    let mut out = child.stdout.take().unwrap();
    stdin.write_all(b"Tell me a long story.\n").unwrap();
    let mut first = [0u8; 1];
    out.read_exact(&mut first).unwrap(); // the answer is streaming
    let start = std::time::Instant::now();
    sigint(&child);
    // The session goes on: the next line is answered, then EOF ends it with 0.
    stdin.write_all(b"/save /dev/stdout\n").unwrap();
    drop(stdin);
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(start.elapsed() < Duration::from_secs(60), "not stopped");
    assert!(status.success(), "{status:?}");
    assert!(rest.contains("\"role\": \"assistant\""), "{rest}");

    // Ctrl-C while the script is waiting for its next line ends the process with 130.
    let answer = fresh("hi\n");
    let mut child = spawn_piped(&["--max-new-tokens", "8"]);
    let mut stdin = child.stdin.take().unwrap();
    let mut out = child.stdout.take().unwrap();
    stdin.write_all(b"hi\n").unwrap();
    let mut got = vec![0u8; answer.len()];
    out.read_exact(&mut got).unwrap(); // the whole answer: back to reading stdin
    assert_eq!(String::from_utf8_lossy(&got), answer);
    std::thread::sleep(Duration::from_millis(300));
    sigint(&child);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("Ctrl-C while waiting for a line did not end the process");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(stdin);
    assert_eq!(status.code(), Some(130), "{status:?}");
}

// ----------------------------------------------------------------------------------------
// The interactive prompt, through a pseudo-terminal.

/// rexpect hands back each byte as a char; turn that back into the UTF-8 text.
fn utf8(latin1: &str) -> String {
    let bytes: Vec<u8> = latin1.chars().map(|c| c as u32 as u8).collect();
    String::from_utf8_lossy(&bytes).replace("\r\n", "\n")
}

/// `qwen2vl chat` on a pseudo-terminal, history under `cache`.
fn spawn_pty(cache: &Path, args: &[&str]) -> rexpect::session::PtySession {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qwen2vl"));
    cmd.args(["chat", "--model", &tiny(), "--temperature", "0"])
        .args(args)
        .env("XDG_CACHE_HOME", cache)
        .env("TERM", "xterm");
    rexpect::session::spawn_command(cmd, Some(60_000)).expect("pty spawn")
}

fn assert_exit_0(p: &rexpect::session::PtySession) {
    use rexpect::process::WaitStatus;
    match p.process().wait().unwrap() {
        WaitStatus::Exited(_, 0) => {}
        other => panic!("expected exit 0, got {other:?}"),
    }
}

#[test]
fn interactive_turn_and_ctrl_c_on_empty_line_exits() {
    let cache = scratch("pty-a");
    let expected = fresh("hello\n").replace("\r\n", "\n");
    let expected = expected.trim_end_matches('\n');
    let mut p = spawn_pty(&cache, &["--max-new-tokens", "8"]);
    p.exp_string("/help lists the commands").unwrap();
    p.exp_string(">>> ").unwrap();
    p.send_line("hello").unwrap();
    let answer = utf8(&p.exp_string(">>> ").unwrap());
    assert!(
        answer.contains(expected),
        "interactive answer {answer:?} should hold {expected:?}"
    );
    // Ctrl-C on a line with text clears it and prompts again; the process lives on.
    p.send("half a thought").unwrap();
    p.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    p.send_control('c').unwrap();
    p.exp_string(">>> ").unwrap();
    assert!(p
        .process()
        .status()
        .is_some_and(|s| matches!(s, rexpect::process::WaitStatus::StillAlive)));
    // Ctrl-C on an empty line leaves with exit 0.
    p.send_control('c').unwrap();
    p.exp_eof().unwrap();
    assert_exit_0(&p);
    let history = std::fs::read_to_string(cache.join("qwen2vl/chat_history")).unwrap();
    assert!(history.contains("hello"), "{history}");
}

#[test]
fn interactive_ctrl_c_stops_a_long_answer_then_ctrl_d_exits() {
    let cache = scratch("pty-b");
    // 30000 tokens take minutes on the tiny model: only Ctrl-C ends this answer in time.
    let mut p = spawn_pty(&cache, &["--max-new-tokens", "30000", "--ignore-eos"]);
    p.exp_string(">>> ").unwrap();
    p.send_line("Tell me a long story.").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    p.send_control('c').unwrap();
    let before = utf8(&p.exp_string("(answer stopped)").unwrap());
    assert!(
        before.len() > "Tell me a long story.".len() + 10,
        "{before:?}"
    );
    p.exp_string(">>> ").unwrap();
    // The session goes on, and the stopped answer is kept in the conversation.
    let file = cache.join("stopped.json");
    p.send_line(&format!("/save {}", file.display())).unwrap();
    p.exp_string("(saved 2 messages").unwrap();
    p.exp_string(">>> ").unwrap();
    p.send_control('d').unwrap();
    p.exp_eof().unwrap();
    assert_exit_0(&p);
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let partial = saved["messages"][1]["content"].as_str().unwrap();
    assert!(
        !partial.is_empty() && before.contains(partial.trim_end()),
        "{partial:?}"
    );
}
