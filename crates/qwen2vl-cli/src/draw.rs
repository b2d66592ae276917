//! `--draw-boxes`: the answer's boxes and quads drawn on the image they refer to.
//!
//! Outlines and labels are drawn by hand (axis-aligned filled rectangles, Bresenham lines and
//! a built-in 5x7 ASCII bitmap font) rather than with imageproc and a TrueType font: that is
//! about a hundred lines against several crates and a font file. Labels show ASCII only;
//! any other character is drawn as `?` (the full label is in the terminal listing and JSON).

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use image::{ImageFormat, Rgb, RgbImage};
use qwen2vl::grounding::{PixelShape, ShapeKind};

use crate::error::CliError;

/// Outline colours, by shape number (Sasha Trubetskoy's distinct colours): red, green, blue,
/// orange, purple, cyan, magenta, yellow.
pub const PALETTE: [[u8; 3]; 8] = [
    [230, 25, 75],
    [60, 180, 75],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
    [70, 240, 240],
    [240, 50, 230],
    [255, 225, 25],
];

/// Longest label drawn, in characters (longer ones end in `...`).
const MAX_LABEL_CHARS: usize = 40;

/// Where `--draw-boxes` writes, checked before the model is loaded so a typo costs no wait.
#[derive(Debug)]
pub struct DrawTarget {
    path: PathBuf,
    format: ImageFormat,
    /// We created the (empty) file while checking; remove it if nothing gets written.
    created: bool,
    written: bool,
}

impl DrawTarget {
    /// Checks that `path` can be written as PNG or JPEG (by extension) and that the request
    /// has an image to draw on. The file is opened for writing now (created empty if it did
    /// not exist, an existing file left untouched until the end), so a missing directory or a
    /// missing permission is reported at once, naming the path.
    pub fn prepare(path: &Path, has_image: bool) -> Result<Self, CliError> {
        if !has_image {
            return Err(CliError::Usage(
                "--draw-boxes needs an image to draw on: pass one with --image".into(),
            ));
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        let format = match ext.as_deref() {
            Some("png") => ImageFormat::Png,
            Some("jpg" | "jpeg") => ImageFormat::Jpeg,
            _ => {
                return Err(CliError::Usage(format!(
                    "--draw-boxes {}: unsupported file type; use a .png, .jpg or .jpeg name",
                    path.display()
                )))
            }
        };
        let existed = path.exists();
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| {
                CliError::Usage(format!(
                    "--draw-boxes {}: cannot write there: {e}",
                    path.display()
                ))
            })?;
        Ok(DrawTarget {
            path: path.to_path_buf(),
            format,
            created: !existed,
            written: false,
        })
    }

    /// The output path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `img` (replacing whatever the file held).
    pub fn write(mut self, img: &RgbImage) -> Result<(), CliError> {
        img.save_with_format(&self.path, self.format).map_err(|e| {
            CliError::Failed(format!(
                "--draw-boxes {}: cannot write the image: {e}",
                self.path.display()
            ))
        })?;
        self.written = true;
        Ok(())
    }
}

