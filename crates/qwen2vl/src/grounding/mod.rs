//! Boxes, quadrilaterals and referred phrases parsed out of a generated answer.
//!
//! Qwen2-VL answers grounding questions with markup (Qwen2-VL paper §2.2 "Visual
//! Grounding"; the tokens are `added_tokens` 151646–151651 of the released tokenizer):
//!
//! ```text
//! <|object_ref_start|>the red car<|object_ref_end|><|box_start|>(120,340),(560,780)<|box_end|>
//! ```
//!
//! Coordinates are integers normalised to [0, 1000) of the image (x by width, y by height);
//! several boxes may follow one reference, a box may come without one, and
//! `<|quad_start|>(x1,y1),(x2,y2),(x3,y3),(x4,y4)<|quad_end|>` gives a quadrilateral (text
//! in images).
//!
//! [`Grounding::parse`] turns an answer (decoded with these markers kept) into clean text
//! and typed [`GroundedObject`]s. In the clean text a reference keeps its phrase and every
//! box or quad becomes a numbered marker `[n]` (preceded by a space unless the text so far
//! is empty or ends in whitespace): `the red car [1]`. [`GroundingStream`] does the same on
//! text arriving in pieces, for a terminal, and its pieces concatenate to exactly
//! [`Grounding::text`] (both are the same state machine).
//!
//! Malformed markup never fails: an opening tag whose content up to the next marker is not
//! exactly what it should be (unclosed, closed by the wrong tag, non-numeric coordinates, the
//! wrong number of points), and every stray closing tag, stays in the text verbatim.
//!
//! Qwen2.5-VL writes coordinates in pixels of the resized image instead, mostly as JSON
//! objects (`{"bbox_2d": [x1, y1, x2, y2], "label": "..."}`, see [`json`]) and sometimes in
//! the same markup; [`Grounding::parse_for`] with [`BoxCoordinates::ResizedPixels`] reads both,
//! and [`Grounding::image_pixel_shapes`] maps either kind onto the original image.
//!
//! A limitation: markers are recognised by their text, so if a model spelled
//! `<|box_start|>` out of ordinary tokens it would be read as markup too. Qwen2-VL emits the
//! markers as their single special tokens, and [`crate::pipeline`] decodes only those.

use serde::{Deserialize, Serialize};

pub mod json;

pub use json::resized_to_pixel;

/// What a model's box coordinates mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BoxCoordinates {
    /// Qwen2-VL: integers in [0, 1000) of the image's width and height ([`SCALE`]).
    #[default]
    Thousandths,
    /// Qwen2.5-VL: pixels of the image as the model saw it, after `smart_resize`
    /// ([`crate::inputs::ImageInfo::resized_hw`]).
    ResizedPixels,
}

impl BoxCoordinates {
    fn is_thousandths(&self) -> bool {
        *self == BoxCoordinates::Thousandths
    }
}

/// Opens a referred phrase.
pub const OBJECT_REF_START: &str = "<|object_ref_start|>";
/// Closes a referred phrase.
pub const OBJECT_REF_END: &str = "<|object_ref_end|>";
/// Opens a box `(x1,y1),(x2,y2)`.
pub const BOX_START: &str = "<|box_start|>";
/// Closes a box.
pub const BOX_END: &str = "<|box_end|>";
/// Opens a quadrilateral of four points.
pub const QUAD_START: &str = "<|quad_start|>";
/// Closes a quadrilateral.
pub const QUAD_END: &str = "<|quad_end|>";

/// Every grounding marker: the special tokens a decode must keep for [`Grounding::parse`].
pub const MARKERS: [&str; 6] = [
    OBJECT_REF_START,
    OBJECT_REF_END,
    BOX_START,
    BOX_END,
    QUAD_START,
    QUAD_END,
];

/// Longest referred phrase accepted, in bytes. Real phrases are a few words; the cap bounds
/// how much text [`GroundingStream`] may hold back after an `<|object_ref_start|>` that is
/// never closed (a longer "phrase" stays text, in the batch parser too).
pub const MAX_LABEL_BYTES: usize = 512;

/// Longest box/quad content accepted, in bytes (`(999, 999), (999, 999)` is 22; the rest
/// is room for whitespace). Bounds what [`GroundingStream`] holds back.
pub const MAX_SHAPE_BYTES: usize = 256;

/// The coordinate scale: points are in [0, `SCALE`) of the image's width and height.
pub const SCALE: u32 = 1000;

/// A byte range in [`Grounding::text`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextSpan {
    /// First byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
}

