//! Text generation as a step API shared by the CLI and the browser: the first step runs the
//! prompt (prefill), every step returns one token. Greedy or seeded sampling with temperature,
//! top-k, top-p, repetition, frequency and presence penalties, optionally constrained
//! ([`crate::constraint`]); stops at EOS, at stop strings, when the constraint is complete, at
//! `max_new_tokens` or when the context is full.

use burn::tensor::{Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::constraint::{Constraint, LazyGrammars, ResponseFormat};
use crate::error::{Error, Result};
use crate::model::{KvCache, Phi};
use crate::tokenizer::{PhiTokenizer, TextStream, END_OF_TEXT};

/// Generation settings. The defaults are greedy decoding (reproducible, like transformers'
/// `generate`), 256 new tokens, no penalty and no stop strings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct SamplingParams {
    pub max_tokens: usize,
    /// 0 means greedy.
    pub temperature: f32,
    /// `None` keeps every token.
    pub top_k: Option<usize>,
    pub top_p: f32,
    /// 1 means none; above 1 discourages tokens already present (prompt included).
    pub repetition_penalty: f32,
    /// OpenAI's: subtracted from a token's logit once per time it was generated so far (the
    /// prompt does not count). In [-2, 2]; 0 means none.
    pub frequency_penalty: f32,
    /// OpenAI's: subtracted from the logit of every token generated so far. In [-2, 2].
    pub presence_penalty: f32,
    pub seed: u64,
    pub stop: Vec<String>,
    /// What the output must be (JSON, a schema, a grammar); `None` is free text. Its
    /// constraint is made from the model's vocabulary and given to [`Session::constrain`].
    pub response_format: Option<ResponseFormat>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_tokens: 256,
            temperature: 0.0,
            top_k: None,
            top_p: 1.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
            stop: Vec::new(),
            response_format: None,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::option(
                "temperature",
                format!(
                    "{} must be a finite number ≥ 0 (0 = greedy)",
                    self.temperature
                ),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::option(
                "top_p",
                format!("{} is outside (0, 1]", self.top_p),
            ));
        }
        if self.top_k == Some(0) {
            return Err(Error::option(
                "top_k",
                "0 would keep no token; leave it unset to keep all",
            ));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(Error::option(
                "repetition_penalty",
                format!("{} must be a finite number > 0", self.repetition_penalty),
            ));
        }
        for (option, value) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                return Err(Error::option(option, format!("{value} is outside [-2, 2]")));
            }
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(Error::option("stop", "stop strings must not be empty"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StopReason {
    /// The model produced `<|endoftext|>`.
    Eos,
    /// The text reached one of the stop strings (which is not included in the output), or
    /// the output constraint is complete.
    Stop,
    /// `max_tokens` were generated or the context is full.
    Length,
    /// The caller ended it (a Stop button, an AbortSignal).
    Cancelled,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Eos => "eos",
            StopReason::Stop => "stop",
            StopReason::Length => "length",
            StopReason::Cancelled => "cancelled",
        }
    }
}

/// One generated token and the text it completes (empty while a character or a possible
/// stop string is incomplete).
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub id: u32,
    pub text: String,
}

/// One generation: the prompt, the cache and everything produced so far.
pub struct Session {
    params: SamplingParams,
    rng: ChaCha8Rng,
    cache: KvCache,
    reused_tokens: usize,
    tokens: Vec<u32>,
    prompt_len: usize,
    stream: TextStream,
    text: String,
    emitted: usize,
    finished: Option<StopReason>,
    /// The text ends where a stop string began.
    cut_at_stop_string: bool,
    ignore_end_of_text: bool,
    constraint: Option<Constraint>,
}

impl Session {
    pub fn new(model: &Phi, prompt: Vec<u32>, params: SamplingParams) -> Result<Self> {
        Session::resume(model, None, prompt, params)
    }

