// LoRA dropout's inverted-dropout mask, drawn on the GPU from a counter: element `index` of
// stream `stream` is SplitMix64's `index + 1`-th output from seed `stream`, and is dropped when
// its top 24 bits are below `threshold` (p * 2^24, rounded up). model/src/kernels/dropout.rs
// computes the same values on the host; the two must stay identical.
extern "C" __global__ void kubetune_dropout_mask(float *out, unsigned long long stream,
                                                 unsigned long long first, unsigned long long n,
                                                 unsigned int threshold, float keep) {
  unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) {
    return;
  }
  unsigned long long z = stream + (first + i + 1ULL) * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z ^= z >> 31;
  out[i] = (unsigned int)(z >> 40) < threshold ? 0.0f : keep;
}