/// An axis-aligned box, corners as the model wrote them (normally top-left, bottom-right),
/// in the model's [0, 1000) coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BBox {
    /// The `n` of its `[n]` marker in the clean text (1-based, counting boxes and quads).
    pub number: usize,
    pub x1: u32,
    pub y1: u32,
    pub x2: u32,
    pub y2: u32,
}

/// A quadrilateral (four points in the model's order), in [0, 1000) coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quad {
    /// The `n` of its `[n]` marker in the clean text (1-based, counting boxes and quads).
    pub number: usize,
    /// `[x, y]` per point.
    pub points: [[u32; 2]; 4],
}

/// A referred phrase and/or the shapes that locate it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroundedObject {
    /// The phrase between `<|object_ref_start|>` and `<|object_ref_end|>`; `None` for
    /// shapes written without one.
    pub label: Option<String>,
    /// Where the label is in the clean text; for an unlabeled object, the empty span where
    /// its first marker begins.
    pub span: TextSpan,
    /// Boxes that directly follow the phrase (or each other).
    pub boxes: Vec<BBox>,
    /// Quadrilaterals that directly follow the phrase (or each other).
    pub quads: Vec<Quad>,
}

/// An answer split into clean text and grounded objects.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grounding {
    /// The answer with the markup removed: phrases kept, each shape replaced by `[n]`.
    pub text: String,
    /// Every well-formed reference and shape, in order of appearance (Qwen2.5-VL's JSON
    /// boxes after the markup's).
    pub objects: Vec<GroundedObject>,
    /// What the coordinates of `objects` mean (absent in JSON: [`BoxCoordinates::Thousandths`]).
    #[serde(default, skip_serializing_if = "BoxCoordinates::is_thousandths")]
    pub coordinates: BoxCoordinates,
}

/// Whether a [`PixelShape`] is a box or a quadrilateral.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShapeKind {
    /// Two corners.
    Box,
    /// Four points.
    Quad,
}

/// One box or quad in an image's pixel coordinates, with its object's label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PixelShape {
    /// The `n` of its `[n]` marker.
    pub number: usize,
    /// Its object's phrase, if any.
    pub label: Option<String>,
    /// Box or quad.
    pub kind: ShapeKind,
    /// `[x, y]` in pixels: two corners for a box, four points for a quad.
    pub points: Vec<[u32; 2]>,
}

/// A model coordinate in [0, 1000) → a pixel index in [0, `size`): `v * size / 1000`
/// rounded down (as Qwen's own cookbook code, `int(x / 1000 * width)`), clamped to the last
/// pixel for out-of-range values the model might write (1000 and above).
pub fn to_pixel(v: u32, size: u32) -> u32 {
    let p = u64::from(v) * u64::from(size) / u64::from(SCALE);
    p.min(u64::from(size.saturating_sub(1))) as u32
}

impl BBox {
    /// The corners in pixels of an image of `width` x `height`: `[[x1, y1], [x2, y2]]`.
    pub fn to_pixels(&self, width: u32, height: u32) -> [[u32; 2]; 2] {
        [
            [to_pixel(self.x1, width), to_pixel(self.y1, height)],
            [to_pixel(self.x2, width), to_pixel(self.y2, height)],
        ]
    }
}

impl Quad {
    /// The points in pixels of an image of `width` x `height`.
    pub fn to_pixels(&self, width: u32, height: u32) -> [[u32; 2]; 4] {
        self.points
            .map(|[x, y]| [to_pixel(x, width), to_pixel(y, height)])
    }
}

impl Grounding {
    /// Parses an answer decoded with the grounding markers kept. Never fails.
    pub fn parse(answer: &str) -> Grounding {
        let mut s = GroundingStream::new();
        s.push(answer);
        s.finish().1
    }

    /// Parses an answer of a model whose boxes are in `coordinates`: the markup as
    /// [`Grounding::parse`] does, and for [`BoxCoordinates::ResizedPixels`] (Qwen2.5-VL) also
    /// the JSON `bbox_2d` objects left in the clean text ([`json`]). Never fails.
    pub fn parse_for(answer: &str, coordinates: BoxCoordinates) -> Grounding {
        let mut g = Grounding::parse(answer);
        g.coordinates = coordinates;
        if coordinates == BoxCoordinates::ResizedPixels {
            let shapes: usize = g
                .objects
                .iter()
                .map(|o| o.boxes.len() + o.quads.len())
                .sum();
            let found = json::json_boxes(&g.text, shapes + 1);
            g.objects.extend(found);
        }
        g
    }