    /// Starts a generation that takes over `previous`'s cache (a chat's earlier turns): the
    /// tokens both share at the start are not run again, only the rest of the prompt. At least
    /// the prompt's last token is always run, because its logits are needed.
    pub fn resume(
        model: &Phi,
        previous: Option<Session>,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<Self> {
        Session::check(model, &prompt, &params)?;
        let cache = match previous {
            Some(previous) => {
                let mut cache = previous.cache;
                let cached = &previous.tokens[..cache.len()];
                let shared = cached
                    .iter()
                    .zip(&prompt)
                    .take_while(|(a, b)| a == b)
                    .count();
                cache.truncate(shared.min(prompt.len() - 1));
                cache
            }
            None => model.new_cache(),
        };
        Ok(Session {
            rng: ChaCha8Rng::seed_from_u64(params.seed),
            params,
            reused_tokens: cache.len(),
            cache,
            prompt_len: prompt.len(),
            tokens: prompt,
            stream: TextStream::new(),
            text: String::new(),
            emitted: 0,
            finished: None,
            cut_at_stop_string: false,
            ignore_end_of_text: false,
            constraint: None,
        })
    }

    /// What [`Session::resume`] refuses: bad settings, an empty prompt or one too long for the
    /// context, ids outside the vocabulary.
    fn check(model: &Phi, prompt: &[u32], params: &SamplingParams) -> Result<()> {
        params.validate()?;
        let context = model.context_length();
        if prompt.is_empty() {
            return Err(Error::option("prompt", "is empty: give at least one token"));
        }
        if prompt.len() > context {
            return Err(Error::PromptTooLong {
                prompt_tokens: prompt.len(),
                context,
            });
        }
        let vocab = model.config().vocab_size;
        if let Some(&bad) = prompt.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::option(
                "prompt",
                format!("token id {bad} is outside the vocabulary of {vocab}"),
            ));
        }
        Ok(())
    }

    /// [`Session::resume`] of the session in `previous`, constrained as
    /// `params.response_format` says (its constraint made from `grammars`, for `tokenizer` and
    /// the model's vocabulary). `previous` is taken only once everything is checked: a refused
    /// start keeps it, and its cache, for the next.
    pub fn start(
        model: &Phi,
        tokenizer: &PhiTokenizer,
        grammars: &mut LazyGrammars,
        previous: &mut Option<Session>,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<Self> {
        Session::check(model, &prompt, &params)?;
        let vocab = model.config().vocab_size;
        let constraint = grammars.constraint(params.response_format.as_ref(), tokenizer, vocab)?;
        let mut session = Session::resume(model, previous.take(), prompt, params)?;
        session.constraint = constraint;
        Ok(session)
    }

    /// Prompt tokens whose keys and values came from the previous session's cache.
    pub fn reused_tokens(&self) -> usize {
        self.reused_tokens
    }

    pub fn prompt_ids(&self) -> &[u32] {
        &self.tokens[..self.prompt_len]
    }

    pub fn generated_ids(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// The generated text (cut before a stop string).
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn stop_reason(&self) -> Option<StopReason> {
        self.finished
    }

    /// Generates through `<|endoftext|>` as if it were text (benchmarks on random weights).
    pub fn ignore_end_of_text(&mut self) {
        self.ignore_end_of_text = true;
    }

    /// Ends the generation early (the caller's stop button); later steps return `None`.
    pub fn cancel(&mut self) {
        self.finished.get_or_insert(StopReason::Cancelled);
    }

    /// Runs the model over what it has not seen and returns the next position's logits,
    /// read back asynchronously (the only host↔device synchronisation of a step).
    pub async fn logits(&mut self, model: &Phi) -> Result<Vec<f32>> {
        let logits = model.forward(&self.tokens[self.cache.len()..], &mut self.cache);
        read_floats(logits).await
    }

    /// Runs the model and picks the next token among `allowed` (every token for `None`).
    /// Greedy and top-k sampling choose on the device and read back only the candidates (one
    /// id for greedy) with the logits' sum, whose finiteness stands for all of them; a
    /// constraint's mask goes up to the device as a bias. Penalties, or top-p without top-k,
    /// need every logit on the host.
    async fn pick(&mut self, model: &Phi, allowed: Option<&[bool]>) -> Result<u32> {
        let vocab = model.config().vocab_size;
        let params = &self.params;
        let on_device = params.repetition_penalty == 1.0
            && params.frequency_penalty == 0.0
            && params.presence_penalty == 0.0
            && (params.temperature == 0.0 || params.top_k.is_some_and(|k| k <= DEVICE_TOP_K));
        if !on_device {
            let mut logits = self.logits(model).await?;
            let (history, prompt_len) = (&self.tokens, self.prompt_len);
            return sample(
                &mut logits,
                history,
                prompt_len,
                allowed,
                &self.params,
                &mut self.rng,
            );
        }
        let mut logits = model.forward(&self.tokens[self.cache.len()..], &mut self.cache);
        if let Some(allowed) = allowed {
            let bias: Vec<f32> = allowed
                .iter()
                .map(|&ok| if ok { 0.0 } else { MASKED })
                .collect();
            logits = logits + Tensor::from_data(TensorData::new(bias, [1, vocab]), model.device());
        }
        let top_k = match self.params.top_k {
            Some(k) if self.params.temperature > 0.0 => Some(k.min(vocab)),
            _ => None,
        };
        let read = read_floats(device_candidates(logits, top_k)).await?;
        let k = (read.len() - 1) / 2;
        if !read[0].is_finite() {
            return Err(Error::Device(format!(
                "the model produced non-finite logits (their sum is {})",
                read[0]
            )));
        }
        // Masked candidates (fewer allowed tokens than top-k) never come out: the first one,
        // the largest, is always allowed.
        let candidates: Vec<(u32, f32)> = read[1 + k..]
            .iter()
            .zip(&read[1..1 + k])
            .map(|(&id, &logit)| (id as u32, logit))
            .filter(|&(_, logit)| logit > MASKED / 2.0)
            .collect();
        if candidates.is_empty() {
            return Err(Error::Device(format!(
                "every candidate token is masked (the largest logit is {})",
                read[1]
            )));
        }
        Ok(sample_sorted(&candidates, &self.params, &mut self.rng))
    }

    /// The tokens the constraint allows next, without `<|endoftext|>` when it is read as text
    /// (benchmarks): `None` without a constraint, `Some(None)` once only the end may follow.
    fn allowed_next(&mut self, vocab: usize) -> Result<Option<Option<Vec<bool>>>> {
        let Some(constraint) = self.constraint.as_mut() else {
            return Ok(None);
        };
        let mut allowed = constraint.allowed(vocab)?;
        if let Some(allowed) = allowed.as_mut().filter(|_| self.ignore_end_of_text) {
            allowed[END_OF_TEXT as usize] = false;
        }
        Ok(Some(allowed))
    }

    /// One step: returns the next token, or `None` once generation has finished.
    pub async fn next(&mut self, model: &Phi, tokenizer: &PhiTokenizer) -> Result<Option<Token>> {
        if self.finished.is_some() {
            return Ok(None);
        }
        if self.generated_ids().len() >= self.params.max_tokens {
            self.finished = Some(StopReason::Length);
            return Ok(None);
        }
        let vocab = model.config().vocab_size;
        let allowed = match self.allowed_next(vocab)? {
            // The constraint was complete before this step (it is checked after each one, so
            // this happens only when nothing at all could be produced).
            Some(None) => {
                self.finished = Some(StopReason::Stop);
                return Ok(None);
            }
            Some(Some(allowed)) => Some(allowed),
            None => None,
        };
        let id = self.pick(model, allowed.as_deref()).await?;
        self.tokens.push(id);
        if let Some(constraint) = self.constraint.as_mut() {
            constraint.advance(id)?;
        }
        if id == END_OF_TEXT && !self.ignore_end_of_text {
            self.finished = Some(StopReason::Eos);
            let text = self.flush(tokenizer)?;
            return Ok(Some(Token { id, text }));
        }
        let piece = self.stream.push(tokenizer, id)?;
        self.text.push_str(&piece);
        if let Some(at) = find_stop(&self.text, &self.params.stop, self.emitted) {
            self.text.truncate(at);
            self.cut_at_stop_string = true;
            self.finished = Some(StopReason::Stop);
        } else if matches!(self.allowed_next(vocab)?, Some(None)) {
            // Nothing but the end may follow: the output is complete.
            self.finished = Some(StopReason::Stop);
        } else if self.generated_ids().len() >= self.params.max_tokens
            || self.tokens.len() >= self.cache.capacity()
        {
            self.finished = Some(StopReason::Length);
        }
        let text = if self.finished.is_some() {
            self.flush(tokenizer)?
        } else {
            let end = self.text.len() - held_back(&self.text, &self.params.stop);
            let end = end.max(self.emitted);
            let text = self.text[self.emitted..end].to_string();
            self.emitted = end;
            text
        };
        Ok(Some(Token { id, text }))
    }

    /// Everything not yet emitted, at the end of generation.
    fn flush(&mut self, tokenizer: &PhiTokenizer) -> Result<String> {
        // What a stop string cut off stays cut, incomplete characters included.
        if !self.cut_at_stop_string {
            let rest = self.stream.flush(tokenizer)?;
            self.text.push_str(&rest);
        }
        let text = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        Ok(text)
    }
}

/// Figures of one generation, reported at its end.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    /// Prompt tokens taken from the previous turn's cache instead of being run again.
    pub reused_tokens: usize,
    pub generated_tokens: usize,
    pub time_to_first_token_ms: f64,
    /// Prompt tokens run per second, up to the first token.
    pub prefill_tokens_per_s: f64,
    /// Tokens per second after the first.
    pub decode_tokens_per_s: f64,
    pub stop_reason: Option<StopReason>,
}

