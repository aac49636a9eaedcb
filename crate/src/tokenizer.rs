//! Phi-2's tokenizer (GPT-2 byte-level BPE plus whitespace-run tokens) through the `tokenizers`
//! crate, and streaming detokenization that only ever emits whole characters.

use std::sync::Arc;

use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// `<|endoftext|>`: Phi-2's BOS, EOS and UNK.
pub const END_OF_TEXT: u32 = 50256;

/// Cheap to clone: clones share the vocabulary.
#[derive(Clone)]
pub struct PhiTokenizer {
    inner: Arc<Tokenizer>,
}

impl PhiTokenizer {
    /// Parses a `tokenizer.json` and checks that every added token keeps the id the file
    /// gives it; `file` names it in errors.
    pub fn from_bytes(json: &[u8], file: &str) -> Result<Self> {
        let inner = Tokenizer::from_bytes(json)
            .map_err(|e| Error::format(file, format!("not a usable tokenizer.json: {e}")))?;
        let tokenizer = PhiTokenizer {
            inner: Arc::new(inner),
        };
        tokenizer.check_added_token_ids(json, file)?;
        Ok(tokenizer)
    }

    /// `tokenizers` only warns when it numbers an added token differently from the file (it
    /// does so for one missing from the model's vocab), and every prompt with that token would
    /// then be mis-tokenized. Here that is an error naming the token and both ids.
    fn check_added_token_ids(&self, json: &[u8], file: &str) -> Result<()> {
        #[derive(Deserialize)]
        struct Declared {
            #[serde(default)]
            added_tokens: Vec<DeclaredToken>,
        }
        #[derive(Deserialize)]
        struct DeclaredToken {
            id: u32,
            content: String,
        }
        let declared: Declared = serde_json::from_slice(json)
            .map_err(|e| Error::format(file, format!("`added_tokens`: {e}")))?;
        for token in declared.added_tokens {
            let actual = self.inner.token_to_id(&token.content);
            if actual != Some(token.id) {
                let actual = actual.map_or("none".to_string(), |id| id.to_string());
                return Err(Error::format(
                    file,
                    format!(
                        "added token {:?} is listed with id {} but the tokenizer gives it id {actual}",
                        token.content, token.id
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        // Phi-2 adds no BOS or other special tokens when encoding.
        self.inner
            .encode(text, false)
            .map(|encoding| encoding.get_ids().to_vec())
            .map_err(|e| Error::Tokenizer(format!("encoding failed: {e}")))
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(format!("decoding failed: {e}")))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The tokenizer as `tokenizer.json`.
    pub fn to_json(&self) -> String {
        self.inner
            .to_string(false)
            .expect("a loaded tokenizer serializes")
    }
}

/// Turns a growing token sequence into text pieces. A character split across tokens decodes
/// to U+FFFD until its last byte arrives; such a tail is held back until it is complete.
#[derive(Debug, Default, Clone)]
pub struct TextStream {
    ids: Vec<u32>,
    /// Start of the tokens decoded together for context (byte-level BPE needs none, but
    /// decoding a window keeps each step's cost independent of the text's length).
    prefix_offset: usize,
    /// Tokens whose text has been emitted.
    read_offset: usize,
}

impl TextStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token and returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &PhiTokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let text = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        if text.len() > prefix.len() && !text.ends_with('\u{FFFD}') {
            let piece = text[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }

    /// Text still held back at the end of generation (an incomplete character is emitted as
    /// U+FFFD, as a full decode would show it).
    pub fn flush(&mut self, tokenizer: &PhiTokenizer) -> Result<String> {
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let text = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(text.get(prefix.len()..).unwrap_or_default().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl PhiTokenizer {
        /// The Phi-2 `tokenizer.json` built by `scripts/build_tokenizer.py`.
        fn phi2() -> Self {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/tokenizer.json");
            Self::from_bytes(&std::fs::read(path).unwrap(), path).unwrap()
        }
    }

    #[test]
    fn known_vectors() {
        let tok = PhiTokenizer::phi2();
        assert_eq!(tok.encode("Hello World").unwrap(), vec![15496, 2159]);
        assert_eq!(
            tok.encode("def f():\n    return 1").unwrap(),
            vec![4299, 277, 33529, 198, 50284, 7783, 352]
        );
        assert_eq!(tok.encode("a  b").unwrap(), vec![64, 50286, 65]);
        assert_eq!(tok.encode(&" ".repeat(40)).unwrap(), vec![50257, 50279]);
        assert_eq!(tok.encode("\t\t\tx").unwrap()[0], 50293);
        assert_eq!(tok.encode("<|endoftext|>").unwrap(), vec![END_OF_TEXT]);
        assert_eq!(tok.vocab_size(), 50295);
    }

    #[test]
    fn an_added_token_numbered_other_than_its_file_says_is_an_error() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/tokenizer.json");
        let mut json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        // The four-space token listed at an id after a gap: `tokenizers` numbers added tokens
        // the vocab lacks in order, so it would get another id.
        let four_spaces = json["added_tokens"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|token| token["content"] == "    ")
            .unwrap();
        assert_eq!(four_spaces["id"], 50284);
        four_spaces["id"] = 51189.into();
        let err = PhiTokenizer::from_bytes(&serde_json::to_vec(&json).unwrap(), "tok.json")
            .err()
            .expect("the mismatch is an error");
        let message = err.to_string();
        assert_eq!(err.kind(), "FormatError");
        assert!(
            message.starts_with("tok.json: ")
                && message.contains("\"    \"")
                && message.contains("51189")
                && message.contains("50284"),
            "{message}"
        );
    }

    #[test]
    fn round_trips() {
        let tok = PhiTokenizer::phi2();
        for text in [
            "Hello World",
            "Instruct: Write a poem.\nOutput:",
            "naïve café, 東京, emoji 🦀👩‍💻, tabs\t\tand    spaces",
            "def f(x):\n\treturn x ** 2  # comment\n",
        ] {
            let ids = tok.encode(text).unwrap();
            assert_eq!(tok.decode(&ids).unwrap(), text);
        }
    }

    #[test]
    fn streaming_never_splits_a_character() {
        let tok = PhiTokenizer::phi2();
        let text = "Crab 🦀, 東京 and é!";
        let ids = tok.encode(text).unwrap();
        // The emoji and CJK characters take several byte-level tokens each.
        assert!(ids.len() > text.chars().count() / 2);
        let mut stream = TextStream::new();
        let mut pieces = Vec::new();
        for &id in &ids {
            let piece = stream.push(&tok, id).unwrap();
            assert!(!piece.contains('\u{FFFD}'), "broken character in {piece:?}");
            pieces.push(piece);
        }
        pieces.push(stream.flush(&tok).unwrap());
        assert_eq!(pieces.concat(), text);
        // Some token completed no character and emitted nothing.
        assert!(pieces[..ids.len()].iter().any(String::is_empty));
    }
}
