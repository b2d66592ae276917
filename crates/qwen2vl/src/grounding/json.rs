//! Qwen2.5-VL's boxes: JSON objects in the answer text with `"bbox_2d": [x1, y1, x2, y2]` and
//! usually a `"label"`, most often a list in a fenced block:
//!
//! ````text
//! ```json
//! [{"bbox_2d": [135, 114, 1016, 672], "label": "the red car"}]
//! ```
//! ````
//!
//! The coordinates are pixels of the image as the model saw it (after `smart_resize`), not
//! Qwen2-VL's [0, 1000) (see [`super::BoxCoordinates`]). The JSON stays in the clean text
//! as written; each box found becomes a [`GroundedObject`] whose span is the object's
//! bytes there, numbered after the markup's shapes.

use super::{BBox, GroundedObject, TextSpan};

/// Longest JSON object looked at, in bytes: a box object is a few dozen; the cap bounds the
/// work spent on each `{` of the text.
pub const MAX_JSON_OBJECT_BYTES: usize = 4096;

/// Most `{` tried as the start of an object in one answer (bounds the work on an answer full
/// of braces, e.g. code, to about this many times [`MAX_JSON_OBJECT_BYTES`]).
pub const MAX_JSON_ATTEMPTS: usize = 1024;

/// The `bbox_2d` objects in `text`, numbered from `first_number`, in order of appearance.
/// An object without a `bbox_2d` of four finite numbers is not a box (its inner objects are
/// still looked at); negative coordinates become 0 and fractions are rounded to the
/// nearest pixel.
pub(super) fn json_boxes(text: &str, first_number: usize) -> Vec<GroundedObject> {
    let mut out = Vec::new();
    let mut from = 0;
    let mut attempts = 0;
    while let Some(off) = text.get(from..).and_then(|t| t.find('{')) {
        attempts += 1;
        if attempts > MAX_JSON_ATTEMPTS {
            break;
        }
        let start = from + off;
        let mut end = (start + MAX_JSON_OBJECT_BYTES).min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let mut values =
            serde_json::Deserializer::from_str(&text[start..end]).into_iter::<serde_json::Value>();
        from = start + 1;
        let Some(Ok(value)) = values.next() else {
            continue;
        };
        let Some(b) = value.get("bbox_2d").and_then(corners) else {
            continue;
        };
        let stop = start + values.byte_offset();
        let label = value
            .get("label")
            .and_then(|l| l.as_str())
            .map(str::to_string);
        out.push(GroundedObject {
            label,
            span: TextSpan { start, end: stop },
            boxes: vec![BBox {
                number: first_number + out.len(),
                x1: b[0],
                y1: b[1],
                x2: b[2],
                y2: b[3],
            }],
            quads: Vec::new(),
        });
        from = stop;
    }
    out
}

/// `[x1, y1, x2, y2]` as four whole pixels, or `None` unless it is four finite numbers.
fn corners(v: &serde_json::Value) -> Option<[u32; 4]> {
    let a = v.as_array()?;
    if a.len() != 4 {
        return None;
    }
    let mut out = [0u32; 4];
    for (o, x) in out.iter_mut().zip(a) {
        let f = x.as_f64().filter(|f| f.is_finite())?;
        *o = f.round().clamp(0.0, f64::from(u32::MAX)) as u32;
    }
    Some(out)
}

/// A pixel of the resized image the model saw (`resized` wide or high) → a pixel index in
/// [0, `original`) of the image it came from: `v * original / resized` rounded down, clamped
/// to the last pixel (a model may write the resized size itself, or more).
pub fn resized_to_pixel(v: u32, original: u32, resized: u32) -> u32 {
    if resized == 0 {
        return 0;
    }
    let p = u64::from(v) * u64::from(original) / u64::from(resized);
    p.min(u64::from(original.saturating_sub(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_from_a_fenced_list() {
        let text = "Here:\n```json\n[\n  {\"bbox_2d\": [135, 114, 1016, 672], \"label\": \"the red car\"},\n  {\"bbox_2d\": [1.6, -3, 20, 40.4]}\n]\n```";
        let objs = json_boxes(text, 3);
        assert_eq!(objs.len(), 2);
        assert_eq!(objs[0].label.as_deref(), Some("the red car"));
        let b = objs[0].boxes[0];
        assert_eq!((b.number, b.x1, b.y1, b.x2, b.y2), (3, 135, 114, 1016, 672));
        let s = objs[0].span;
        assert!(
            text[s.start..s.end].starts_with("{\"bbox_2d\"")
                && text[s.start..s.end].ends_with("car\"}")
        );
        let b = objs[1].boxes[0];
        assert_eq!((b.number, b.x1, b.y1, b.x2, b.y2), (4, 2, 0, 20, 40));
        assert_eq!(objs[1].label, None);
    }

    #[test]
    fn what_is_not_a_box_is_skipped() {
        // Wrong length, strings, no bbox_2d, an unclosed object; a box nested in a wrapper
        // object is found; a box after a broken one is found.
        let text = r#"{"bbox_2d": [1, 2, 3]} {"bbox_2d": ["1", 2, 3, 4]} {"a": 1} {"bbox_2d": [1, 2,
            {"wrap": {"bbox_2d": [5, 6, 7, 8], "label": "in"}} {"bbox_2d": [9, 10, 11, 12]}"#;
        let objs = json_boxes(text, 1);
        let got: Vec<_> = objs
            .iter()
            .map(|o| (o.label.clone(), o.boxes[0].x1, o.boxes[0].number))
            .collect();
        assert_eq!(got, vec![(Some("in".to_string()), 5, 1), (None, 9, 2)]);
        assert!(json_boxes("no braces at all", 1).is_empty());
        assert!(json_boxes("{{{{ é {", 1).is_empty());
    }

    #[test]
    fn braces_everywhere_cost_a_bounded_amount() {
        let text = "{".repeat(200_000);
        let t = std::time::Instant::now();
        assert!(json_boxes(&text, 1).is_empty());
        // MAX_JSON_ATTEMPTS tries of at most MAX_JSON_OBJECT_BYTES each.
        assert!(t.elapsed().as_secs() < 5);
        // A box past the attempts cap is not looked for.
        let late = format!(
            "{}{}",
            "{} ".repeat(MAX_JSON_ATTEMPTS),
            r#"{"bbox_2d": [1, 2, 3, 4]}"#
        );
        assert!(json_boxes(&late, 1).is_empty());
    }

    #[test]
    fn resized_pixels_map_back_to_the_original() {
        // A 640x480 image resized to 644x476.
        assert_eq!(resized_to_pixel(0, 640, 644), 0);
        assert_eq!(resized_to_pixel(322, 640, 644), 320);
        assert_eq!(resized_to_pixel(643, 640, 644), 639);
        assert_eq!(resized_to_pixel(644, 640, 644), 639);
        assert_eq!(resized_to_pixel(238, 480, 476), 240);
        assert_eq!(resized_to_pixel(u32::MAX, 480, 476), 479);
        assert_eq!(resized_to_pixel(5, 480, 0), 0);
    }
}