/// Timestamps (milliseconds, from any clock) of a generation's start and tokens.
#[derive(Debug, Clone)]
pub struct Timings {
    started_ms: f64,
    first_token_ms: Option<f64>,
    last_token_ms: f64,
}

impl Timings {
    pub fn start(now_ms: f64) -> Self {
        Timings {
            started_ms: now_ms,
            first_token_ms: None,
            last_token_ms: now_ms,
        }
    }

    pub fn token(&mut self, now_ms: f64) {
        self.first_token_ms.get_or_insert(now_ms);
        self.last_token_ms = now_ms;
    }

    pub fn stats(&self, session: &Session) -> GenerationStats {
        let per_s = |count: usize, ms: f64| {
            if ms > 0.0 {
                count as f64 * 1000.0 / ms
            } else {
                0.0
            }
        };
        let first = self.first_token_ms.unwrap_or(self.started_ms);
        let ttft = first - self.started_ms;
        let generated = session.generated_ids().len();
        GenerationStats {
            prompt_tokens: session.prompt_ids().len(),
            reused_tokens: session.reused_tokens(),
            generated_tokens: generated,
            time_to_first_token_ms: ttft,
            prefill_tokens_per_s: per_s(session.prompt_ids().len() - session.reused_tokens(), ttft),
            decode_tokens_per_s: per_s(generated.saturating_sub(1), self.last_token_ms - first),
            stop_reason: session.stop_reason(),
        }
    }
}

