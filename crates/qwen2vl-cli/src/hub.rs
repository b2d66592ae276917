//! Where `--model` points: a local directory, or a Hugging Face Hub repo id.
//!
//! Hub models are fetched with `hf-hub` into the standard Hugging Face cache layout
//! (`models--owner--name/{blobs,snapshots/<commit>,refs/<revision>}`), so files downloaded
//! by the Python tools are reused and ours are reused by them. The environment is read the
//! way `huggingface_hub` reads it:
//!
//! - `HF_HUB_CACHE` (or the legacy `HUGGINGFACE_HUB_CACHE`), else `$HF_HOME/hub`, else
//!   `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`;
//! - `HF_ENDPOINT` (default `https://huggingface.co`);
//! - `HF_TOKEN`, else the file `HF_TOKEN_PATH`, else `$HF_HOME/token`;
//! - `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) = 1/true/yes/on: the cache only, never the
//!   network;
//! - `HF_HUB_DISABLE_PROGRESS_BARS` = 1: no progress bars.
//!
//! hf-hub 0.5 itself reads only `HF_HOME` and `HF_ENDPOINT` and the token file next to the
//! cache, so the cache, endpoint and token are worked out here and handed to it.
//!
//! Partial downloads live in `blobs/<etag>.part` and are resumed with a Range request by the
//! next attempt (and up to three times within one attempt); a partial download the Python
//! tools left (`blobs/<etag>.incomplete`) is resumed too. A finished file whose size is not
//! the size the hub announced is removed rather than left in the cache.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::Args;
use hf_hub::api::sync::{Api, ApiBuilder, ApiError, ApiRepo};
use hf_hub::api::Progress;
use hf_hub::{Cache, Repo, RepoType};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

use crate::error::CliError;

/// The model used when `--model` is not given.
pub const DEFAULT_MODEL: &str = "Qwen/Qwen2-VL-2B-Instruct";

/// The hub everyone means when `HF_ENDPOINT` is not set.
const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Files fetched when the repo has them, besides the weights.
const MODEL_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
];

/// Files a checkpoint cannot run without (the weights are checked separately).
const REQUIRED_FILES: &[&str] = &["config.json", "tokenizer.json"];

/// What to do when the hub cannot be used: the sentence every "unavailable" error ends with.
const ELSEWHERE: &str = "or download the model elsewhere and pass --model /path/to/dir";

