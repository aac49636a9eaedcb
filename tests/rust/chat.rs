//! Constrained decoding and OpenAI-style chat on the test model, whose random weights write
//! garbage unless constrained: JSON that parses and fits its schema, grammars' strings only,
//! bad schemas refused by name, and a conversation fed back turn by turn reusing its cache.

mod common;

use common::{load, BACKENDS};
use phi2_web::chat::ChatRun;
use phi2_web::constraint::{LazyGrammars, ResponseFormat};
use phi2_web::generation::StopReason;
use phi2_web::{block_on, Phi, PhiTokenizer, SamplingParams, Session, Timings};
use serde_json::{json, Value};

/// Generates from `prompt` with `params` (and its response format) and returns the text and
/// how it ended.
fn generate(
    model: &Phi,
    tokenizer: &PhiTokenizer,
    grammars: &mut LazyGrammars,
    prompt: &str,
    params: SamplingParams,
) -> (String, Option<StopReason>) {
    let ids = tokenizer.encode(prompt).unwrap();
    let mut session = Session::start(model, tokenizer, grammars, &mut None, ids, params).unwrap();
    let mut text = String::new();
    while let Some(token) = block_on(session.next(model, tokenizer)).unwrap() {
        text.push_str(&token.text);
    }
    assert_eq!(text, session.text());
    (text, session.stop_reason())
}

fn format(value: Value) -> ResponseFormat {
    serde_json::from_value(value).unwrap()
}

/// The schema of the JSON test, checked by hand below (no validator dependency).
fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": { "type": "string", "maxLength": 12 },
            "age": { "type": "integer", "minimum": 0, "maximum": 120 },
            "tags": { "type": "array", "items": { "enum": ["a", "b", "c"] }, "maxItems": 3 }
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": false
    })
}

fn fits_person_schema(value: &Value) -> Result<(), String> {
    let object = value.as_object().ok_or("not an object")?;
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    if keys != ["age", "name", "tags"] {
        return Err(format!("keys {keys:?}"));
    }
    let name = object["name"].as_str().ok_or("name is not a string")?;
    if name.chars().count() > 12 {
        return Err(format!("name {name:?} is longer than 12"));
    }
    let age = object["age"].as_i64().ok_or("age is not an integer")?;
    if !(0..=120).contains(&age) {
        return Err(format!("age {age}"));
    }
    let tags = object["tags"].as_array().ok_or("tags is not an array")?;
    if tags.len() > 3
        || tags
            .iter()
            .any(|t| !matches!(t.as_str(), Some("a" | "b" | "c")))
    {
        return Err(format!("tags {tags:?}"));
    }
    Ok(())
}

#[test]
fn every_sampled_json_output_parses_and_fits_its_schema() {
    let response_format = format(json!({
        "type": "json_schema",
        "json_schema": { "name": "person", "schema": person_schema() }
    }));
    for backend in BACKENDS {
        let (model, tokenizer) = load("phi-tok", backend);
        let mut grammars = LazyGrammars::default();
        for seed in 0..20u64 {
            // Half pick on the device (top-k up to 32: the mask goes up as a bias), half on the
            // host (top-p without top-k and a frequency penalty need every logit there).
            let params = SamplingParams {
                max_tokens: 120,
                temperature: 1.0,
                top_k: (seed % 2 == 0).then_some(20),
                top_p: if seed % 2 == 0 { 1.0 } else { 0.95 },
                frequency_penalty: if seed % 2 == 0 { 0.0 } else { 0.5 },
                seed,
                response_format: Some(response_format.clone()),
                ..SamplingParams::default()
            };
            let prompt = "Instruct: Describe a person as JSON.\nOutput:";
            let (text, stop) = generate(&model, &tokenizer, &mut grammars, prompt, params);
            let value: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{backend:?} seed {seed}: {text:?} is not JSON: {e}"));
            fits_person_schema(&value)
                .unwrap_or_else(|e| panic!("{backend:?} seed {seed}: {text}: {e}"));
            assert_eq!(
                stop,
                Some(StopReason::Stop),
                "{backend:?} seed {seed}: {text}"
            );
        }
        // Greedy (on the device, the mask as a bias) gives the same kind of output.
        let greedy = SamplingParams {
            max_tokens: 120,
            response_format: Some(response_format.clone()),
            ..SamplingParams::default()
        };
        let prompt = "Instruct: Describe a person as JSON.\nOutput:";
        let (text, stop) = generate(&model, &tokenizer, &mut grammars, prompt, greedy);
        let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        fits_person_schema(&value).unwrap_or_else(|e| panic!("{backend:?} greedy: {text}: {e}"));
        assert_eq!(stop, Some(StopReason::Stop));
        // Unconstrained, the same model writes no JSON.
        let (free, _) = generate(
            &model,
            &tokenizer,
            &mut grammars,
            "Instruct: Describe a person as JSON.\nOutput:",
            SamplingParams {
                max_tokens: 30,
                ..SamplingParams::default()
            },
        );
        assert!(serde_json::from_str::<Value>(&free).is_err(), "{free:?}");
    }
}

