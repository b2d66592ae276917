//! Image sources → encoded bytes: local paths, `file://` URLs, `data:` URIs, raw bytes and
//! (when allowed) `http(s)://` URLs, each with a size cap.
//!
//! Reference: qwen-vl-utils 0.0.8 `fetch_image`, which opens `http(s)://` URLs with
//! `requests.get(url, stream=True)`, strips `file://` (7 characters, nothing decoded), decodes
//! `data:image…;base64,…` with `base64.b64decode` and treats anything else as a path. This
//! module does the same and a little more, where the reference would fail on input a user
//! reasonably sends: percent-encoded and non-base64 `data:` URIs (RFC 2397), base64 without
//! padding or with line breaks, and `file://` URLs with `%20`-style escapes (tried only when the
//! literal path does not exist). What comes back is handed to
//! [`decode_image`](crate::processing::image::decode_image).
//!
//! Remote fetching is off by default ([`FetchOptions::allow_remote`]): a library that reads
//! URLs out of untrusted messages must not reach the network unless its user asked for it.

use std::borrow::Cow;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;

use crate::processing::image::MAX_FILE_BYTES;
use crate::processing::messages::{ImageSource, Location};
use crate::{Error, Result};

/// Default timeout of a whole http(s) request (connect, headers and body).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How image sources are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchOptions {
    /// Fetch `http://` / `https://` URLs. Off by default in the library (a URL in a message is
    /// then a bad input); the CLI and server turn it on.
    pub allow_remote: bool,
    /// Limit on a whole http(s) request, from connecting to the last body byte.
    pub timeout: Duration,
    /// Largest encoded image accepted from any source (file, URL, data URI, bytes).
    pub max_bytes: u64,
    /// Largest video accepted from a URL or data URI (local files are read in place, only
    /// the sampled frames are kept).
    pub max_video_bytes: u64,
    /// Refuse http(s) URLs whose host resolves to a loopback, private, link-local,
    /// unspecified, multicast or other non-public address, on the first request and after
    /// every redirect (redirects are then followed one hop at a time, each hop checked). Off
    /// by default; a server fetching URLs out of untrusted requests turns it on.
    pub refuse_private_hosts: bool,
    /// When to give up: a deadline and a cancel flag, checked inside every loop over
    /// untrusted data (downloads, demuxing, decoding, resizing) so that a slow or hostile
    /// input cannot hold a preprocessing thread past its deadline.
    pub interrupt: Interrupt,
    /// The most vision tokens the item being read may become, checked from header sizes and
    /// the item's settings before any pixel is decoded. The processor sets it per item from
    /// what the model's context leaves; `None`: unchecked here.
    pub token_budget: Option<usize>,
}

/// A deadline and a cancel flag for a preprocessing job (see [`FetchOptions::interrupt`]).
/// The default never interrupts.
#[derive(Debug, Clone, Default)]
pub struct Interrupt {
    /// Work still running at this instant fails with [`Error::BadInput`] ("took longer
    /// than …").
    pub deadline: Option<std::time::Instant>,
    /// The budget the deadline was computed from, for the message.
    pub budget: Option<Duration>,
    /// Set from elsewhere (a disconnect, a shutdown) to stop the work at the next check.
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl PartialEq for Interrupt {
    fn eq(&self, other: &Self) -> bool {
        self.deadline == other.deadline
            && self.budget == other.budget
            && match (&self.cancel, &other.cancel) {
                (None, None) => true,
                (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b),
                _ => false,
            }
    }
}

impl Eq for Interrupt {}

impl Interrupt {
    /// A deadline `budget` from now, with an optional cancel flag.
    pub fn within(
        budget: Duration,
        cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    ) -> Self {
        Interrupt {
            deadline: std::time::Instant::now().checked_add(budget),
            budget: Some(budget),
            cancel,
        }
    }

    /// Whether the work should stop now (cancelled or past the deadline).
    pub fn is_set(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
            || self
                .deadline
                .is_some_and(|d| std::time::Instant::now() >= d)
    }

