// Depthwise 2-D convolution (channel multiplier 1), NHWC, float32, on XLA:CPU through the XLA FFI.
//
// Two handlers: the forward conv, and its input and kernel gradients in one call
// (qat_jax/kernels/depthwise.py wires them into one jax.custom_vjp). XLA:CPU has no fast depthwise
// conv: lax.conv with feature_group_count runs a generic grouped conv, and the shifted-tap sum
// that qat_jax.ops uses instead materialises one shifted view per tap for the kernel gradient.
// Here every pass works one row at a time: for each tap, one sweep along the row, the channels
// (the innermost, contiguous axis) vectorised by the compiler; each output pixel sums its taps in
// row-major tap order. The backward pass works image by image, so an image's x, dy and dx stay
// in the cache between its input-gradient and kernel-gradient sweeps.
//
// Work is split over the batch (or output rows) into one contiguous part per CPU of the process.
// The kernel gradient sums each output row in float, the rows of a part in double, and the parts
// in a fixed order, so a result depends only on the inputs and the number of CPUs.
#include <sched.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t n, h, w, c, kh, kw, ho, wo, sh, sw, ph, pw;
};

int HostThreads() {
  static const int threads = [] {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
    return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  }();
  return threads;
}

// f(begin, end, part) over [0, n) split into contiguous parts, one thread each.
template <typename F>
void ParallelFor(int64_t n, int parts, F f) {
  if (parts <= 1) {
    f(0, n, 0);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(parts - 1);
  for (int p = 1; p < parts; ++p) {
    pool.emplace_back([&, p] { f(n * p / parts, n * (p + 1) / parts, p); });
  }
  f(0, n / parts, 0);
  for (auto& t : pool) t.join();
}

int Parts(int64_t n) { return static_cast<int>(std::min<int64_t>(HostThreads(), n)); }

// The output columns ow whose tap j reads an input column inside [0, w): iw = ow*s + j - p.
inline void ValidColumns(const Geometry& g, int64_t j, int64_t* ow0, int64_t* ow1) {
  const int64_t lo = g.pw - j;  // ow*s >= lo
  const int64_t hi = g.w - 1 + g.pw - j;  // ow*s <= hi
  *ow0 = lo <= 0 ? 0 : (lo + g.sw - 1) / g.sw;
  *ow1 = hi < 0 ? 0 : std::min(g.wo, hi / g.sw + 1);
}

// One output row per task: for each tap, one sweep along the row (the row stays in the cache and
// each output pixel still sums its taps in row-major tap order).
template <int64_t kC>
void ForwardT(const float* x, const float* k, float* y, const Geometry& g) {
  const int64_t c = kC > 0 ? kC : g.c;
  ParallelFor(g.n * g.ho, Parts(g.n * g.ho), [&](int64_t r0, int64_t r1, int) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / g.ho, oh = r % g.ho;
      float* __restrict__ out = y + r * g.wo * c;
      std::memset(out, 0, sizeof(float) * g.wo * c);
      for (int64_t i = 0; i < g.kh; ++i) {
        const int64_t ih = oh * g.sh + i - g.ph;
        if (ih < 0 || ih >= g.h) continue;
        const float* __restrict__ xrow = x + (n * g.h + ih) * g.w * c;
        for (int64_t j = 0; j < g.kw; ++j) {
          const float* __restrict__ kk = k + (i * g.kw + j) * c;
          int64_t ow0, ow1;
          ValidColumns(g, j, &ow0, &ow1);
          for (int64_t ow = ow0; ow < ow1; ++ow) {
            const float* __restrict__ xi = xrow + (ow * g.sw + j - g.pw) * c;
            float* __restrict__ o = out + ow * c;
            for (int64_t ch = 0; ch < c; ++ch) o[ch] += xi[ch] * kk[ch];
          }
        }
      }
    }
  });
}

// The common channel counts of 32 to 96 get a compile-time inner trip count (whole vectors, no
// remainder loop: 10-20 % off those layers, measured); 16 channels ran slower that way (the
// forward 1.6x, the backward 2.3x, on AVX-512) and stay on the run-time loop with the rest.
void Forward(const float* x, const float* k, float* y, const Geometry& g) {
  switch (g.c) {
    case 32: return ForwardT<32>(x, k, y, g);
    case 48: return ForwardT<48>(x, k, y, g);
    case 64: return ForwardT<64>(x, k, y, g);
    case 96: return ForwardT<96>(x, k, y, g);
    default: return ForwardT<0>(x, k, y, g);
  }
}

