//! The benchmark shared by `phi2 bench` and the browser's bench page: time to first token,
//! prefill and decode speed, kernel launches per decoded token, and the effective decode
//! bandwidth next to a plain device memory copy measured in the same run, and the prefill's
//! arithmetic rate next to the device's register-only multiply-add rate.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

#[cfg(feature = "gpu")]
use burn::backend::Cube;
#[cfg(feature = "gpu")]
use burn::tensor::kind::Basic;
#[cfg(feature = "gpu")]
use burn::tensor::{DType, Element, Int, TensorData};
use burn::tensor::{Device, Tensor};
use cubecl::logging::{LaunchObservation, LaunchObserver};
#[cfg(feature = "gpu")]
use cubecl::prelude::CubeDim;
use serde::Serialize;

use crate::config::PhiConfig;
use crate::constraint::{LazyGrammars, ResponseFormat};
#[cfg(feature = "gpu")]
use crate::error::Error;
use crate::error::Result;
use crate::generation::{read_floats, SamplingParams, Session, Timings};
use crate::kernels::plan::DECODE_ROWS_PER_WORKGROUP;
#[cfg(feature = "gpu")]
use crate::kernels::{buffer, cube, empty_output, grid, WORKGROUP};
use crate::kernels::{describe_device, is_cpu, Epilogue, Q4Weight};
use crate::memory::device_memory_usage;
use crate::model::Phi;
use crate::quant::Q4Matrix;
use crate::tokenizer::PhiTokenizer;
use crate::weights::assembler::FusedLinear;
use crate::weights::bundle::linear_weight_bytes;
use crate::weights::names::Slot;

/// What a benchmark run measures (besides load, which its caller times).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BenchReport {
    pub device: String,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub time_to_first_token_s: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    /// GPU kernels launched per decoded token (0 on the CPU backend, which launches none).
    pub launches_per_token: f64,
    /// The same by kernel (name → launches per token), most first.
    pub launches_by_kernel: Vec<(String, f64)>,
    /// 4-bit linear-weight bytes read per decoded token.
    pub weight_bytes_per_token: u64,
    /// `weight_bytes_per_token` × decode tokens/s.
    pub decode_effective_gb_per_s: f64,
    /// A plain device copy (read + write) of `copy_bytes`, in the same run.
    pub copy_gb_per_s: f64,
    pub copy_bytes: u64,
    /// `decode_effective_gb_per_s` / `copy_gb_per_s`.
    pub bandwidth_ratio: f64,
    /// `prefill_tokens_per_s` / `decode_tokens_per_s`; None when no token was decoded after
    /// the first (one generated token), which leaves no decode speed.
    pub prefill_decode_ratio: Option<f64>,
    /// The prefill's linear-layer multiply-adds per second, in billions (GMAC/s).
    pub prefill_gmac_per_s: f64,
    /// Register-only f32 multiply-adds per second on the device, in the same run (GMAC/s): the
    /// arithmetic ceiling an f32 prefill works under, as the copy is the memory one a decode
    /// works under (f16 products, where enabled, may go past it). None on the CPU backend,
    /// whose matmul is host code, not a kernel.
    pub peak_gmac_per_s: Option<f64>,
    /// Bytes the device's allocator holds after the run: the model, its full KV cache and the
    /// largest step's activations (freed memory stays pooled for reuse). None on the CPU
    /// backend.
    pub device_memory_bytes: Option<u64>,
    /// `prefill_gmac_per_s` / `peak_gmac_per_s`.
    pub prefill_peak_share: Option<f64>,
    /// The largest `prefill_decode_ratio` this device allows at the measured decode speed: a
    /// prefill at `peak_gmac_per_s` over `decode_tokens_per_s` (None without either).
    pub prefill_decode_ceiling: Option<f64>,
}

/// Counts the kernel launches issued while it is alive (every device, every thread), by kernel.
pub struct LaunchCounter {
    counts: Arc<Counts>,
    _observation: LaunchObservation,
}

