//! Chat mode of sessions on SmolLM2-135M-Instruct (it has a chat template; the tiny test
//! models have none): the first turn generates what the runtime generates from the rendered
//! template, later turns evaluate only the new tokens, and a reset forgets the conversation.

use sparrow::generate::{generate, GenerateOptions};
use sparrow::model::{Model, ModelOptions};
use sparrow::sample::SamplerConfig;
use sparrow::tokenizer::{ChatTemplate, Message, Tokenizer};
use sparrow_ffi::core::{self, GenOptions, OpenOptions, SparrowStopReason};
use sparrow_tests::model_from_env;

const QUESTION: &str = "What is the capital of France?";

fn greedy_chat(max_tokens: u32) -> GenOptions {
    GenOptions {
        max_tokens,
        temperature: 0.0,
        chat: true,
        ..GenOptions::default()
    }
}

/// Runs one chat turn; returns the streamed token ids, the text, and the result.
fn turn(s: &core::SessionObj, prompt: &str) -> (Vec<u32>, String, core::GenResult) {
    let mut ids = Vec::new();
    let mut text = String::new();
    let r = core::generate(s, prompt, &greedy_chat(24), |id, piece| {
        ids.extend(id);
        text.push_str(piece);
        true
    })
    .unwrap();
    (ids, text, r)
}

#[test]
fn chat_turns_follow_the_template_and_reuse_the_cache() {
    let path = model_from_env("SPARROW_SMOLLM2_Q4_1");
    let m = core::model_open(
        path.to_str().unwrap(),
        OpenOptions {
            threads: 2,
            n_ctx: 512,
            backend: 0,
        },
    )
    .unwrap();
    let s = core::session_create(&m, 0).unwrap();
    let (ids1, text1, r1) = turn(&s, QUESTION);

    // The runtime on the rendered conversation.
    let mut rm = Model::open(
        &path,
        &ModelOptions {
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let tok = Tokenizer::from_metadata(rm.file().metadata()).unwrap();
    let template = ChatTemplate::from_metadata(rm.file().metadata()).unwrap();
    let rendered = template
        .render(&[Message::new("user", QUESTION)], true)
        .unwrap();
    let prompt = tok.encode(&rendered, true, true).unwrap();
    let mut rs = rm.new_session(512).unwrap();
    let opts = GenerateOptions {
        max_tokens: 24,
        sampler: SamplerConfig::greedy(),
        stop: Vec::new(),
        stop_at_eog: true,
    };
    let g = generate(&mut rm, &mut rs, &tok, &prompt, &opts, |_| true).unwrap();
    let want: Vec<u32> = g
        .tokens
        .iter()
        .copied()
        .filter(|&t| !tok.is_eog(t))
        .collect();
    assert_eq!(
        ids1, want,
        "first turn differs from the runtime on the rendered template"
    );
    assert_eq!(text1, g.text);
    assert_eq!(r1.prompt_tokens as usize, prompt.len());
    assert!(!text1.trim().is_empty());

    // The second turn evaluates only what the conversation added.
    let (ids2, text2, r2) = turn(&s, "And of Germany?");
    let all = template
        .render(
            &[
                Message::new("user", QUESTION),
                Message::new("assistant", text1.trim()),
                Message::new("user", "And of Germany?"),
            ],
            true,
        )
        .unwrap();
    let all = tok.encode(&all, true, true).unwrap();
    assert!(
        (r2.prompt_tokens as usize) < all.len() - prompt.len() + 8,
        "the second turn evaluated {} tokens of a {}-token conversation",
        r2.prompt_tokens,
        all.len()
    );
    assert!(!ids2.is_empty() && !text2.trim().is_empty());

    // A reset forgets the conversation: the first turn again.
    core::session_reset(&s).unwrap();
    let (ids3, _, r3) = turn(&s, QUESTION);
    assert_eq!(ids3, ids1);
    assert_eq!(r3.prompt_tokens, r1.prompt_tokens);
    assert!(matches!(
        r3.stop_reason,
        SparrowStopReason::SPARROW_STOP_EOG | SparrowStopReason::SPARROW_STOP_MAX_TOKENS
    ));
}