    /// `Ok` while the work may go on; otherwise an error naming `what` was being done.
    pub fn check(&self, what: &str) -> Result<()> {
        if self
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        {
            return Err(Error::bad_input(
                format!("{what} was cancelled"),
                "a request that is not cancelled",
            ));
        }
        if self
            .deadline
            .is_some_and(|d| std::time::Instant::now() >= d)
        {
            let budget = self
                .budget
                .map(|b| format!("{:.0} s", b.as_secs_f64()))
                .unwrap_or_else(|| "its deadline".to_string());
            return Err(Error::bad_input(
                format!("{what} took longer than the preprocessing limit"),
                format!("media that can be read and decoded within {budget}"),
            ));
        }
        Ok(())
    }
}

/// Default [`FetchOptions::max_video_bytes`]: 2 GiB.
pub const MAX_VIDEO_BYTES: u64 = 2 << 30;

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            allow_remote: false,
            timeout: DEFAULT_TIMEOUT,
            max_bytes: MAX_FILE_BYTES,
            max_video_bytes: MAX_VIDEO_BYTES,
            refuse_private_hosts: false,
            interrupt: Interrupt::default(),
            token_budget: None,
        }
    }
}

impl FetchOptions {
    /// The defaults with remote fetching turned on.
    pub fn remote() -> Self {
        FetchOptions {
            allow_remote: true,
            ..Default::default()
        }
    }
}

/// Encoded image bytes and a short name of where they came from (for error messages: a path,
/// a URL, `data: URI (N bytes)` or `image bytes`; never a data URI's payload).
#[derive(Debug, Clone)]
pub struct Fetched<'a> {
    /// The encoded image.
    pub bytes: Cow<'a, [u8]>,
    /// Where it came from.
    pub origin: String,
}

/// A URL or path shortened for a message.
fn shorten(s: &str) -> String {
    const MAX: usize = 200;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head}…")
    }
}

fn size_error(what: String, max_bytes: u64) -> Error {
    Error::bad_input(
        what,
        format!(
            "images of at most {} bytes ({} MiB)",
            max_bytes,
            max_bytes >> 20
        ),
    )
}

/// Reads the encoded bytes of an image source. Relative paths (and relative `file://` paths)
/// are resolved against `base_dir` when given. Errors are [`Error::BadInput`] naming the
/// path or URL, what was wrong and what is allowed.
pub fn fetch<'a>(
    source: &'a ImageSource,
    opts: &FetchOptions,
    base_dir: Option<&Path>,
) -> Result<Fetched<'a>> {
    match source {
        ImageSource::Bytes(b) => {
            if b.len() as u64 > opts.max_bytes {
                return Err(size_error(
                    format!("image bytes are {} bytes", b.len()),
                    opts.max_bytes,
                ));
            }
            Ok(Fetched {
                bytes: Cow::Borrowed(b),
                origin: "image bytes".to_string(),
            })
        }
        ImageSource::Uri(s) => fetch_uri(s, opts, base_dir),
    }
}

fn fetch_uri<'a>(s: &str, opts: &FetchOptions, base_dir: Option<&Path>) -> Result<Fetched<'a>> {
    if s.is_empty() {
        return Err(Error::bad_input(
            "image source is an empty string",
            "a path, file:// URL, http(s):// URL or data: URI",
        ));
    }
    match Location::parse(s) {
        Location::Path(p) => {
            let path = image_path(p, s.len() > p.len(), base_dir);
            let bytes = read_file(&path, opts.max_bytes)?;
            Ok(Fetched {
                bytes: Cow::Owned(bytes),
                origin: path.display().to_string(),
            })
        }
        Location::Data {
            base64, payload, ..
        } => {
            let bytes = decode_data_payload(base64, payload)?;
            if bytes.len() as u64 > opts.max_bytes {
                return Err(size_error(
                    format!("data: URI holds {} bytes", bytes.len()),
                    opts.max_bytes,
                ));
            }
            Ok(Fetched {
                origin: format!("data: URI ({} bytes)", bytes.len()),
                bytes: Cow::Owned(bytes),
            })
        }
        Location::Http(url) => {
            if !opts.allow_remote {
                return Err(Error::bad_input(
                    format!(
                        "image URL {} was not fetched: fetching remote images is disabled",
                        shorten(url)
                    ),
                    "local paths, file:// URLs, data: URIs or image bytes \
                     (remote URLs when FetchOptions::allow_remote is on)",
                ));
            }
            let bytes = http_get(url, opts)?;
            Ok(Fetched {
                bytes: Cow::Owned(bytes),
                origin: shorten(url),
            })
        }
    }
}