/// Byte offset of the earliest stop string in `text` that ends after `emitted`.
fn find_stop(text: &str, stops: &[String], emitted: usize) -> Option<usize> {
    stops
        .iter()
        .filter_map(|stop| {
            let from = emitted.saturating_sub(stop.len());
            let from = (0..=from).rev().find(|&i| text.is_char_boundary(i))?;
            text[from..].find(stop.as_str()).map(|at| from + at)
        })
        .min()
}

/// Length of the longest tail of `text` that could be the start of a stop string.
fn held_back(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .flat_map(|stop| {
            (1..stop.len())
                .filter(|&k| stop.is_char_boundary(k) && text.ends_with(&stop[..k]))
                .max()
        })
        .max()
        .unwrap_or(0)
}

/// Added on the device to the logit of a token a constraint forbids: far below any real logit,
/// so that such a token never comes out of a top-k that has allowed ones, and finite (WGSL
/// does not promise IEEE infinities; at -1e9 wgpu's top-k returned wrong values). Candidates
/// below half of it are dropped.
const MASKED: f32 = -1.0e4;

/// The largest top-k picked on the device: burn-wgpu 0.22.1's `topk` returns wrong values for
/// a larger k (f32::MIN, even a wrong maximum at 100); a larger k reads every logit back.
const DEVICE_TOP_K: usize = 32;

