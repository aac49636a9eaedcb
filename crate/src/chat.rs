//! OpenAI-style chat completions over Phi-2, shared by `phi2 chat` and the package's
//! `model.chat.completions.create`: the request and response shapes of OpenAI's API, and the
//! prompt Phi-2 was trained on ([`phi2_prompt`]).
//!
//! A run is driven by its caller, which owns the model: [`ChatRun::start`] reads the request
//! and gives the prompt's tokens and the sampling settings; the caller generates, handing each
//! token's text to [`ChatRun::delta`] (a `chat.completion.chunk` when streaming) and the final
//! stats to [`ChatRun::finish_chunks`] or [`ChatRun::completion`].

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::constraint::ResponseFormat;
use crate::error::{Error, Result};
use crate::generation::{GenerationStats, SamplingParams, StopReason};

/// Fields of OpenAI's request this engine does not offer: refused by name rather than ignored.
const UNSUPPORTED: [&str; 14] = [
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "top_logprobs",
    "logit_bias",
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "web_search_options",
    "service_tier",
    "store",
];

/// Every field read (besides `messages`), and those accepted and ignored.
const FIELDS: [&str; 16] = [
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "frequency_penalty",
    "presence_penalty",
    "response_format",
    "n",
    "logprobs",
    "user",
    "metadata",
];

/// One message of the conversation.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    /// Accepted, not used (Phi-2's format names its speakers Alice and Bob).
    #[serde(default)]
    pub name: Option<String>,
}

/// A message's fields this engine reads (`refusal` too: OpenAI's responses carry it, and apps
/// send an answer back as they got it); others, such as tool calls, are refused by name.
const MESSAGE_FIELDS: [&str; 4] = ["role", "content", "name", "refusal"];

/// A message's content: text, or text parts (`[{type: "text", text}]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
enum StopStrings {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// A prompt in Phi-2's format and the stop strings that end its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phi2Prompt {
    pub text: String,
    /// The speaker's next turn ("\nInstruct:", "\nAlice:"): where Phi-2, a base model, would
    /// go on writing the conversation itself.
    pub stop: Vec<String>,
}

/// The prompt for `messages` in the formats Phi-2's model card documents:
/// - one user message: `Instruct: {question}\nOutput:`;
/// - a conversation (any assistant message, or several user ones): `Alice: {user}` and
///   `Bob: {assistant}` lines, then `Bob:` for the answer;
/// - system (or developer) messages, wherever they are, first, one per line.
///
/// The last non-system message must be the user's. Assistant messages are written as their
/// content follows `Bob:` after a space, as the model writes its answers, so that a
/// conversation fed back turn by turn shares its start with the previous prompt and answer.
pub fn phi2_prompt(messages: &[ChatMessage]) -> Result<Phi2Prompt> {
    let mut system = Vec::new();
    let mut turns = Vec::new();
    for (index, message) in messages.iter().enumerate() {
        let text = message_text(message, index)?;
        match message.role.as_str() {
            "system" | "developer" => system.push(text),
            "user" | "assistant" => turns.push((message.role.as_str(), text)),
            other => {
                return Err(Error::option(
                    format!("messages[{index}].role"),
                    format!("`{other}` is not one of system, developer, user, assistant"),
                ))
            }
        }
    }
    match turns.last() {
        Some(("user", _)) => {}
        Some(_) => {
            return Err(Error::option(
                "messages",
                "the last message (after system ones) must be the user's",
            ))
        }
        None => return Err(Error::option("messages", "no user message")),
    }
    let mut text: String = system.iter().map(|line| format!("{line}\n")).collect();
    let stop = if let [(_, question)] = turns.as_slice() {
        text.push_str(&format!("Instruct: {question}\nOutput:"));
        "\nInstruct:"
    } else {
        for (role, content) in &turns {
            let speaker = if *role == "user" { "Alice" } else { "Bob" };
            text.push_str(&format!("{speaker}: {content}\n"));
        }
        text.push_str("Bob:");
        "\nAlice:"
    };
    Ok(Phi2Prompt {
        text,
        stop: vec![stop.to_string()],
    })
}

fn message_text(message: &ChatMessage, index: usize) -> Result<String> {
    match &message.content {
        Some(Content::Text(text)) => Ok(text.clone()),
        Some(Content::Parts(parts)) => parts
            .iter()
            .enumerate()
            .map(
                |(part_index, part)| match (part["type"].as_str(), part["text"].as_str()) {
                    (Some("text"), Some(text)) => Ok(text.to_string()),
                    _ => Err(Error::option(
                        format!("messages[{index}].content[{part_index}]"),
                        "only text parts (`{\"type\": \"text\", \"text\": …}`) are supported",
                    )),
                },
            )
            .collect::<Result<Vec<_>>>()
            .map(|texts| texts.concat()),
        None => Err(Error::option(
            format!("messages[{index}].content"),
            "is missing",
        )),
    }
}