/// Where an image source's path `p` (the whole source, or what follows `file://` when
/// `is_file_url`) is: [`resolve`]d, and for a `file://` URL whose literal path does not exist,
/// its %-escapes decoded when that path exists (the reference strips the scheme only, so
/// `file:///tmp/a%20b.png` would fail there).
fn image_path(p: &str, is_file_url: bool, base_dir: Option<&Path>) -> PathBuf {
    let path = resolve(Path::new(p), base_dir);
    if !is_file_url || path.exists() || !p.contains('%') {
        return path;
    }
    match percent_decode(p)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
    {
        Some(d) if resolve(Path::new(&d), base_dir).exists() => resolve(Path::new(&d), base_dir),
        _ => path,
    }
}

/// A local path as given, or joined to `base_dir` when relative and a base is given: how
/// image and video paths (and `file://` paths) are found.
pub(crate) fn resolve(p: &Path, base_dir: Option<&Path>) -> PathBuf {
    match base_dir {
        Some(base) if p.is_relative() => base.join(p),
        _ => p.to_path_buf(),
    }
}

/// Reads a whole file of at most `max_bytes`. Errors name the path.
pub fn read_file(path: &Path, max_bytes: u64) -> Result<Vec<u8>> {
    let name = path.display();
    let allowed = "a path to a readable image file";
    let meta = std::fs::metadata(path).map_err(|e| {
        let what = if e.kind() == std::io::ErrorKind::NotFound {
            format!("image file {name} does not exist")
        } else {
            format!("image file {name} cannot be read: {e}")
        };
        Error::bad_input(what, allowed)
    })?;
    if !meta.is_file() {
        return Err(Error::bad_input(
            format!("image path {name} is not a file"),
            allowed,
        ));
    }
    if meta.len() > max_bytes {
        return Err(size_error(
            format!("image file {name} is {} bytes", meta.len()),
            max_bytes,
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    std::fs::File::open(path)
        .and_then(|f| f.take(max_bytes + 1).read_to_end(&mut bytes))
        .map_err(|e| Error::bad_input(format!("image file {name} cannot be read: {e}"), allowed))?;
    if bytes.len() as u64 > max_bytes {
        return Err(size_error(
            format!("image file {name} grew past {max_bytes} bytes while being read"),
            max_bytes,
        ));
    }
    Ok(bytes)
}

const DATA_ALLOWED: &str =
    "a data: URI with a non-empty payload, e.g. data:image/png;base64,iVBORw0KGgo…";

/// The bytes of a `data:` URI's payload (the text after the first comma): percent-escapes are
/// decoded first (RFC 2397), then base64 when the URI says `;base64`. Base64 as Python's
/// `base64.b64decode` reads it, and a little more leniently: ASCII whitespace is skipped and
/// padding is optional; any other character outside the standard alphabet is an error (Python
/// would silently drop it).
pub fn decode_data_payload(base64: bool, payload: &str) -> Result<Vec<u8>> {
    let raw: Cow<[u8]> = if payload.contains('%') {
        Cow::Owned(percent_decode(payload)?)
    } else {
        Cow::Borrowed(payload.as_bytes())
    };
    let bytes = if base64 {
        let clean: Vec<u8> = raw
            .iter()
            .copied()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        if clean.is_empty() {
            return Err(Error::bad_input(
                "data: URI has an empty payload",
                DATA_ALLOWED,
            ));
        }
        const ENGINE: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new()
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent)
                .with_decode_allow_trailing_bits(true),
        );
        ENGINE.decode(&clean).map_err(|e| {
            Error::bad_input(
                format!("data: URI payload is not valid base64 ({e})"),
                "standard base64 (A-Z a-z 0-9 + /, optional = padding) after \";base64,\"",
            )
        })?
    } else {
        raw.into_owned()
    };
    if bytes.is_empty() {
        return Err(Error::bad_input(
            "data: URI has an empty payload",
            DATA_ALLOWED,
        ));
    }
    Ok(bytes)
}

/// Decodes `%XX` escapes; a `%` not followed by two hex digits is an error.
fn percent_decode(s: &str) -> Result<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |c: u8| (c as char).to_digit(16);
            match (
                b.get(i + 1).and_then(|&c| hex(c)),
                b.get(i + 2).and_then(|&c| hex(c)),
            ) {
                (Some(hi), Some(lo)) => {
                    out.push((hi * 16 + lo) as u8);
                    i += 3;
                }
                _ => {
                    return Err(Error::bad_input(
                        format!("a percent-escape at byte {i} is not %XX with two hex digits"),
                        "percent-escapes of the form %XX",
                    ))
                }
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// GET an http(s) URL (redirects followed) and return its body, refusing bodies over
/// `opts.max_bytes` (from `Content-Length` before reading, or while reading) and requests that
/// take longer than `opts.timeout`. Does not look at [`FetchOptions::allow_remote`].
pub fn http_get(url: &str, opts: &FetchOptions) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    http_download(url, opts, opts.max_bytes, "image", &mut bytes)?;
    Ok(bytes)
}

/// GET an http(s) URL into `out`, streaming: at most `max_bytes` (checked against
/// `Content-Length` before reading and while reading), within `opts.timeout`. `kind`
/// ("image", "video") names the item in errors. Returns the byte count; an empty body is an
/// error. Does not look at [`FetchOptions::allow_remote`].
pub fn http_download(
    url: &str,
    opts: &FetchOptions,
    max_bytes: u64,
    kind: &str,
    out: &mut dyn std::io::Write,
) -> Result<u64> {
    let d = Download {
        kind,
        name: shorten(url),
        secs: opts.timeout.as_secs_f64(),
        max_bytes,
    };
    let (name, fail) = (&d.name, |e: ureq::Error| d.failed(e));
    let mut resp = if opts.refuse_private_hosts {
        get_public_only(url, opts, kind, &fail)?
    } else {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(opts.timeout))
            .http_status_as_error(false)
            .build()
            .into();
        agent.get(url).call().map_err(fail)?
    };
    let status = resp.status();
    if !status.is_success() {
        return Err(Error::bad_input(
            format!("{kind} URL {name} answered HTTP {status}"),
            format!("a URL that answers 200 with an {kind}"),
        ));
    }
    if let Some(len) = resp.body().content_length() {
        if len > max_bytes {
            return Err(d.too_big(format!("{kind} URL {name} is {len} bytes (Content-Length)")));
        }
    }
    let total = d.copy_body(resp.body_mut().as_reader(), out, &opts.interrupt)?;
    if total == 0 {
        return Err(Error::bad_input(
            format!("{kind} URL {name} sent an empty body"),
            format!("a URL that answers with an {kind}"),
        ));
    }
    Ok(total)
}

