//! Qwen2 text models (`Qwen2ForCausalLM`, `Qwen2MoeForCausalLM`) against transformers 4.49:
//! tiny random checkpoints written by `tools/reference/make_qwen2_text.py`
//! (`tests/fixtures/tiny-qwen2`: tied, bf16; `tiny-qwen2-untied`: untied, f16;
//! `tiny-qwen2-moe`: a sparse MoE layer and a dense one), their prompts rendered by the
//! Qwen2-Instruct chat template of `tokenizer_config.json`.
//!
//! - prompt ids identical to `apply_chat_template(..., add_generation_prompt=True)`;
//! - decoder layer 0 and last-position prefill logits within [`common::tolerance`] (as in
//!   `golden_logits.rs`);
//! - greedy tokens identical to `generate(do_sample=False)`, through the raw model and
//!   through [`Pipeline::generate`];
//! - an unknown architecture and an image sent to a text model are clear errors.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use qwen2vl::config::{Architecture, Qwen2VLConfig};
use qwen2vl::generation::sampler::SamplingParams;
use qwen2vl::generation::GenerateRequest;
use qwen2vl::model::Qwen2VL;
use qwen2vl::pipeline::{DTypeChoice, Pipeline};
use qwen2vl::processing::messages::{Content, ContentPart, Message};

const MODELS: [&str; 3] = ["tiny-qwen2", "tiny-qwen2-untied", "tiny-qwen2-moe"];

struct Reference {
    dir: PathBuf,
    tensors: HashMap<String, Tensor>,
    json: serde_json::Value,
}

impl Reference {
    fn load(model: &str) -> Reference {
        let dir = common::fixtures().join(model);
        let tensors =
            candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
                .expect("reference.safetensors");
        let json = serde_json::from_str(
            &std::fs::read_to_string(dir.join("reference.json")).expect("reference.json"),
        )
        .expect("reference.json parses");
        Reference { dir, tensors, json }
    }