/// What a request asks for, read and checked.
struct ChatOptions {
    messages: Vec<ChatMessage>,
    model: String,
    stream: bool,
    include_usage: bool,
    params: SamplingParams,
}

fn field<T: serde::de::DeserializeOwned>(
    map: &Map<String, Value>,
    name: &str,
) -> Result<Option<T>> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => serde_json::from_value(value.clone())
            .map(Some)
            .map_err(|e| Error::option(name, e.to_string())),
    }
}

fn read_request(request: &Value, seed: u64) -> Result<ChatOptions> {
    let map = request
        .as_object()
        .ok_or_else(|| Error::option("request", "must be a JSON object"))?;
    for key in map.keys() {
        if UNSUPPORTED.contains(&key.as_str()) {
            return Err(Error::option(key, "is not supported by phi2-web"));
        }
        if key != "messages" && !FIELDS.contains(&key.as_str()) {
            return Err(Error::option(key, "is not a chat completion field"));
        }
    }
    if let Some(Value::Array(list)) = map.get("messages") {
        for (index, message) in list.iter().enumerate() {
            let unknown = message.as_object().and_then(|fields| {
                fields
                    .keys()
                    .find(|key| !MESSAGE_FIELDS.contains(&key.as_str()))
            });
            if let Some(key) = unknown {
                return Err(Error::option(
                    format!("messages[{index}].{key}"),
                    "is not supported by phi2-web",
                ));
            }
        }
    }
    let messages: Vec<ChatMessage> =
        field(map, "messages")?.ok_or_else(|| Error::option("messages", "is missing"))?;
    if let Some(n) = field::<u64>(map, "n")?.filter(|&n| n != 1) {
        return Err(Error::option(
            "n",
            format!("{n} choices: only 1 is supported"),
        ));
    }
    if field::<bool>(map, "logprobs")? == Some(true) {
        return Err(Error::option("logprobs", "is not supported by phi2-web"));
    }
    let defaults = SamplingParams::default();
    let max_tokens = match field(map, "max_completion_tokens")? {
        Some(max) => Some(max),
        None => field(map, "max_tokens")?,
    };
    let stop = match field(map, "stop")? {
        None => Vec::new(),
        Some(StopStrings::One(stop)) => vec![stop],
        Some(StopStrings::Many(stops)) => stops,
    };
    let response_format: Option<ResponseFormat> = field(map, "response_format")?;
    let params = SamplingParams {
        max_tokens: max_tokens.unwrap_or(defaults.max_tokens),
        // OpenAI's default temperature is 1; Phi-2's answers are better greedy, and greedy is
        // this package's default everywhere.
        temperature: field(map, "temperature")?.unwrap_or(defaults.temperature),
        top_p: field(map, "top_p")?.unwrap_or(defaults.top_p),
        frequency_penalty: field(map, "frequency_penalty")?.unwrap_or(0.0),
        presence_penalty: field(map, "presence_penalty")?.unwrap_or(0.0),
        seed: field(map, "seed")?.unwrap_or(seed),
        stop,
        response_format: response_format.filter(|format| *format != ResponseFormat::Text),
        ..defaults
    };
    params.validate()?;
    let stream_options: Option<StreamOptions> = field(map, "stream_options")?;
    Ok(ChatOptions {
        messages,
        model: field(map, "model")?.unwrap_or_else(|| "phi-2".to_string()),
        stream: field(map, "stream")?.unwrap_or(false),
        include_usage: stream_options.unwrap_or_default().include_usage,
        params,
    })
}

/// One chat completion in progress.
#[derive(Debug)]
pub struct ChatRun {
    id: String,
    created: u64,
    model: String,
    stream: bool,
    include_usage: bool,
    /// The answer so far.
    content: String,
    /// Whether the first chunk (with the role) went out.
    started: bool,
}

/// What a run needs generated: the prompt, and how.
#[derive(Debug)]
pub struct ChatStart {
    pub run: ChatRun,
    pub prompt: String,
    pub params: SamplingParams,
}

