//! `qwen2vl chat`: a multi-turn conversation, typed at a prompt or piped in as a script.
//!
//! Each line is one user turn; lines starting with `/` are commands (`/help` lists them).
//! Answers stream to stdout; everything else (banner, command feedback, errors, `--stats`)
//! goes to stderr, so `qwen2vl chat < script.txt > answers.txt` captures only the answers.
//!
//! Each turn sends the whole conversation, but the prefix cache (`--prefix-cache-mb`) keeps
//! the keys and values of the earlier turns, images included, so a turn prefills only the new
//! message (and the previous answer's last partial block of 16 tokens). `/reset`, `/system`
//! and `--load` change the conversation's text, so the next turn's prompt simply matches a
//! shorter cached prefix (or none): the cache is keyed by content and cannot give a stale
//! answer. `--stats` shows how many prompt tokens each turn found cached.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Args;
use qwen2vl::generation::stop::FinishReason;
use qwen2vl::generation::GenerateRequest;
use qwen2vl::pipeline::Pipeline;
use qwen2vl::processing::messages::{ContentPart, ImagePart, Location, Message, Role, VideoPart};
use serde::{Deserialize, Serialize};

use crate::common::{EncoderCacheArgs, MediaArgs, ModelArgs, SamplingArgs};
use crate::error::CliError;

/// Flags of `qwen2vl chat`.
#[derive(Args)]
#[command(allow_negative_numbers = true)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub encoder_cache: EncoderCacheArgs,
    /// A system message (default: the chat template's "You are a helpful assistant.").
    #[arg(long)]
    pub system: Option<String>,
    /// An image attached to the first message you send (repeatable). A path, file:// or
    /// http(s) URL, or data: URI.
    #[arg(long = "image", value_name = "PATH")]
    pub images: Vec<String>,
    /// A video attached to the first message you send (repeatable).
    #[arg(long = "video", value_name = "PATH")]
    pub videos: Vec<String>,
    /// Resume a conversation written by `/save` (a JSON object with "messages", or a bare
    /// list of messages, in the OpenAI / qwen-vl-utils shape).
    #[arg(long, value_name = "FILE")]
    pub load: Option<PathBuf>,
    #[command(flatten)]
    pub media: MediaArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// After each answer, print its token counts, finish reason and speed on stderr.
    #[arg(long)]
    pub stats: bool,
    /// Keep generating through end-of-sequence tokens. Hidden: only useful to get a long
    /// answer out of a random-weight test model (which may stop at once) so tests can
    /// interrupt it.
    #[arg(long, hide = true)]
    pub ignore_eos: bool,
}