/// One download, for its errors: what it fetches (`kind`, the shortened URL), its timeout in
/// seconds and its size cap.
struct Download<'a> {
    kind: &'a str,
    name: String,
    secs: f64,
    max_bytes: u64,
}

impl Download<'_> {
    /// Streams the body into `out` (the job's [`Interrupt`] checked before every read),
    /// refusing more than `max_bytes`; returns the byte count.
    fn copy_body(
        &self,
        body: impl Read,
        out: &mut dyn std::io::Write,
        interrupt: &Interrupt,
    ) -> Result<u64> {
        let (kind, name, max_bytes) = (self.kind, &self.name, self.max_bytes);
        // One byte over the cap is read so an oversized body is told apart from one that fits.
        let mut reader = body.take(max_bytes + 1);
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            interrupt.check(&format!("downloading {kind} URL {name}"))?;
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.read_failed(e)),
            };
            total += n as u64;
            if total > max_bytes {
                return Err(self.too_big(format!(
                    "{kind} URL {name} sent more than {max_bytes} bytes"
                )));
            }
            out.write_all(&buf[..n]).map_err(Error::Io)?;
        }
        Ok(total)
    }

    fn timed_out(&self) -> Error {
        let (kind, name, secs) = (self.kind, &self.name, self.secs);
        Error::bad_input(
            format!("{kind} URL {name} timed out after {secs} s"),
            format!("a URL that answers within {secs} s"),
        )
    }

    fn too_big(&self, what: String) -> Error {
        let (kind, max_bytes) = (self.kind, self.max_bytes);
        Error::bad_input(
            what,
            format!(
                "{kind}s of at most {max_bytes} bytes ({} MiB)",
                max_bytes >> 20
            ),
        )
    }

    /// A request that failed (connecting, sending, the headers).
    fn failed(&self, e: ureq::Error) -> Error {
        let (kind, name) = (self.kind, &self.name);
        match e {
            ureq::Error::Timeout(_) => self.timed_out(),
            ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => self.timed_out(),
            other => Error::bad_input(
                format!("{kind} URL {name} could not be fetched: {other}"),
                format!("a reachable http(s) URL of an {kind}"),
            ),
        }
    }

    /// A body read that failed: ureq reports its own errors (timeouts included) wrapped in
    /// `io::Error`.
    fn read_failed(&self, e: std::io::Error) -> Error {
        let (kind, name) = (self.kind, &self.name);
        if e.kind() == std::io::ErrorKind::TimedOut {
            return self.timed_out();
        }
        match e.into_inner().map(|inner| inner.downcast::<ureq::Error>()) {
            Some(Ok(ue)) => self.failed(*ue),
            Some(Err(other)) => Error::bad_input(
                format!("{kind} URL {name} could not be read: {other}"),
                format!("a reachable http(s) URL of an {kind}"),
            ),
            None => Error::bad_input(
                format!("{kind} URL {name} could not be read"),
                format!("a reachable http(s) URL of an {kind}"),
            ),
        }
    }
}

