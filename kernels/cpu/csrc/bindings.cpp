// Torch bindings of the CPU kernels: the small-M matmul, the row-invariant attention and the decoder, every
// layer in one call (checks and allocation here; work split in decoder.cpp and attention.cpp). One file holds
// every binding because the torch and pybind headers are what takes time to compile.
// Narrow includes on purpose: <torch/extension.h> alone takes ~19 s to compile here, these ~5 s.
#include <ATen/Parallel.h>
#include <string>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include "decoder.h"
#include "dispatch.h"
#include "quant.h"

using specedit_cpu::ISA_AUTO;
using specedit_cpu::ISA_AVX2;
using specedit_cpu::ISA_AVX512;

// "avx512" or "avx2": what ISA_AUTO runs on this CPU.
static std::string best_isa() { return specedit_cpu::resolve_isa(ISA_AUTO) == ISA_AVX512 ? "avx512" : "avx2"; }

// An IsaCode from Python -> the instruction set to run (dispatch.h); ValueError if this CPU cannot run it.
static int64_t runnable_isa(int64_t isa, const char* what) {
  const int64_t resolved = specedit_cpu::resolve_isa(isa);
  TORCH_CHECK_VALUE(resolved >= 0, what, ": isa code ", isa, " is not available here");
  return resolved;
}

// One part of a packed weight from Python: (packed bytes, N, dtype code).
using PartSpec = std::tuple<at::Tensor, int64_t, int64_t>;

// Bytes of a packed part of N columns over K in a WeightDtype; ValueError when K does not fit its blocks.
static int64_t packed_nbytes(int64_t N, int64_t K, int64_t dtype, const std::string& what) {
  using namespace specedit_cpu;
  TORCH_CHECK_VALUE(dtype >= 0 && dtype < W_NUM_DTYPES, what, ": unknown weight dtype code ", dtype);
  TORCH_CHECK_VALUE(N >= 0 && K >= 0, what, ": bad shape N=", N, " K=", K);
  const int64_t groups = (N + 31) / 32;
  if (dtype >= W_Q8_0) {
    TORCH_CHECK_VALUE(K % QK_OF[dtype] == 0, what, ": K=", K, " is not a multiple of the block size ",
                      QK_OF[dtype], " of dtype code ", dtype);
    return groups * (K / QK_OF[dtype]) * PACKED_BYTES_OF[dtype];
  }
  return groups * 32 * K * (dtype == W_F32 ? 4 : 2);
}

// A packed weight: its parts (pack_weight()'s integer views or repack()'s bytes; their N add up to the
// weight's), K, its bias [N] float32 or None: checked and kept as pointers. `what` names the weight in errors.
static specedit_cpu::Packed to_packed(const std::vector<PartSpec>& parts, int64_t K,
                                      const std::optional<at::Tensor>& bias, const std::string& what) {
  using namespace specedit_cpu;
  TORCH_CHECK_VALUE(!parts.empty() && (int)parts.size() <= MAX_PARTS, what, ": ", parts.size(),
                    " parts, expected 1 to ", MAX_PARTS);
  Packed w{};
  w.K = K;
  auto vec = [&](const std::optional<at::Tensor>& t, int64_t n, const char* name) -> const float* {
    if (!t.has_value() || !t->defined()) return nullptr;
    TORCH_CHECK_VALUE(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                          t->numel() == n,
                      what, ": ", name, " must be a contiguous float32 [", n, "] on the CPU, got ",
                      t->scalar_type(), " ", t->sizes());
    return t->data_ptr<float>();
  };
  for (const auto& [packed, N, dtype] : parts) {
    const int64_t bytes = packed_nbytes(N, K, dtype, what);
    TORCH_CHECK_VALUE(packed.device().is_cpu() && packed.is_contiguous() && (int64_t)packed.nbytes() == bytes,
                      what, ": packed weight must be a contiguous CPU tensor of ", bytes, " bytes for N=", N,
                      " K=", K, " dtype code ", dtype, ", got ", packed.nbytes(), " bytes on ", packed.device());
    w.part[w.nparts++] = {packed.data_ptr(), N, (int)dtype};
    w.N += N;
  }
  w.bias = vec(bias, w.N, "bias");
  return w;
}