    /// Every box and quad, ordered by number, in pixels of the original image of `original`
    /// `(width, height)` that the model saw resized to `resized` `(width, height)`: through
    /// [`to_pixel`] for [`BoxCoordinates::Thousandths`], through [`resized_to_pixel`] for
    /// [`BoxCoordinates::ResizedPixels`].
    pub fn image_pixel_shapes(&self, original: (u32, u32), resized: (u32, u32)) -> Vec<PixelShape> {
        if self.coordinates == BoxCoordinates::Thousandths {
            return self.pixel_shapes(original.0, original.1);
        }
        let mut out = self.shapes();
        for s in &mut out {
            for p in &mut s.points {
                *p = [
                    resized_to_pixel(p[0], original.0, resized.0),
                    resized_to_pixel(p[1], original.1, resized.1),
                ];
            }
        }
        out
    }

    /// Whether any box or quad was found.
    pub fn has_shapes(&self) -> bool {
        self.objects
            .iter()
            .any(|o| !o.boxes.is_empty() || !o.quads.is_empty())
    }

    /// Every box and quad with its object's label, ordered by number, in the model's
    /// [0, 1000) coordinates (the form of [`Self::pixel_shapes`], before mapping).
    pub fn shapes(&self) -> Vec<PixelShape> {
        let mut out: Vec<PixelShape> = Vec::new();
        for o in &self.objects {
            for b in &o.boxes {
                out.push(PixelShape {
                    number: b.number,
                    label: o.label.clone(),
                    kind: ShapeKind::Box,
                    points: vec![[b.x1, b.y1], [b.x2, b.y2]],
                });
            }
            for q in &o.quads {
                out.push(PixelShape {
                    number: q.number,
                    label: o.label.clone(),
                    kind: ShapeKind::Quad,
                    points: q.points.to_vec(),
                });
            }
        }
        out.sort_by_key(|s| s.number);
        out
    }

    /// Every box and quad, ordered by number, in pixels of an image of `width` x `height`
    /// (each coordinate through [`to_pixel`]; for Qwen2-VL's [0, 1000) coordinates, see
    /// [`Grounding::image_pixel_shapes`] for either kind).
    pub fn pixel_shapes(&self, width: u32, height: u32) -> Vec<PixelShape> {
        let mut out = self.shapes();
        for s in &mut out {
            for p in &mut s.points {
                *p = [to_pixel(p[0], width), to_pixel(p[1], height)];
            }
        }
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marker {
    RefStart,
    RefEnd,
    BoxStart,
    BoxEnd,
    QuadStart,
    QuadEnd,
}

impl Marker {
    const ALL: [Marker; 6] = [
        Marker::RefStart,
        Marker::RefEnd,
        Marker::BoxStart,
        Marker::BoxEnd,
        Marker::QuadStart,
        Marker::QuadEnd,
    ];

    fn text(self) -> &'static str {
        match self {
            Marker::RefStart => OBJECT_REF_START,
            Marker::RefEnd => OBJECT_REF_END,
            Marker::BoxStart => BOX_START,
            Marker::BoxEnd => BOX_END,
            Marker::QuadStart => QUAD_START,
            Marker::QuadEnd => QUAD_END,
        }
    }
}

/// What the opening tag just consumed expects before its closing tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Ref,
    Box,
    Quad,
}

impl Open {
    fn start(self) -> Marker {
        match self {
            Open::Ref => Marker::RefStart,
            Open::Box => Marker::BoxStart,
            Open::Quad => Marker::QuadStart,
        }
    }

    fn end(self) -> Marker {
        match self {
            Open::Ref => Marker::RefEnd,
            Open::Box => Marker::BoxEnd,
            Open::Quad => Marker::QuadEnd,
        }
    }
}

/// The first complete marker in `s`: (byte offset, marker). Marker texts contain `<|` only
/// at their start, so two occurrences never overlap.
fn find_marker(s: &str) -> Option<(usize, Marker)> {
    let mut from = 0;
    while let Some(i) = s[from..].find("<|") {
        let at = from + i;
        if let Some(m) = Marker::ALL.iter().find(|m| s[at..].starts_with(m.text())) {
            return Some((at, *m));
        }
        from = at + 2;
    }
    None
}

/// The earliest offset from which the rest of `s` is a proper prefix of some marker (so a
/// marker could still begin there once more text arrives); `s.len()` when there is none.
/// Called only on text with no complete marker, so a marker can begin nowhere earlier.
fn hold_from(s: &str) -> usize {
    let longest = MARKERS.iter().map(|m| m.len()).max().unwrap_or(0);
    let lo = s.len().saturating_sub(longest - 1);
    (lo..s.len())
        .filter(|&i| s.as_bytes()[i] == b'<')
        .find(|&i| MARKERS.iter().any(|m| m.starts_with(&s[i..])))
        .unwrap_or(s.len())
}