#[derive(Default)]
struct Counts(Mutex<BTreeMap<&'static str, usize>>);

impl LaunchObserver for Counts {
    fn launched(&self, kernel: &'static str) {
        *self
            .0
            .lock()
            .expect("not poisoned")
            .entry(kernel)
            .or_default() += 1;
    }
}

impl LaunchCounter {
    pub fn start() -> Self {
        let counts = Arc::new(Counts::default());
        LaunchCounter {
            _observation: LaunchObservation::new(counts.clone()),
            counts,
        }
    }

    pub fn launches(&self) -> usize {
        self.counts.0.lock().expect("not poisoned").values().sum()
    }

    /// Launches by kernel, named without module paths and generic arguments, most first.
    pub fn by_kernel(&self) -> Vec<(String, usize)> {
        let mut named = BTreeMap::<String, usize>::new();
        for (kernel, count) in self.counts.0.lock().expect("not poisoned").iter() {
            let base = kernel.split('<').next().unwrap_or(kernel);
            let short = base.rsplit("::").next().unwrap_or(base);
            *named.entry(short.to_string()).or_default() += count;
        }
        let mut named: Vec<_> = named.into_iter().collect();
        named.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        named
    }
}

/// Device memory-copy bandwidth in GB/s (bytes read + written per second): `bytes` copied
/// back and forth between two device buffers by the plainest kernel
/// (`copy_words`), or by `memcpy` in host memory on the CPU backend.
#[cfg_attr(not(feature = "gpu"), allow(unused_variables))] // device: a GPU's only
pub async fn copy_bandwidth(device: &Device, bytes: u64, now_ms: &dyn Fn() -> f64) -> Result<f64> {
    let words = (bytes / 4).max(1) as usize;
    let rate = |seconds: f64| 2.0 * (words * 4) as f64 * COPY_REPEATS as f64 / seconds / 1e9;
    #[cfg(feature = "gpu")]
    if !is_cpu(device) {
        return Ok(rate(device_copy_seconds(device, words, now_ms).await?));
    }
    let mut a: Vec<u32> = (0..words as u32).collect();
    let mut b = vec![0u32; words];
    let started = now_ms();
    for _ in 0..COPY_REPEATS {
        b.copy_from_slice(&a);
        std::mem::swap(&mut a, &mut b);
    }
    let seconds = (now_ms() - started) / 1000.0;
    std::hint::black_box(&a);
    Ok(rate(seconds))
}

/// Copies of a buffer back and forth in [`copy_bandwidth`].
const COPY_REPEATS: usize = 8;

/// Seconds [`copy_bandwidth`]'s copies take on a GPU device.
#[cfg(feature = "gpu")]
async fn device_copy_seconds(
    device: &Device,
    words: usize,
    now_ms: &dyn Fn() -> f64,
) -> Result<f64> {
    let source: Vec<u32> = (0..words as u32).collect();
    let mut a = Tensor::<1, Int>::from_data(TensorData::new(source, [words]), (device, DType::U32));
    let mut b = copy_words(&a); // compiles the kernel, allocates
    last_value::<_, u64>(b.clone(), words).await?;
    let started = now_ms();
    for _ in 0..COPY_REPEATS {
        b = copy_words(&a);
        std::mem::swap(&mut a, &mut b);
    }
    // Reading the last copy's last word waits for every copy before it.
    let last: u64 = last_value(a, words).await?;
    let seconds = (now_ms() - started) / 1000.0;
    if last != words as u64 - 1 {
        return Err(Error::Device(format!(
            "the copy benchmark read back {last}, not {}",
            words - 1
        )));
    }
    Ok(seconds)
}

/// The device's multiply-add rate in GMAC/s (`multiply_adds`): the best of 4, 8 and 16
/// independent chains per thread (enough to hide the latency, few enough to stay in registers;
/// which wins depends on the adapter), each on a grid of threads large enough to
/// fill a big GPU, made 2× longer until a run takes 0.2 s (so no dispatch takes much over
/// 0.4 s: a long one can freeze a shared GPU's display). None on the CPU backend.
#[cfg_attr(not(feature = "gpu"), allow(unused_variables))] // device: a GPU's only
pub async fn peak_multiply_adds(device: &Device, now_ms: &dyn Fn() -> f64) -> Result<Option<f64>> {
    #[cfg(feature = "gpu")]
    if !is_cpu(device) {
        return device_multiply_adds(device, now_ms).await.map(Some);
    }
    Ok(None)
}

/// [`peak_multiply_adds`] on a GPU device.
#[cfg(feature = "gpu")]
async fn device_multiply_adds(device: &Device, now_ms: &dyn Fn() -> f64) -> Result<f64> {
    const THREADS: usize = 1 << 18;
    const MAX_ITERATIONS: u32 = 1 << 22;
    let run = |iterations: u32, chains: usize| {
        let sums = multiply_adds(device, THREADS, iterations, chains);
        last_value::<_, f32>(sums, THREADS)
    };
    let mut best = 0.0f64;
    for chains in [4, 8, 16] {
        run(1, chains).await?; // compiles the kernel
        let mut iterations = 64;
        loop {
            let started = now_ms();
            let sum = run(iterations, chains).await?;
            let seconds = (now_ms() - started) / 1000.0;
            let expected = chains as f32 / 2.0;
            // A few ulps of slack: WGSL lets an addition round either way.
            if (sum - expected).abs() > 1e-5 * expected {
                return Err(Error::Device(format!(
                    "the multiply-add benchmark ({chains} chains) read back {sum}, not {expected}"
                )));
            }
            if seconds >= 0.2 || iterations >= MAX_ITERATIONS {
                let multiply_adds = (THREADS * chains) as f64 * f64::from(iterations);
                best = best.max(multiply_adds / seconds / 1e9);
                break;
            }
            iterations *= 2;
        }
    }
    Ok(best)
}

/// Multiply-adds per prompt token in a prefill of `tokens`: every layer's linear weights for
/// each token, the LM head's for the last one only. Attention's grow with the context and are
/// left out (about 1.7 % more at 512 tokens on Phi-2).
fn prefill_multiply_adds_per_token(config: &PhiConfig, tokens: usize) -> f64 {
    Slot::all(config)
        .into_iter()
        .filter(|s| s.is_linear_weight())
        .map(|s| {
            let elements = s.shape(config).iter().product::<usize>() as f64;
            match s {
                Slot::LmHeadWeight => elements / tokens as f64,
                _ => elements,
            }
        })
        .sum()
}

/// The last of a device vector's `len` values, read back (which waits for the work before it).
#[cfg(feature = "gpu")]
async fn last_value<K, T>(values: Tensor<1, K>, len: usize) -> Result<T>
where
    K: Basic,
    T: Element,
{
    let data = values
        .narrow(0, len - 1, 1)
        .into_data_async()
        .await
        .map_err(|e| Error::Device(format!("reading back failed: {e:?}")))?;
    let value = data.iter::<T>().next();
    value.ok_or_else(|| Error::Device("reading back gave nothing".into()))
}

/// Runs `prompt_tokens` of a synthetic prompt and `gen_tokens` greedy tokens (speed does not
/// depend on the token values), after a warm-up that compiles every kernel, then measures the
/// device's copy bandwidth over `copy_bytes` and its multiply-add rate.
pub async fn run(
    model: &Phi,
    tokenizer: &PhiTokenizer,
    prompt_tokens: usize,
    gen_tokens: usize,
    copy_bytes: u64,
    response_format: Option<ResponseFormat>,
    now_ms: &dyn Fn() -> f64,
) -> Result<BenchReport> {
    let config = model.config();
    let context = model.context_length();
    let prompt_tokens = prompt_tokens.clamp(1, context.saturating_sub(1).max(1));
    let gen_tokens = gen_tokens.clamp(1, context.saturating_sub(prompt_tokens).max(1));
    let prompt: Vec<u32> = (0..prompt_tokens)
        .map(|i| (i * 7919 % 50000) as u32)
        .collect();
    let params = SamplingParams {
        max_tokens: gen_tokens,
        // The synthetic model may produce <|endoftext|> early; a stop string never matches.
        response_format,
        ..SamplingParams::default()
    };
    // A constraint's vocabulary index is made here, with the warm-up, not timed.
    let mut grammars = LazyGrammars::default();
    // Warm-up: a short prompt and two steps compile every shader (seconds on first use).
    {
        let warm_prompt = prompt[..prompt_tokens.min(8)].to_vec();
        let mut warm = Session::start(
            model,
            tokenizer,
            &mut grammars,
            &mut None,
            warm_prompt,
            params.clone(),
        )?;
        for _ in 0..2 {
            warm.next(model, tokenizer).await?;
        }
    } // its KV cache would count twice in the peak memory

    let mut session = Session::start(model, tokenizer, &mut grammars, &mut None, prompt, params)?;
    session.ignore_end_of_text();
    let mut timings = Timings::start(now_ms());
    let mut launches = None;
    while session.next(model, tokenizer).await?.is_some() {
        timings.token(now_ms());
        // Counted from the first decoded token on: prefill launches once per prompt.
        launches.get_or_insert_with(LaunchCounter::start);
    }
    let stats = timings.stats(&session);
    let decoded = stats.generated_tokens.saturating_sub(1).max(1);
    let per_token = |count: usize| count as f64 / decoded as f64;
    let launches_per_token = per_token(launches.as_ref().map_or(0, LaunchCounter::launches));
    let launches_by_kernel = launches.map_or_else(Vec::new, |c| {
        c.by_kernel()
            .into_iter()
            .map(|(name, count)| (name, per_token(count)))
            .collect()
    });
    let weight_bytes_per_token = linear_weight_bytes(config);
    let effective = weight_bytes_per_token as f64 * stats.decode_tokens_per_s / 1e9;
    drop(session);
    let copy = copy_bandwidth(model.device(), copy_bytes, now_ms).await?;
    let peak = peak_multiply_adds(model.device(), now_ms).await?;
    let per_prompt_token = prefill_multiply_adds_per_token(config, stats.prompt_tokens);
    let prefill_gmac = stats.prefill_tokens_per_s * per_prompt_token / 1e9;
    // Prompt tokens/s over decode tokens/s, where a decode speed was measured.
    let per_decode_speed = |tokens_per_s: f64| {
        (stats.decode_tokens_per_s > 0.0).then(|| tokens_per_s / stats.decode_tokens_per_s)
    };
    Ok(BenchReport {
        device_memory_bytes: device_memory_usage(model.device()).map(|u| u.bytes_reserved),
        device: describe_device(model.device(), model.kernel_plan()),
        prompt_tokens: stats.prompt_tokens,
        generated_tokens: stats.generated_tokens,
        time_to_first_token_s: stats.time_to_first_token_ms / 1000.0,
        prefill_tokens_per_s: stats.prefill_tokens_per_s,
        decode_tokens_per_s: stats.decode_tokens_per_s,
        launches_per_token,
        launches_by_kernel,
        weight_bytes_per_token,
        decode_effective_gb_per_s: effective,
        copy_gb_per_s: copy,
        copy_bytes,
        bandwidth_ratio: effective / copy,
        prefill_decode_ratio: per_decode_speed(stats.prefill_tokens_per_s),
        prefill_gmac_per_s: prefill_gmac,
        peak_gmac_per_s: peak,
        prefill_peak_share: peak.map(|p| prefill_gmac / p),
        prefill_decode_ceiling: peak.and_then(|p| per_decode_speed(p * 1e9 / per_prompt_token)),
    })
}

/// One matmul's speed alone (`phi2 bench --matmuls`): a 4-bit weight of one of the model's
/// shapes, random (speed does not depend on the values), run by one kernel variant.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MatmulFigure {
    /// The model's matmul of that shape: `fc1_qkv`, `fc2_dense` or `lm_head`.
    pub name: &'static str,
    pub rows: usize,
    pub cols: usize,
    pub tokens: usize,
    /// Output rows per workgroup of the decode kernel (see `KernelPlan`), where it ran.
    pub decode_rows: Option<usize>,
    pub microseconds: f64,
    /// 4-bit weight bytes (codes and scales) read per second, in GB/s.
    pub weight_gb_per_s: f64,
    /// `weight_gb_per_s` over the run's copy bandwidth.
    pub copy_share: f64,
    /// Multiply-adds per second, in billions.
    pub gmac_per_s: f64,
}