// x [M, K] float32; the weight as in to_packed(); isa an IsaCode.
// Returns y [M, N] float32.
static at::Tensor linear(const at::Tensor& x_, const std::vector<PartSpec>& parts, int64_t K,
                         const std::optional<at::Tensor>& bias, int64_t isa) {
  TORCH_CHECK_VALUE(x_.device().is_cpu(), "cpu linear: x must be on the CPU, got ", x_.device());
  TORCH_CHECK_VALUE(x_.scalar_type() == at::kFloat, "cpu linear: x must be float32, got ", x_.scalar_type());
  TORCH_CHECK_VALUE(x_.dim() == 2 && x_.size(1) == K, "cpu linear: x must be [M, ", K, "], got ", x_.sizes());
  const specedit_cpu::Packed w = to_packed(parts, K, bias, "cpu linear");
  isa = runnable_isa(isa, "cpu linear");
  const at::Tensor x = x_.contiguous();
  auto y = at::empty({x.size(0), w.N}, x.options());
  specedit_cpu::linear_run(x.data_ptr<float>(), x.size(0), w, y.data_ptr<float>(), isa);
  return y;
}

// raw: the GGUF tensor's bytes [N rows of K / QK blocks] (uint8, contiguous); out: uint8 of
// packed_nbytes(N, K, dtype) bytes, filled with the repacked layout (quant.h). dtype: W_Q8_0 .. W_Q6_K.
static void repack(const at::Tensor& raw, int64_t N, int64_t K, int64_t dtype, const at::Tensor& out) {
  using namespace specedit_cpu;
  TORCH_CHECK_VALUE(dtype >= W_Q8_0 && dtype < W_NUM_DTYPES, "repack: dtype code ", dtype,
                    " is not a GGUF block format");
  const int64_t nbytes = packed_nbytes(N, K, dtype, "repack");
  TORCH_CHECK_VALUE(raw.device().is_cpu() && raw.scalar_type() == at::kByte && raw.is_contiguous() &&
                        (int64_t)raw.nbytes() == N * (K / QK_OF[dtype]) * GGUF_BYTES_OF[dtype],
                    "repack: raw must be contiguous uint8 of ", N * (K / QK_OF[dtype]) * GGUF_BYTES_OF[dtype],
                    " bytes for N=", N, " K=", K, ", got ", raw.scalar_type(), " of ", raw.nbytes(), " bytes");
  TORCH_CHECK_VALUE(out.device().is_cpu() && out.scalar_type() == at::kByte && out.is_contiguous() &&
                        (int64_t)out.nbytes() == nbytes,
                    "repack: out must be contiguous uint8 of ", nbytes, " bytes, got ", out.nbytes());
  const uint8_t* src = raw.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, (N + 31) / 32, 16, [&](int64_t g0, int64_t g1) { specedit_cpu::repack(src, N, K, dtype, dst, g0, g1); });
}

// Columns `cols` (int64, each in [0, N)) of a repacked weight -> [len(cols), K] float32 (embedding rows).
static at::Tensor dequant_cols(const at::Tensor& packed, int64_t N, int64_t K, int64_t dtype, const at::Tensor& cols_) {
  using namespace specedit_cpu;
  TORCH_CHECK_VALUE(dtype >= W_Q8_0 && dtype < W_NUM_DTYPES, "dequant: dtype code ", dtype,
                    " is not a GGUF block format");
  const int64_t nbytes = packed_nbytes(N, K, dtype, "dequant");
  TORCH_CHECK_VALUE(packed.device().is_cpu() && packed.is_contiguous() && (int64_t)packed.nbytes() == nbytes,
                    "dequant: packed must be a contiguous CPU tensor of ", nbytes, " bytes, got ", packed.nbytes());
  const at::Tensor cols = cols_.to(at::kLong).contiguous();
  const int64_t* c = cols.data_ptr<int64_t>();
  for (int64_t i = 0; i < cols.numel(); ++i)
    TORCH_CHECK_VALUE(c[i] >= 0 && c[i] < N, "dequant: index ", c[i], " outside [0, ", N, ")");
  at::Tensor out = at::empty({cols.numel(), K}, at::TensorOptions().dtype(at::kFloat));
  specedit_cpu::dequant_cols((const uint8_t*)packed.data_ptr(), K, (int)dtype, c, cols.numel(), out.data_ptr<float>());
  return out;
}