/// `qwen2vl download`: fetch a model from the Hugging Face Hub into the local cache.
#[derive(Args, Debug, Clone)]
pub struct DownloadArgs {
    /// Hub repo id, optionally with a revision (branch, tag or commit): owner/name[@revision].
    pub repo: String,
    /// Revision to fetch (branch, tag or commit); overrides an `@revision` in REPO.
    #[arg(long)]
    pub revision: Option<String>,
    /// No progress bars or status lines on stderr (errors are still printed).
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// Runs `qwen2vl download`: fetches the model files and prints the snapshot directory.
pub fn download_main(args: DownloadArgs) -> Result<(), CliError> {
    let mut spec = parse_repo_spec(&args.repo).ok_or_else(|| {
        CliError::Usage(format!(
            "{:?} is not a hub repo id: expected owner/name or owner/name@revision",
            args.repo
        ))
    })?;
    if let Some(rev) = args.revision {
        if rev.trim().is_empty() {
            return Err(CliError::Usage("--revision must not be empty".into()));
        }
        spec.revision = rev;
    }
    let dir = resolve_repo(&spec, &HubEnv::from_env()?, args.quiet)?;
    println!("{}", dir.display());
    Ok(())
}

/// Resolves `--model` to a local directory: an existing directory as is, a hub repo id
/// (`owner/name[@revision]`) through the cache, downloading what is missing.
pub fn resolve_model(spec: &str, quiet: bool) -> Result<PathBuf, CliError> {
    let p = PathBuf::from(spec);
    if p.is_dir() {
        return Ok(p);
    }
    // Something that looks like a path (./x, /x, ~/x, x/y/z) is a missing directory, not a repo.
    let looks_like_path = spec.starts_with('.')
        || spec.starts_with('/')
        || spec.starts_with('~')
        || spec.contains('\\');
    match parse_repo_spec(spec) {
        Some(repo) if !looks_like_path => resolve_repo(&repo, &HubEnv::from_env()?, quiet),
        _ => Err(CliError::Usage(format!(
            "model directory {spec} not found: give a directory holding config.json, \
             *.safetensors and tokenizer.json, or a Hugging Face repo id owner/name[@revision]"
        ))),
    }
}

/// A hub model reference: `owner/name` and a revision (`main` unless given).
#[derive(Debug, Clone, PartialEq, Eq)]
struct RepoSpec {
    id: String,
    revision: String,
}

/// Parses `owner/name[@revision]`; `None` when it is not of that form. Names follow the hub's
/// rules: letters, digits, `-`, `_` and `.`, not starting with `.` or `-`, no `..`.
fn parse_repo_spec(spec: &str) -> Option<RepoSpec> {
    let (id, revision) = match spec.split_once('@') {
        Some((id, rev)) => (id, rev),
        None => (spec, "main"),
    };
    if revision.is_empty() || revision.contains("..") || revision.chars().any(char::is_whitespace) {
        return None;
    }
    let (owner, name) = id.split_once('/')?;
    let ok = |part: &str| {
        !part.is_empty()
            && part.len() <= 96
            && !part.starts_with(['.', '-'])
            && !part.contains("..")
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    (ok(owner) && ok(name)).then(|| RepoSpec {
        id: id.to_string(),
        revision: revision.to_string(),
    })
}

/// The Hugging Face settings from the environment.
#[derive(Debug, Clone)]
struct HubEnv {
    /// The hub cache directory (`.../huggingface/hub`).
    cache: PathBuf,
    /// Base URL, without a trailing slash.
    endpoint: String,
    token: Option<String>,
    offline: bool,
    /// `HF_HUB_DISABLE_PROGRESS_BARS` is set.
    no_bars: bool,
}

/// Whether an environment variable holds one of Python's true values.
fn env_true(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

/// A non-empty environment variable.
fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl HubEnv {
    /// Reads the settings the way `huggingface_hub` does (see the module docs).
    fn from_env() -> Result<Self, CliError> {
        let home_cache = || -> Result<PathBuf, CliError> {
            if let Some(x) = env_nonempty("XDG_CACHE_HOME") {
                return Ok(PathBuf::from(x));
            }
            std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
                .ok_or_else(|| {
                    CliError::Unavailable(
                        "no Hugging Face cache directory: set HF_HOME or HF_HUB_CACHE (HOME is \
                         not set)"
                            .into(),
                    )
                })
        };
        let hf_home = match env_nonempty("HF_HOME") {
            Some(h) => PathBuf::from(h),
            None => home_cache()?.join("huggingface"),
        };
        let cache = env_nonempty("HF_HUB_CACHE")
            .or_else(|| env_nonempty("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let endpoint = env_nonempty("HF_ENDPOINT")
            .unwrap_or_else(|| DEFAULT_ENDPOINT.into())
            .trim_end_matches('/')
            .to_string();
        let token_file = env_nonempty("HF_TOKEN_PATH")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("token"));
        let token = env_nonempty("HF_TOKEN")
            .or_else(|| env_nonempty("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| std::fs::read_to_string(token_file).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        Ok(HubEnv {
            cache,
            endpoint,
            token,
            offline: env_true("HF_HUB_OFFLINE") || env_true("TRANSFORMERS_OFFLINE"),
            no_bars: env_true("HF_HUB_DISABLE_PROGRESS_BARS"),
        })
    }

    /// hf-hub's view of the repo at its revision.
    fn repo(&self, spec: &RepoSpec) -> Repo {
        Repo::with_revision(spec.id.clone(), RepoType::Model, spec.revision.clone())
    }

    /// `models--owner--name` in the cache.
    fn repo_dir(&self, spec: &RepoSpec) -> PathBuf {
        self.cache.join(self.repo(spec).folder_name())
    }
}

/// The snapshot directory for `spec`, downloading what the cache lacks (or, offline or with
/// the hub unreachable, the cached snapshot).
fn resolve_repo(spec: &RepoSpec, env: &HubEnv, quiet: bool) -> Result<PathBuf, CliError> {
    if env.offline {
        return cached_snapshot(spec, env).map_err(|why| {
            CliError::Unavailable(format!(
                "{}@{} is not usable from the cache {} ({why}) and HF_HUB_OFFLINE is set: unset \
                 HF_HUB_OFFLINE to download it, {ELSEWHERE}",
                spec.id,
                spec.revision,
                env.cache.display()
            ))
        });
    }
    // A commit never changes: when its snapshot is complete there is nothing to ask the hub.
    if is_commit(&spec.revision) {
        if let Ok(dir) = cached_snapshot(spec, env) {
            return Ok(dir);
        }
    }
    // hf-hub panics on a few malformed answers (a redirect without Location); report those as
    // errors like any other unexpected answer instead of a panic message.
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        fetch_repo(spec, env, quiet)
    }));
    std::panic::set_hook(previous_hook);
    result.unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "hf-hub failed".into());
        Err(CliError::Unavailable(format!(
            "unexpected answer from {} for {}@{} ({why}): check that HF_ENDPOINT is a \
             Hugging Face hub, {ELSEWHERE}",
            env.endpoint, spec.id, spec.revision
        )))
    })
}