/// A parsed box or quad body.
enum Shape {
    Box([[u32; 2]; 2]),
    Quad([[u32; 2]; 4]),
}

/// Why coordinate text is not (yet) a list of points.
#[derive(Debug, PartialEq, Eq)]
enum PointsError {
    /// Valid so far; more text could complete it.
    Incomplete,
    /// No continuation can make it valid.
    Invalid,
}

/// Parses exactly `n` points `(x, y)` separated by commas, with optional ASCII whitespace
/// around every item. Left to right and deterministic, so `Invalid` for a text means
/// `Invalid` for every extension of it (what lets [`GroundingStream`] give up early).
fn parse_points<const N: usize>(s: &str) -> Result<[[u32; 2]; N], PointsError> {
    struct Cursor<'a> {
        b: &'a [u8],
        i: usize,
    }
    impl Cursor<'_> {
        fn ws(&mut self) {
            while self.i < self.b.len() && self.b[self.i].is_ascii_whitespace() {
                self.i += 1;
            }
        }
        fn expect(&mut self, c: u8) -> Result<(), PointsError> {
            match self.b.get(self.i) {
                None => Err(PointsError::Incomplete),
                Some(&x) if x == c => {
                    self.i += 1;
                    Ok(())
                }
                Some(_) => Err(PointsError::Invalid),
            }
        }
        fn num(&mut self) -> Result<u32, PointsError> {
            let start = self.i;
            let mut v: u32 = 0;
            while let Some(&d) = self.b.get(self.i).filter(|d| d.is_ascii_digit()) {
                v = v
                    .checked_mul(10)
                    .and_then(|v| v.checked_add(u32::from(d - b'0')))
                    .ok_or(PointsError::Invalid)?;
                self.i += 1;
            }
            match (self.i > start, self.i < self.b.len()) {
                (true, _) => Ok(v),
                (false, false) => Err(PointsError::Incomplete),
                (false, true) => Err(PointsError::Invalid),
            }
        }
    }
    let mut c = Cursor {
        b: s.as_bytes(),
        i: 0,
    };
    let mut pts = [[0u32; 2]; N];
    for (k, p) in pts.iter_mut().enumerate() {
        c.ws();
        if k > 0 {
            c.expect(b',')?;
            c.ws();
        }
        c.expect(b'(')?;
        c.ws();
        let x = c.num()?;
        c.ws();
        c.expect(b',')?;
        c.ws();
        let y = c.num()?;
        c.ws();
        c.expect(b')')?;
        *p = [x, y];
    }
    c.ws();
    if c.i < c.b.len() {
        return Err(PointsError::Invalid);
    }
    Ok(pts)
}

/// Whether `content` (what follows an opening tag, no marker in it) could still become a
/// valid body once more text arrives.
fn could_complete(open: Open, content: &str) -> bool {
    match open {
        Open::Ref => content.len() <= MAX_LABEL_BYTES,
        Open::Box => {
            content.len() <= MAX_SHAPE_BYTES
                && parse_points::<2>(content) != Err(PointsError::Invalid)
        }
        Open::Quad => {
            content.len() <= MAX_SHAPE_BYTES
                && parse_points::<4>(content) != Err(PointsError::Invalid)
        }
    }
}

/// Incremental grounding parser: feed it text pieces, get display text back.
///
/// [`GroundingStream::push`] returns the clean text that is now certain, holding back only
/// what could still turn out to be markup: a tail that may be the start of a marker, and
/// the body of an opened reference/box/quad until its closing tag arrives or the body can no
/// longer be valid (e.g. a letter inside a box, a phrase over [`MAX_LABEL_BYTES`]). The
/// pieces from `push` and [`GroundingStream::finish`] concatenate to the
/// [`Grounding::text`] of the whole input, however it was split.
#[derive(Debug, Clone, Default)]
pub struct GroundingStream {
    /// Input not yet turned into output.
    buf: String,
    /// An opening tag consumed from the input whose body is in `buf`.
    open: Option<Open>,
    /// The result so far (its `text` is everything emitted).
    done: Grounding,
    /// Whether a following shape joins the last object (true right after a valid reference or
    /// shape; any text in between ends that).
    chain: bool,
    /// Shapes so far (for the `[n]` numbers).
    shapes: usize,
}

impl GroundingStream {
    /// An empty stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a piece of the answer; returns the display text it releases (maybe empty).
    pub fn push(&mut self, piece: &str) -> String {
        self.buf.push_str(piece);
        let before = self.done.text.len();
        self.run(false);
        self.done.text[before..].to_string()
    }