/// Times the model's matmul shapes one by one with its kernel plan: one token (the decode
/// kernel; on a GPU without the software shape with 2, 4 and 8 rows per workgroup) and
/// `prompt_tokens` tokens. Each is repeated until a run takes 0.1 s.
pub async fn matmul_figures(
    model: &Phi,
    prompt_tokens: usize,
    copy_gb_per_s: f64,
    now_ms: &dyn Fn() -> f64,
) -> Result<Vec<MatmulFigure>> {
    let config = model.config();
    let device = model.device();
    let plan = model.kernel_plan();
    let [fc1_qkv, fc2_dense] = FusedLinear::of_layer(config);
    let shapes = [
        ("fc1_qkv", fc1_qkv.rows, fc1_qkv.cols),
        ("fc2_dense", fc2_dense.rows, fc2_dense.cols),
        ("lm_head", config.vocab_size, config.hidden_size),
    ];
    // Rows per workgroup are a choice of a GPU's decode kernel only.
    let decode_rows: Vec<Option<usize>> = match !is_cpu(device) && !plan.software {
        true => vec![Some(2), Some(4), Some(8)],
        false => vec![None],
    };
    let mut figures = Vec::new();
    for (name, rows, cols) in shapes {
        let matrix = random_q4(rows, cols);
        let bytes = (matrix.codes.len() * 4 + matrix.scales.len() * 2) as f64;
        let weight = Q4Weight::upload(matrix, device);
        let bias = Tensor::<1>::zeros([rows], device);
        let mut runs: Vec<(usize, Option<usize>)> = decode_rows.iter().map(|&r| (1, r)).collect();
        runs.push((prompt_tokens, None));
        for (tokens, rows_per_workgroup) in runs {
            let x = Tensor::<2>::ones([tokens, cols], device);
            let run = |repeats: usize| {
                let mut y = None;
                for _ in 0..repeats {
                    y = Some(weight.matmul_with(
                        x.clone(),
                        None,
                        &bias,
                        Epilogue::default(),
                        plan,
                        rows_per_workgroup.unwrap_or(DECODE_ROWS_PER_WORKGROUP),
                    ));
                }
                // Its last value, read (the data alone may not wait for the work), waits for
                // every run without timing a read-back of the whole output.
                let y = y.expect("at least one run");
                read_floats(y.narrow(0, tokens - 1, 1).narrow(1, rows - 1, 1))
            };
            run(1).await?;
            let mut repeats = 1;
            let seconds = loop {
                let started = now_ms();
                run(repeats).await?;
                let seconds = (now_ms() - started) / 1000.0;
                if seconds >= 0.1 || repeats >= 1 << 16 {
                    break seconds / repeats as f64;
                }
                repeats *= 2;
            };
            let weight_gb_per_s = bytes / seconds / 1e9;
            figures.push(MatmulFigure {
                name,
                rows,
                cols,
                tokens,
                decode_rows: rows_per_workgroup,
                microseconds: seconds * 1e6,
                weight_gb_per_s,
                copy_share: weight_gb_per_s / copy_gb_per_s,
                gmac_per_s: (rows * cols * tokens) as f64 / seconds / 1e9,
            });
        }
    }
    Ok(figures)
}