/// The online part of [`resolve_repo`]: repo info, then every missing file.
fn fetch_repo(spec: &RepoSpec, env: &HubEnv, quiet: bool) -> Result<PathBuf, CliError> {
    let api = ApiBuilder::from_cache(Cache::new(env.cache.clone()))
        .with_endpoint(env.endpoint.clone())
        .with_token(env.token.clone())
        .with_progress(false)
        .with_retries(3)
        .with_user_agent("qwen2vl", env!("CARGO_PKG_VERSION"))
        .build()
        .map_err(|e| CliError::Failed(format!("cannot set up the hub client: {e}")))?;
    let repo = api.repo(env.repo(spec));
    let info = match repo.info() {
        Ok(info) => info,
        Err(e) => {
            let err = describe(&e, spec, env, None);
            // Like huggingface_hub: no network, but a complete snapshot cached → use it.
            if is_network(&e) {
                if let Ok(dir) = cached_snapshot(spec, env) {
                    if !quiet {
                        eprintln!("warning: {err}; using the cached {}", dir.display());
                    }
                    return Ok(dir);
                }
            }
            return Err(err);
        }
    };
    let available: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    for f in REQUIRED_FILES {
        if !available.contains(f) {
            return Err(CliError::Usage(format!(
                "{}@{} has no {f}: it is not a Hugging Face-format Qwen2-VL checkpoint",
                spec.id, spec.revision
            )));
        }
    }
    let snapshot = env.repo_dir(spec).join("snapshots").join(&info.sha);
    let show = Show::new(quiet, env.no_bars);
    let mut files: Vec<String> = MODEL_FILES
        .iter()
        .filter(|f| available.contains(f))
        .map(|f| f.to_string())
        .collect();
    const INDEX: &str = "model.safetensors.index.json";
    if available.contains(&INDEX) {
        let index = fetch_file(&api, &repo, spec, env, &snapshot, INDEX, show)?;
        files.extend(shards(&index)?);
    } else if available.contains(&"model.safetensors") {
        files.push("model.safetensors".into());
    } else {
        return Err(CliError::Usage(format!(
            "{}@{} has neither model.safetensors nor model.safetensors.index.json: qwen2vl \
             reads safetensors checkpoints only",
            spec.id, spec.revision
        )));
    }
    for f in &files {
        fetch_file(&api, &repo, spec, env, &snapshot, f, show)?;
    }
    // Record branch/tag → commit even when every file was already cached, as huggingface_hub
    // does, so a later offline run finds this revision.
    if spec.revision != info.sha {
        Cache::new(env.cache.clone())
            .repo(env.repo(spec))
            .create_ref(&info.sha)
            .map_err(|e| CliError::Failed(format!("cannot write to the cache: {e}")))?;
    }
    Ok(snapshot)
}