/// Picks the next token from raw logits, among `allowed` (all for `None`): repetition penalty
/// (over `history`, prompt included), OpenAI's frequency and presence penalties (over what
/// follows the first `prompt_len` tokens of `history`), then, in transformers' order,
/// temperature, top-k, top-p.
pub fn sample(
    logits: &mut [f32],
    history: &[u32],
    prompt_len: usize,
    allowed: Option<&[bool]>,
    params: &SamplingParams,
    rng: &mut impl Rng,
) -> Result<u32> {
    if let Some(bad) = logits.iter().position(|v| !v.is_finite()) {
        return Err(Error::Device(format!(
            "the model produced a non-finite logit ({}) for token {bad}",
            logits[bad]
        )));
    }
    if params.frequency_penalty != 0.0 || params.presence_penalty != 0.0 {
        let mut counts = std::collections::HashMap::<usize, f32>::new();
        for &id in &history[prompt_len.min(history.len())..] {
            *counts.entry(id as usize).or_default() += 1.0;
        }
        for (id, count) in counts {
            if let Some(logit) = logits.get_mut(id) {
                *logit -= count * params.frequency_penalty + params.presence_penalty;
            }
        }
    }
    if params.repetition_penalty != 1.0 {
        let mut seen = vec![false; logits.len()];
        for &id in history {
            let id = id as usize;
            if id < logits.len() && !seen[id] {
                seen[id] = true;
                let v = logits[id];
                logits[id] = if v < 0.0 {
                    v * params.repetition_penalty
                } else {
                    v / params.repetition_penalty
                };
            }
        }
    }
    let mut order: Vec<usize> = match allowed {
        Some(allowed) => (0..logits.len()).filter(|&id| allowed[id]).collect(),
        None => (0..logits.len()).collect(),
    };
    if order.is_empty() {
        return Err(Error::State("the output constraint allows no token".into()));
    }
    if params.temperature == 0.0 {
        // First maximum, like torch.argmax.
        let mut best = order[0];
        for &id in &order {
            if logits[id] > logits[best] {
                best = id;
            }
        }
        return Ok(best as u32);
    }
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if let Some(k) = params.top_k {
        order.truncate(k.min(order.len()));
    }
    let candidates: Vec<(u32, f32)> = order.iter().map(|&i| (i as u32, logits[i])).collect();
    Ok(sample_sorted(&candidates, params, rng))
}