#[test]
fn json_mode_and_grammars_produce_only_what_they_admit() {
    let (model, tokenizer) = load("phi-tok", phi2_web::BackendKind::Cpu);
    let mut grammars = LazyGrammars::default();
    let lark = format(json!({
        "type": "grammar",
        "grammar": { "syntax": "lark", "definition": "start: \"yes\" | \"no\" | \"maybe later\"" }
    }));
    let regex = format(json!({
        "type": "grammar",
        "grammar": { "syntax": "regex", "definition": "[0-9]{3}-[0-9]{4}" }
    }));
    let json_object = format(json!({ "type": "json_object" }));
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..10u64 {
        let params = |format: &ResponseFormat| SamplingParams {
            max_tokens: 80,
            temperature: 1.5,
            top_k: Some(if seed % 2 == 0 { 100 } else { 10 }),
            seed,
            response_format: Some(format.clone()),
            ..SamplingParams::default()
        };
        let (text, stop) = generate(&model, &tokenizer, &mut grammars, "Answer:", params(&lark));
        assert!(
            ["yes", "no", "maybe later"].contains(&text.as_str()),
            "{text:?}"
        );
        assert_eq!(stop, Some(StopReason::Stop));
        seen.insert(text);
        let (text, _) = generate(&model, &tokenizer, &mut grammars, "Call:", params(&regex));
        let digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
        assert!(
            text.len() == 8 && digits(&text[..3]) && &text[3..4] == "-" && digits(&text[4..]),
            "{text:?}"
        );
        let (text, stop) = generate(
            &model,
            &tokenizer,
            &mut grammars,
            "Data:",
            params(&json_object),
        );
        if stop == Some(StopReason::Stop) {
            let value: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert!(value.is_object(), "{text}");
        } else {
            // Out of tokens inside an unbounded object: a prefix of one, never anything else.
            assert_eq!(stop, Some(StopReason::Length));
            assert!(text.starts_with('{'), "{text:?}");
        }
    }
    assert!(seen.len() > 1, "sampling always chose {seen:?}");
}