    /// Ends the input: releases everything held back (an unclosed tag as text). Returns the
    /// last display text and the complete result.
    pub fn finish(mut self) -> (String, Grounding) {
        let before = self.done.text.len();
        self.run(true);
        let tail = self.done.text[before..].to_string();
        (tail, self.done)
    }

    /// The result so far (objects whose markup is complete).
    pub fn grounding(&self) -> &Grounding {
        &self.done
    }

    fn literal(&mut self, s: &str) {
        if !s.is_empty() {
            self.done.text.push_str(s);
            self.chain = false;
        }
    }

    /// Consumes as much of `buf` as is decided; at `eof` everything.
    fn run(&mut self, eof: bool) {
        loop {
            let found = find_marker(&self.buf);
            match (self.open, found) {
                (None, Some((at, m))) => {
                    let text = self.buf[..at].to_string();
                    self.literal(&text);
                    self.buf.drain(..at + m.text().len());
                    match m {
                        Marker::RefStart => self.open = Some(Open::Ref),
                        Marker::BoxStart => self.open = Some(Open::Box),
                        Marker::QuadStart => self.open = Some(Open::Quad),
                        // A stray closing tag.
                        _ => self.literal(m.text()),
                    }
                }
                (None, None) => {
                    let cut = if eof {
                        self.buf.len()
                    } else {
                        hold_from(&self.buf)
                    };
                    let text: String = self.buf.drain(..cut).collect();
                    self.literal(&text);
                    return;
                }
                (Some(open), Some((at, m))) => {
                    if m == open.end() && self.accept(open, at) {
                        self.buf.drain(..at + m.text().len());
                        self.open = None;
                    } else {
                        self.reject(open);
                    }
                }
                (Some(open), None) => {
                    if eof || !could_complete(open, &self.buf[..hold_from(&self.buf)]) {
                        self.reject(open);
                    } else {
                        return;
                    }
                }
            }
        }
    }

    /// The opening tag stays text; its would-be body is scanned again as ordinary text.
    fn reject(&mut self, open: Open) {
        self.literal(open.start().text());
        self.open = None;
    }