// q [B, T, H, D] float32 (d contiguous, else copied); k, v [B, Hkv, S, D] float32 views (d contiguous,
// other strides free; not copied); lengths [B]: valid positions per row including the T new rows;
// window 0 = none; isa an IsaCode. Returns out [B, T, H, D] float32, contiguous.
// Errors are ValueError (TORCH_CHECK_VALUE) naming the values.
static at::Tensor attention(const at::Tensor& q_, const at::Tensor& k, const at::Tensor& v,
                            const std::vector<int64_t>& lengths, double scale, int64_t window, int64_t isa) {
  for (const at::Tensor* x : {&q_, &k, &v}) {
    TORCH_CHECK_VALUE(x->device().is_cpu() && x->scalar_type() == at::kFloat && x->dim() == 4,
                      "cpu attention: q, k and v must be 4-d float32 CPU tensors, got ", x->scalar_type(), " ",
                      x->sizes(), " on ", x->device());
  }
  const int64_t B = q_.size(0), T = q_.size(1), H = q_.size(2), D = q_.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "cpu attention: k ", k.sizes(), " and v ", v.sizes(), " differ");
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(3) == D, "cpu attention: cache ", k.sizes(), " does not match q ",
                    q_.sizes());
  TORCH_CHECK_VALUE(D > 0 && D % 16 == 0, "cpu attention: head dim must be a positive multiple of 16, got ", D);
  TORCH_CHECK_VALUE(Hkv > 0 && H % Hkv == 0, "cpu attention: ", H, " heads not divisible by ", Hkv, " kv heads");
  TORCH_CHECK_VALUE(k.stride(3) == 1 && v.stride(3) == 1, "cpu attention: cache rows must be contiguous in d");
  TORCH_CHECK_VALUE((int64_t)lengths.size() == B, "cpu attention: ", lengths.size(), " lengths for batch ", B);
  for (int64_t n : lengths)
    TORCH_CHECK_VALUE(n >= T && n <= S, "cpu attention: length ", n, " outside [T=", T, ", S_max=", S, "]");
  TORCH_CHECK_VALUE(scale > 0 && scale < 1e300, "cpu attention: scale must be positive and finite, got ", scale);
  TORCH_CHECK_VALUE(window >= 0, "cpu attention: window must be >= 0 (0 = none), got ", window);
  isa = runnable_isa(isa, "cpu attention");
  const at::Tensor q = q_.stride(3) == 1 ? q_ : q_.contiguous();
  at::Tensor out = at::empty({B, T, H, D}, q.options());
  specedit_cpu::AttnProblem P{};
  P.q = q.data_ptr<float>();
  P.sq_b = q.stride(0), P.sq_t = q.stride(1), P.sq_h = q.stride(2);
  P.k = k.data_ptr<float>();
  P.sk_b = k.stride(0), P.sk_h = k.stride(1), P.sk_s = k.stride(2);
  P.v = v.data_ptr<float>();
  P.sv_b = v.stride(0), P.sv_h = v.stride(1), P.sv_s = v.stride(2);
  P.out = out.data_ptr<float>();
  P.so_b = out.stride(0), P.so_t = out.stride(1), P.so_h = out.stride(2);
  P.lengths = lengths.data();
  P.B = B, P.T = T, P.H = H, P.Hkv = Hkv, P.D = D;
  P.window = window;
  P.qscale = (float)(scale * 1.4426950408889634);  // scores in base 2: exp(x * scale) = exp2(x * qscale)
  specedit_cpu::attention_run(P, isa);
  return out;
}

// A linear layer from Python: (parts, bias or None), see to_packed().
using LinearSpec = std::tuple<std::vector<PartSpec>, std::optional<at::Tensor>>;
// One decoder layer from Python: 4 norms (attn_norm [dim], q_norm [D] or None, k_norm [D] or None, mlp_norm
// [dim]) and 4 linears (qkv, o, gate_up, down), each in its own dtypes.
using LayerSpec = std::tuple<std::vector<std::optional<at::Tensor>>, std::vector<LinearSpec>>;