    fn cases(&self) -> Vec<String> {
        let mut v: Vec<String> = self.json["cases"]
            .as_object()
            .expect("cases")
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    fn messages(&self, case: &str) -> Vec<Message> {
        serde_json::from_value(self.json["cases"][case]["messages"].clone()).expect("messages")
    }

    fn u32s(&self, key: &str) -> Vec<u32> {
        self.tensors[key]
            .to_vec1::<i64>()
            .expect("i64")
            .into_iter()
            .map(|x| x as u32)
            .collect()
    }

    fn f32s(&self, key: &str) -> Vec<f32> {
        common::flat(&self.tensors[key])
    }
}

fn load_model(dir: &std::path::Path) -> Qwen2VL {
    common::load_model(dir, DType::F32)
}

#[test]
fn config_names_a_text_model() {
    for name in MODELS {
        let c = Qwen2VLConfig::from_file(&common::fixtures().join(name).join("config.json"))
            .expect("config");
        assert!(c.text.rope_1d);
        assert_eq!(c.text.mrope_section(), vec![c.text.head_dim() / 2]);
        assert!(!c.text.use_sliding_window);
        assert_eq!(c.text.context_len(), 32768);
        if name.ends_with("moe") {
            assert_eq!(c.architecture, Architecture::Qwen2Moe);
            let moe = c.text.moe.as_ref().expect("MoE fields");
            assert_eq!((moe.num_experts, moe.num_experts_per_tok), (4, 2));
            assert!(!moe.norm_topk_prob);
            // Layer 0 sparse, layer 1 dense (mlp_only_layers = [1]).
            assert!(moe.is_sparse(0) && !moe.is_sparse(1));
            // Qwen2MoeConfig writes sliding_window null when use_sliding_window is false.
            assert_eq!(c.text.sliding_window, None);
        } else {
            assert_eq!(c.architecture, Architecture::Qwen2);
            assert!(c.text.moe.is_none() && c.text.sliding_window.is_some());
        }
    }
}

#[test]
fn prefill_logits_and_greedy_tokens_match_reference() {
    for name in MODELS {
        let r = Reference::load(name);
        let model = load_model(&r.dir);
        assert!(!model.has_vision());
        for case in r.cases() {
            let ids = r.u32s(&format!("{case}.input_ids"));
            // A text prompt's M-RoPE ids are equal in all three rows: 0..n.
            let positions = model.position_ids(&ids, &[], &[]).expect("positions");
            assert_eq!(positions.ids[0], (0..ids.len() as i64).collect::<Vec<_>>());
            assert_eq!(positions.rope_delta, 0);
            let mut cache = model.new_cache(ids.len() + 32).expect("cache");
            let mut layers = Vec::new();
            let h = model
                .prefill_hidden(&ids, &positions, None, None, &mut cache, Some(&mut layers))
                .expect("prefill");
            let want = r.f32s(&format!("{case}.layer0_out"));
            let d = common::max_abs_diff(&common::flat(&layers[0]), &want);
            let tol = common::tolerance(&want);
            println!("{name}/{case}: layer 0 max abs diff {d:e} (tolerance {tol:e})");
            assert!(d <= tol, "{name}/{case}: layer 0 diff {d} > {tol}");
            let last = qwen2vl::text::TextModel::last_position(&h).expect("last");
            let logits = model.text().logits(&last).expect("logits");
            let got = common::flat(&logits);
            let want = r.f32s(&format!("{case}.logits"));
            let d = common::max_abs_diff(&got, &want);
            let tol = common::tolerance(&want);
            println!("{name}/{case}: logits max abs diff {d:e} (tolerance {tol:e})");
            assert!(d <= tol, "{name}/{case}: logits diff {d} > {tol}");

            // Greedy decoding with the raw model API.
            let want_ids = r.u32s(&format!("{case}.greedy_ids"));
            let mut logits = logits.squeeze(0).expect("squeeze");
            let mut got_ids = Vec::new();
            while got_ids.len() < want_ids.len() {
                let tok = logits
                    .argmax(0)
                    .expect("argmax")
                    .to_scalar::<u32>()
                    .expect("u32");
                got_ids.push(tok);
                if tok == 151645 || tok == 151643 {
                    break;
                }
                logits = model
                    .decode_step(&[tok], &[positions.rope_delta], &mut [&mut cache])
                    .expect("decode")
                    .squeeze(0)
                    .expect("squeeze");
            }
            assert_eq!(got_ids, want_ids, "{name}/{case}: greedy tokens");
        }
    }
}

/// End to end: messages rendered with the checkpoint's own (Qwen2-Instruct) chat template
/// from `tokenizer_config.json`, tokenized, generated greedily.
#[test]
fn pipeline_generates_the_reference_tokens() {
    for name in MODELS {
        let r = Reference::load(name);
        let pipeline = Pipeline::load(&r.dir, DTypeChoice::F32).expect("load");
        assert!(pipeline.processor().is_text_only());
        let max_new = r.json["max_new_tokens"].as_u64().expect("max_new_tokens") as usize;
        for case in r.cases() {
            let messages = r.messages(&case);
            let inputs = pipeline
                .prepare(&GenerateRequest::new(messages.clone()))
                .expect("prepare");
            assert_eq!(
                inputs.prompt,
                r.json["cases"][&case]["prompt"].as_str().expect("prompt"),
                "{name}/{case}: rendered prompt"
            );
            assert_eq!(
                inputs.input_ids,
                r.u32s(&format!("{case}.input_ids")),
                "{name}/{case}: prompt ids"
            );
            // The same turns as lists of one text part each (as the CLI and OpenAI clients
            // send them) render as the strings do.
            let as_parts: Vec<Message> = messages
                .iter()
                .map(|m| {
                    let text = match &m.content {
                        Content::Text(t) => t.clone(),
                        Content::Parts(_) => unreachable!("the fixture's turns are strings"),
                    };
                    Message::parts(m.role, vec![ContentPart::text(text)])
                })
                .collect();
            let parts_inputs = pipeline
                .prepare(&GenerateRequest::new(as_parts))
                .expect("prepare parts");
            assert_eq!(
                parts_inputs.input_ids, inputs.input_ids,
                "{name}/{case}: parts"
            );
            let req = GenerateRequest::new(messages)
                .with_sampling(SamplingParams::greedy())
                .with_max_new_tokens(max_new);
            let gen = pipeline.generate(&req, &mut |_| {}).expect("generate");
            assert_eq!(
                gen.token_ids,
                r.u32s(&format!("{case}.greedy_ids")),
                "{name}/{case}: greedy tokens"
            );
        }
    }
}

/// An image or a video sent to a text model is refused before anything is read, naming the
/// part and saying the model has no vision tower.
#[test]
fn text_model_refuses_images_and_videos() {
    let dir = common::fixtures().join("tiny-qwen2");
    let pipeline = Pipeline::load(&dir, DTypeChoice::F32).expect("load");
    let image = common::fixtures().join("images/photo640.png");
    let req = GenerateRequest::from_prompt(None, &[image], "What is this?")
        .with_sampling(SamplingParams::greedy())
        .with_max_new_tokens(4);
    let e = pipeline.generate(&req, &mut |_| {}).unwrap_err();
    let item = e.item().expect("the error names the image");
    assert_eq!((item.index, item.message), (1, 1));
    let e = e.to_string();
    assert!(e.contains("image 1 (message 1)"), "{e}");
    assert!(e.contains("no vision tower"), "{e}");
    assert!(e.contains("Qwen2ForCausalLM"), "{e}");
    // A missing file is not even opened: the refusal comes first.
    let video: Vec<Message> = serde_json::from_value(serde_json::json!([
        {"role": "user", "content": "hi"},
        {"role": "user", "content": [
            {"type": "text", "text": "and this?"},
            {"type": "video", "video": "/nonexistent/clip.mp4"}
        ]}
    ]))
    .expect("messages");
    let e = pipeline
        .generate(&GenerateRequest::new(video), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("video 1 (message 2)") && e.contains("no vision tower"),
        "{e}"
    );
    // The model itself refuses vision rows too.
    let e = pipeline
        .model()
        .encode_vision(&[0.0; 1176 * 4], &[[1, 2, 2]])
        .unwrap_err()
        .to_string();
    assert!(e.contains("no vision tower"), "{e}");
}

/// An architecture other than the supported ones is an error naming it and them.
#[test]
fn unknown_architecture_is_a_clear_error() {
    let e = Qwen2VLConfig::from_json_str(r#"{"architectures": ["LlamaForCausalLM"]}"#)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("architecture LlamaForCausalLM is not supported")
            && e.contains("Qwen2VLForConditionalGeneration")
            && e.contains("Qwen2ForCausalLM")
            && e.contains("Qwen2MoeForCausalLM"),
        "{e}"
    );
    let e = Qwen2VLConfig::from_json_str(
        r#"{"architectures": ["Qwen2MoeForCausalLM"], "num_experts": 4, "num_experts_per_tok": 5}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("num_experts_per_tok is 5 with 4 experts"), "{e}");
    let e = Qwen2VLConfig::from_json_str(r#"{"model_type": "llama"}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model_type llama"), "{e}");
    // Through the pipeline: the file is named.
    let dir = std::env::temp_dir().join(format!("qwen2vl-arch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = common::fixtures().join("tiny-qwen2");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["Qwen3MoeForCausalLM"]);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let e = Pipeline::load(&dir, DTypeChoice::F32)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("config.json") && e.contains("Qwen3MoeForCausalLM is not supported"),
        "{e}"
    );
    // Rope scalings the reference would apply are refused rather than ignored.
    let e = Qwen2VLConfig::from_json_str(
        r#"{"architectures": ["Qwen2ForCausalLM"], "rope_scaling": {"type": "yarn", "factor": 4.0}}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("rope_scaling type yarn is not supported"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Where transformers 4.49's default (SDPA / eager) attention applies a sliding window: in
/// every layer whenever `config.sliding_window` is set below the context, whatever
/// `use_sliding_window` and `max_window_layers` say; a `Qwen2MoeConfig` drops the window
/// unless `use_sliding_window` (see `TextConfig::attention_window`). The context is
/// `max_position_embeddings` either way.
#[test]
fn where_the_sliding_window_applies() {
    let window = |json: &str| {
        let c = Qwen2VLConfig::from_json_str(json).unwrap();
        assert_eq!(c.text.context_len(), 32768);
        c.text.attention_window()
    };
    let qwen2 = r#""architectures": ["Qwen2ForCausalLM"], "max_position_embeddings": 32768"#;
    let moe = r#""architectures": ["Qwen2MoeForCausalLM"], "max_position_embeddings": 32768"#;
    for (json, want) in [
        (
            format!(
                r#"{{{qwen2}, "sliding_window": 4096, "use_sliding_window": true, "max_window_layers": 28}}"#
            ),
            Some(4096),
        ),
        (
            format!(r#"{{{qwen2}, "sliding_window": 4096, "use_sliding_window": false}}"#),
            Some(4096),
        ),
        // HF's default window (4096) when the key is absent.
        (format!(r#"{{{qwen2}}}"#), Some(4096)),
        (format!(r#"{{{qwen2}, "sliding_window": null}}"#), None),
        // At or beyond the context it never hides a key (the released configs).
        (format!(r#"{{{qwen2}, "sliding_window": 131072}}"#), None),
        (format!(r#"{{{qwen2}, "sliding_window": 32768}}"#), None),
        (
            format!(r#"{{{moe}, "sliding_window": 4096, "use_sliding_window": false}}"#),
            None,
        ),
        (
            format!(r#"{{{moe}, "sliding_window": 4096, "use_sliding_window": true}}"#),
            Some(4096),
        ),
        // Qwen2-VL keeps its window as Qwen2 does (its configs set it to the context).
        (
            r#"{"max_position_embeddings": 32768, "sliding_window": 32768}"#.to_string(),
            None,
        ),
    ] {
        assert_eq!(window(&json), want, "{json}");
    }
}

/// A sliding window as transformers 4.49 applies it (`reference-swa.*`, from
/// `make_qwen2_text.py swa`: tiny-qwen2 with `sliding_window` 12, `use_sliding_window`
/// true and `max_window_layers` 1, on a 54-token prompt; eager and SDPA agree): every
/// position's final (normed) hidden state and the last logits within [`common::tolerance`], and the
/// 24 greedy tokens (decode steps past the window) identical, through the raw model and the
/// pipeline. A prefill in two parts gives the whole prefill's numbers.
#[test]
fn sliding_window_matches_the_reference() {
    let src = common::fixtures().join("tiny-qwen2");
    let r = candle_core::safetensors::load(src.join("reference-swa.safetensors"), &Device::Cpu)
        .unwrap();
    let dir = std::env::temp_dir().join(format!("qwen2vl-swa-{}", std::process::id()));
    let meta = common::tiny_qwen2_swa(&dir);
    let model = load_model(&dir);
    assert_eq!(model.config().text.attention_window(), Some(12));
    let ids: Vec<u32> = r["input_ids"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect();
    assert!(ids.len() > 12 * 4);
    let positions = model.position_ids(&ids, &[], &[]).unwrap();
    let mut cache = model.new_cache(ids.len() + 32).unwrap();
    let h = model
        .prefill_hidden(&ids, &positions, None, None, &mut cache, None)
        .unwrap();
    let want = common::flat(&r["final_hidden"]);
    let normed = model.text().final_norm(&h).unwrap();
    let (d, tol) = (
        common::max_abs_diff(&common::flat(&normed), &want),
        common::tolerance(&want),
    );
    println!("swa: final hidden states max abs diff {d:e} (tolerance {tol:e})");
    assert!(d <= tol, "hidden {d} > {tol}");
    let logits = model
        .text()
        .logits(&qwen2vl::text::TextModel::last_position(&h).unwrap())
        .unwrap();
    let want = common::flat(&r["logits"]);
    let (d, tol) = (
        common::max_abs_diff(&common::flat(&logits), &want),
        common::tolerance(&want),
    );
    println!("swa: logits max abs diff {d:e} (tolerance {tol:e})");
    assert!(d <= tol, "logits {d} > {tol}");
    // The window matters here: without it the logits are far off.
    let plain = common::flat(&r["logits_no_window"]);
    assert!(common::max_abs_diff(&plain, &want) > 100.0 * tol);

    // The same prompt prefilled in two parts (the second after 30 cached positions, as
    // after a prefix-cache hit, its window reaching into the first part): the same numbers
    // (within the products' rounding: row counts change the GEMM's blocking).
    let mut parts = model.new_cache(ids.len()).unwrap();
    let head = model.position_ids(&ids[..30], &[], &[]).unwrap();
    let a = model
        .prefill_hidden(&ids[..30], &head, None, None, &mut parts, None)
        .unwrap();
    let b = model
        .prefill_hidden(
            &ids[30..],
            &positions.tail(30),
            None,
            None,
            &mut parts,
            None,
        )
        .unwrap();
    let joined = Tensor::cat(&[a, b], 1).unwrap();
    let d = common::max_abs_diff(&common::flat(&joined), &common::flat(&h));
    assert!(d < 1e-4, "prefill in two parts: {d}");

    // Greedy decoding: every step past the window.
    let want_ids: Vec<u32> = r["greedy_ids"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect();
    let mut logits = logits.squeeze(0).unwrap();
    let mut got = Vec::new();
    while got.len() < want_ids.len() {
        let tok = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        got.push(tok);
        if tok == 151645 || tok == 151643 {
            break;
        }
        logits = model
            .decode_step(&[tok], &[positions.rope_delta], &mut [&mut cache])
            .unwrap()
            .squeeze(0)
            .unwrap();
    }
    assert_eq!(got, want_ids, "greedy tokens");

    // Two sequences decoded in one batch (one past its window, one within it) get the
    // logits each gets alone.
    let prefilled = |n: usize| {
        let p = model.position_ids(&ids[..n], &[], &[]).unwrap();
        let mut c = model.new_cache(n + 4).unwrap();
        model
            .prefill_hidden(&ids[..n], &p, None, None, &mut c, None)
            .unwrap();
        c
    };
    let (mut a, mut b) = (prefilled(ids.len()), prefilled(9));
    let batched = common::flat(
        &model
            .decode_step(&[want_ids[0], 42], &[0, 0], &mut [&mut a, &mut b])
            .unwrap(),
    );
    let (mut a, mut b) = (prefilled(ids.len()), prefilled(9));
    let mut alone = common::flat(
        &model
            .decode_step(&[want_ids[0]], &[0], &mut [&mut a])
            .unwrap(),
    );
    alone.extend(common::flat(
        &model.decode_step(&[42], &[0], &mut [&mut b]).unwrap(),
    ));
    let d = common::max_abs_diff(&batched, &alone);
    assert!(d < 1e-4, "batched decode: {d}");

    let messages: Vec<Message> = serde_json::from_value(meta["messages"].clone()).unwrap();
    let pipeline = Pipeline::load(&dir, DTypeChoice::F32).unwrap();
    let req = GenerateRequest::new(messages)
        .with_sampling(SamplingParams::greedy())
        .with_max_new_tokens(want_ids.len());
    let gen = pipeline.generate(&req, &mut |_| {}).unwrap();
    assert_eq!(gen.token_ids, want_ids, "pipeline greedy tokens");
    std::fs::remove_dir_all(&dir).ok();
}

/// A text model loads with `--quant` as Qwen2-VL does (`qwen2vl quantize` of a text model:
/// `tests/gguf_text.rs`).
#[test]
fn text_model_quantizes_at_load() {
    let dir = common::fixtures().join("tiny-qwen2");
    let p = Pipeline::load_with(
        &dir,
        &qwen2vl::pipeline::LoadOptions {
            quant: Some(qwen2vl::ops::quant::plan::QuantScheme::Q8_0),
            ..Default::default()
        },
    )
    .expect("q8_0 load");
    let req = GenerateRequest::new(vec![Message::user("Hello! Who are you?")])
        .with_sampling(SamplingParams::greedy())
        .with_max_new_tokens(3);
    assert_eq!(
        p.generate(&req, &mut |_| {})
            .expect("generate")
            .token_ids
            .len(),
        3
    );
}

/// `--quant` quantizes a MoE model's experts as it does dense matrices: a synthetic
/// `Qwen2MoeForCausalLM` wide enough for q8_0 blocks (hidden 64, experts of width 64) gives
/// nearly the float logits when loaded with q8_0, and the quantized load is smaller.
#[test]
fn quantized_moe_experts_stay_close_to_float() {
    let dir = std::env::temp_dir().join(format!("qwen2vl-moe-q-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (d, e, inter, vocab) = (64usize, 4usize, 64usize, 256usize);
    let cfg = serde_json::json!({
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
        "vocab_size": vocab, "hidden_size": d, "intermediate_size": inter,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": false, "sliding_window": null, "num_experts": e,
        "num_experts_per_tok": 2, "moe_intermediate_size": inter,
        "shared_expert_intermediate_size": inter, "norm_topk_prob": true,
        "decoder_sparse_step": 1, "mlp_only_layers": []
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    // A deterministic LCG: the same weights on every run.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut rand = |shape: &[usize], scale: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let s = 1.0 / (d as f32).sqrt();
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), rand(&[vocab, d], 1.0));
    t.insert("lm_head.weight".into(), rand(&[vocab, d], s));
    t.insert(
        "model.norm.weight".into(),
        rand(&[d], 0.1).affine(1.0, 1.0).unwrap(),
    );
    let mlp = |t: &mut HashMap<String, Tensor>,
               rand: &mut dyn FnMut(&[usize], f32) -> Tensor,
               p: String| {
        t.insert(format!("{p}.gate_proj.weight"), rand(&[inter, d], s));
        t.insert(format!("{p}.up_proj.weight"), rand(&[inter, d], s));
        t.insert(
            format!("{p}.down_proj.weight"),
            rand(&[d, inter], 1.0 / (inter as f32).sqrt()),
        );
    };
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        for n in ["input_layernorm", "post_attention_layernorm"] {
            t.insert(
                format!("{p}.{n}.weight"),
                rand(&[d], 0.1).affine(1.0, 1.0).unwrap(),
            );
        }
        let a = format!("{p}.self_attn");
        for (n, rows) in [("q_proj", d), ("k_proj", d / 2), ("v_proj", d / 2)] {
            t.insert(format!("{a}.{n}.weight"), rand(&[rows, d], s));
            t.insert(format!("{a}.{n}.bias"), rand(&[rows], 0.1));
        }
        t.insert(format!("{a}.o_proj.weight"), rand(&[d, d], s));
        t.insert(format!("{p}.mlp.gate.weight"), rand(&[e, d], 2.0 * s));
        t.insert(
            format!("{p}.mlp.shared_expert_gate.weight"),
            rand(&[1, d], s),
        );
        mlp(&mut t, &mut rand, format!("{p}.mlp.shared_expert"));
        for k in 0..e {
            mlp(&mut t, &mut rand, format!("{p}.mlp.experts.{k}"));
        }
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();

    let ids: Vec<u32> = (0..24).map(|i| (i * 37 % vocab) as u32).collect();
    let logits = |quant| {
        let (m, report) =
            Qwen2VL::load_quantized(&dir, DType::F32, &Device::Cpu, None, quant, None)
                .expect("load");
        assert!(report.unused.is_empty(), "{:?}", report.unused);
        let pos = m.position_ids(&ids, &[], &[]).unwrap();
        let mut cache = m.new_cache(ids.len()).unwrap();
        common::flat(&m.prefill(&ids, &pos, None, None, &mut cache).unwrap())
    };
    // The experts' matrices are in the plan (the router and the shared gate stay float).
    let plan = qwen2vl::ops::quant::plan::QuantPlan {
        text: Some(qwen2vl::ops::quant::plan::QuantScheme::Q8_0),
        vision: None,
        layers: 2,
    };
    assert!(plan
        .type_for("model.layers.1.mlp.experts.3.down_proj.weight", inter)
        .is_some());
    let float = logits(None);
    let q8 = logits(Some(qwen2vl::ops::quant::plan::QuantScheme::Q8_0));
    let scale = float.iter().fold(0f32, |a, b| a.max(b.abs()));
    let d = common::max_abs_diff(&float, &q8);
    println!("q8_0 MoE: logits max abs diff {d} (max |logit| {scale})");
    assert!(d > 0.0, "the experts were not quantized");
    assert!(d < 0.02 * scale, "q8_0 diff {d} vs max |logit| {scale}");
    std::fs::remove_dir_all(&dir).ok();
}