/// What `/help` prints.
const HELP: &str = "\
Type a message and press Enter. Commands:
  /image PATH    attach an image (path, file:// or http(s) URL, data: URI) to your next message
  /video PATH    attach a video to your next message
  /system TEXT   replace the system message (/system alone shows it)
  /reset         forget the conversation (the system message stays)
  /save FILE     write the conversation as JSON (resume it with --load FILE)
  /help          this text
  /quit, /exit   leave (so do Ctrl-D and Ctrl-C on an empty line)
Start a message with // to send a line that begins with /.
Ctrl-C while an answer streams stops that answer.";

/// The file format of `/save` and `--load`: the OpenAI chat request shape.
#[derive(Serialize, Deserialize)]
struct SavedConversation {
    messages: Vec<Message>,
}

/// The conversation so far and what is waiting to be sent with the next message.
#[derive(Default)]
struct Conversation {
    /// The system message; `None` lets the chat template add its default.
    system: Option<String>,
    /// User and assistant turns, oldest first.
    turns: Vec<Message>,
    /// Images and videos attached to the next user message.
    pending: Vec<ContentPart>,
}

impl Conversation {
    /// All messages: the system message (if any), then the turns.
    fn messages(&self) -> Vec<Message> {
        self.system
            .iter()
            .map(Message::system)
            .chain(self.turns.iter().cloned())
            .collect()
    }

    /// Reads a conversation written by `/save`: a leading system message becomes the
    /// system message, every other message a turn.
    fn load(path: &Path) -> Result<Self, CliError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?;
        let bad = |e: serde_json::Error| {
            CliError::Usage(format!(
                "{} is not a saved conversation: {e}",
                path.display()
            ))
        };
        let value: serde_json::Value = serde_json::from_str(&text).map_err(bad)?;
        let messages: Vec<Message> = if value.is_array() {
            serde_json::from_value(value).map_err(bad)?
        } else {
            serde_json::from_value::<SavedConversation>(value)
                .map_err(bad)?
                .messages
        };
        let mut conv = Conversation::default();
        let mut rest = messages.into_iter().peekable();
        if let Some(first) = rest.next_if(|m| m.role == Role::System) {
            conv.system = Some(plain_text(&first).ok_or_else(|| {
                CliError::Usage(format!(
                    "{}: the system message must be text only",
                    path.display()
                ))
            })?);
        }
        conv.turns = rest.collect();
        Ok(conv)
    }

    /// Writes the conversation (system message included) as pretty JSON.
    fn save(&self, path: &Path) -> Result<usize, CliError> {
        let saved = SavedConversation {
            messages: self.messages(),
        };
        let json = serde_json::to_string_pretty(&saved)
            .map_err(|e| CliError::Failed(format!("cannot encode the conversation: {e}")))?;
        std::fs::write(path, json + "\n")
            .map_err(|e| CliError::Failed(format!("cannot write {}: {e}", path.display())))?;
        Ok(saved.messages.len())
    }
}

/// The text of a message whose parts are all text, joined.
fn plain_text(m: &Message) -> Option<String> {
    use qwen2vl::processing::messages::PartRef;
    m.iter_parts()
        .map(|p| match p {
            PartRef::Text(t) => Some(t),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
        .map(|v| v.concat())
}

/// What one input line asks for.
#[derive(Debug, PartialEq)]
enum Line<'a> {
    /// Nothing (blank line).
    Empty,
    /// A user message.
    Say(&'a str),
    /// A `/command` and its argument (trimmed, possibly empty).
    Command(&'a str, &'a str),
}

/// Splits a line into a message or a command; `//text` is the message `/text`.
fn parse_line(line: &str) -> Line<'_> {
    let t = line.trim();
    if t.is_empty() {
        Line::Empty
    } else if t.starts_with("//") {
        Line::Say(&t[1..])
    } else if let Some(cmd) = t.strip_prefix('/') {
        let (name, arg) = cmd.split_once(char::is_whitespace).unwrap_or((cmd, ""));
        Line::Command(name, arg.trim())
    } else {
        Line::Say(t)
    }
}

/// Removes one pair of matching surrounding quotes (terminals add them to dropped files).
fn unquote(s: &str) -> &str {
    for q in ['"', '\''] {
        if let Some(inner) = s.strip_prefix(q).and_then(|r| r.strip_suffix(q)) {
            return inner;
        }
    }
    s
}

/// Checks a media source and makes local paths absolute, so a saved conversation still
/// finds its files when loaded from another directory. Remote URLs and `data:` URIs are
/// checked when the message is sent.
fn resolve_source(src: &str) -> Result<String, String> {
    let src = unquote(src.trim());
    if src.is_empty() {
        return Err("no path given".into());
    }
    match Location::parse(src) {
        Location::Path(p) => {
            let path = Path::new(p);
            if !path.is_file() {
                return Err(format!("{p}: no such file"));
            }
            Ok(std::path::absolute(path)
                .map(|a| a.to_string_lossy().into_owned())
                .unwrap_or_else(|_| p.to_string()))
        }
        _ => Ok(src.to_string()),
    }
}

/// The session: the model, the settings every turn shares, and the conversation.
struct Session<'p> {
    pipeline: &'p Pipeline,
    args: ChatArgs,
    conv: Conversation,
    /// Set by Ctrl-C; stops the answer being generated. Cleared before each input line.
    cancel: Arc<AtomicBool>,
    /// While true, Ctrl-C ends the process (exit 130): during loading, and while a script
    /// line is read. False for the whole interactive session (the prompt handles Ctrl-C).
    idle: Arc<AtomicBool>,
    /// Whether status messages go to stderr (`--quiet` turns them off).
    chatty: bool,
}