impl Drop for DrawTarget {
    fn drop(&mut self) {
        // A failed run leaves no empty file behind that it created itself.
        if self.created && !self.written {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Draws every shape's outline in its colour and a label `n text` on a filled background.
/// Line width and text size grow with the image; everything is clipped to the image.
pub fn draw_shapes(img: &mut RgbImage, shapes: &[PixelShape]) {
    let side = img.width().min(img.height());
    let thick = (side / 300).clamp(2, 8);
    let scale = ((side + 150) / 300).clamp(1, 8);
    for s in shapes {
        let color = PALETTE[(s.number.max(1) - 1) % PALETTE.len()];
        let (left, top) = match s.kind {
            ShapeKind::Box => {
                let [[x1, y1], [x2, y2]] = [s.points[0], s.points[1]];
                let (l, r) = (x1.min(x2), x1.max(x2));
                let (t, b) = (y1.min(y2), y1.max(y2));
                // Four sides, drawn inward so the outline stays inside the box.
                fill_rect(img, l, t, r, (t + thick - 1).min(b), color);
                fill_rect(img, l, b.saturating_sub(thick - 1).max(t), r, b, color);
                fill_rect(img, l, t, (l + thick - 1).min(r), b, color);
                fill_rect(img, r.saturating_sub(thick - 1).max(l), t, r, b, color);
                (l, t)
            }
            ShapeKind::Quad => {
                let n = s.points.len();
                for i in 0..n {
                    let (a, b) = (s.points[i], s.points[(i + 1) % n]);
                    line(img, a, b, thick, color);
                }
                (
                    s.points.iter().map(|p| p[0]).min().unwrap_or(0),
                    s.points.iter().map(|p| p[1]).min().unwrap_or(0),
                )
            }
        };
        let text = label_text(s.number, s.label.as_deref());
        draw_label(img, left, top, &text, scale, color);
    }
}

/// `n label` in printable ASCII, shortened to [`MAX_LABEL_CHARS`].
fn label_text(number: usize, label: Option<&str>) -> String {
    let full = match label {
        Some(l) if !l.trim().is_empty() => format!("{number} {}", l.trim()),
        _ => number.to_string(),
    };
    let mut out: String = full
        .chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .collect();
    if out.chars().count() > MAX_LABEL_CHARS {
        out = out.chars().take(MAX_LABEL_CHARS - 3).collect::<String>() + "...";
    }
    out
}

/// Fills the inclusive rectangle `(x0, y0)..=(x1, y1)`, clipped to the image.
fn fill_rect(img: &mut RgbImage, x0: u32, y0: u32, x1: u32, y1: u32, color: [u8; 3]) {
    if img.width() == 0 || img.height() == 0 {
        return;
    }
    for y in y0..=y1.min(img.height() - 1) {
        for x in x0..=x1.min(img.width() - 1) {
            img.put_pixel(x, y, Rgb(color));
        }
    }
}

/// A `thick`-pixel line from `a` to `b` (Bresenham, a square brush at each step).
fn line(img: &mut RgbImage, a: [u32; 2], b: [u32; 2], thick: u32, color: [u8; 3]) {
    let (mut x, mut y) = (i64::from(a[0]), i64::from(a[1]));
    let (x1, y1) = (i64::from(b[0]), i64::from(b[1]));
    let (dx, dy) = ((x1 - x).abs(), -(y1 - y).abs());
    let (sx, sy) = (if x < x1 { 1 } else { -1 }, if y < y1 { 1 } else { -1 });
    let mut err = dx + dy;
    let half = i64::from(thick / 2);
    loop {
        let (bx, by) = ((x - half).max(0) as u32, (y - half).max(0) as u32);
        fill_rect(img, bx, by, bx + thick - 1, by + thick - 1, color);
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

/// Draws `text` on a box of `color` just above `(left, top)`, or just inside the shape when
/// there is no room above; moved left when it would run off the right edge.
fn draw_label(img: &mut RgbImage, left: u32, top: u32, text: &str, scale: u32, color: [u8; 3]) {
    let pad = scale;
    let w = text.chars().count() as u32 * 6 * scale + 2 * pad - scale;
    let h = 7 * scale + 2 * pad;
    let x0 = left.min(img.width().saturating_sub(w));
    let y0 = if top >= h { top - h } else { top };
    fill_rect(img, x0, y0, x0 + w - 1, y0 + h - 1, color);
    // Black text on light colours, white on dark (Rec. 601 luma).
    let luma = 299 * u32::from(color[0]) + 587 * u32::from(color[1]) + 114 * u32::from(color[2]);
    let ink = if luma > 140_000 {
        [0, 0, 0]
    } else {
        [255, 255, 255]
    };
    for (i, c) in text.chars().enumerate() {
        let cols = glyph(c);
        let gx = x0 + pad + i as u32 * 6 * scale;
        for (col, bits) in cols.iter().enumerate() {
            for row in 0..7u32 {
                if bits >> row & 1 == 1 {
                    let px = gx + col as u32 * scale;
                    let py = y0 + pad + row * scale;
                    fill_rect(img, px, py, px + scale - 1, py + scale - 1, ink);
                }
            }
        }
    }
}

/// The 5x7 glyph of a printable ASCII character (anything else: `?`), five columns, bit 0
/// the top row. The classic public-domain 5x7 LCD font.
fn glyph(c: char) -> [u8; 5] {
    let i = match c {
        ' '..='~' => c as usize - 0x20,
        _ => '?' as usize - 0x20,
    };
    FONT[i]
}

const FONT: [[u8; 5]; 95] = [
    [0x00, 0x00, 0x00, 0x00, 0x00], // ' '
    [0x00, 0x00, 0x5F, 0x00, 0x00], // !
    [0x00, 0x07, 0x00, 0x07, 0x00], // "
    [0x14, 0x7F, 0x14, 0x7F, 0x14], // #
    [0x24, 0x2A, 0x7F, 0x2A, 0x12], // $
    [0x23, 0x13, 0x08, 0x64, 0x62], // %
    [0x36, 0x49, 0x55, 0x22, 0x50], // &
    [0x00, 0x05, 0x03, 0x00, 0x00], // '
    [0x00, 0x1C, 0x22, 0x41, 0x00], // (
    [0x00, 0x41, 0x22, 0x1C, 0x00], // )
    [0x08, 0x2A, 0x1C, 0x2A, 0x08], // *
    [0x08, 0x08, 0x3E, 0x08, 0x08], // +
    [0x00, 0x50, 0x30, 0x00, 0x00], // ,
    [0x08, 0x08, 0x08, 0x08, 0x08], // -
    [0x00, 0x60, 0x60, 0x00, 0x00], // .
    [0x20, 0x10, 0x08, 0x04, 0x02], // /
    [0x3E, 0x51, 0x49, 0x45, 0x3E], // 0
    [0x00, 0x42, 0x7F, 0x40, 0x00], // 1
    [0x42, 0x61, 0x51, 0x49, 0x46], // 2
    [0x21, 0x41, 0x45, 0x4B, 0x31], // 3
    [0x18, 0x14, 0x12, 0x7F, 0x10], // 4
    [0x27, 0x45, 0x45, 0x45, 0x39], // 5
    [0x3C, 0x4A, 0x49, 0x49, 0x30], // 6
    [0x01, 0x71, 0x09, 0x05, 0x03], // 7
    [0x36, 0x49, 0x49, 0x49, 0x36], // 8
    [0x06, 0x49, 0x49, 0x29, 0x1E], // 9
    [0x00, 0x36, 0x36, 0x00, 0x00], // :
    [0x00, 0x56, 0x36, 0x00, 0x00], // ;
    [0x08, 0x14, 0x22, 0x41, 0x00], // <
    [0x14, 0x14, 0x14, 0x14, 0x14], // =
    [0x00, 0x41, 0x22, 0x14, 0x08], // >
    [0x02, 0x01, 0x51, 0x09, 0x06], // ?
    [0x32, 0x49, 0x79, 0x41, 0x3E], // @
    [0x7E, 0x11, 0x11, 0x11, 0x7E], // A
    [0x7F, 0x49, 0x49, 0x49, 0x36], // B
    [0x3E, 0x41, 0x41, 0x41, 0x22], // C
    [0x7F, 0x41, 0x41, 0x22, 0x1C], // D
    [0x7F, 0x49, 0x49, 0x49, 0x41], // E
    [0x7F, 0x09, 0x09, 0x09, 0x01], // F
    [0x3E, 0x41, 0x49, 0x49, 0x7A], // G
    [0x7F, 0x08, 0x08, 0x08, 0x7F], // H
    [0x00, 0x41, 0x7F, 0x41, 0x00], // I
    [0x20, 0x40, 0x41, 0x3F, 0x01], // J
    [0x7F, 0x08, 0x14, 0x22, 0x41], // K
    [0x7F, 0x40, 0x40, 0x40, 0x40], // L
    [0x7F, 0x02, 0x0C, 0x02, 0x7F], // M
    [0x7F, 0x04, 0x08, 0x10, 0x7F], // N
    [0x3E, 0x41, 0x41, 0x41, 0x3E], // O
    [0x7F, 0x09, 0x09, 0x09, 0x06], // P
    [0x3E, 0x41, 0x51, 0x21, 0x5E], // Q
    [0x7F, 0x09, 0x19, 0x29, 0x46], // R
    [0x46, 0x49, 0x49, 0x49, 0x31], // S
    [0x01, 0x01, 0x7F, 0x01, 0x01], // T
    [0x3F, 0x40, 0x40, 0x40, 0x3F], // U
    [0x1F, 0x20, 0x40, 0x20, 0x1F], // V
    [0x3F, 0x40, 0x38, 0x40, 0x3F], // W
    [0x63, 0x14, 0x08, 0x14, 0x63], // X
    [0x07, 0x08, 0x70, 0x08, 0x07], // Y
    [0x61, 0x51, 0x49, 0x45, 0x43], // Z
    [0x00, 0x7F, 0x41, 0x41, 0x00], // [
    [0x02, 0x04, 0x08, 0x10, 0x20], // backslash
    [0x00, 0x41, 0x41, 0x7F, 0x00], // ]
    [0x04, 0x02, 0x01, 0x02, 0x04], // ^
    [0x40, 0x40, 0x40, 0x40, 0x40], // _
    [0x00, 0x01, 0x02, 0x04, 0x00], // `
    [0x20, 0x54, 0x54, 0x54, 0x78], // a
    [0x7F, 0x48, 0x44, 0x44, 0x38], // b
    [0x38, 0x44, 0x44, 0x44, 0x20], // c
    [0x38, 0x44, 0x44, 0x48, 0x7F], // d
    [0x38, 0x54, 0x54, 0x54, 0x18], // e
    [0x08, 0x7E, 0x09, 0x01, 0x02], // f
    [0x0C, 0x52, 0x52, 0x52, 0x3E], // g
    [0x7F, 0x08, 0x04, 0x04, 0x78], // h
    [0x00, 0x44, 0x7D, 0x40, 0x00], // i
    [0x20, 0x40, 0x44, 0x3D, 0x00], // j
    [0x7F, 0x10, 0x28, 0x44, 0x00], // k
    [0x00, 0x41, 0x7F, 0x40, 0x00], // l
    [0x7C, 0x04, 0x18, 0x04, 0x78], // m
    [0x7C, 0x08, 0x04, 0x04, 0x78], // n
    [0x38, 0x44, 0x44, 0x44, 0x38], // o
    [0x7C, 0x14, 0x14, 0x14, 0x08], // p
    [0x08, 0x14, 0x14, 0x18, 0x7C], // q
    [0x7C, 0x08, 0x04, 0x04, 0x08], // r
    [0x48, 0x54, 0x54, 0x54, 0x20], // s
    [0x04, 0x3F, 0x44, 0x40, 0x20], // t
    [0x3C, 0x40, 0x40, 0x20, 0x7C], // u
    [0x1C, 0x20, 0x40, 0x20, 0x1C], // v
    [0x3C, 0x40, 0x30, 0x40, 0x3C], // w
    [0x44, 0x28, 0x10, 0x28, 0x44], // x
    [0x0C, 0x50, 0x50, 0x50, 0x3C], // y
    [0x44, 0x64, 0x54, 0x4C, 0x44], // z
    [0x00, 0x08, 0x36, 0x41, 0x00], // {
    [0x00, 0x00, 0x7F, 0x00, 0x00], // |
    [0x00, 0x41, 0x36, 0x08, 0x00], // }
    [0x08, 0x04, 0x08, 0x10, 0x08], // ~
];

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(number: usize, kind: ShapeKind, points: Vec<[u32; 2]>) -> PixelShape {
        PixelShape {
            number,
            label: Some("car".into()),
            kind,
            points,
        }
    }

    #[test]
    fn box_outline_is_drawn_inside_the_box_only() {
        let mut img = RgbImage::new(200, 150);
        draw_shapes(
            &mut img,
            &[shape(1, ShapeKind::Box, vec![[150, 120], [50, 60]])],
        );
        let red = Rgb(PALETTE[0]);
        // The four sides, corners given bottom-right first.
        for (x, y) in [(50, 90), (150, 90), (100, 120), (51, 61), (149, 119)] {
            assert_eq!(*img.get_pixel(x, y), red, "({x}, {y})");
        }
        // Inside and outside untouched (the label sits above the top-left corner).
        for (x, y) in [(100, 90), (49, 90), (151, 90), (100, 121), (160, 10)] {
            assert_eq!(*img.get_pixel(x, y), Rgb([0, 0, 0]), "({x}, {y})");
        }
        // The label: a filled box with white ink above the top edge.
        let above: Vec<_> = (40..60)
            .flat_map(|y| (50..80).map(move |x| (x, y)))
            .collect();
        assert!(above.iter().any(|&(x, y)| *img.get_pixel(x, y) == red));
        assert!(above
            .iter()
            .any(|&(x, y)| *img.get_pixel(x, y) == Rgb([255, 255, 255])));
    }

    #[test]
    fn quad_edges_join_its_points_and_colours_follow_numbers() {
        let mut img = RgbImage::new(100, 100);
        let pts = vec![[10, 20], [90, 20], [90, 80], [10, 80]];
        draw_shapes(&mut img, &[shape(2, ShapeKind::Quad, pts.clone())]);
        let green = Rgb(PALETTE[1]);
        for [x, y] in pts {
            assert_eq!(*img.get_pixel(x, y), green);
        }
        assert_eq!(*img.get_pixel(50, 80), green);
        assert_eq!(*img.get_pixel(90, 50), green);
        assert_eq!(*img.get_pixel(50, 50), Rgb([0, 0, 0]));
    }

    #[test]
    fn shapes_at_the_edges_and_tiny_images_do_not_panic() {
        for (w, h) in [(1, 1), (3, 200), (200, 3), (640, 480)] {
            let mut img = RgbImage::new(w, h);
            let (x, y) = (w - 1, h - 1);
            draw_shapes(
                &mut img,
                &[
                    shape(1, ShapeKind::Box, vec![[0, 0], [x, y]]),
                    shape(9, ShapeKind::Quad, vec![[x, 0], [0, y], [x, y], [0, 0]]),
                    PixelShape {
                        label: Some("長い名前 with a very long label that will be cut".into()),
                        ..shape(3, ShapeKind::Box, vec![[x, y], [x, y]])
                    },
                ],
            );
            assert_eq!(img.dimensions(), (w, h));
            assert_ne!(*img.get_pixel(0, 0), Rgb([0, 0, 0]));
        }
    }

    #[test]
    fn labels_are_ascii_and_bounded() {
        assert_eq!(label_text(1, Some(" the red car ")), "1 the red car");
        assert_eq!(label_text(2, Some("红车")), "2 ??");
        assert_eq!(label_text(3, None), "3");
        let long = label_text(4, Some(&"x".repeat(100)));
        assert_eq!(long.chars().count(), MAX_LABEL_CHARS);
        assert!(long.ends_with("..."));
    }

    #[test]
    fn font_glyphs_are_distinct_and_visible() {
        for c in '!'..='~' {
            assert!(glyph(c).iter().any(|&b| b != 0), "{c:?} is blank");
            assert!(glyph(c).iter().all(|&b| b < 0x80), "{c:?} has an 8th row");
        }
        let mut all: Vec<[u8; 5]> = (' '..='~').map(glyph).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 95);
        assert_eq!(glyph('é'), glyph('?'));
    }

    #[test]
    fn draw_target_checks_before_anything_runs() {
        let dir = std::env::temp_dir().join(format!("qwen2vl-draw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = DrawTarget::prepare(&dir.join("a.png"), false).unwrap_err();
        assert!(e.to_string().contains("--image"), "{e}");
        let e = DrawTarget::prepare(&dir.join("a.gif"), true).unwrap_err();
        assert!(e.to_string().contains(".png, .jpg"), "{e}");
        let missing = dir.join("no/such/dir/a.png");
        let e = DrawTarget::prepare(&missing, true).unwrap_err();
        assert!(
            e.to_string().contains(&missing.display().to_string()),
            "{e}"
        );
        assert_eq!(e.exit_code(), 2);
        // Created while checking, removed when nothing was written.
        let p = dir.join("out.PNG");
        let t = DrawTarget::prepare(&p, true).unwrap();
        assert!(p.exists());
        drop(t);
        assert!(!p.exists());
        // An existing file is kept when nothing was written.
        std::fs::write(&p, b"keep").unwrap();
        drop(DrawTarget::prepare(&p, true).unwrap());
        assert_eq!(std::fs::read(&p).unwrap(), b"keep");
        // Written as a JPEG when asked.
        let j = dir.join("out.jpeg");
        DrawTarget::prepare(&j, true)
            .unwrap()
            .write(&RgbImage::new(8, 8))
            .unwrap();
        assert_eq!(
            image::ImageReader::open(&j)
                .unwrap()
                .with_guessed_format()
                .unwrap()
                .format(),
            Some(ImageFormat::Jpeg)
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
