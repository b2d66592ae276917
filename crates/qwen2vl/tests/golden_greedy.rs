//! End to end: conversation in, greedy token ids out, identical to transformers'
//! `generate(do_sample=False, max_new_tokens=32)`.

mod common;

use qwen2vl::generation::sampler::SamplingParams;
use qwen2vl::generation::GenerateRequest;
use qwen2vl::pipeline::{DTypeChoice, Pipeline};
use qwen2vl::processing::messages::Message;

#[test]
fn greedy_generation_matches_reference() {
    for name in common::case_names() {
        let case = common::Case::load(&name);
        let pipeline = Pipeline::load(&case.model_dir(), DTypeChoice::F32).expect("load");
        let messages: Vec<Message> =
            serde_json::from_value(case.json["messages"].clone()).expect("messages parse");
        let mut req = GenerateRequest::new(messages)
            .with_sampling(SamplingParams::greedy())
            .with_max_new_tokens(case.json["max_new_tokens"].as_u64().unwrap_or(32) as usize);
        req.base_dir = Some(case.dir.clone());
        let mut streamed = String::new();
        let gen = pipeline
            .generate(&req, &mut |piece| streamed.push_str(piece))
            .expect("generate");
        assert_eq!(
            gen.token_ids,
            case.u32s("greedy_ids"),
            "case {name}: greedy tokens"
        );
        assert_eq!(
            streamed, gen.text,
            "case {name}: streamed text = final text"
        );
        let want_text = pipeline
            .processor()
            .tokenizer()
            .decode(&gen.token_ids, true)
            .expect("decode");
        assert_eq!(gen.text, want_text, "case {name}: text = decode(ids)");
        assert_eq!(gen.usage.prompt_tokens, case.u32s("input_ids").len());
        assert_eq!(gen.usage.completion_tokens, gen.token_ids.len());
        assert_eq!(gen.logprobs.len(), gen.token_ids.len());
        for lp in &gen.logprobs {
            assert!(lp.logprob <= 0.0 && lp.logprob.is_finite());
        }
    }
}