/// What the loop should do after a line.
#[derive(Debug, PartialEq)]
enum Next {
    Continue,
    Quit,
}

impl Session<'_> {
    /// A status line on stderr, unless `--quiet`.
    fn note(&self, msg: &str) {
        if self.chatty {
            eprintln!("{msg}");
        }
    }

    /// Attaches an image or video to the next user message.
    fn attach(&mut self, video: bool, src: &str) -> Result<(), String> {
        let source = resolve_source(src)?;
        let opts = self.args.media.options();
        self.conv.pending.push(if video {
            ContentPart::Video(VideoPart {
                min_pixels: opts.min_pixels,
                max_pixels: opts.max_pixels,
                fps: opts.fps,
                nframes: opts.nframes,
                ..VideoPart::new(source)
            })
        } else {
            ContentPart::Image(ImagePart {
                min_pixels: opts.min_pixels,
                max_pixels: opts.max_pixels,
                ..ImagePart::new(source)
            })
        });
        Ok(())
    }

    /// Handles one input line.
    fn handle(&mut self, line: &str) -> Next {
        match parse_line(line) {
            Line::Empty => {}
            Line::Say(text) => self.turn(text),
            Line::Command(name, arg) => return self.command(name, arg),
        }
        Next::Continue
    }

    /// Runs a `/command`.
    fn command(&mut self, name: &str, arg: &str) -> Next {
        match name {
            "quit" | "exit" => return Next::Quit,
            "help" => eprintln!("{HELP}"),
            "image" | "video" => {
                let video = name == "video";
                match self.attach(video, arg) {
                    Ok(()) => self.note(&format!(
                        "({} attached to your next message)",
                        if video { "video" } else { "image" }
                    )),
                    Err(e) => eprintln!("error: /{name}: {e}"),
                }
            }
            "system" => {
                if arg.is_empty() {
                    match &self.conv.system {
                        Some(s) => eprintln!("system: {s}"),
                        None => eprintln!("system: (the chat template's default)"),
                    }
                } else {
                    self.conv.system = Some(arg.to_string());
                    self.note("(system message replaced)");
                }
            }
            "reset" => {
                self.conv.turns.clear();
                self.conv.pending.clear();
                self.note("(conversation cleared)");
            }
            "save" => {
                if arg.is_empty() {
                    eprintln!("error: /save needs a file name");
                } else {
                    match self.conv.save(Path::new(unquote(arg))) {
                        Ok(n) => self.note(&format!("(saved {n} messages to {arg})")),
                        Err(e) => eprintln!("error: {e}"),
                    }
                }
            }
            _ => eprintln!("unknown command /{name} (/help lists the commands)"),
        }
        Next::Continue
    }

    /// Sends one user message and streams the answer. On success the message and the answer
    /// join the conversation; on failure neither does, and the attachments are dropped.
    fn turn(&mut self, text: &str) {
        let mut parts = std::mem::take(&mut self.conv.pending);
        let user = if parts.is_empty() {
            Message::user(text)
        } else {
            parts.push(ContentPart::text(text));
            Message::parts(Role::User, parts)
        };
        let mut messages = self.conv.messages();
        messages.push(user.clone());
        let mut req = GenerateRequest::new(messages)
            .with_sampling(self.args.sampling.params(self.pipeline))
            .with_max_new_tokens(self.args.sampling.max_new_tokens);
        req.add_vision_id = self.args.media.add_vision_id;
        req.fetch = self.args.media.fetch();
        req.ignore_eos = self.args.ignore_eos;
        req.cancel = Some(self.cancel.clone());

        let stdout = std::io::stdout();
        let mut wrote = false;
        let result = self.pipeline.generate(&req, &mut |piece: &str| {
            let mut out = stdout.lock();
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
            wrote = true;
        });
        match result {
            Ok(gen) => {
                let _ = writeln!(stdout.lock());
                if gen.finish_reason == FinishReason::Cancelled {
                    self.note("(answer stopped)");
                }
                if self.args.stats {
                    let u = &gen.usage;
                    eprintln!(
                        "[prompt {} tokens ({} image, {} video, {} cached), answer {} tokens, {}, first token {:.0} ms, {:.1} tokens/s]",
                        u.prompt_tokens,
                        u.prompt_image_tokens,
                        u.prompt_video_tokens,
                        u.prompt_cached_tokens,
                        u.completion_tokens,
                        gen.finish_reason,
                        gen.timings.ttft_ms,
                        gen.timings.decode_tokens_per_s
                    );
                }
                self.conv.turns.push(user);
                self.conv.turns.push(Message::assistant(gen.text));
            }
            Err(e) => {
                if wrote {
                    let _ = writeln!(stdout.lock());
                }
                eprintln!("error: {}", CliError::from(e));
            }
        }
    }
}