/// A 4-bit matrix of random codes and small scales.
fn random_q4(rows: usize, cols: usize) -> Q4Matrix {
    let blocks = cols.div_ceil(32);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let codes = (0..rows * blocks * 4)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 32) as u32
        })
        .collect();
    Q4Matrix {
        rows,
        cols,
        codes,
        scales: vec![half::f16::from_f32(0.01); rows * blocks],
    }
}

/// A copy of `words` made by the plainest kernel: one read and one write per word.
#[cfg(feature = "gpu")]
fn copy_words(words: &Tensor<1, Int>) -> Tensor<1, Int> {
    let len = words.dims()[0];
    let input = cube(words.clone());
    let client = input.client.clone();
    let output = empty_output(&input, [len], DType::U32);
    unsafe {
        shader::copy_kernel::launch_unchecked(
            &client,
            grid(len.div_ceil(WORKGROUP as usize)),
            CubeDim::new_1d(WORKGROUP),
            buffer(&input),
            buffer(&output),
            len,
        );
    }
    Tensor::from_primitive::<Cube>(output)
}

/// `threads` × `iterations` × `chains` multiply-adds in registers
/// ([`shader::mul_add_kernel`]); each thread's output is `chains / 2` once `iterations` ≥ 64
/// (every chain, starting at most at 22.125, converges to 0.5).
#[cfg(feature = "gpu")]
fn multiply_adds(device: &Device, threads: usize, iterations: u32, chains: usize) -> Tensor<1> {
    let params = Tensor::<1>::from_data(TensorData::new(vec![0.5f32, 0.25, 0.125], [3]), device);
    let params = cube(params);
    let client = params.client.clone();
    let output = empty_output(&params, [threads], DType::F32);
    unsafe {
        shader::mul_add_kernel::launch_unchecked(
            &client,
            grid(threads.div_ceil(WORKGROUP as usize)),
            CubeDim::new_1d(WORKGROUP),
            buffer(&params),
            buffer(&output),
            iterations,
            chains,
        );
    }
    Tensor::from_primitive::<Cube>(output)
}