impl ChatRun {
    /// Reads `request` (an OpenAI chat completion request) into the prompt and sampling
    /// settings. `id` and `created` (Unix seconds) name the response; `seed` is used when the
    /// request gives none. Phi-2's own stop strings are added unless the output is
    /// constrained (a JSON string may hold them).
    pub fn start(request: &Value, id: String, created: u64, seed: u64) -> Result<ChatStart> {
        let ChatOptions {
            messages,
            model,
            stream,
            include_usage,
            mut params,
        } = read_request(request, seed)?;
        let prompt = phi2_prompt(&messages)?;
        if params.response_format.is_none() {
            params.stop.extend(prompt.stop);
        }
        let run = ChatRun {
            id,
            created,
            model,
            stream,
            include_usage,
            content: String::new(),
            started: false,
        };
        Ok(ChatStart {
            run,
            prompt: prompt.text,
            params,
        })
    }

    /// Whether the request asked for chunks (`stream: true`).
    pub fn is_streamed(&self) -> bool {
        self.stream
    }

    /// Adds a token's text to the answer; returns the chunk that carries it, if it adds
    /// anything (the answer's leading whitespace, which follows the prompt's colon, is left out).
    pub fn delta(&mut self, text: &str) -> Option<Value> {
        let text = if self.content.is_empty() {
            text.trim_start()
        } else {
            text
        };
        if text.is_empty() {
            return None;
        }
        self.content.push_str(text);
        let mut delta = json!({ "content": text });
        if !self.started {
            self.started = true;
            delta["role"] = json!("assistant");
        }
        Some(self.chunk(delta, Value::Null))
    }

    /// The chunks that end a stream: the finish reason (with the role, if nothing came before),
    /// then the usage when `stream_options.include_usage` asked for it.
    pub fn finish_chunks(&mut self, stats: &GenerationStats) -> Vec<Value> {
        let delta = match self.started {
            true => json!({}),
            false => json!({ "role": "assistant", "content": "" }),
        };
        self.started = true;
        let mut chunks = vec![self.chunk(delta, json!(finish_reason(stats)))];
        if self.include_usage {
            let mut usage = self.chunk(json!({}), Value::Null);
            usage["choices"] = json!([]);
            usage["usage"] = usage_of(stats);
            chunks.push(usage);
        }
        chunks
    }

    /// The whole response (`chat.completion`).
    pub fn completion(&self, stats: &GenerationStats) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": self.content, "refusal": null },
                "logprobs": null,
                "finish_reason": finish_reason(stats),
            }],
            "usage": usage_of(stats),
        })
    }

    fn chunk(&self, delta: Value, finish_reason: Value) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason }],
        })
    }
}

/// OpenAI's finish reasons: `length` when the token budget (or the context) ran out, `stop`
/// otherwise (`<|endoftext|>`, a stop string, a complete constrained output, a stop call).
fn finish_reason(stats: &GenerationStats) -> &'static str {
    match stats.stop_reason {
        Some(StopReason::Length) => "length",
        _ => "stop",
    }
}