/// Most redirects followed by hand when [`FetchOptions::refuse_private_hosts`] is on.
const MAX_CHECKED_REDIRECTS: usize = 5;

/// GET `url` following redirects one hop at a time, refusing any hop whose host resolves to a
/// non-public address (checked just before each request; the connection itself resolves the
/// name again, so a DNS answer that changes between the two is not caught).
fn get_public_only(
    url: &str,
    opts: &FetchOptions,
    kind: &str,
    fail: &dyn Fn(ureq::Error) -> Error,
) -> Result<ureq::http::Response<ureq::Body>> {
    let config = ureq::Agent::config_builder()
        .timeout_global(Some(opts.timeout))
        .http_status_as_error(false)
        .max_redirects(0)
        .build();
    // The connection goes only to addresses this resolver returned, and it returns only
    // public ones: a DNS answer that changes between the check below and the connection
    // (DNS rebinding) cannot reach a private address.
    let agent = ureq::Agent::with_parts(
        config,
        ureq::unversioned::transport::DefaultConnector::default(),
        PublicOnlyResolver::default(),
    );
    let mut current: ureq::http::Uri = url.parse().map_err(|_| {
        Error::bad_input(
            format!("{kind} URL {} is not a valid URL", shorten(url)),
            "an http(s) URL",
        )
    })?;
    for _ in 0..=MAX_CHECKED_REDIRECTS {
        check_public_host(&current, kind)?;
        let resp = agent.get(current.clone()).call().map_err(fail)?;
        if !resp.status().is_redirection() {
            return Ok(resp);
        }
        let Some(location) = resp
            .headers()
            .get(ureq::http::header::LOCATION)
            .and_then(|l| l.to_str().ok())
        else {
            return Ok(resp);
        };
        current = join_location(&current, location).ok_or_else(|| {
            Error::bad_input(
                format!(
                    "{kind} URL {} redirected to an invalid location",
                    shorten(url)
                ),
                "redirects to http(s) URLs",
            )
        })?;
    }
    Err(Error::bad_input(
        format!("{kind} URL {} redirected too many times", shorten(url)),
        format!("at most {MAX_CHECKED_REDIRECTS} redirects"),
    ))
}