    /// Takes `buf[..end]` as the body of `open` if it is valid; says whether it was.
    fn accept(&mut self, open: Open, end: usize) -> bool {
        let body = &self.buf[..end];
        match open {
            Open::Ref => {
                if body.len() > MAX_LABEL_BYTES {
                    return false;
                }
                let label = body.to_string();
                let start = self.done.text.len();
                self.done.text.push_str(&label);
                self.done.objects.push(GroundedObject {
                    label: Some(label),
                    span: TextSpan {
                        start,
                        end: self.done.text.len(),
                    },
                    boxes: vec![],
                    quads: vec![],
                });
                self.chain = true;
                true
            }
            Open::Box | Open::Quad => {
                if body.len() > MAX_SHAPE_BYTES {
                    return false;
                }
                let shape = if open == Open::Box {
                    parse_points::<2>(body).map(Shape::Box)
                } else {
                    parse_points::<4>(body).map(Shape::Quad)
                };
                let Ok(shape) = shape else {
                    return false;
                };
                self.shapes += 1;
                let number = self.shapes;
                let text = &mut self.done.text;
                if !text.is_empty() && !text.ends_with(char::is_whitespace) {
                    text.push(' ');
                }
                if !self.chain {
                    let at = text.len();
                    self.done.objects.push(GroundedObject {
                        label: None,
                        span: TextSpan { start: at, end: at },
                        boxes: vec![],
                        quads: vec![],
                    });
                }
                let text = &mut self.done.text;
                text.push_str(&format!("[{number}]"));
                self.chain = true;
                // A chain always has an object: a reference or the one just pushed.
                let obj = self
                    .done
                    .objects
                    .last_mut()
                    .expect("a chained shape has an object");
                match shape {
                    Shape::Box([[x1, y1], [x2, y2]]) => obj.boxes.push(BBox {
                        number,
                        x1,
                        y1,
                        x2,
                        y2,
                    }),
                    Shape::Quad(points) => obj.quads.push(Quad { number, points }),
                }
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(number: usize, x1: u32, y1: u32, x2: u32, y2: u32) -> BBox {
        BBox {
            number,
            x1,
            y1,
            x2,
            y2,
        }
    }

    /// Streams `s` split at every pair of char boundaries (three pieces), and one char at a
    /// time, and checks each against the batch parse.
    fn check_streaming(s: &str) {
        let whole = Grounding::parse(s);
        let cuts: Vec<usize> = s.char_indices().map(|(i, _)| i).chain([s.len()]).collect();
        let run = |pieces: &[&str]| {
            let mut st = GroundingStream::new();
            let mut out = String::new();
            for p in pieces {
                out.push_str(&st.push(p));
            }
            let (tail, g) = st.finish();
            out.push_str(&tail);
            assert_eq!(out, whole.text, "{s:?} split as {pieces:?}");
            assert_eq!(g, whole, "{s:?} split as {pieces:?}");
        };
        for (ai, &a) in cuts.iter().enumerate() {
            for &z in &cuts[ai..] {
                run(&[&s[..a], &s[a..z], &s[z..]]);
            }
        }
        let chars: Vec<String> = s.chars().map(String::from).collect();
        run(&chars.iter().map(String::as_str).collect::<Vec<_>>());
    }

    #[test]
    fn reference_with_box() {
        let s = "<|object_ref_start|>the red car<|object_ref_end|><|box_start|>(120,340),(560,780)<|box_end|> is parked.";
        let g = Grounding::parse(s);
        assert_eq!(g.text, "the red car [1] is parked.");
        assert_eq!(
            g.objects,
            vec![GroundedObject {
                label: Some("the red car".into()),
                span: TextSpan { start: 0, end: 11 },
                boxes: vec![b(1, 120, 340, 560, 780)],
                quads: vec![],
            }]
        );
        assert!(g.has_shapes());
        check_streaming(s);
    }

    #[test]
    fn several_boxes_one_ref_and_a_bare_box() {
        let s = "Two <|object_ref_start|>dogs<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|><|box_start|>( 10 , 20 ) , ( 30 , 40 )<|box_end|> and <|box_start|>(5,6),(7,8)<|box_end|>.";
        let g = Grounding::parse(s);
        assert_eq!(g.text, "Two dogs [1] [2] and [3].");
        assert_eq!(g.objects.len(), 2);
        assert_eq!(g.objects[0].label.as_deref(), Some("dogs"));
        assert_eq!(
            &g.text[g.objects[0].span.start..g.objects[0].span.end],
            "dogs"
        );
        assert_eq!(
            g.objects[0].boxes,
            vec![b(1, 1, 2, 3, 4), b(2, 10, 20, 30, 40)]
        );
        assert_eq!(g.objects[1].label, None);
        assert_eq!(g.objects[1].span, TextSpan { start: 21, end: 21 });
        assert_eq!(&g.text[21..], "[3].");
        assert_eq!(g.objects[1].boxes, vec![b(3, 5, 6, 7, 8)]);
        check_streaming(s);
    }

    #[test]
    fn quads_and_multibyte_text() {
        let s = "文字「<|object_ref_start|>出口 🚪<|object_ref_end|><|quad_start|>(1,2),(3,4),(5,6),(7,8)<|quad_end|>」é";
        let g = Grounding::parse(s);
        assert_eq!(g.text, "文字「出口 🚪 [1]」é");
        let o = &g.objects[0];
        assert_eq!(&g.text[o.span.start..o.span.end], "出口 🚪");
        assert_eq!(
            o.quads,
            vec![Quad {
                number: 1,
                points: [[1, 2], [3, 4], [5, 6], [7, 8]]
            }]
        );
        assert!(o.boxes.is_empty());
        check_streaming(s);
    }

    #[test]
    fn reference_without_shape_is_an_object_without_shapes() {
        let g = Grounding::parse("<|object_ref_start|>sky<|object_ref_end|> is blue");
        assert_eq!(g.text, "sky is blue");
        assert_eq!(g.objects.len(), 1);
        assert!(!g.has_shapes());
    }

    #[test]
    fn malformed_markup_stays_text() {
        for (s, want) in [
            // Unclosed tags.
            ("a <|box_start|>(1,2),(3,4)", "a <|box_start|>(1,2),(3,4)"),
            ("<|object_ref_start|>car", "<|object_ref_start|>car"),
            (
                "<|quad_start|>(1,2),(3,4),(5,6),(7,8)",
                "<|quad_start|>(1,2),(3,4),(5,6),(7,8)",
            ),
            // Non-numeric, negative, overflowing coordinates.
            (
                "<|box_start|>(a,2),(3,4)<|box_end|>",
                "<|box_start|>(a,2),(3,4)<|box_end|>",
            ),
            (
                "<|box_start|>(-1,2),(3,4)<|box_end|>",
                "<|box_start|>(-1,2),(3,4)<|box_end|>",
            ),
            (
                "<|box_start|>(99999999999,2),(3,4)<|box_end|>",
                "<|box_start|>(99999999999,2),(3,4)<|box_end|>",
            ),
            (
                "<|box_start|>(1.5,2),(3,4)<|box_end|>",
                "<|box_start|>(1.5,2),(3,4)<|box_end|>",
            ),
            // Wrong number of points.
            (
                "<|box_start|>(1,2)<|box_end|>",
                "<|box_start|>(1,2)<|box_end|>",
            ),
            (
                "<|box_start|>(1,2),(3,4),(5,6)<|box_end|>",
                "<|box_start|>(1,2),(3,4),(5,6)<|box_end|>",
            ),
            (
                "<|quad_start|>(1,2),(3,4)<|quad_end|>",
                "<|quad_start|>(1,2),(3,4)<|quad_end|>",
            ),
            ("<|box_start|><|box_end|>", "<|box_start|><|box_end|>"),
            // Closed by the wrong tag.
            (
                "<|box_start|>(1,2),(3,4)<|quad_end|>",
                "<|box_start|>(1,2),(3,4)<|quad_end|>",
            ),
            // Stray end tags.
            (
                "x<|box_end|>y<|object_ref_end|><|quad_end|>",
                "x<|box_end|>y<|object_ref_end|><|quad_end|>",
            ),
            // Nested reference: the outer opening tag stays text, the inner one is valid.
            (
                "<|object_ref_start|>a<|object_ref_start|>b<|object_ref_end|>",
                "<|object_ref_start|>ab",
            ),
            // Almost-markers.
            ("<|box_start(1,2)<|box_end|", "<|box_start(1,2)<|box_end|"),
            ("<|", "<|"),
            ("<", "<"),
        ] {
            let g = Grounding::parse(s);
            assert_eq!(g.text, want, "{s:?}");
            assert!(!g.has_shapes(), "{s:?}");
            check_streaming(s);
        }
    }

    #[test]
    fn a_malformed_box_does_not_hide_a_later_valid_one() {
        let s = "<|box_start|>(x)<|box_start|>(1,2),(3,4)<|box_end|>";
        let g = Grounding::parse(s);
        assert_eq!(g.text, "<|box_start|>(x) [1]");
        assert_eq!(g.objects[0].boxes, vec![b(1, 1, 2, 3, 4)]);
        check_streaming(s);
    }

    #[test]
    fn text_between_ref_and_box_ends_the_chain() {
        let s = "<|object_ref_start|>cat<|object_ref_end|> <|box_start|>(1,2),(3,4)<|box_end|>";
        let g = Grounding::parse(s);
        assert_eq!(g.text, "cat [1]");
        assert_eq!(g.objects.len(), 2);
        assert!(g.objects[0].boxes.is_empty());
        assert_eq!(g.objects[1].label, None);
        check_streaming(s);
    }

    #[test]
    fn overlong_label_stays_text_and_is_not_held_forever() {
        let long = "x".repeat(MAX_LABEL_BYTES + 1);
        let s = format!("<|object_ref_start|>{long}<|object_ref_end|>");
        let g = Grounding::parse(&s);
        assert_eq!(g.text, s);
        let mut st = GroundingStream::new();
        let out = st.push(&format!("<|object_ref_start|>{long}"));
        // Released before any closing tag came.
        assert_eq!(out, format!("<|object_ref_start|>{long}"));
        // Exactly at the cap it is still a label.
        let ok = "y".repeat(MAX_LABEL_BYTES);
        let g = Grounding::parse(&format!("<|object_ref_start|>{ok}<|object_ref_end|>"));
        assert_eq!(g.objects[0].label.as_deref(), Some(ok.as_str()));
    }

    #[test]
    fn streaming_holds_back_only_possible_markup() {
        let mut st = GroundingStream::new();
        assert_eq!(st.push("Hello <"), "Hello ");
        assert_eq!(st.push("|bo"), "");
        assert_eq!(st.push("x_start|>(12"), "");
        // A letter where a coordinate must be: the box is malformed, released at once.
        assert_eq!(st.push("q"), "<|box_start|>(12q");
        assert_eq!(st.push(" <|im"), " <|im");
        assert_eq!(st.push("_end|>"), "_end|>");
        let (tail, g) = st.finish();
        assert_eq!(tail, "");
        assert_eq!(g.text, "Hello <|box_start|>(12q <|im_end|>");

        let mut st = GroundingStream::new();
        assert_eq!(st.push("<|object_ref_start|>the car"), "");
        assert_eq!(st.push("<|object_ref_end|>"), "the car");
        assert_eq!(st.push("<|box_start|>(1,2),(3,4)"), "");
        assert_eq!(st.push("<|box_end|>"), " [1]");
        assert_eq!(st.grounding().objects[0].boxes.len(), 1);
    }

    #[test]
    fn random_answers_stream_like_batch() {
        let parts = [
            OBJECT_REF_START,
            OBJECT_REF_END,
            BOX_START,
            BOX_END,
            QUAD_START,
            QUAD_END,
            "(1,2),(3,4)",
            "(1,2),(3,4),(5,6),(7,8)",
            "(1,",
            "2)",
            " ",
            "车",
            "a",
            "<|",
            "|>",
            "<",
            "box_end",
        ];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        for _ in 0..150 {
            let s: String = (0..next(8) + 1).map(|_| parts[next(parts.len())]).collect();
            check_streaming(&s);
        }
    }

    #[test]
    fn pixel_mapping() {
        assert_eq!(to_pixel(0, 640), 0);
        assert_eq!(to_pixel(500, 640), 320);
        assert_eq!(to_pixel(999, 640), 639);
        // Rounded down: 123 * 333 / 1000 = 40.959.
        assert_eq!(to_pixel(123, 333), 40);
        // Out of range: clamped to the last pixel.
        assert_eq!(to_pixel(1000, 640), 639);
        assert_eq!(to_pixel(u32::MAX, 640), 639);
        assert_eq!(to_pixel(500, 0), 0);
        let g = Grounding::parse(
            "<|object_ref_start|>a<|object_ref_end|><|quad_start|>(0,0),(999,0),(999,999),(0,999)<|quad_end|><|box_start|>(100,200),(300,400)<|box_end|>",
        );
        assert_eq!(g.shapes()[1].points, vec![[100, 200], [300, 400]]);
        let shapes = g.pixel_shapes(200, 100);
        assert_eq!(shapes.len(), 2);
        assert_eq!(shapes[0].number, 1);
        assert_eq!(shapes[0].kind, ShapeKind::Quad);
        assert_eq!(shapes[0].points, vec![[0, 0], [199, 0], [199, 99], [0, 99]]);
        assert_eq!(shapes[1].kind, ShapeKind::Box);
        assert_eq!(shapes[1].label.as_deref(), Some("a"));
        assert_eq!(shapes[1].points, vec![[20, 20], [60, 40]]);
    }

    #[test]
    fn qwen25_boxes_in_resized_pixels() {
        // A 640x480 image the model saw as 644x476: a JSON box and a marked-up one, both in
        // resized pixels.
        let answer =
            "<|object_ref_start|>sky<|object_ref_end|><|box_start|>(0,0),(644,238)<|box_end|> and
```json
[{\"bbox_2d\": [322, 119, 644, 476], \"label\": \"car\"}]
```";
        let g = Grounding::parse_for(answer, BoxCoordinates::ResizedPixels);
        assert_eq!(g.coordinates, BoxCoordinates::ResizedPixels);
        assert!(g.text.starts_with("sky [1] and\n```json"), "{}", g.text);
        assert_eq!(g.objects.len(), 2);
        let shapes = g.image_pixel_shapes((640, 480), (644, 476));
        assert_eq!(shapes[0].points, vec![[0, 0], [639, 240]]);
        assert_eq!(shapes[1].number, 2);
        assert_eq!(shapes[1].label.as_deref(), Some("car"));
        assert_eq!(shapes[1].points, vec![[320, 120], [639, 479]]);
        let v = serde_json::to_value(&g).unwrap();
        assert_eq!(v["coordinates"], "resized_pixels");
        assert_eq!(serde_json::from_value::<Grounding>(v).unwrap(), g);
        // The same text read as Qwen2-VL's: JSON is just text, thousandths of the original.
        let old = Grounding::parse_for(answer, BoxCoordinates::Thousandths);
        assert_eq!(old.objects.len(), 1);
        assert_eq!(
            old.image_pixel_shapes((640, 480), (644, 476)),
            old.pixel_shapes(640, 480)
        );
        assert_eq!(
            old.pixel_shapes(640, 480)[0].points,
            vec![[0, 0], [412, 114]]
        );
        assert!(serde_json::to_value(&old)
            .unwrap()
            .get("coordinates")
            .is_none());
    }

    #[test]
    fn serializes_to_json() {
        let g = Grounding::parse(
            "<|object_ref_start|>car<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>",
        );
        let v = serde_json::to_value(&g).unwrap();
        assert_eq!(v["text"], "car [1]");
        assert_eq!(v["objects"][0]["label"], "car");
        assert_eq!(v["objects"][0]["span"]["end"], 3);
        assert_eq!(v["objects"][0]["boxes"][0]["x2"], 3);
        let back: Grounding = serde_json::from_value(v).unwrap();
        assert_eq!(back, g);
        let p = serde_json::to_value(g.pixel_shapes(1000, 1000)).unwrap();
        assert_eq!(p[0]["kind"], "box");
        assert_eq!(p[0]["points"], serde_json::json!([[1, 2], [3, 4]]));
    }
}