// The input gradient and the kernel gradient, image by image (an image's x, dy and dx stay in
// the cache between the two sweeps): dx row by row, each row gathered from the dy rows that read
// it and written once; then the kernel gradient, output row by output row. Each part owns a
// contiguous range of images; its kernel-gradient sums are combined after the join.
template <int64_t kC>
void BackwardT(const float* x, const float* dy, const float* k, float* dx, float* dk,
               const Geometry& g) {
  const int64_t c = kC > 0 ? kC : g.c, taps = g.kh * g.kw;
  const int parts = Parts(g.n);
  std::vector<std::vector<double>> partial(parts, std::vector<double>(taps * c, 0.0));
  ParallelFor(g.n, parts, [&](int64_t n0, int64_t n1, int part) {
    std::vector<float> row(taps * c);
    double* __restrict__ acc = partial[part].data();
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t ih = 0; ih < g.h; ++ih) {
        float* __restrict__ dxrow = dx + (n * g.h + ih) * g.w * c;
        std::memset(dxrow, 0, sizeof(float) * g.w * c);
        for (int64_t i = 0; i < g.kh; ++i) {
          const int64_t t = ih + g.ph - i;  // = oh * sh
          if (t < 0 || t % g.sh != 0 || t / g.sh >= g.ho) continue;
          const float* __restrict__ grow = dy + (n * g.ho + t / g.sh) * g.wo * c;
          for (int64_t j = 0; j < g.kw; ++j) {
            const float* __restrict__ kk = k + (i * g.kw + j) * c;
            int64_t ow0, ow1;
            ValidColumns(g, j, &ow0, &ow1);
            for (int64_t ow = ow0; ow < ow1; ++ow) {
              const float* __restrict__ gi = grow + ow * c;
              float* __restrict__ o = dxrow + (ow * g.sw + j - g.pw) * c;
              for (int64_t ch = 0; ch < c; ++ch) o[ch] += gi[ch] * kk[ch];
            }
          }
        }
      }
      for (int64_t oh = 0; oh < g.ho; ++oh) {
        std::fill(row.begin(), row.end(), 0.0f);
        const float* __restrict__ grow = dy + (n * g.ho + oh) * g.wo * c;
        for (int64_t i = 0; i < g.kh; ++i) {
          const int64_t ih = oh * g.sh + i - g.ph;
          if (ih < 0 || ih >= g.h) continue;
          const float* __restrict__ xrow = x + (n * g.h + ih) * g.w * c;
          for (int64_t j = 0; j < g.kw; ++j) {
            float* __restrict__ rr = row.data() + (i * g.kw + j) * c;
            int64_t ow0, ow1;
            ValidColumns(g, j, &ow0, &ow1);
            for (int64_t ow = ow0; ow < ow1; ++ow) {
              const float* __restrict__ gi = grow + ow * c;
              const float* __restrict__ xi = xrow + (ow * g.sw + j - g.pw) * c;
              for (int64_t ch = 0; ch < c; ++ch) rr[ch] += xi[ch] * gi[ch];
            }
          }
        }
        for (int64_t t = 0; t < taps * c; ++t) acc[t] += row[t];
      }
    }
  });
  for (int64_t t = 0; t < taps * c; ++t) {
    double s = 0.0;
    for (int p = 0; p < parts; ++p) s += partial[p][t];
    dk[t] = static_cast<float>(s);
  }
}

void Backward(const float* x, const float* dy, const float* k, float* dx, float* dk,
              const Geometry& g) {
  switch (g.c) {
    case 32: return BackwardT<32>(x, dy, k, dx, dk, g);
    case 48: return BackwardT<48>(x, dy, k, dx, dk, g);
    case 64: return BackwardT<64>(x, dy, k, dx, dk, g);
    case 96: return BackwardT<96>(x, dy, k, dx, dk, g);
    default: return BackwardT<0>(x, dy, k, dx, dk, g);
  }
}

ffi::Error Check(const Geometry& g) {
  if (g.sh < 1 || g.sw < 1 || g.ph < 0 || g.pw < 0) {
    return ffi::Error::InvalidArgument("depthwise: strides must be >= 1 and padding >= 0");
  }
  if ((g.h + 2 * g.ph - g.kh) / g.sh + 1 != g.ho || (g.w + 2 * g.pw - g.kw) / g.sw + 1 != g.wo) {
    return ffi::Error::InvalidArgument("depthwise: output shape does not match the geometry");
  }
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                       ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t ph,
                       int64_t pw) {
  auto xd = x.dimensions(), kd = k.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || kd.size() != 3 || yd.size() != 4 || kd[2] != xd[3] || yd[3] != xd[3] ||
      yd[0] != xd[0]) {
    return ffi::Error::InvalidArgument("depthwise forward: x [N,H,W,C], k [kh,kw,C]");
  }
  Geometry g{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], yd[1], yd[2], sh, sw, ph, pw};
  if (auto e = Check(g); e.failure()) return e;
  Forward(x.typed_data(), k.typed_data(), y->typed_data(), g);
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                        ffi::Buffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> dx,
                        ffi::ResultBuffer<ffi::F32> dk, int64_t sh, int64_t sw, int64_t ph,
                        int64_t pw) {
  auto xd = x.dimensions(), gd = dy.dimensions(), kd = k.dimensions();
  auto dxd = dx->dimensions(), dkd = dk->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || kd.size() != 3 || kd[2] != xd[3] || gd[3] != xd[3] ||
      gd[0] != xd[0] || dxd.size() != 4 || dkd.size() != 3 ||
      !std::equal(xd.begin(), xd.end(), dxd.begin()) ||
      !std::equal(kd.begin(), kd.end(), dkd.begin())) {
    return ffi::Error::InvalidArgument(
        "depthwise backward: x [N,H,W,C], dy [N,Ho,Wo,C], k [kh,kw,C]; dx and dk shaped as x, k");
  }
  Geometry g{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], gd[1], gd[2], sh, sw, ph, pw};
  if (auto e = Check(g); e.failure()) return e;
  Backward(x.typed_data(), dy.typed_data(), k.typed_data(), dx->typed_data(), dk->typed_data(),
           g);
  return ffi::Error::Success();
}

}  // namespace

#define QAT_JAX_ATTRS                                                                       \
  .Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("ph").Attr<int64_t>("pw")

XLA_FFI_DEFINE_HANDLER_SYMBOL(QatJaxDepthwiseForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() QAT_JAX_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(QatJaxDepthwiseBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() QAT_JAX_ATTRS);