/// Where the line-editing history lives: `$XDG_CACHE_HOME/qwen2vl/chat_history`, else
/// `~/.cache/qwen2vl/chat_history`.
fn history_path() -> Option<PathBuf> {
    let non_empty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    let cache = non_empty("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| non_empty("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(cache.join("qwen2vl").join("chat_history"))
}

/// Ctrl-C at the prompt: clears a non-empty line, or (on an empty one) asks to leave.
/// Records which it was so the loop can tell the two apart.
struct CtrlC {
    line_was_empty: Arc<AtomicBool>,
}

impl rustyline::ConditionalEventHandler for CtrlC {
    fn handle(
        &self,
        _evt: &rustyline::Event,
        _n: rustyline::RepeatCount,
        _positive: bool,
        ctx: &rustyline::EventContext,
    ) -> Option<rustyline::Cmd> {
        self.line_was_empty
            .store(ctx.line().is_empty(), Ordering::SeqCst);
        Some(rustyline::Cmd::Interrupt)
    }
}

/// The interactive loop: a line editor with history.
fn interactive(session: &mut Session) -> Result<(), CliError> {
    use rustyline::error::ReadlineError;
    let config = rustyline::Config::builder()
        .auto_add_history(false)
        .max_history_size(1000)
        .map_err(|e| CliError::Failed(e.to_string()))?
        .build();
    let mut editor: rustyline::DefaultEditor = rustyline::Editor::with_config(config)
        .map_err(|e| CliError::Failed(format!("cannot start the line editor: {e}")))?;
    let line_was_empty = Arc::new(AtomicBool::new(true));
    editor.bind_sequence(
        rustyline::KeyEvent::ctrl('C'),
        rustyline::EventHandler::Conditional(Box::new(CtrlC {
            line_was_empty: line_was_empty.clone(),
        })),
    );
    let history = history_path();
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    session.note(&format!(
        "Chatting with {}. /help lists the commands; Ctrl-D or /quit leaves.",
        session.args.model.model
    ));
    // From here on Ctrl-C never ends the process: at the prompt it is a key (see `CtrlC`),
    // anywhere else it stops the current answer, even when pressed just after Enter.
    session.idle.store(false, Ordering::SeqCst);
    loop {
        session.cancel.store(false, Ordering::SeqCst);
        match editor.readline(">>> ") {
            Ok(line) => {
                if !line.trim().is_empty() {
                    let _ = editor.add_history_entry(line.as_str());
                }
                if session.handle(&line) == Next::Quit {
                    break;
                }
            }
            Err(ReadlineError::Interrupted) => {
                if line_was_empty.load(Ordering::SeqCst) {
                    break;
                }
            }
            Err(ReadlineError::Eof) => break,
            Err(e) => {
                save_history(&mut editor, history.as_deref());
                return Err(CliError::Failed(format!("cannot read the prompt: {e}")));
            }
        }
    }
    save_history(&mut editor, history.as_deref());
    Ok(())
}

/// Writes the line-editing history, best effort (a read-only home is not an error).
fn save_history(editor: &mut rustyline::DefaultEditor, path: Option<&Path>) {
    if let Some(p) = path {
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = editor.save_history(p);
    }
}

/// The scripted loop: stdin is not a terminal, so read it line by line, no prompt.
fn scripted(session: &mut Session) -> Result<(), CliError> {
    let mut stdin = std::io::stdin().lock();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        session.idle.store(true, Ordering::SeqCst);
        let n = stdin.read_until(b'\n', &mut buf)?;
        session.idle.store(false, Ordering::SeqCst);
        session.cancel.store(false, Ordering::SeqCst);
        if n == 0 {
            return Ok(());
        }
        let line = String::from_utf8_lossy(&buf);
        if session.handle(&line) == Next::Quit {
            return Ok(());
        }
    }
}