/// The shard files listed in a `model.safetensors.index.json`, sorted, without duplicates.
fn shards(index: &Path) -> Result<Vec<String>, CliError> {
    let bad = |why: String| CliError::Usage(format!("{}: {why}", index.display()));
    let text = std::fs::read_to_string(index).map_err(|e| bad(e.to_string()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no \"weight_map\" object".into()))?;
    let mut v: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    v.sort();
    v.dedup();
    if let Some(s) = v.iter().find(|s| s.contains("..") || s.starts_with('/')) {
        return Err(bad(format!("shard name {s:?} points outside the repo")));
    }
    Ok(v)
}

/// One file into `snapshot` (skipped when already there); returns its path there.
fn fetch_file(
    api: &Api,
    repo: &ApiRepo,
    spec: &RepoSpec,
    env: &HubEnv,
    snapshot: &Path,
    file: &str,
    show: Show,
) -> Result<PathBuf, CliError> {
    let target = snapshot.join(file);
    if target.is_file() {
        return Ok(target);
    }
    let url = repo.url(file);
    let meta = api
        .metadata(&url)
        .map_err(|e| describe(&e, spec, env, Some(file)))?;
    let blob = env.repo_dir(spec).join("blobs").join(meta.etag());
    // hf-hub's partial file (the name it gives it).
    let part = blob.with_extension("part");
    adopt_python_partial(env, spec, meta.etag(), &part);
    // A partial download longer than the file cannot be resumed: start over.
    if std::fs::metadata(&part).is_ok_and(|m| m.len() > meta.size() as u64) {
        let _ = std::fs::remove_file(&part);
    }
    let path = repo
        .download_with_progress(file, FileBar::new(show))
        .map_err(|e| describe(&e, spec, env, Some(file)))?;
    let got = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    if got != meta.size() as u64 {
        // Never leave a truncated or overlong file in the cache.
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&blob);
        return Err(CliError::Unavailable(format!(
            "download of {file} from {} was incomplete ({got} of {} bytes): run the command \
             again, {ELSEWHERE}",
            spec.id,
            meta.size()
        )));
    }
    if meta.commit_hash() != snapshot.file_name().and_then(|s| s.to_str()).unwrap_or("") {
        return Err(CliError::Unavailable(format!(
            "{}@{} changed while downloading (now at commit {}): run the command again",
            spec.id,
            spec.revision,
            meta.commit_hash()
        )));
    }
    Ok(path)
}

/// Resumes from a partial download left by the Python tools (`blobs/<etag>.incomplete`) by
/// renaming it to hf-hub's `blobs/<etag>.part`, unless hf-hub already has one or a Python
/// process holds that blob's lock (`.locks/models--owner--name/<etag>.lock`, an flock).
fn adopt_python_partial(env: &HubEnv, spec: &RepoSpec, etag: &str, part: &Path) {
    let incomplete = env
        .repo_dir(spec)
        .join("blobs")
        .join(format!("{etag}.incomplete"));
    if part.exists() || !incomplete.is_file() {
        return;
    }
    let lock_path = env
        .cache
        .join(".locks")
        .join(env.repo(spec).folder_name())
        .join(format!("{etag}.lock"));
    // Held while renaming; closing the file releases the lock.
    let _lock = match std::fs::File::open(&lock_path) {
        Ok(f) => {
            if !try_lock(&f) {
                return; // a Python download of this blob is running
            }
            Some(f)
        }
        Err(_) => None,
    };
    let _ = std::fs::rename(&incomplete, part);
}