/// ureq's resolver, keeping a lookup only when every address it returns is public
/// ([`is_public_ip`]); otherwise the request fails before any connection is made.
#[derive(Debug, Default)]
struct PublicOnlyResolver {
    inner: ureq::unversioned::resolver::DefaultResolver,
}

impl ureq::unversioned::resolver::Resolver for PublicOnlyResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> std::result::Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        let addrs = self.inner.resolve(uri, config, timeout)?;
        if let Some(bad) = addrs.iter().find(|a| !is_public_ip(a.ip())) {
            return Err(ureq::Error::Io(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "the host resolves to the non-public address {} (refused)",
                    bad.ip()
                ),
            )));
        }
        Ok(addrs)
    }
}

/// A `Location` header resolved against the URL that sent it (absolute, or an absolute path).
fn join_location(base: &ureq::http::Uri, location: &str) -> Option<ureq::http::Uri> {
    let lower = location.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return location.parse().ok();
    }
    if location.starts_with("//") {
        return format!("{}:{location}", base.scheme_str()?).parse().ok();
    }
    let path = if location.starts_with('/') {
        location.to_string()
    } else {
        let dir = base.path().rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        format!("{dir}/{location}")
    };
    format!("{}://{}{path}", base.scheme_str()?, base.authority()?)
        .parse()
        .ok()
}

/// Resolves the URL's host and refuses it unless every address is public.
fn check_public_host(uri: &ureq::http::Uri, kind: &str) -> Result<()> {
    use std::net::ToSocketAddrs;
    let allowed = "http(s) URLs of public hosts (loopback, private, link-local and other \
                   non-public addresses are refused)";
    let scheme = uri.scheme_str().unwrap_or("").to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return Err(Error::bad_input(
            format!("{kind} URL scheme {scheme:?} is not http(s)"),
            allowed,
        ));
    }
    let host = uri
        .host()
        .ok_or_else(|| Error::bad_input(format!("{kind} URL has no host"), allowed))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    let addrs: Vec<std::net::SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| {
            Error::bad_input(
                format!("{kind} URL host {host} does not resolve: {e}"),
                allowed,
            )
        })?
        .collect();
    if addrs.is_empty() {
        return Err(Error::bad_input(
            format!("{kind} URL host {host} does not resolve"),
            allowed,
        ));
    }
    if let Some(bad) = addrs.iter().find(|a| !is_public_ip(a.ip())) {
        return Err(Error::bad_input(
            format!(
                "{kind} URL host {host} resolves to the non-public address {}",
                bad.ip()
            ),
            allowed,
        ));
    }
    Ok(())
}

