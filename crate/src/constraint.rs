//! Output constrained to JSON, a JSON Schema or a grammar, through llguidance: before each
//! token the constraint says which tokens may come next, the sampler picks among those only,
//! and generation ends when the constraint is complete.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{JsonCompileOptions, Matcher, ParserFactory};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use toktrie::{
    InferenceCapabilities, SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv,
};

use crate::error::{Error, Result};
use crate::tokenizer::{PhiTokenizer, END_OF_TEXT};

/// What the output must be, in OpenAI's `response_format` shapes, plus a grammar.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResponseFormat {
    /// Free text (no constraint).
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON valid against `json_schema.schema`.
    JsonSchema { json_schema: JsonSchemaFormat },
    /// Text matching a grammar: `{ "syntax": "lark" | "regex", "definition": "…" }` (the shape
    /// of OpenAI's grammar-constrained custom tools). Lark as llguidance reads it.
    Grammar { grammar: GrammarFormat },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonSchemaFormat {
    /// OpenAI requires a name; it is not used here.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub schema: Option<Value>,
    /// Accepted for compatibility: the schema is always enforced.
    #[serde(default)]
    pub strict: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrammarFormat {
    pub syntax: GrammarSyntax,
    pub definition: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GrammarSyntax {
    Lark,
    Regex,
}

/// Makes [`Constraint`]s for one tokenizer and vocabulary. Building it indexes every token's
/// bytes (tens of milliseconds for Phi-2's vocabulary): make it once per model.
pub struct Grammars {
    factory: ParserFactory,
    vocab_size: usize,
}

impl Grammars {
    /// For `tokenizer` and a model with `vocab_size` logits (Phi-2 pads its 50 295 tokens to
    /// 51 200 rows: the rest can never be produced).
    pub fn new(tokenizer: &PhiTokenizer, vocab_size: usize) -> Result<Self> {
        let failed = |e: &dyn std::fmt::Display| {
            Error::Tokenizer(format!("indexing the vocabulary for constraints: {e}"))
        };
        let json: Value = serde_json::from_str(&tokenizer.to_json()).map_err(|e| failed(&e))?;
        // llguidance reads byte-level BPE (Phi-2's, GPT-2's) safely; another decoder it may
        // reject with a panic.
        if json["decoder"]["type"] != "ByteLevel" {
            return Err(failed(&format!(
                "constraints need a byte-level BPE tokenizer; this one's decoder is {}",
                json["decoder"]["type"]
            )));
        }
        let mut words =
            llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| failed(&e))?;
        if words.len() > vocab_size {
            return Err(failed(&format!(
                "the tokenizer has {} tokens, the model {vocab_size} logits",
                words.len()
            )));
        }
        words.resize(vocab_size, Vec::new());
        let trie = TokTrie::from(&TokRxInfo::new(vocab_size as u32, END_OF_TEXT), &words);
        let env: TokEnv = Arc::new(Vocabulary {
            trie,
            tokenizer: tokenizer.clone(),
        });
        let mut factory = ParserFactory::new(&env, InferenceCapabilities::default(), &[])
            .map_err(|e| failed(&e))?;
        factory.quiet();
        Ok(Grammars {
            factory,
            vocab_size,
        })
    }

    /// The constraint for `format` (`None` for plain text). A schema or grammar that cannot be
    /// compiled is an `OptionError` naming `response_format` and saying why.
    pub fn constraint(&self, format: &ResponseFormat) -> Result<Option<Constraint>> {
        let grammar = match format {
            ResponseFormat::Text => return Ok(None),
            ResponseFormat::JsonObject => json_grammar(serde_json::json!({ "type": "object" })),
            ResponseFormat::JsonSchema { json_schema } => {
                let schema = json_schema.schema.clone().ok_or_else(|| {
                    Error::option("response_format", "json_schema.schema is missing")
                })?;
                json_grammar(schema)
            }
            ResponseFormat::Grammar { grammar } => match grammar.syntax {
                GrammarSyntax::Lark => TopLevelGrammar::from_lark(grammar.definition.clone()),
                GrammarSyntax::Regex => TopLevelGrammar::from_regex(&grammar.definition),
            },
        };
        let invalid = |e: &dyn std::fmt::Display| {
            Error::option(
                "response_format",
                format!("{} cannot constrain the output: {e}", format.describe()),
            )
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| invalid(&e))?;
        let mut matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(invalid(&e));
        }
        // A schema no output can satisfy admits no first token.
        let first = matcher.compute_mask().map_err(|e| invalid(&e))?;
        if first.num_set() == 0 {
            return Err(invalid(&"no output can satisfy it"));
        }
        let next = allowed_tokens(&first, self.vocab_size)?;
        Ok(Some(Constraint {
            matcher,
            next: Some(next),
        }))
    }
}