/// Takes an exclusive flock without waiting (what Python's `filelock` uses on Unix).
#[cfg(unix)]
fn try_lock(f: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Elsewhere a Python partial download is never adopted.
#[cfg(not(unix))]
fn try_lock(_f: &std::fs::File) -> bool {
    false
}

/// Whether a revision is a full commit hash (40 hex digits) rather than a branch or tag.
fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

/// The cached snapshot of `spec` when it holds a loadable model; otherwise why not.
fn cached_snapshot(spec: &RepoSpec, env: &HubEnv) -> Result<PathBuf, String> {
    let repo_dir = env.repo_dir(spec);
    let commit = if is_commit(&spec.revision) {
        spec.revision.clone()
    } else {
        let r = repo_dir.join("refs").join(&spec.revision);
        std::fs::read_to_string(&r)
            .map(|s| s.trim().to_string())
            .map_err(|_| format!("revision {} was never downloaded", spec.revision))?
    };
    let dir = repo_dir.join("snapshots").join(&commit);
    if !dir.is_dir() {
        return Err(format!("snapshot {commit} is missing"));
    }
    for f in REQUIRED_FILES {
        if !dir.join(f).is_file() {
            return Err(format!("the cached snapshot has no {f}"));
        }
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let list = shards(&index).map_err(|e| e.to_string())?;
        if let Some(s) = list.iter().find(|s| !dir.join(s).is_file()) {
            return Err(format!("the cached snapshot lacks the weights shard {s}"));
        }
    } else if !dir.join("model.safetensors").is_file() {
        return Err("the cached snapshot has no weights".into());
    }
    Ok(dir)
}

/// Whether the error is about reaching the hub at all (rather than an answer from it).
fn is_network(e: &ApiError) -> bool {
    match e {
        ApiError::RequestError(e) => is_transport(e),
        ApiError::TooManyRetries(e) => is_network(e),
        ApiError::IoError(_) => true,
        _ => false,
    }
}

/// Whether a ureq error means the server could not be reached or the connection broke.
fn is_transport(e: &ureq::Error) -> bool {
    matches!(
        e,
        ureq::Error::Io(_)
            | ureq::Error::Timeout(_)
            | ureq::Error::HostNotFound
            | ureq::Error::ConnectionFailed
            | ureq::Error::ConnectProxyFailed(_)
            | ureq::Error::Tls(_)
            | ureq::Error::Rustls(_)
    )
}

/// A one-line error that says what went wrong and what to do instead.
fn describe(e: &ApiError, spec: &RepoSpec, env: &HubEnv, file: Option<&str>) -> CliError {
    let what = match file {
        Some(f) => format!("{f} of {}@{}", spec.id, spec.revision),
        None => format!("{}@{}", spec.id, spec.revision),
    };
    let endpoint = &env.endpoint;
    match e {
        ApiError::TooManyRetries(inner) => describe(inner, spec, env, file),
        ApiError::RequestError(re) => match **re {
            ureq::Error::StatusCode(404) => CliError::Unavailable(format!(
                "{what} not found on {endpoint} (HTTP 404): check the repo id and revision, \
                 {ELSEWHERE}"
            )),
            ureq::Error::StatusCode(code @ (401 | 403)) => {
                let token = if env.token.is_some() {
                    "the token in use (HF_TOKEN or the token file) has no access to it: request \
                     access on the model page or use another token"
                } else {
                    "if it is private or gated, accept its terms on the model page and set \
                     HF_TOKEN to an access token"
                };
                CliError::Unavailable(format!(
                    "{endpoint} refused {what} (HTTP {code}): the repo does not exist or needs \
                     a token; {token}, {ELSEWHERE}"
                ))
            }
            ureq::Error::StatusCode(code) => CliError::Unavailable(format!(
                "{endpoint} answered HTTP {code} for {what}: try again later, {ELSEWHERE}"
            )),
            ref other if is_transport(other) => CliError::Unavailable(format!(
                "cannot reach {endpoint} for {what} ({other}): check the network and \
                 HF_ENDPOINT (nothing usable is cached), {ELSEWHERE}"
            )),
            ref other => CliError::Unavailable(format!(
                "unexpected answer from {endpoint} for {what} ({other}): check that \
                 HF_ENDPOINT is a Hugging Face hub, {ELSEWHERE}"
            )),
        },
        ApiError::IoError(io) => CliError::Unavailable(format!(
            "download of {what} failed ({io}): run the command again to resume, {ELSEWHERE}"
        )),
        ApiError::MissingHeader(_) | ApiError::InvalidHeader(_) | ApiError::ParseIntError(_) => {
            CliError::Unavailable(format!(
                "unexpected answer from {endpoint} for {what} ({e}): check that \
                 HF_ENDPOINT is a Hugging Face hub, {ELSEWHERE}"
            ))
        }
        ApiError::LockAcquisition(lock) => CliError::Unavailable(format!(
            "another process is downloading {what} (lock {}): wait for it, or remove the lock \
             file if no download is running",
            lock.display()
        )),
        other => CliError::Unavailable(format!(
            "download of {what} failed ({other}): run the command again, {ELSEWHERE}"
        )),
    }
}

/// How downloads are shown on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Show {
    /// Nothing (`--quiet`).
    Nothing,
    /// One plain line per file (stderr is not a terminal, or bars are disabled).
    Lines,
    /// A progress bar per file.
    Bars,
}