/// Whether an address is globally routable: not loopback, private (RFC 1918, IPv6 ULA),
/// link-local, unspecified, broadcast, multicast, shared (100.64/10), documentation,
/// benchmarking or reserved; IPv4-mapped IPv6 addresses are judged as IPv4.
pub fn is_public_ip(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_ip(IpAddr::V4(v4));
            }
            let s = v6.segments();
            // 6to4 (2002::/16) carries an IPv4 address in bits 16..48: judged as that one.
            if s[0] == 0x2002 {
                let v4 = std::net::Ipv4Addr::new(
                    (s[1] >> 8) as u8,
                    s[1] as u8,
                    (s[2] >> 8) as u8,
                    s[2] as u8,
                );
                if !is_public_ip(IpAddr::V4(v4)) {
                    return false;
                }
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                // ::/96 (IPv4-compatible, e.g. [::127.0.0.1]) and ::ffff:0:0/96 forms that
                // are not IPv4-mapped (SIIT ::ffff:0:a.b.c.d): deprecated or translator-only.
                || s[..6].iter().all(|&x| x == 0)
                || (s[..4].iter().all(|&x| x == 0) && s[4] == 0xffff && s[5] == 0)
                // 100::/64 discard-only; 2001::/32 Teredo (tunnels to any IPv4 address).
                || (s[0] == 0x0100 && s[1..4].iter().all(|&x| x == 0))
                || (s[0] == 0x2001 && s[1] == 0)
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] & 0xffc0) == 0xfec0
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                || (s[0] == 0x64 && s[1] == 0xff9b))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processing::test_util::bad;

    fn uri(s: impl Into<String>) -> ImageSource {
        ImageSource::Uri(s.into())
    }

    #[test]
    fn public_ips() {
        let public = |s: &str| is_public_ip(s.parse().unwrap());
        for ok in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "2002:808:808::1"] {
            assert!(public(ok), "{ok}");
        }
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            // IPv4-compatible, SIIT, 6to4 of a private address, Teredo, discard-only.
            "::127.0.0.1",
            "::10.0.0.1",
            "::ffff:0:127.0.0.1",
            "2002:7f00:1::1",
            "2002:c0a8:101::1",
            "2001:0:4136:e378::1",
            "100::1",
        ] {
            assert!(!public(bad), "{bad}");
        }
    }

    /// The resolver the connection uses refuses non-public answers itself, so a name that
    /// resolves to a public address for the check and a private one for the connection (DNS
    /// rebinding) is still refused: what it returns is what is connected to.
    #[test]
    fn connection_resolver_refuses_private_answers() {
        use ureq::unversioned::resolver::Resolver;
        use ureq::unversioned::transport::NextTimeout;
        let never = || NextTimeout {
            after: ureq::unversioned::transport::time::Duration::NotHappening,
            reason: ureq::Timeout::Global,
            per_read: None,
            per_write: None,
        };
        let r = PublicOnlyResolver::default();
        let config = ureq::config::Config::default();
        for url in [
            "http://127.0.0.1:9/",
            "http://localhost:9/",
            "http://[::127.0.0.1]:9/",
            "http://10.0.0.1/",
        ] {
            let uri: ureq::http::Uri = url.parse().unwrap();
            let timeout = never();
            let e = r.resolve(&uri, &config, timeout).unwrap_err();
            assert!(e.to_string().contains("non-public address"), "{url}: {e}");
        }
        let uri: ureq::http::Uri = "http://8.8.8.8/".parse().unwrap();
        let timeout = never();
        let ok = r.resolve(&uri, &config, timeout).unwrap();
        assert_eq!(ok.len(), 1);
    }

    #[test]
    fn private_hosts_refused_before_any_request() {
        let opts = FetchOptions {
            refuse_private_hosts: true,
            ..FetchOptions::remote()
        };
        // Nothing listens on port 9 of loopback; the refusal comes before connecting.
        for url in [
            "http://127.0.0.1:9/a.png",
            "http://localhost:9/a.png",
            "http://[::1]:9/x",
            "http://[::127.0.0.1]:9/x",
            "http://[::ffff:127.0.0.1]:9/x",
        ] {
            let (what, allowed) = bad(http_get(url, &opts));
            assert!(what.contains("non-public address"), "{url}: {what}");
            assert!(allowed.contains("public hosts"), "{allowed}");
        }
    }

    #[test]
    fn locations_join() {
        let base: ureq::http::Uri = "http://a.example/dir/x.png".parse().unwrap();
        let j = |l: &str| join_location(&base, l).unwrap().to_string();
        assert_eq!(j("/y.png"), "http://a.example/y.png");
        assert_eq!(j("z.png"), "http://a.example/dir/z.png");
        assert_eq!(j("https://b.example/q"), "https://b.example/q");
        assert_eq!(j("//c.example/r"), "http://c.example/r");
    }

    #[test]
    fn data_payloads() {
        assert_eq!(decode_data_payload(true, "aGVsbG8=").unwrap(), b"hello");
        // No padding, line breaks, percent-escaped '+' '/' '='.
        assert_eq!(decode_data_payload(true, "aGVsbG8").unwrap(), b"hello");
        assert_eq!(decode_data_payload(true, "aGVs\r\nbG8=").unwrap(), b"hello");
        assert_eq!(decode_data_payload(true, "Pz8%2F").unwrap(), b"???");
        assert_eq!(decode_data_payload(true, "aGVsbG8%3D").unwrap(), b"hello");
        // Not base64: percent-decoded bytes.
        assert_eq!(decode_data_payload(false, "a%00b%FF").unwrap(), b"a\0b\xff");
        let (what, allowed) = bad(decode_data_payload(true, "not*base64!"));
        assert!(what.contains("not valid base64"), "{what}");
        assert!(allowed.contains("base64"), "{allowed}");
        let (what, _) = bad(decode_data_payload(true, ""));
        assert!(what.contains("empty payload"), "{what}");
        assert!(bad(decode_data_payload(true, " \n ")).0.contains("empty"));
        assert!(bad(decode_data_payload(false, "")).0.contains("empty"));
        assert!(bad(decode_data_payload(false, "%zz")).0.contains("percent"));
    }

    #[test]
    fn sources() {
        let o = FetchOptions::default();
        let b = ImageSource::Bytes(vec![1, 2, 3]);
        assert_eq!(&*fetch(&b, &o, None).unwrap().bytes, &[1, 2, 3]);
        let small = FetchOptions {
            max_bytes: 2,
            ..Default::default()
        };
        assert!(bad(fetch(&b, &small, None)).0.contains("3 bytes"));
        let d = uri("data:image/png;base64,aGVsbG8=");
        let f = fetch(&d, &o, None).unwrap();
        assert_eq!(&*f.bytes, b"hello");
        assert_eq!(f.origin, "data: URI (5 bytes)");
        let (what, _) = bad(fetch(&uri("data:image/png;base64,"), &o, None));
        assert!(what.contains("empty payload"), "{what}");
        let (what, allowed) = bad(fetch(&uri("https://example.com/cat.png"), &o, None));
        assert!(what.contains("https://example.com/cat.png"), "{what}");
        assert!(what.contains("disabled"), "{what}");
        assert!(allowed.contains("allow_remote"), "{allowed}");
        let (what, _) = bad(fetch(&uri(""), &o, None));
        assert!(what.contains("empty"), "{what}");
    }

    #[test]
    fn paths_and_file_urls() {
        let dir = std::env::temp_dir().join(format!("qwen2vl-fetch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a b.bin"), b"xyz").unwrap();
        let o = FetchOptions::default();
        let abs = dir.join("a b.bin").display().to_string();
        for s in [
            abs.clone(),
            format!("file://{abs}"),
            format!("file://{}", abs.replace(' ', "%20")),
        ] {
            let src = uri(s.clone());
            let f = fetch(&src, &o, None).unwrap();
            assert_eq!(&*f.bytes, b"xyz", "{s}");
        }
        // Relative to base_dir, with and without file://.
        for s in ["a b.bin", "file://a b.bin"] {
            let src = uri(s);
            let f = fetch(&src, &o, Some(&dir)).unwrap();
            assert_eq!(&*f.bytes, b"xyz", "{s}");
        }
        let (what, _) = bad(fetch(&uri("file:///nonexistent/q/pic.png"), &o, None));
        assert!(what.contains("/nonexistent/q/pic.png"), "{what}");
        assert!(what.contains("does not exist"), "{what}");
        let (what, _) = bad(fetch(&uri(dir.display().to_string()), &o, None));
        assert!(what.contains("not a file"), "{what}");
        let tiny = FetchOptions {
            max_bytes: 2,
            ..Default::default()
        };
        let (what, allowed) = bad(fetch(&uri(abs), &tiny, None));
        assert!(what.contains("3 bytes"), "{what}");
        assert!(allowed.contains("at most 2 bytes"), "{allowed}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