/// Samples among `candidates` (id, logit), sorted by falling logit and already cut to top-k:
/// temperature, then top-p. Greedy takes the first.
fn sample_sorted(candidates: &[(u32, f32)], params: &SamplingParams, rng: &mut impl Rng) -> u32 {
    if params.temperature == 0.0 {
        return candidates[0].0;
    }
    let max = candidates[0].1 / params.temperature;
    let mut probs: Vec<f64> = candidates
        .iter()
        .map(|&(_, logit)| ((logit / params.temperature - max) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if params.top_p < 1.0 {
        let mut cumulative = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                cumulative += p;
                cumulative >= params.top_p as f64
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut draw = rng.random::<f64>() * total;
    for (&(id, _), &p) in candidates.iter().zip(&probs) {
        draw -= p;
        if draw < 0.0 {
            return id;
        }
    }
    candidates[probs.len() - 1].0
}

/// What a step reads back when it picks on the device, `[1, 1 + 2k]`: the logits' sum (finite
/// only if every logit is), then the `top_k` largest logits (the largest alone for `None`:
/// greedy) and their ids.
pub(crate) fn device_candidates(logits: Tensor<2>, top_k: Option<usize>) -> Tensor<2> {
    match top_k {
        Some(k) => {
            let (values, ids) = logits.clone().topk_with_indices(k, 1);
            Tensor::cat(vec![logits.sum_dim(1), values, ids.float()], 1)
        }
        None => crate::kernels::greedy_candidates(logits),
    }
}

pub(crate) async fn read_floats(tensor: Tensor<2>) -> Result<Vec<f32>> {
    let data = tensor
        .into_data_async()
        .await
        .map_err(|e| Error::Device(format!("reading logits failed: {e:?}")))?;
    data.try_into_vec::<f32>()
        .map_err(|e| Error::Device(format!("logits have an unexpected type: {e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams::default()
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut logits = vec![0.1, 3.0, -1.0, 3.0];
        assert_eq!(
            sample(&mut logits, &[], 0, None, &params(), &mut rng).unwrap(),
            1
        );
    }

    #[test]
    fn repetition_penalty_follows_transformers() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..params()
        };
        // Token 0 (4.0 → 2.0) loses to token 1 (3.0); a negative seen logit gets more negative.
        let mut logits = vec![4.0, 3.0, -1.0];
        assert_eq!(
            sample(&mut logits, &[0, 0, 2], 0, None, &p, &mut rng).unwrap(),
            1
        );
        assert_eq!(logits, vec![2.0, 3.0, -2.0]);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_candidates() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let top_k = SamplingParams {
            temperature: 1.0,
            top_k: Some(2),
            ..params()
        };
        // softmax([1, 5, 4.9, 0, 2]) ≈ [.009, .505, .457, .003, .025]
        let top_p_half = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            ..params()
        };
        let top_p_most = SamplingParams {
            top_p: 0.9,
            ..top_p_half.clone()
        };
        let logits = vec![1.0, 5.0, 4.9, 0.0, 2.0];
        let mut drawn = [0usize; 5];
        for _ in 0..200 {
            let id = sample(&mut logits.clone(), &[], 0, None, &top_k, &mut rng).unwrap();
            assert!(id == 1 || id == 2, "top-k 2 drew {id}");
            let id = sample(&mut logits.clone(), &[], 0, None, &top_p_half, &mut rng).unwrap();
            assert_eq!(id, 1, "top-p 0.5 keeps only the most likely token");
            let id = sample(&mut logits.clone(), &[], 0, None, &top_p_most, &mut rng).unwrap();
            drawn[id as usize] += 1;
        }
        assert_eq!(
            drawn[0] + drawn[3] + drawn[4],
            0,
            "top-p 0.9 drew {drawn:?}"
        );
        assert!(drawn[1] > 0 && drawn[2] > 0, "top-p 0.9 drew {drawn:?}");
    }

    #[test]
    fn sampling_is_seeded_and_follows_the_distribution() {
        let p = SamplingParams {
            temperature: 1.0,
            seed: 3,
            ..params()
        };
        let logits = vec![0.0, (3.0f32).ln()]; // probabilities 1/4 and 3/4
        let draw = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..4000)
                .map(|_| sample(&mut logits.clone(), &[], 0, None, &p, &mut rng).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
        let ones = draw(3).iter().filter(|&&id| id == 1).count();
        assert!(
            (2800..3200).contains(&ones),
            "{ones} of 4000 draws of p=0.75"
        );
    }

    #[test]
    fn non_finite_logits_are_an_error() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let err = sample(&mut [0.0, f32::NAN], &[], 0, None, &params(), &mut rng).unwrap_err();
        assert!(err.to_string().contains("non-finite"), "{err}");
    }

    #[test]
    fn invalid_options_are_rejected_by_name() {
        let bad = [
            SamplingParams {
                temperature: -1.0,
                ..params()
            },
            SamplingParams {
                top_p: 0.0,
                ..params()
            },
            SamplingParams {
                top_p: 1.5,
                ..params()
            },
            SamplingParams {
                top_k: Some(0),
                ..params()
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..params()
            },
            SamplingParams {
                stop: vec![String::new()],
                ..params()
            },
        ];
        let names = [
            "temperature",
            "top_p",
            "top_p",
            "top_k",
            "repetition_penalty",
            "stop",
        ];
        for (p, name) in bad.iter().zip(names) {
            match p.validate() {
                Err(Error::InvalidOption { option, .. }) => assert_eq!(option, name),
                other => panic!("{p:?}: expected an error naming {name}, got {other:?}"),
            }
        }
    }

    #[test]
    fn stop_strings_are_found_and_their_prefixes_held_back() {
        let stops = vec!["\nUser:".to_string(), "END".to_string()];
        assert_eq!(find_stop("hello\nUser: hi", &stops, 0), Some(5));
        assert_eq!(find_stop("hello", &stops, 0), None);
        assert_eq!(held_back("hello\nUs", &stops), 3);
        assert_eq!(held_back("hello E", &stops), 1);
        assert_eq!(held_back("hello", &stops), 0);
    }
}