impl Show {
    fn new(quiet: bool, no_bars: bool) -> Self {
        if quiet {
            Show::Nothing
        } else if no_bars || !std::io::stderr().is_terminal() {
            Show::Lines
        } else {
            Show::Bars
        }
    }
}

/// hf-hub's per-file progress hook, drawn as an indicatif bar or one plain line.
struct FileBar {
    show: Show,
    bar: Option<ProgressBar>,
}

impl FileBar {
    fn new(show: Show) -> Self {
        FileBar { show, bar: None }
    }
}

impl Progress for FileBar {
    /// Called at the start and again at every resumed attempt, with the whole file's size.
    fn init(&mut self, size: usize, filename: &str) {
        match (self.show, &self.bar) {
            (Show::Nothing, _) => {}
            (Show::Lines, None) => {
                eprintln!("downloading {filename} ({})", HumanBytes(size as u64));
                self.bar = Some(ProgressBar::hidden());
            }
            (Show::Bars, None) => {
                let style = ProgressStyle::with_template(
                    "{msg:>28} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
                let bar = ProgressBar::new(size as u64).with_style(style);
                bar.set_message(filename.to_string());
                self.bar = Some(bar);
            }
            (_, Some(bar)) => {
                // A resumed attempt re-reports what is already on disk through `update`.
                bar.set_length(size as u64);
                bar.set_position(0);
            }
        }
    }

    fn update(&mut self, size: usize) {
        if let Some(bar) = &self.bar {
            bar.inc(size as u64);
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_specs() {
        let r = parse_repo_spec("Qwen/Qwen2-VL-2B-Instruct").unwrap();
        assert_eq!(
            (r.id.as_str(), r.revision.as_str()),
            ("Qwen/Qwen2-VL-2B-Instruct", "main")
        );
        let r = parse_repo_spec("a_b/c.d-e@v1.0").unwrap();
        assert_eq!((r.id.as_str(), r.revision.as_str()), ("a_b/c.d-e", "v1.0"));
        for bad in [
            "noslash", "a/b/c", "/abs", "a/", "../x", "a/..", "a/b@", "a b/c", "a/b@x y", "-a/b",
        ] {
            assert!(parse_repo_spec(bad).is_none(), "{bad} should be rejected");
        }
    }
}
