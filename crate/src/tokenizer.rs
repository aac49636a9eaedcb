//! Phi-2's tokenizer (GPT-2 byte-level BPE plus whitespace-run tokens) through the `tokenizers`
//! crate, and streaming detokenization that only ever emits whole characters.

use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// `<|endoftext|>`: Phi-2's BOS, EOS and UNK.
pub const END_OF_TEXT: u32 = 50256;

pub struct PhiTokenizer {
    inner: Tokenizer,
}

impl PhiTokenizer {
    pub fn from_bytes(json: &[u8]) -> Result<Self> {
        Tokenizer::from_bytes(json)
            .map(|inner| PhiTokenizer { inner })
            .map_err(|e| Error::Tokenizer(format!("tokenizer.json: {e}")))
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
            Self::from_bytes(&std::fs::read(path).unwrap()).unwrap()
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