#[test]
fn invalid_or_impossible_constraints_are_option_errors_naming_them() {
    let (model, tokenizer) = load("phi-tok", phi2_web::BackendKind::Cpu);
    let mut grammars = LazyGrammars::default();
    for (bad, words) in [
        (
            json!({"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}),
            "JSON schema",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"schema": {"type": "integer", "minimum": 5, "maximum": 3}}}),
            "JSON schema",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"schema": {"allOf": [{"type": "string"}, {"type": "integer"}]}}}),
            "JSON schema",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "x"}}),
            "schema is missing",
        ),
        (
            json!({"type": "grammar", "grammar": {"syntax": "lark", "definition": "start: ("}}),
            "Lark grammar",
        ),
    ] {
        let params = SamplingParams {
            response_format: Some(format(bad.clone())),
            ..SamplingParams::default()
        };
        let ids = tokenizer.encode("Hi").unwrap();
        let err = Session::start(&model, &tokenizer, &mut grammars, &mut None, ids, params)
            .err()
            .unwrap_or_else(|| panic!("{bad} was accepted"));
        assert_eq!(err.kind(), "OptionError", "{bad}: {err}");
        assert_eq!(
            err.details(),
            vec![("option", "response_format".to_string())]
        );
        assert!(err.to_string().contains(words), "{bad}: {err}");
    }
    // A refused start leaves the previous session, and its cache, for the next one.
    let ids = tokenizer.encode("Hello there").unwrap();
    let plain = SamplingParams::default;
    let mut previous = None;
    let first = Session::start(
        &model,
        &tokenizer,
        &mut grammars,
        &mut previous,
        ids.clone(),
        plain(),
    );
    previous = Some(first.unwrap());
    block_on(previous.as_mut().unwrap().next(&model, &tokenizer)).unwrap();
    let refused = SamplingParams {
        response_format: Some(format(
            json!({"type": "grammar", "grammar": {"syntax": "lark", "definition": "start: ("}}),
        )),
        ..plain()
    };
    let mut start = |ids: Vec<u32>, params| {
        Session::start(
            &model,
            &tokenizer,
            &mut grammars,
            &mut previous,
            ids,
            params,
        )
    };
    assert!(start(ids.clone(), refused).is_err());
    assert!(start(Vec::new(), plain()).is_err());
    let again = start(ids.clone(), plain()).unwrap();
    assert_eq!(again.reused_tokens(), ids.len() - 1);
    assert!(previous.is_none());
}

/// One turn of a chat: the request's messages, answered; the completion and the session.
fn chat_turn(
    model: &Phi,
    tokenizer: &PhiTokenizer,
    mut previous: Option<Session>,
    messages: &Value,
) -> (Value, Session) {
    let request = json!({ "messages": messages, "max_tokens": 8 });
    let start = ChatRun::start(&request, "chatcmpl-test".into(), 1, 0).unwrap();
    let mut run = start.run;
    let ids = tokenizer.encode(&start.prompt).unwrap();
    let mut grammars = LazyGrammars::default();
    let mut session = Session::start(
        model,
        tokenizer,
        &mut grammars,
        &mut previous,
        ids,
        start.params,
    )
    .unwrap();
    let mut timings = Timings::start(0.0);
    while let Some(token) = block_on(session.next(model, tokenizer)).unwrap() {
        timings.token(1.0);
        run.delta(&token.text);
    }
    (run.completion(&timings.stats(&session)), session)
}

#[test]
fn a_conversation_fed_back_turn_by_turn_reuses_its_cache() {
    for backend in BACKENDS {
        let (model, tokenizer) = load("phi-tok", backend);
        let mut messages = json!([{ "role": "user", "content": "I can't focus when I study." }]);
        let mut previous = None;
        let mut prompt_tokens = Vec::new();
        for turn in 0..3 {
            let (completion, session) = chat_turn(&model, &tokenizer, previous, &messages);
            assert_eq!(completion["object"], "chat.completion");
            let choice = &completion["choices"][0];
            assert_eq!(choice["message"]["role"], "assistant");
            let answer = choice["message"]["content"].as_str().unwrap().to_string();
            let usage = &completion["usage"];
            let prompt = usage["prompt_tokens"].as_u64().unwrap();
            let cached = usage["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap();
            assert_eq!(
                usage["total_tokens"].as_u64(),
                Some(prompt + usage["completion_tokens"].as_u64().unwrap())
            );
            if turn == 2 {
                // The whole previous prompt (and more) came from the cache.
                assert!(cached >= prompt_tokens[1], "{backend:?}: {usage}");
            }
            prompt_tokens.push(prompt);
            let messages_list = messages.as_array_mut().unwrap();
            messages_list.push(json!({ "role": "assistant", "content": answer }));
            messages_list
                .push(json!({ "role": "user", "content": format!("Turn {turn}: go on.") }));
            previous = Some(session);
        }
    }
}