// The decoder of a model, built once from its tensors (kept alive here); forward() runs every layer in one
// call (decoder.cpp).
class Decoder {
 public:
  Decoder(const std::vector<LayerSpec>& layers, const at::Tensor& cos,
        const at::Tensor& sin, int64_t dim, int64_t H, int64_t Hkv, int64_t D, int64_t I, double eps,
        double scale, int64_t window) {
    TORCH_CHECK_VALUE(dim > 0 && H > 0 && Hkv > 0 && H % Hkv == 0 && I > 0,
                      "cpu decoder: bad dims dim=", dim, " H=", H, " Hkv=", Hkv, " I=", I);
    TORCH_CHECK_VALUE(D > 0 && D % 16 == 0 && D <= 512, "cpu decoder: head dim must be a multiple of 16 up to 512, got ", D);
    for (const at::Tensor* t : {&cos, &sin})
      TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(1) == D && t->is_contiguous(),
                        "cpu decoder: rope tables must be contiguous float32 [max_position, ", D, "], got ",
                        t->scalar_type(), " ", t->sizes());
    TORCH_CHECK_VALUE(cos.sizes() == sin.sizes(), "cpu decoder: rope tables differ in shape");
    keep_ = {cos, sin};
    dims_ = {(int64_t)layers.size(), dim, H, Hkv, D, I, (float)eps, scale, window,
             cos.data_ptr<float>(), sin.data_ptr<float>()};
    max_pos_ = cos.size(0);
    const int64_t nqkv = (H + 2 * Hkv) * D;
    for (size_t l = 0; l < layers.size(); ++l) {
      const auto& t = std::get<0>(layers[l]);
      const auto& lin = std::get<1>(layers[l]);
      TORCH_CHECK_VALUE(t.size() == 4 && lin.size() == 4, "cpu decoder: layer ", l, " has ", t.size(), " norms and ",
                        lin.size(), " linears, expected 4 and 4");
      for (const auto& x : t)
        if (x.has_value() && x->defined()) keep_.push_back(*x);
      for (const auto& [parts, bias] : lin) {
        for (const auto& p : parts) {
          keep_.push_back(std::get<0>(p));
        }
        if (bias.has_value() && bias->defined()) keep_.push_back(*bias);
      }
      auto norm = [&](int i, int64_t n, bool optional) -> const float* {
        if (!t[i].has_value() || !t[i]->defined()) {
          TORCH_CHECK_VALUE(optional, "cpu decoder: layer ", l, " norm ", i, " is missing");
          return nullptr;
        }
        const at::Tensor& v = *t[i];
        TORCH_CHECK_VALUE(v.scalar_type() == at::kFloat && v.is_contiguous() && v.dim() == 1 && v.size(0) == n,
                          "cpu decoder: layer ", l, " norm ", i, " must be contiguous float32 [", n, "], got ",
                          v.scalar_type(), " ", v.sizes());
        return v.data_ptr<float>();
      };
      auto linear = [&](int i, int64_t N, int64_t K, const char* name) {
        const std::string what = "cpu decoder: layer " + std::to_string(l) + " " + name;
        specedit_cpu::Packed w = to_packed(std::get<0>(lin[i]), K, std::get<1>(lin[i]), what);
        TORCH_CHECK_VALUE(w.N == N, what, ": ", w.N, " output columns, expected ", N);
        return w;
      };
      specedit_cpu::Layer L{};
      L.attn_norm = norm(0, dim, false);
      L.q_norm = norm(1, D, true);
      L.k_norm = norm(2, D, true);
      L.mlp_norm = norm(3, dim, false);
      L.qkv = linear(0, nqkv, dim, "qkv");
      L.o = linear(1, dim, H * D, "o");
      L.gate_up = linear(2, 2 * I, dim, "gate_up");
      L.down = linear(3, dim, I, "down");
      layers_.push_back(L);
    }
  }

  // x [M, dim] float32: sequence b's counts[b] rows one after another (empty counts: M / B rows each),
  // cache [L, 2, B, Hkv, S, D] float32 contiguous, starts: B ints (positions held before this call). Writes
  // sequence b's new K/V rows at starts[b] + t and returns the hidden states after the last layer, [M, dim].
  // isa an IsaCode.
  at::Tensor forward(const at::Tensor& x_, const at::Tensor& cache, const std::vector<int64_t>& starts,
                     std::vector<int64_t> counts, int64_t isa) {
    const auto& d = dims_;
    const int64_t B = (int64_t)starts.size();
    TORCH_CHECK_VALUE(x_.device().is_cpu() && x_.scalar_type() == at::kFloat && x_.dim() == 2 && x_.size(1) == d.dim,
                      "cpu decoder: x must be float32 [rows, ", d.dim, "] on the CPU, got ", x_.scalar_type(), " ",
                      x_.sizes());
    if (counts.empty()) {
      TORCH_CHECK_VALUE(B > 0 && x_.size(0) % B == 0, "cpu decoder: ", x_.size(0), " rows for ", B, " sequences");
      counts.assign(B, x_.size(0) / B);
    }
    TORCH_CHECK_VALUE((int64_t)counts.size() == B, "cpu decoder: ", counts.size(), " row counts for ", B, " sequences");
    int64_t M = 0;
    for (int64_t c : counts) {
      TORCH_CHECK_VALUE(c >= 0, "cpu decoder: row counts must be >= 0, got ", c);
      M += c;
    }
    TORCH_CHECK_VALUE(M == x_.size(0), "cpu decoder: row counts add up to ", M, " but x has ", x_.size(0), " rows");
    TORCH_CHECK_VALUE(cache.device().is_cpu() && cache.scalar_type() == at::kFloat && cache.is_contiguous() &&
                          cache.dim() == 6 && cache.size(0) == d.n_layers && cache.size(1) == 2 &&
                          cache.size(2) == B && cache.size(3) == d.Hkv && cache.size(5) == d.D,
                      "cpu decoder: cache must be contiguous float32 [", d.n_layers, ", 2, ", B, ", ", d.Hkv,
                      ", S, ", d.D, "], got ", cache.scalar_type(), " ", cache.sizes());
    const int64_t S = cache.size(4);
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK_VALUE(starts[b] >= 0 && starts[b] + counts[b] <= S && starts[b] + counts[b] <= max_pos_,
                        "cpu decoder: start ", starts[b], " + ", counts[b], " rows exceeds the cache (", S,
                        ") or the rope table (", max_pos_, ")");
    isa = runnable_isa(isa, "cpu decoder");
    const int64_t nqkv = (d.H + 2 * d.Hkv) * d.D;
    at::Tensor x = x_.clone(at::MemoryFormat::Contiguous);
    at::Tensor work = at::empty({M * (2 * d.dim + nqkv + d.H * d.D + 3 * d.I)}, x.options());
    float* w = work.data_ptr<float>();
    specedit_cpu::DecoderScratch s{};
    s.h = w, w += M * d.dim;
    s.qkv = w, w += M * nqkv;
    s.o = w, w += M * d.H * d.D;
    s.gu = w, w += M * 2 * d.I;
    s.a = w, w += M * d.I;
    s.y = w;
    specedit_cpu::decoder_forward(d, layers_.data(), x.data_ptr<float>(), B, counts.data(), starts.data(),
                                  cache.data_ptr<float>(), S, s, isa);
    return x;
  }

 private:
  std::vector<at::Tensor> keep_;
  std::vector<specedit_cpu::Layer> layers_;
  specedit_cpu::DecoderDims dims_;
  int64_t max_pos_ = 0;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "y[M, N] = x[M, K] @ W^T (+ bias) with packed W (see specedit.kernels.cpu.linear)");
  m.def("repack", &repack, "GGUF blocks -> the kernel's layout (see specedit.kernels.cpu.linear.pack_gguf)");
  m.def("dequant_cols", &dequant_cols, "float32 columns of a repacked GGUF weight (embedding rows)");
  m.def("packed_nbytes", [](int64_t N, int64_t K, int64_t dtype) { return packed_nbytes(N, K, dtype, "packed_nbytes"); },
        "bytes of a packed weight [N, K] in a dtype code");
  pybind11::dict dtypes, isas;
  dtypes["float32"] = (int)specedit_cpu::W_F32;
  dtypes["float16"] = (int)specedit_cpu::W_F16;
  dtypes["bfloat16"] = (int)specedit_cpu::W_BF16;
  for (auto [name, code] : {std::pair<const char*, int>{"q8_0", specedit_cpu::W_Q8_0}, {"q4_0", specedit_cpu::W_Q4_0},
                            {"q4_1", specedit_cpu::W_Q4_1}, {"q5_0", specedit_cpu::W_Q5_0}, {"q5_1", specedit_cpu::W_Q5_1},
                            {"q4_k", specedit_cpu::W_Q4_K}, {"q5_k", specedit_cpu::W_Q5_K}, {"q6_k", specedit_cpu::W_Q6_K}})
  {
    dtypes[name] = code;  // compute="exact"
    dtypes[(std::string("int8:") + name).c_str()] = code + specedit_cpu::I8_SHIFT;  // compute="int8"
  }
  isas["auto"] = (int)ISA_AUTO;
  isas["avx2"] = (int)ISA_AVX2;
  isas["avx512"] = (int)ISA_AVX512;
  m.attr("DTYPE_CODES") = dtypes;
  m.attr("ISA_CODES") = isas;
  m.def("best_isa", &best_isa, "instruction set chosen by isa=0 on this CPU");
  m.def("attention", &attention,
        "row-invariant attention of q [B, T, H, D] over k/v [B, Hkv, S, D] (see specedit.kernels.cpu.attention)");
  pybind11::class_<Decoder>(m, "Decoder")
      .def(pybind11::init<const std::vector<LayerSpec>&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                          int64_t, int64_t, int64_t, double, double, int64_t>())
      .def("forward", &Decoder::forward, "hidden states [B*T, dim] through every layer (see specedit.kernels.cpu.decoder)");
}