#[cfg(feature = "gpu")]
mod shader {
    use cubecl::prelude::*;

    /// `output = input`, one word per thread (the benchmark's memory-copy bandwidth).
    #[cube(launch_unchecked)]
    pub fn copy_kernel(input: &[u32], output: &mut [u32], len: usize) {
        if ABSOLUTE_POS < len {
            output[ABSOLUTE_POS] = input[ABSOLUTE_POS];
        }
    }

    /// `chains` independent chains of `iterations` multiply-adds per thread, in registers:
    /// the adapter's f32 arithmetic ceiling, as the copy kernel is its memory one. With
    /// `params` = `[a, b, start]`, chain `j` of a thread runs `acc = acc · a + b` from
    /// `start + j + UNIT_POS % 8` towards `b / (1 - a)` (`|a| < 1`); `out` holds each thread's
    /// sum, so the work cannot be optimised away and can be checked.
    #[cube(launch_unchecked)]
    pub fn mul_add_kernel(
        params: &[f32],
        out: &mut [f32],
        iterations: u32,
        #[comptime] chains: usize,
    ) {
        let a = params[0];
        let b = params[1];
        let mut acc = Array::<f32>::new(chains);
        // Starts that differ between threads: identical work could run on a scalar unit.
        let lane = f32::cast_from(UNIT_POS % 8);
        #[unroll]
        for j in 0..chains {
            acc[j] = params[2] + lane + f32::cast_from(j as u32);
        }
        for _ in 0..iterations {
            #[unroll]
            for j in 0..chains {
                acc[j] = acc[j] * a + b;
            }
        }
        let mut total = f32::new(0.0);
        #[unroll]
        for j in 0..chains {
            total += acc[j];
        }
        if ABSOLUTE_POS < out.len() {
            out[ABSOLUTE_POS] = total;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Phi's layers: q, k, v and dense are hidden², fc1 and fc2 hidden × intermediate; the LM
    /// head is vocab × hidden, run for the prompt's last token only; the embedding is a lookup.
    #[test]
    fn prefill_multiply_adds_count_each_layer_per_token_and_the_head_once() {
        let config = PhiConfig::phi2();
        let (h, i, v) = (2560.0, 10240.0, 51200.0);
        let layers = 32.0 * (4.0 * h * h + 2.0 * h * i);
        for tokens in [1usize, 16, 512] {
            let expected = layers + v * h / tokens as f64;
            assert_eq!(prefill_multiply_adds_per_token(&config, tokens), expected);
        }
    }
}