/// JSON laid out one way, as `json.dumps` writes it (`", "` and `": "`, no other whitespace)
/// unless the schema says otherwise (llguidance's `x-guidance`): with free whitespace a model
/// may pad a finished object with newlines until it runs out of tokens.
fn json_grammar(mut schema: Value) -> TopLevelGrammar {
    if schema.is_object() && schema.get("x-guidance").is_none() {
        let layout = JsonCompileOptions {
            whitespace_flexible: false,
            item_separator: ", ".to_string(),
            key_separator: ": ".to_string(),
            ..JsonCompileOptions::default()
        };
        layout.apply_to(&mut schema);
    }
    TopLevelGrammar::from_json_schema(schema)
}

/// A model's [`Grammars`], made at the first constrained generation (most never need one).
#[derive(Default)]
pub struct LazyGrammars(Option<Grammars>);

impl LazyGrammars {
    /// The constraint for `format` (`None` for none or free text), for `tokenizer` and a model
    /// with `vocab_size` logits.
    pub fn constraint(
        &mut self,
        format: Option<&ResponseFormat>,
        tokenizer: &PhiTokenizer,
        vocab_size: usize,
    ) -> Result<Option<Constraint>> {
        let Some(format) = format.filter(|format| **format != ResponseFormat::Text) else {
            return Ok(None);
        };
        let grammars = match &mut self.0 {
            Some(grammars) => grammars,
            empty => empty.insert(Grammars::new(tokenizer, vocab_size)?),
        };
        grammars.constraint(format)
    }
}

impl ResponseFormat {
    fn describe(&self) -> &'static str {
        match self {
            ResponseFormat::Text => "text",
            ResponseFormat::JsonObject => "json_object",
            ResponseFormat::JsonSchema { .. } => "the JSON schema",
            ResponseFormat::Grammar { grammar } => match grammar.syntax {
                GrammarSyntax::Lark => "the Lark grammar",
                GrammarSyntax::Regex => "the regex",
            },
        }
    }
}

/// The tokens llguidance may allow: each id's bytes, and the model's own tokenizer for text
/// the grammar forces.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: PhiTokenizer,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // A grammar's forced text is UTF-8; anything else is split by the vocabulary itself.
        match std::str::from_utf8(s) {
            Ok(text) => self.tokenizer.encode(text).unwrap_or_default(),
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// One generation's constraint: which tokens may come next, as it advances token by token.
pub struct Constraint {
    matcher: Matcher,
    /// [`Constraint::allowed`]'s answer until the next [`Constraint::advance`].
    next: Option<Option<Vec<bool>>>,
}

impl Constraint {
    /// The tokens allowed next (`allowed[id]` for the model's `vocab` ids), or `None` once the
    /// output is complete (only the end may follow).
    pub fn allowed(&mut self, vocab: usize) -> Result<Option<Vec<bool>>> {
        if let Some(next) = &self.next {
            return Ok(next.clone());
        }
        if let Some(e) = self.matcher.get_error() {
            return Err(constraint_error(e));
        }
        let next = match self.matcher.is_stopped() {
            true => None,
            false => {
                let mask = self.matcher.compute_mask().map_err(constraint_error)?;
                allowed_tokens(&mask, vocab)?
            }
        };
        self.next = Some(next.clone());
        Ok(next)
    }

    /// Advances past `id`, which [`Constraint::allowed`] allowed.
    pub fn advance(&mut self, id: u32) -> Result<()> {
        self.next = None;
        self.matcher.consume_token(id).map_err(constraint_error)
    }
}

/// `mask` as `allowed[id]` for the model's `vocab` ids; `None` when only the end is allowed.
fn allowed_tokens(mask: &SimpleVob, vocab: usize) -> Result<Option<Vec<bool>>> {
    let allowed: Vec<bool> = (0..vocab as TokenId)
        .map(|id| mask.is_allowed(id))
        .collect();
    let mut others = allowed
        .iter()
        .enumerate()
        .filter(|&(id, &ok)| ok && id as TokenId != END_OF_TEXT);
    match (others.next(), allowed.get(END_OF_TEXT as usize)) {
        (Some(_), _) => Ok(Some(allowed)),
        (None, Some(true)) => Ok(None),
        (None, _) => Err(constraint_error("it allows no token, not even the end")),
    }
}

fn constraint_error(e: impl std::fmt::Display) -> Error {
    Error::State(format!("the output constraint failed: {e}"))
}
