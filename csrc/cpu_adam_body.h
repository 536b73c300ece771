// The Adam step body, written once over a vector trait `V` (simd.h), compiled per ISA.
//
// NOT an ordinary header: cpu_adam.cpp includes it once per instruction set, each time inside
// its own namespace, with `V` naming the trait struct and ZRAY_BODY_TARGET the function
// attribute that lets the compiler emit V's instructions. Hence no include guard and no
// #includes: it uses what cpu_adam.cpp declared before including it (AdamBuffers, AdamCoeffs,
// Decay, Out, DType, <cstring>).
//
// Why one body for all ISAs: the AVX-512 path cannot run on the development VM (AVX2 only), so
// it is kept correct by construction. It differs from the scalar and AVX2 paths, which the
// tests run, only in simd.h's small trait functions; the algorithm, the tail handling and the
// operation order are this file's, shared by all three.

// The per-call float32 scalars, broadcast once per span so the loop only loads and computes.
struct VecCoeffs {
  V::F grad_scale, decay_factor, weight_decay, lerp_weight, one_minus_lerp_weight, beta2,
      one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size;
};

ZRAY_BODY_TARGET inline VecCoeffs broadcast(const AdamCoeffs& c) {
  return {V::set1(c.grad_scale),      V::set1(c.decay_factor),
          V::set1(c.weight_decay),    V::set1(c.lerp_weight),
          V::set1(c.one_minus_lerp_weight), V::set1(c.beta2),
          V::set1(c.one_minus_beta2), V::set1(c.bias_correction2_sqrt),
          V::set1(c.eps),             V::set1(c.neg_step_size)};
}

template <DType G>
ZRAY_BODY_TARGET inline V::F load_grad(const void* grad, int64_t i) {
  if constexpr (G == DType::kFloat32) {
    return V::load(static_cast<const float*>(grad) + i);
  } else if constexpr (G == DType::kBFloat16) {
    return V::load_bf16(static_cast<const uint16_t*>(grad) + i);
  } else {
    return V::load_fp16(static_cast<const uint16_t*>(grad) + i);
  }
}

template <Out O>
ZRAY_BODY_TARGET inline void store_out(void* out, int64_t i, V::F p, bool stream) {
  uint16_t* dst = static_cast<uint16_t*>(out) + i;
  if constexpr (O == Out::kBFloat16) {
    stream ? V::stream_bf16(dst, p) : V::store_bf16(dst, p);
  } else if constexpr (O == Out::kFloat16) {
    stream ? V::stream_fp16(dst, p) : V::store_fp16(dst, p);
  }
}

// Elements [i, i + V::kWidth): the whole update, torch's operation order (see cpu_adam.h).
template <DType G, Out O, Decay D>
ZRAY_BODY_TARGET inline void step_vector(const AdamBuffers& b, int64_t i, const VecCoeffs& k,
                                         bool lerp_from_grad, bool stream) {
  using F = V::F;
  F p = V::load(b.param + i);
  F g = V::mul(load_grad<G>(b.grad, i), k.grad_scale);
  if constexpr (D == Decay::kDecoupled) p = V::mul(p, k.decay_factor);
  if constexpr (D == Decay::kL2) g = V::add(g, V::mul(p, k.weight_decay));

  // torch's lerp(m, g, w): m + w*(g - m) when |w| < 0.5, else g - (g - m)*(1 - w); the
  // branch is the same for every element of the call, so it predicts perfectly.
  F m = V::load(b.exp_avg + i);
  const F diff = V::sub(g, m);
  m = lerp_from_grad ? V::sub(g, V::mul(diff, k.one_minus_lerp_weight))
                     : V::add(m, V::mul(k.lerp_weight, diff));

  F v = V::load(b.exp_avg_sq + i);
  v = V::add(V::mul(v, k.beta2), V::mul(V::mul(k.one_minus_beta2, g), g));

  const F denom = V::add(V::div(V::sqrt(v), k.bias_correction2_sqrt), k.eps);
  p = V::add(p, V::div(V::mul(k.neg_step_size, m), denom));

  V::store(b.param + i, p);
  V::store(b.exp_avg + i, m);
  V::store(b.exp_avg_sq + i, v);
  store_out<O>(b.out, i, p, stream);
}