/// Runs `qwen2vl chat`.
pub fn main(args: ChatArgs) -> Result<(), CliError> {
    let mut conv = match &args.load {
        Some(path) => Conversation::load(path)?,
        None => Conversation::default(),
    };
    if let Some(s) = &args.system {
        conv.system = Some(s.clone());
    }

    // Ctrl-C (SIGINT) sets `cancel`, which stops the answer being generated; while `idle`
    // (loading, waiting for a script line) it ends the process with the shell's 130 instead.
    // At the interactive prompt the terminal is in raw mode and Ctrl-C arrives as a key (see
    // `CtrlC`). The shutdown action is registered first so it runs before `cancel` is set.
    let cancel = Arc::new(AtomicBool::new(false));
    let idle = Arc::new(AtomicBool::new(true));
    let sigint = signal_hook::consts::SIGINT;
    signal_hook::flag::register_conditional_shutdown(sigint, 130, idle.clone())
        .and_then(|_| signal_hook::flag::register(sigint, cancel.clone()))
        .map_err(|e| CliError::Failed(format!("cannot install the Ctrl-C handler: {e}")))?;

    let pipeline = args.model.load_with_cache(&args.encoder_cache)?;
    let chatty = !args.model.quiet;
    let (images, videos) = (args.images.clone(), args.videos.clone());
    let mut session = Session {
        pipeline: &pipeline,
        args,
        conv,
        cancel,
        idle,
        chatty,
    };
    for (video, src) in images
        .iter()
        .map(|s| (false, s))
        .chain(videos.iter().map(|s| (true, s)))
    {
        session.attach(video, src).map_err(|e| {
            CliError::Usage(format!("--{}: {e}", if video { "video" } else { "image" }))
        })?;
    }
    if !session.conv.turns.is_empty() {
        session.note(&format!(
            "(resumed a conversation of {} messages)",
            session.conv.turns.len()
        ));
    }
    if std::io::stdin().is_terminal() {
        interactive(&mut session)
    } else {
        scripted(&mut session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        assert_eq!(parse_line("  "), Line::Empty);
        assert_eq!(parse_line(" hi there \n"), Line::Say("hi there"));
        assert_eq!(parse_line("//etc is"), Line::Say("/etc is"));
        assert_eq!(
            parse_line("/image  a b.png "),
            Line::Command("image", "a b.png")
        );
        assert_eq!(parse_line("/reset"), Line::Command("reset", ""));
        assert_eq!(unquote("'a b.png'"), "a b.png");
        assert_eq!(unquote("\"a\""), "a");
        assert_eq!(unquote("\"a"), "\"a");
    }
}