/// OpenAI's usage, with the prompt tokens taken from the previous turn's cache as
/// `prompt_tokens_details.cached_tokens`.
fn usage_of(stats: &GenerationStats) -> Value {
    json!({
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.generated_tokens,
        "total_tokens": stats.prompt_tokens + stats.generated_tokens,
        "prompt_tokens_details": { "cached_tokens": stats.reused_tokens },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(list: &[(&str, &str)]) -> Vec<ChatMessage> {
        list.iter()
            .map(|&(role, content)| ChatMessage {
                role: role.to_string(),
                content: Some(Content::Text(content.to_string())),
                name: None,
            })
            .collect()
    }

    #[test]
    fn one_question_is_an_instruct_prompt() {
        let prompt = phi2_prompt(&messages(&[("user", "What is a prime?")])).unwrap();
        assert_eq!(prompt.text, "Instruct: What is a prime?\nOutput:");
        assert_eq!(prompt.stop, ["\nInstruct:"]);
    }

    #[test]
    fn a_system_message_goes_first() {
        let prompt = phi2_prompt(&messages(&[
            ("user", "What is a prime?"),
            ("system", "Answer in one sentence."),
        ]))
        .unwrap();
        assert_eq!(
            prompt.text,
            "Answer in one sentence.\nInstruct: What is a prime?\nOutput:"
        );
    }

    #[test]
    fn a_conversation_is_alice_and_bob() {
        let prompt = phi2_prompt(&messages(&[
            ("system", "A friendly chat."),
            ("user", "I can't focus when I study."),
            ("assistant", "Have you tried a schedule?"),
            ("user", "Yes, it doesn't help."),
        ]))
        .unwrap();
        assert_eq!(
            prompt.text,
            "A friendly chat.\nAlice: I can't focus when I study.\nBob: Have you tried a schedule?\nAlice: Yes, it doesn't help.\nBob:"
        );
        assert_eq!(prompt.stop, ["\nAlice:"]);
        // Two user messages in a row are a conversation too.
        let prompt = phi2_prompt(&messages(&[("user", "Hi."), ("user", "Anyone?")])).unwrap();
        assert_eq!(prompt.text, "Alice: Hi.\nAlice: Anyone?\nBob:");
    }

    #[test]
    fn text_parts_are_joined_and_other_content_is_refused() {
        let parts = vec![
            json!({"type": "text", "text": "What is "}),
            json!({"type": "text", "text": "2+2?"}),
        ];
        let message = ChatMessage {
            role: "user".into(),
            content: Some(Content::Parts(parts)),
            name: None,
        };
        assert_eq!(
            phi2_prompt(&[message]).unwrap().text,
            "Instruct: What is 2+2?\nOutput:"
        );
        let image = ChatMessage {
            role: "user".into(),
            content: Some(Content::Parts(vec![
                json!({"type": "image_url", "image_url": {"url": "x"}}),
            ])),
            name: None,
        };
        let err = phi2_prompt(&[image]).unwrap_err();
        assert_eq!(
            err.details(),
            vec![("option", "messages[0].content[0]".to_string())]
        );
    }

    #[test]
    fn bad_conversations_name_what_is_wrong() {
        for (list, option, words) in [
            (vec![("assistant", "Hello")], "messages", "user's"),
            (
                vec![("system", "Only this.")],
                "messages",
                "no user message",
            ),
            (
                vec![("tool", "42"), ("user", "hi")],
                "messages[0].role",
                "tool",
            ),
        ] {
            let err = phi2_prompt(&messages(&list)).unwrap_err();
            assert_eq!(err.kind(), "OptionError");
            assert_eq!(err.details(), vec![("option", option.to_string())], "{err}");
            assert!(err.to_string().contains(words), "{err}");
        }
    }

    #[test]
    fn requests_are_read_with_openai_names_and_unsupported_fields_refused() {
        let request = json!({
            "model": "phi-2", "messages": [{"role": "user", "content": "Hi"}],
            "max_completion_tokens": 5, "temperature": 0.5, "top_p": 0.9, "seed": 7,
            "stop": "END", "frequency_penalty": 0.5, "presence_penalty": -0.5,
            "response_format": {"type": "json_object"}, "stream": true,
            "stream_options": {"include_usage": true}, "n": 1, "user": "u1",
        });
        let start = ChatRun::start(&request, "chatcmpl-1".into(), 0, 99).unwrap();
        assert_eq!(start.prompt, "Instruct: Hi\nOutput:");
        let p = &start.params;
        assert_eq!(
            (p.max_tokens, p.temperature, p.top_p, p.seed),
            (5, 0.5, 0.9, 7)
        );
        assert_eq!((p.frequency_penalty, p.presence_penalty), (0.5, -0.5));
        // A constrained answer keeps only the caller's stop strings.
        assert_eq!(p.stop, ["END"]);
        assert_eq!(p.response_format, Some(ResponseFormat::JsonObject));
        assert!(start.run.is_streamed());

        let plain = json!({"messages": [{"role": "user", "content": "Hi"}], "stop": ["a", "b"]});
        let start = ChatRun::start(&plain, "x".into(), 0, 99).unwrap();
        assert_eq!(start.params.stop, ["a", "b", "\nInstruct:"]);
        assert_eq!(start.params.seed, 99);

        let mut with_tool_call = plain.clone();
        with_tool_call["messages"][0]["tool_calls"] = json!([]);
        let err = ChatRun::start(&with_tool_call, "x".into(), 0, 0).unwrap_err();
        assert_eq!(
            err.details(),
            vec![("option", "messages[0].tool_calls".to_string())]
        );
        for (field, value, words) in [
            ("tools", json!([]), "not supported"),
            ("logit_bias", json!({}), "not supported"),
            ("temprature", json!(1), "not a chat completion field"),
            ("n", json!(2), "only 1"),
            ("temperature", json!("hot"), "invalid type"),
            ("frequency_penalty", json!(3), "[-2, 2]"),
            ("response_format", json!({"type": "xml"}), "unknown variant"),
        ] {
            let mut request = plain.clone();
            request[field] = value;
            let err = ChatRun::start(&request, "x".into(), 0, 0).unwrap_err();
            assert_eq!(err.kind(), "OptionError", "{field}: {err}");
            assert_eq!(err.details(), vec![("option", field.to_string())], "{err}");
            assert!(err.to_string().contains(words), "{field}: {err}");
        }
    }
}