// The last n < V::kWidth elements: copied into zero-padded scratch one vector wide, stepped by
// the same step_vector, copied back. So every element of a call goes through the same
// instructions (no separate scalar tail to keep in sync); the padding lanes compute on zeros
// (finite: denominators are eps) and are dropped. Costs ~100 bytes of copies per call.
template <DType G, Out O, Decay D>
ZRAY_BODY_TARGET void step_tail(const AdamBuffers& b, int64_t i, int64_t n, const VecCoeffs& k,
                                bool lerp_from_grad) {
  constexpr int64_t kW = V::kWidth;
  constexpr int64_t kGradSize = G == DType::kFloat32 ? 4 : 2;
  alignas(64) float p[kW] = {};
  alignas(64) float m[kW] = {};
  alignas(64) float v[kW] = {};
  alignas(64) unsigned char g[kW * 4] = {};
  alignas(64) uint16_t out[kW] = {};
  const size_t nf = static_cast<size_t>(n) * sizeof(float);
  std::memcpy(p, b.param + i, nf);
  std::memcpy(m, b.exp_avg + i, nf);
  std::memcpy(v, b.exp_avg_sq + i, nf);
  std::memcpy(g, static_cast<const unsigned char*>(b.grad) + i * kGradSize,
              static_cast<size_t>(n * kGradSize));
  const AdamBuffers scratch{p, g, m, v, out};
  step_vector<G, O, D>(scratch, 0, k, lerp_from_grad, /*stream=*/false);
  std::memcpy(b.param + i, p, nf);
  std::memcpy(b.exp_avg + i, m, nf);
  std::memcpy(b.exp_avg_sq + i, v, nf);
  if constexpr (O != Out::kNone) {
    std::memcpy(static_cast<uint16_t*>(b.out) + i, out, static_cast<size_t>(n) * 2);
  }
}

// Elements [begin, end) of the buffers: one OpenMP work item.
template <DType G, Out O, Decay D>
ZRAY_BODY_TARGET void step_span(const AdamBuffers& b, int64_t begin, int64_t end,
                                const AdamCoeffs& c) {
  constexpr int64_t kW = V::kWidth;
  const VecCoeffs k = broadcast(c);
  const bool from_grad = c.lerp_from_grad;
  // Streaming stores for the 16-bit copy when its vectors are aligned for them (chunks start
  // at multiples of 64K elements, so that depends only on the buffer's address).
  const bool stream = O != Out::kNone && V::kStreamAlign != 0 &&
                      reinterpret_cast<uintptr_t>(static_cast<uint16_t*>(b.out) + begin) %
                              V::kStreamAlign ==
                          0;
  int64_t i = begin;
  for (; i + kW <= end; i += kW) step_vector<G, O, D>(b, i, k, from_grad, stream);
  if (stream) V::stream_fence();  // order them before the caller (or the DMA) reads the copy
  if constexpr (kW > 1) {
    if (i < end) step_tail<G, O, D>(b, i, end - i, k, from_grad);
  }
}

// The instantiation for one (gradient dtype, output, decay) triple. Plain functions (no target
// attribute): they only take addresses, so they may run before the ISA is known to be usable.
template <DType G, Out O>
SpanFn select_decay(Decay d) {
  switch (d) {
    case Decay::kNone:
      return &step_span<G, O, Decay::kNone>;
    case Decay::kDecoupled:
      return &step_span<G, O, Decay::kDecoupled>;
    case Decay::kL2:
      return &step_span<G, O, Decay::kL2>;
  }
  return nullptr;
}

template <DType G>
SpanFn select_out(Out o, Decay d) {
  switch (o) {
    case Out::kNone:
      return select_decay<G, Out::kNone>(d);
    case Out::kBFloat16:
      return select_decay<G, Out::kBFloat16>(d);
    case Out::kFloat16:
      return select_decay<G, Out::kFloat16>(d);
  }
  return nullptr;
}

inline SpanFn select_span(DType g, Out o, Decay d) {
  switch (g) {
    case DType::kFloat32:
      return select_out<DType::kFloat32>(o, d);
    case DType::kBFloat16:
      return select_out<DType::kBFloat16>(o, d);
    case DType::kFloat16:
      return select_out<DType::kFloat16>(o, d);
  }
  return nullptr;
}
