//! The greedy pick on the device: the largest logit, its id (the first, on a tie) and the
//! logits' sum (finite only if every logit is), in one kernel launch on GPU backends (burn's
//! ops take six: maximum, sum, cast and the copies that join them), tensor ops on burn's CPU
//! backend.

#[cfg(feature = "gpu")]
use burn::backend::Cube;
#[cfg(feature = "gpu")]
use burn::tensor::DType;
use burn::tensor::Tensor;
#[cfg(feature = "gpu")]
use cubecl::prelude::CubeDim;

#[cfg(feature = "gpu")]
use super::{buffer, cube, empty_output, is_cpu};

/// `[1, 3]` for `logits: [1, vocab]`: their sum, the largest and its id (as f32: exact below
/// 2^24).
pub fn greedy_candidates(logits: Tensor<2>) -> Tensor<2> {
    #[cfg(feature = "gpu")]
    if !is_cpu(&logits.device()) {
        return gpu_greedy_candidates(logits);
    }
    let (largest, id) = logits.clone().max_dim_with_indices(1);
    Tensor::cat(vec![logits.sum_dim(1), largest, id.float()], 1)
}

/// Threads of the one workgroup that scans the vocabulary.
#[cfg(feature = "gpu")]
const THREADS: usize = 256;

#[cfg(feature = "gpu")]
fn gpu_greedy_candidates(logits: Tensor<2>) -> Tensor<2> {
    let [_, vocab] = logits.dims();
    let logits = cube(logits);
    let out = empty_output(&logits, [1, 3], DType::F32);
    unsafe {
        shader::greedy_kernel::launch_unchecked(
            &logits.client,
            cubecl::prelude::CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(THREADS as u32),
            buffer(&logits),
            buffer(&out),
            vocab,
            THREADS,
        );
    }
    Tensor::from_primitive::<Cube>(out)
}

#[cfg(feature = "gpu")]
mod shader {
    use cubecl::prelude::*;

    use crate::kernels::reduce::{combine_across_workgroup, scratch_len};

    /// One workgroup: each thread scans every `threads`-th logit, then the workgroup combines
    /// the sums, the maxima, and the smallest id holding the maximum (as the largest negated
    /// id). Thread 0 writes `[sum, largest, id]`.
    #[cube(launch_unchecked)]
    pub fn greedy_kernel(
        logits: &[f32],
        out: &mut [f32],
        vocab: usize,
        #[comptime] threads: usize,
    ) {
        let unit = UNIT_POS as usize;
        let mut scratch = Shared::<[f32]>::new_slice(comptime!(scratch_len(1, threads)));
        let mut value = Array::<f32>::new(1usize);
        let mut sum = f32::new(0.0);
        let mut largest = f32::new(-3.0e38);
        let mut id = vocab;
        let mut i = unit;
        while i < vocab {
            let logit = logits[i];
            sum += logit;
            // Strictly larger: a thread's earlier id wins a tie.
            if logit > largest || id == vocab {
                largest = logit;
                id = i;
            }
            i += threads;
        }
        value[0] = sum;
        combine_across_workgroup(&mut value, &mut scratch, 1usize, threads, false, false);
        sum = value[0];
        value[0] = largest;
        combine_across_workgroup(&mut value, &mut scratch, 1usize, threads, false, true);
        let overall = value[0];
        let mine = select(id < vocab && largest == overall, id, vocab);
        value[0] = -f32::cast_from(mine);
        combine_across_workgroup(&mut value, &mut scratch, 1usize, threads, false, true);
        if unit == 0 {
            out[0] = sum;
            out[1] = overall;
            out[2] = -value[0];
        }
    }
}
