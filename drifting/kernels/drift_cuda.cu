// The three passes of the fused drifting loss on tensor cores: CUDA C++, compiled at run time with NVRTC
// (drifting/kernels/drift_cuda.py). Same outputs and precision as the Triton kernel (drift_triton.py), for bf16
// inputs with C_g <= 64, C_p <= 64, C_n <= 16 and S <= 256, S a multiple of 8: the 32x32 key of the paper's ablation.
// Some roundings differ: the norms are scaled before the distances, the weights enter the exponent as logs, and the
// column sums reuse the row sums' exponentials where that is exact to fp32 (softmax_sums).
//
// Why a second implementation: the Triton kernel keeps a problem's 64 x 144 tiles (distances, affinities,
// coefficients) in registers with no control over where the inputs live, so every force loop re-reads them from
// L2 and the program takes all 255 registers (two programs per SM, spills). Here one block of 4 warps handles one
// problem; its inputs are copied once into shared memory (cp.async, 72 KB at S = 256) and every product of the pass
// reads them from there (wgmma on Hopper, ldmatrix and mma.sync elsewhere); warp w owns generated rows
// 16w..16w+15 against all T = 64 + BN + 64 targets.
// (Tried: 8 warps per problem, two per row block splitting the targets, for twice the warps per SM: exact, but
// slower, 10.2 against 8.9 ms in pass 2 on an H100: the pairs' exchanges cost more than the occupancy gained. And
// two problems per block, one per warpgroup, with or without "ping-pong" barriers that hand the tensor cores from
// one warpgroup's force to the other's: passes 2 and 3 12-23% slower on an H200, as a block's slot is free only when
// both of its problems are done; the barriers took back 3-9% of pass 2. One block per SM instead of two: pass 2
// 1.56x slower, so the second block's overlap is worth a third of the time.)
//
// Layout of a warp's [16, T] tile in registers: the accumulator of mma.m16n8k16, tile j holds columns 8j..8j+7;
// element e of tile j of lane (g = lane / 4, t = lane % 4) is row g + 8 (e / 2), column 8j + 2t + (e % 2). Row
// reductions therefore stay in a quad of lanes (shuffles over lane bits 0-1). For column reductions each lane group
// (g of a warp: two rows) stores its partial values to shared memory, and one thread per column combines the 32 of
// them in a fixed order (results repeat bit for bit; no shuffles).
//
// Shared memory holds the targets Y = [generated | negatives | positives] as chunks of 64 columns of S, each row
// 128 bytes whose 16-byte segments are XOR-swizzled by the row (segment s of row r at s ^ (r % 8)): ldmatrix then
// reads 8 rows without bank conflicts. The generated rows are rows 0..63 of Y: the same tiles serve as the A
// operand of the distance product and as targets.
//
// Pass 2 runs the tensor cores and the exponential units at once: the next temperature's softmax sums are computed
// between the products of this temperature's force (a compiler can interleave independent instructions within a
// block of straight-line code; one block of 4 warps per problem and two per SM leave too few warps to hide the
// latencies otherwise). Per-temperature constants and pass 3's normalisers are read into shared memory once.
//
// Statistics: the logits' row and column maxima are taken once from the minima of the normalised distances
// (max_j(-n_ij k) = -(min_j n_ij) k exactly, since rounding is monotone), so a temperature needs only the softmax
// sums. Exponentials are in base 2 (ex2.approx, as Triton's exp): l2 = -n log2(e) / tau; the normalisers are kept
// in log2 form, u_i = -(m_i + log2 Z_i) / 2 per row and v_j likewise per column ("xy"), and A_ij = 2^(l2 + u_i + v_j).
// One exponential per entry serves both sums of a temperature unless a column's largest logit lies far below the
// problem's (kOneExpGap): pass 2's 5.4 -> 5.1 ms on an H200.

typedef unsigned int u32;
typedef unsigned short u16;

namespace drift {

constexpr int kThreads = 128;  // 4 warps, 16 generated rows each
constexpr int kBG = 64;        // generated rows (and generated targets), padded
constexpr int kBP = 64;        // positive targets, padded
constexpr int kChunk = 64;     // columns of S per shared-memory chunk: rows of 128 bytes
constexpr float kLog2e = 1.4426950408889634f;
// pass 3 stages a warp's [16, 64] chunk of the gradient in shared memory in rows of 72 bf16: 144 bytes, so that the
// 8 rows of a lane group's 4-byte stores fall in different banks, and rows stay 16-byte aligned for the reads
constexpr int kStageRow = 72;
// A temperature's column sums take one exponential per entry (softmax_sums' ONE_EXP) where every valid column's
// largest logit lies at most 2^kOneExpGap below the problem's: the terms then lost to underflow (2^-126) are below
// 2^-30 of their column's largest, far under fp32's resolution of the sums
constexpr float kOneExpGap = 96.0f;
#define kInf __int_as_float(0x7f800000)

template <int BN>
struct Layout {
  static constexpr int T = kBG + BN + kBP;      // targets: generated, negatives (unconditional), positives
  static constexpr int NT = T / 8;              // n8 tiles of the [16, T] tile
  static constexpr int NEG0 = kBG / 8;          // first tile of the negatives
  static constexpr int POS0 = (kBG + BN) / 8;   // first tile of the positives
  static constexpr int NORM_WIDTH = kBG + T;    // u (rows), then v (targets), per problem and temperature
  static constexpr int TQ = T - kBG;             // the other targets (negatives, positives): their squared norms
  static constexpr int PART = T + 4;            // row stride of the column partials (conflict-free float2 stores)
};

__device__ __forceinline__ u32 smem_u32(const void* p) {
  return static_cast<u32>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool valid) {
  // 16 bytes, or 16 zero bytes where the row or column is padding (src-size 0 reads nothing)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

__device__ __forceinline__ void cp_async_wait(int pending) {  // wait_group takes an immediate
  switch (pending) {
    case 0: asm volatile("cp.async.wait_group 0;\n" ::: "memory"); break;
    case 1: asm volatile("cp.async.wait_group 1;\n" ::: "memory"); break;
    case 2: asm volatile("cp.async.wait_group 2;\n" ::: "memory"); break;
    default: asm volatile("cp.async.wait_group 3;\n" ::: "memory"); break;
  }
}

__device__ __forceinline__ void ldsm_x4(u32 addr, u32 (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_trans(u32 addr, u32 (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// c += a b: a 16 x 16 (4 registers of bf16 pairs), b 16 x 8 (2 registers), c 16 x 8 in fp32
__device__ __forceinline__ void mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Hopper (sm_90a): warpgroup products (wgmma). The block's 4 warps issue one asynchronous instruction for the
// whole 64-row tile, go on with other work (exponentials), and wait for it; B (and the distance product's A) are
// read from shared memory through a descriptor: start address, 1024 bytes between 8-row groups, 128-byte swizzle,
// which is exactly the layout of the targets' chunks (segment s of row r at s ^ (r % 8), chunks 1024-byte aligned).
// A k-step of 16 columns of S starts 32 bytes further (K-major); one of 16 targets 2048 bytes further (MN-major,
// the force's B). The accumulator and register-A layouts equal mma.m16n8k16's, warp w holding rows 16w..16w+15.
// Elsewhere (sm_80, sm_86, ...) the kernel runs on mma.sync.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DRIFT_WGMMA 1

__device__ __forceinline__ unsigned long long smem_desc(u32 addr) {
  constexpr unsigned long long kRowGroups = 1024 >> 4, kSwizzle128 = 1ull << 62;
  return (unsigned long long)((addr & 0x3FFFF) >> 4) | (1ull << 16) | (kRowGroups << 32) | kSwizzle128;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// shared memory written by ordinary stores and cp.async, made visible to wgmma (the async proxy)
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// d (+)= A B^T for A [64, 16] and B [N, 16] K-major in shared memory (accumulate: 0 overwrites d); one overload
// per width, as inline PTX must name every accumulator register: N = 144 (with negatives) and 128 for the distances,
// 64 and 16 for the squared norms
__device__ __forceinline__ void wgmma_ss(float (&d)[18][4], unsigned long long a, unsigned long long b,
                                         int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %74, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n144k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, "
      "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "
      "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, "
      "%54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71"
      "}, %72, %73, p, 1, 1, 0, 0;\n}\n"
      :
      "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]),
      "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
      "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]),
      "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
      "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]),
      "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),
      "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]),
      "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
      "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]),
      "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),
      "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3]), "+f"(d[16][0]), "+f"(d[16][1]),
      "+f"(d[16][2]), "+f"(d[16][3]), "+f"(d[17][0]), "+f"(d[17][1]), "+f"(d[17][2]), "+f"(d[17][3])
      : "l"(a), "l"(b), "r"(accumulate));
}

__device__ __forceinline__ void wgmma_ss(float (&d)[16][4], unsigned long long a, unsigned long long b,
                                         int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, "
      "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "
      "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, "
      "%54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      :
      "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]),
      "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
      "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]),
      "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
      "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]),
      "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),
      "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]),
      "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
      "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]),
      "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),
      "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
      : "l"(a), "l"(b), "r"(accumulate));
}

__device__ __forceinline__ void wgmma_ss(float (&d)[8][4], unsigned long long a, unsigned long long b,
                                         int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, "
      "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      :
      "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]),
      "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
      "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]),
      "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
      "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]),
      "+f"(d[7][2]), "+f"(d[7][3])
      : "l"(a), "l"(b), "r"(accumulate));
}

__device__ __forceinline__ void wgmma_ss(float (&d)[2][4], unsigned long long a, unsigned long long b,
                                         int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7"
      "}, %8, %9, p, 1, 1, 0, 0;\n}\n"
      :
      "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]),
      "+f"(d[1][2]), "+f"(d[1][3])
      : "l"(a), "l"(b), "r"(accumulate));
}

// d (+)= a B for a [64, 16] in registers and B [16, 64] MN-major in shared memory
__device__ __forceinline__ void wgmma_rs(float (&d)[8][4], const u32 (&a)[4], unsigned long long b,
                                         int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, "
      "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
      :
      "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]),
      "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
      "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]),
      "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
      "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]),
      "+f"(d[7][2]), "+f"(d[7][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
}
#else
#define DRIFT_WGMMA 0
#endif

__device__ __forceinline__ float bf16_low(u32 v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16_high(u32 v) { return __uint_as_float(v & 0xffff0000u); }

__device__ __forceinline__ u32 pack_bf16(float low, float high) {  // round to nearest even, low half first
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(high), "f"(low));
  return r;
}

__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float sqrt_approx(float x) {  // as Triton's tl.sqrt
  float y;
  asm("sqrt.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float log2_approx(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// byte offset of 16-byte segment `seg` of row `row` in a chunk (XOR swizzle)
__device__ __forceinline__ u32 swizzled(int row, int seg) { return row * 128 + ((seg ^ (row & 7)) << 4); }

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

__device__ __forceinline__ float quad_min(float v) {
  v = fminf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fminf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float warp_min(float v) {
  for (int m = 16; m >= 1; m >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int m = 16; m >= 1; m >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int m = 16; m >= 1; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

// sum over the block, the same order every launch; `red` holds 4 floats; the result is valid in thread 0
__device__ __forceinline__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  __syncthreads();  // `red` may still be read from an earlier call
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  return ((red[0] + red[1]) + red[2]) + red[3];
}

// column j's 32 partial values in `part` (row 8 w + g: lane group g of warp w, its two rows), combined in a fixed
// order: a sum, or a minimum
template <bool MIN, int STRIDE>
__device__ __forceinline__ float combine_partials(const float* part, int j) {
  float s[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const float a = part[(4 * k) * STRIDE + j], b = part[(4 * k + 1) * STRIDE + j];
    const float c = part[(4 * k + 2) * STRIDE + j], d = part[(4 * k + 3) * STRIDE + j];
    s[k] = MIN ? fminf(fminf(a, b), fminf(c, d)) : (a + b) + (c + d);
  }
  if constexpr (MIN)
    return fminf(fminf(fminf(s[0], s[1]), fminf(s[2], s[3])), fminf(fminf(s[4], s[5]), fminf(s[6], s[7])));
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

template <int BN>
__device__ __forceinline__ bool column_valid(int j, int col, int CG, int CN, int CP) {  // j: the n8 tile of col
  if (j < Layout<BN>::NEG0) return col < CG;
  if (j < Layout<BN>::POS0) return col - kBG < CN;
  return col - kBG - BN < CP;
}

template <int BN>
__device__ __forceinline__ bool target_valid(int col, int CG, int CN, int CP) {  // col: a runtime column index
  if (col < kBG) return col < CG;
  if (col < kBG + BN) return col - kBG < CN;
  return col - kBG - BN < CP;
}

// The softmax sums of tile j of the normalised distances n at k2 = log2(e) / tau: rz (two partial sums per row, of
// this lane's two rows) += 2^(l2 - m_i); with COLUMNS, this lane's share of the column sums (its two rows) into its
// row of the partials. l2 - m = -n k2 - m: one fused multiply-add each. The first terms are assigned, not added to 0
// (an add of 0 is an instruction). Padding adds 0 (padded rows have m_i = 0 here, so that their terms are 0, not NaN).
// The column sums take the column's own stabiliser m_j (2^(l2 - m_j): a second exponential), or with ONE_EXP the
// problem's M = max_i m_i, as the row terms times fr_i = 2^(m_i - M): one exponential per entry for both sums. M is
// exact only where no column's maximum lies far below it (the caller's `one_exp`).
template <bool COLUMNS, bool ONE_EXP>
__device__ __forceinline__ void softmax_sums(const float (&n)[4], int j, float k2, const float (&rm)[2],
                                             const float (&fr)[2], float (&rz)[2][2], const float* cmin,
                                             float* part_row, int t) {
  float cmx[2] = {0.0f, 0.0f}, cz[2];
  if constexpr (COLUMNS && !ONE_EXP) {
    const float2 c = *reinterpret_cast<const float2*>(cmin + 8 * j + 2 * t);
    cmx[0] = -c.x * k2;
    cmx[1] = -c.y * k2;
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float x = exp2_approx(fmaf(n[e], -k2, -rm[e >> 1]));
    rz[e >> 1][j & 1] = (j < 2 && (e & 1) == 0) ? x : rz[e >> 1][j & 1] + x;
    if constexpr (COLUMNS && ONE_EXP) {
      cz[e & 1] = e < 2 ? x * fr[e >> 1] : fmaf(x, fr[e >> 1], cz[e & 1]);
    } else if constexpr (COLUMNS) {
      const float y = exp2_approx(fmaf(n[e], -k2, -cmx[e & 1]));
      cz[e & 1] = e < 2 ? y : cz[e & 1] + y;
    }
  }
  if constexpr (COLUMNS) *reinterpret_cast<float2*>(part_row + 8 * j + 2 * t) = make_float2(cz[0], cz[1]);
}

// F = coef @ Y - rowsum(coef) x over every chunk of S, from shared memory, as one product: x_i is target row i, so the
// rowsum is subtracted from the diagonal coefficient of the generated block (the term then carries the coefficients'
// ~16 bits instead of an exact fp32 product: the bf16 gradient's error at 1,024 problems is 3.1e-3 of its largest value
// against 1.5e-3 on the Triton kernel, within the tests' bf16 tolerance). The fp32 coefficients are split into bf16
// high and low parts (two products, ~16 mantissa bits), as in the Triton kernel. Returns this lane's sum of F^2 (pass
// 2), or of (F / s_in)^2 with the gradient -2 F / (s_in^2 C_g S) times grad_factor written once (pass 3). `coef` is
// consumed.
// between(step, steps) is the caller's independent work, run in `steps` parts: with wgmma one per chunk of S while its
// products run; with mma.sync one per 16 targets of a chunk, for the compiler to interleave with the tensor-core
// instructions.
template <int NT, int NCH, bool PASS3, bool WRITE_GRAD, class Between>
__device__ __forceinline__ float force(float (&coef)[NT][4], u32 ys, int lane, int warp, int S, int CG, float s_in,
                                       float grad_factor, u16* __restrict__ grad, long long b, u16* stage,
                                       Between&& between) {
  constexpr int T = NT * 8, NK = NT / 2;
  const int g = lane >> 2, t = lane & 3;
  float rsum[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};  // two partial sums per row: shorter dependency chains
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) rsum[e >> 1][j & 1] += coef[j][e];
  // row 16 warp + 8h + g (this lane's) is column 16 warp + 8h + g: tile 2 warp + h, element 2h + (g & 1) of lane
  // t = g / 2. The tile is chosen by a branch on the warp (uniform), the element by a select: a runtime index would
  // put coef in local memory
  float diag[2][2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float r = quad_sum(rsum[h][0] + rsum[h][1]);
    diag[h][0] = 2 * t == g ? r : 0.0f;
    diag[h][1] = 2 * t + 1 == g ? r : 0.0f;
  }
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w)
    if (warp == w) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        coef[2 * w + h][2 * h] -= diag[h][0];
        coef[2 * w + h][2 * h + 1] -= diag[h][1];
      }
    }
  // A fragments of the [16, T] coefficients: the accumulator layout of tiles 2kk, 2kk + 1 is the A layout of block kk
  u32 ahi[NK][4], alo[NK][4];
#pragma unroll
  for (int kk = 0; kk < NK; ++kk)
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float c0 = coef[2 * kk + (q >> 1)][2 * (q & 1)], c1 = coef[2 * kk + (q >> 1)][2 * (q & 1) + 1];
      const u32 hi = pack_bf16(c0, c1);
      ahi[kk][q] = hi;
      alo[kk][q] = pack_bf16(c0 - bf16_low(hi), c1 - bf16_high(hi));
    }
  // pass 3: the gradient -2 F / (s_in^2 C_g S) in one product, and sum F^2 scaled by 1 / s_in^2 once at the end
  const float inv_s_in = 1.0f / s_in, grad_scale = -2.0f * inv_s_in * inv_s_in / (CG * S) * grad_factor;
  float total[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  // chunk c of F done: its squares into total (one fused multiply-add each), and the gradient written once (pass 3)
  // through the warp's `stage` in shared memory, so that global memory takes whole 16-byte segments of rows: 4 stores
  // of 16 bytes per lane and chunk, not 16 of 4 bytes that fill 32-byte sectors by halves (pass 3: 3.3 -> 2.9 ms on
  // an H200). (Tried: the stage written by stmatrix, 4 instructions instead of 16: within the card's noise.)
  auto finish = [&](const float (&f)[8][4], int c) {
#pragma unroll
    for (int p = 0; p < 8; ++p)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float f0 = f[p][2 * h], f1 = f[p][2 * h + 1];
        total[2 * (p & 1) + h] = fmaf(f1, f1, fmaf(f0, f0, total[2 * (p & 1) + h]));
        if constexpr (WRITE_GRAD)
          *reinterpret_cast<u32*>(stage + (8 * h + g) * kStageRow + 8 * p + 2 * t) =
              pack_bf16(grad_scale * f0, grad_scale * f1);
      }
    if constexpr (WRITE_GRAD) {
      __syncwarp();
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // lane (r, seg): 8 columns from 8 seg of row r + 4 i of the warp's 16
        const int r = (lane >> 3) + 4 * i, seg = lane & 7;
        const int row = 16 * warp + r, col = c * kChunk + 8 * seg;
        const uint4 v = *reinterpret_cast<const uint4*>(stage + r * kStageRow + 8 * seg);
        if (row < CG && col < S) *reinterpret_cast<uint4*>(grad + (b * CG + row) * S + col) = v;
      }
      __syncwarp();  // before the next chunk rewrites the stage
    }
  };
#if DRIFT_WGMMA
  // (Tried: two chunks in flight in pass 2, chunk c + 1's products running while chunk c is finished: within the
  // run-to-run noise on H100s, 6.1-6.4 against 6.3-6.4 ms. Again on an H200 for the forces with nothing beside them
  // only, pass 2's last temperature and pass 3, where the distances' registers are free: calls of 9.84-10.27 against
  // 9.78-10.12 ms.)
#pragma unroll
  for (int c = 0; c < NCH; ++c) {
    const u32 base = ys + c * T * 128;
    float f[8][4];
    wgmma_fence();  // f was read by the previous chunk's epilogue
#pragma unroll
    for (int kk = 0; kk < NK; ++kk) wgmma_rs(f, ahi[kk], smem_desc(base + kk * 2048), kk > 0);
#pragma unroll
    for (int kk = 0; kk < NK; ++kk) wgmma_rs(f, alo[kk], smem_desc(base + kk * 2048), 1);
    wgmma_commit();
    between(c, NCH);  // while the tensor cores work
    wgmma_wait_all();
    finish(f, c);
  }
#else
#pragma unroll
  for (int c = 0; c < NCH; ++c) {
    const u32 base = ys + c * T * 128;
    float f[8][4];
#pragma unroll
    for (int p = 0; p < 8; ++p) f[p][0] = f[p][1] = f[p][2] = f[p][3] = 0.0f;
    const int mat = lane >> 3;
#pragma unroll
    for (int kk = 0; kk < NK; ++kk) {
      u32 bf[4][4];
#pragma unroll
      for (int pp = 0; pp < 4; ++pp)
        ldsm_x4_trans(base + swizzled(16 * kk + (lane & 7) + 8 * (mat & 1), 2 * pp + (mat >> 1)), bf[pp]);
#pragma unroll
      for (int pp = 0; pp < 4; ++pp) {  // the high parts first: no product waits for the one before it
        mma(f[2 * pp], ahi[kk], bf[pp][0], bf[pp][1]);
        mma(f[2 * pp + 1], ahi[kk], bf[pp][2], bf[pp][3]);
      }
#pragma unroll
      for (int pp = 0; pp < 4; ++pp) {
        mma(f[2 * pp], alo[kk], bf[pp][0], bf[pp][1]);
        mma(f[2 * pp + 1], alo[kk], bf[pp][2], bf[pp][3]);
      }
      between(c * NK + kk, NCH * NK);
    }
    finish(f, c);
  }
#endif
  const float sum = (total[0] + total[1]) + (total[2] + total[3]);
  return PASS3 ? sum * (inv_s_in * inv_s_in) : sum;
}

// element (r, r) of a warpgroup's 64 x 64 accumulator, r = 16 warp + 8 h + g, held by lane (g, g / 2): element g % 2 of
// tile 2 warp + h. Every element is multiplied by 1 or 0 and summed: a runtime index, or a choice of element (which
// the compiler turns into one load from a computed address), would put the tiles in local memory.
template <int NJ>
__device__ __forceinline__ float diagonal(const float (&d)[NJ][4], int warp, int h, int g) {
  float v = 0.0f;
#pragma unroll
  for (int j = 0; j < (NJ < 8 ? NJ : 8); ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) v = fmaf((j == 2 * warp + h && e == (g & 1)) ? 1.0f : 0.0f, d[j][2 * h + e], v);
  return v;
}

// PASS 1: per problem [sum_ij w_j d_ij, C_g sum_j w_j] (the scale's sums; 3 blocks per SM: it needs only the
// targets and a few floats of shared memory). PASS 2: per problem and temperature sum_is F_R^2 (F_R before the
// division by s_in, as the Triton kernel). PASS 3: loss_b and its gradient times grad_factor (1, or the factor of a
// reduced loss: 1 / B for a mean). NORM: 0 "xy", 1 "y", 2 "none". BN: 16 with negatives (C_n <= 16), 0 without.
// NCH: chunks of 64 columns of S (S <= 64 NCH). STORE_NORM (pass 2) writes the normalisers in log2 form, u_i and
// v_j + log2 w_j (the weight rides on v); LOAD_NORM (pass 3) reads them.
// The same buffer hands the squared norms of the targets other than the generated rows from pass 1 (STORE_NORM) to
// passes 2 (STORE_NORM) and 3 (LOAD_NORM), which then skip their products (the generated rows' norms come free, the
// diagonal of the distance product): a call's passes share one buffer, and pass 1 runs first. Per problem the buffer
// holds R W floats of normalisers, then TQ squared norms, unscaled (drift_cuda.norm_floats).
//
// Order of work in pass 2, per temperature: the normalisers from the softmax sums (two barriers for the column
// sums, "xy" only), the affinities and coefficients, then the force, during which the next temperature's softmax
// sums are computed (exponentials between the tensor-core products, so the two units work at the same time).
template <int PASS, int NORM, int BN, int NCH, bool STORE_NORM, bool LOAD_NORM, bool WRITE_GRAD>
__global__ void __launch_bounds__(kThreads, PASS == 1 ? 3 : 2) drift_kernel(
    const u16* __restrict__ gen, const u16* __restrict__ neg, const u16* __restrict__ pos,
    int sgb, int sgr, int snb, int snr, int spb, int spr,
    const float* __restrict__ wg, const float* __restrict__ wn, const float* __restrict__ wp,
    int has_wg, int has_wn, int has_wp,
    const float* __restrict__ temps, const float* __restrict__ inv_lambda, float* __restrict__ out,
    u16* __restrict__ grad, const float* __restrict__ params, float* __restrict__ norm,
    int CG, int CN, int CP, int S, int R, int params_stride, int lambda_stride,
    double sqrt_floor_d, double self_mask_d, double attraction_d, double repulsion_d, double grad_factor_d) {
  static_assert(PASS >= 1 && PASS <= 3, "passes 1-3");
  static_assert(Layout<BN>::T * 8 % kThreads == 0, "every lane takes part in the squared norms' shuffles");
  static_assert(Layout<BN>::TQ <= kThreads, "one thread per squared norm handed from pass 1");
  static_assert(!(STORE_NORM && LOAD_NORM) && !(LOAD_NORM && PASS != 3) && !(STORE_NORM && PASS == 3),
                "pass 2 stores the normalisers, pass 3 loads them");
  using L = Layout<BN>;
  constexpr int T = L::T, NT = L::NT, W = L::NORM_WIDTH, PART = L::PART, TQ = L::TQ;
  constexpr bool SQN_OUT = PASS == 1 && STORE_NORM;  // pass 1 writes the other targets' squared norms
  constexpr bool SQN_IN = PASS != 1 && (STORE_NORM || LOAD_NORM);  // passes 2 and 3 read them
  constexpr bool SUMS = NORM != 2 && !LOAD_NORM;  // this pass computes the softmax sums
  constexpr bool COLUMNS = SUMS && NORM == 0;     // ... and the column ones
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const long long b = blockIdx.x;
  const int row0 = 16 * warp + g;  // this lane's rows: row0 (elements 0, 1) and row0 + 8 (elements 2, 3)
  const bool row_ok[2] = {row0 < CG, row0 + 8 < CG};
  const float sqrt_floor = (float)sqrt_floor_d;

  // shared memory (drift_cuda.shared_bytes): the targets' chunks, then floats: the problem's normalisers (LOAD_NORM,
  // R W), weights (sqrt(floor) w in passes 2 and 3), squared norms, column minima, v of the temperature, log2 of the
  // weights (T each; pass 1 uses the first three), the 32 lane groups' column partials (32 PART), log2(e) / tau and
  // 1 / lambda (R each), pass 2's per-warp sums (4 R), 4 for block_sum
  extern __shared__ __align__(1024) unsigned char smem[];  // 1024: wgmma's swizzle atoms
  float* nrm = reinterpret_cast<float*>(smem + NCH * T * 128);
  float* wts = nrm + (LOAD_NORM ? R * W : 0);
  float* sqn = wts + T;
  float* cmin = sqn + T;
  float* vsm = cmin + T;
  float* lw = vsm + T;
  float* part = lw + T;
  float* k2s = part + 32 * PART;
  float* inv_ls = k2s + R;
  float* fsq = inv_ls + R;
  float* red = fsq + 4 * R;
  float* part_row = part + (8 * warp + g) * PART;  // PART = T + 4: this lane group's float2 stores hit 2-way at most
  const u32 ys = smem_u32(smem);

  // ---- the problem's few scalars first, into registers, so that their reads wait alongside the copies below, not
  // after them (waits on them were ~3% of pass 3's stall samples; the time gained is within the card's noise): the
  // weights of targets tid and tid + 128, the scale and s_in, and the temperature and lambda of index tid < R -------
  constexpr int WJ = (T + kThreads - 1) / kThreads;
  float w_in[WJ];
#pragma unroll
  for (int k = 0; k < WJ; ++k) {
    const int j = tid + k * kThreads;
    float w = 0.0f;
    if (j < kBG) {
      if (j < CG) w = has_wg ? wg[b * CG + j] : 1.0f;
    } else if (j < kBG + BN) {
      if (j - kBG < CN) w = has_wn ? wn[b * CN + j - kBG] : 1.0f;
    } else if (j < T && j - kBG - BN < CP) {
      w = has_wp ? wp[b * CP + j - kBG - BN] : 1.0f;
    }
    w_in[k] = w;
  }
  const float scale_in = PASS != 1 ? params[b * params_stride] : 1.0f;
  const float s_in = PASS != 1 ? params[b * params_stride + 1] : 1.0f;
  const float temp_in = PASS != 1 && tid < R ? temps[tid] : 1.0f;
  const float inv_l_in = PASS == 3 && tid < R ? inv_lambda[b * lambda_stride + tid] : 1.0f;
  const long long nf = (long long)R * W + TQ;  // the problem's floats in `norm`: normalisers, then squared norms
  const float sq_in = SQN_IN && tid < TQ ? norm[b * nf + R * W + tid] : 0.0f;  // target kBG + tid's, from pass 1

  // ---- the inputs into shared memory: the normalisers (LOAD_NORM), then one commit group per chunk of the targets,
  // so chunk 0's products start early ----------------------------------------------------------------------------
  if constexpr (LOAD_NORM) {
    const float* src = norm + b * nf;
    for (int idx = tid; idx < R * W / 4; idx += kThreads) cp_async16(smem_u32(nrm + 4 * idx), src + 4 * idx, true);
    cp_async_commit();
  }
  // Thread tid copies 16-byte segment tid % 8 of rows tid / 8 + 16 k: which input row k reads is known when the loop
  // is unrolled (rows 0..63 generated, then 16 negatives, then the positives), so a copy costs a few instructions, not
  // a branch and a 64-bit product (which took ~50 instructions a copy, a fifth of pass 2).
  // (Tried, to wait less for the inputs at the start of a problem, both slower on an H200: each block prefetching into
  // L2 the inputs of the problem that starts after it, b + the blocks resident on the GPU, one bulk prefetch per row:
  // pass 1 1.23 -> 1.51 ms, pass 3 3.35 -> 3.81 ms; and blocks looping over problems, as many as the GPU holds, each
  // copying the next problem's chunks into shared memory as its last products released them: pass 2 5.22 -> 5.52 ms,
  // pass 3 2.92 -> 3.39 ms, with equal results.)
  static_assert(kBG % 16 == 0 && BN % 16 == 0 && kBP % 16 == 0 && kThreads == 128, "16 rows per step of 128 threads");
  {
    const int seg = tid & 7, r0 = tid >> 3;
    const u16* gen_row = gen + b * sgb + (long long)r0 * sgr + seg * 8;
    const u16* neg_row = neg + b * snb + (long long)r0 * snr + seg * 8;
    const u16* pos_row = pos + b * spb + (long long)r0 * spr + seg * 8;
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
      const bool col_ok = c * kChunk + seg * 8 < S;
#pragma unroll
      for (int k = 0; k < T / 16; ++k) {
        const u16* src;
        bool ok;
        if (16 * k < kBG) {
          ok = r0 + 16 * k < CG;
          src = gen_row + (long long)(16 * k) * sgr;
        } else if (16 * k < kBG + BN) {
          ok = r0 + 16 * k - kBG < CN;
          src = neg_row + (long long)(16 * k - kBG) * snr;
        } else {
          ok = r0 + 16 * k - kBG - BN < CP;
          src = pos_row + (long long)(16 * k - kBG - BN) * spr;
        }
        ok = ok && col_ok;
        cp_async16(ys + c * T * 128 + swizzled(r0 + 16 * k, seg), ok ? src + c * kChunk : gen, ok);
      }
      cp_async_commit();
    }
  }
#pragma unroll
  for (int k = 0; k < WJ; ++k) {
    const int j = tid + k * kThreads;
    if (j >= T) break;
    const float w = w_in[k];
    // passes 2 and 3: +inf on the padding, so that its normalised distances are +inf with no test per entry (their
    // logits are then -inf, every exponential of them exactly 0)
    if (!SQN_IN || j < kBG) sqn[j] = (PASS == 1 || target_valid<BN>(j, CG, CN, CP)) ? 0.0f : kInf;
    if constexpr (PASS == 1) {
      wts[j] = w;
    } else {
      // A_ij = max(2^(l2 + u_i + v_j), sqrt(floor)) w_j = max(2^(l2 + u_i + v_j + log2 w_j), sqrt(floor) w_j): the
      // weight rides on v (the same value for w = 1; w = 0 gives 2^-inf = 0). Weights are non-negative (drift_loss).
      wts[j] = sqrt_floor * w;
      lw[j] = log2f(w);  // exact 0 at w = 1
      if constexpr (!LOAD_NORM && NORM != 0) vsm[j] = lw[j];  // no column normalisers
    }
  }
  for (int r = tid; r < (PASS == 1 ? 0 : R); r += kThreads) {  // read once, not in the temperature loop
    k2s[r] = kLog2e / (r == tid ? temp_in : temps[r]);  // l2 = -n k2 = logit / ln 2
    if constexpr (PASS == 3) inv_ls[r] = r == tid ? inv_l_in : inv_lambda[b * lambda_stride + r];
  }

  // ---- x_i . y_j on tensor cores, chunk by chunk as the copies land -----------------------------------------------
  // |y_j|^2 is added to sqn's 0 or +inf (set with the weights: testing the padding here, among the products, makes
  // ptxas serialise them), in passes 2 and 3 divided by scale^2 so that a normalised distance needs no product
  float inv_scale = 1.0f;
  if constexpr (PASS != 1) inv_scale = 1.0f / fmaxf(scale_in, 1e-3f);
  const float sq_scale = inv_scale * inv_scale;
  if constexpr (SQN_IN) {  // the other targets' squared norms from pass 1 (+inf on the padding, as above)
    if (tid < TQ) sqn[kBG + tid] = target_valid<BN>(kBG + tid, CG, CN, CP) ? sq_in * sq_scale : kInf;
  }
  auto store_sqn = [&](int j, float value) { sqn[j] += value * sq_scale; };
  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
#if DRIFT_WGMMA
  // the other targets' squared norms from the tensor cores, as the distances' products (~900 instructions a warp on
  // the CUDA cores otherwise): the diagonal of Y_b Y_b^T for rows 64..127 (n64), and with negatives (T = 144) that
  // of rows 128..143 as the last 16 rows of rows 80..143 times rows 128..143 (n16: a quarter of an n64 product).
  // Passes 2 and 3 read them from pass 1 where they can (SQN_IN): a third of the tensor-core work of this phase,
  // 0.4-0.6 ms of a 32x32-key call on an H200
  static_assert(T == kBG + 64 || T == kBG + 80, "the other targets: 64 or 80 rows");
  constexpr bool TAIL = T == kBG + 80;
  float gram[8][4], tail[2][4];
#pragma unroll
  for (int j = 0; j < 8; ++j) gram[j][0] = gram[j][1] = gram[j][2] = gram[j][3] = 0.0f;
  tail[0][0] = tail[0][1] = tail[0][2] = tail[0][3] = tail[1][0] = tail[1][1] = tail[1][2] = tail[1][3] = 0.0f;
  wgmma_fence();
#pragma unroll
  for (int c = 0; c < NCH; ++c) {
    cp_async_wait(NCH - 1 - c);
    fence_proxy_async();
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < kChunk / 16; ++ks) {
      const u32 chunk = ys + c * T * 128 + ks * 32;  // 1024-byte aligned row blocks: multiples of 8 rows
      const unsigned long long d = smem_desc(chunk);  // A: rows 0..63 of the same chunk
      wgmma_ss(acc, d, d, 1);
      if constexpr (!SQN_IN) {
        const unsigned long long e = smem_desc(chunk + kBG * 128);
        wgmma_ss(gram, e, e, 1);
        if constexpr (TAIL) wgmma_ss(tail, smem_desc(chunk + (T - 64) * 128), smem_desc(chunk + 128 * 128), 1);
      }
    }
    wgmma_commit();
  }
  wgmma_wait_all();
  // the squared norms from the diagonals: row r of a 64-row block is element g % 2 of tile 2 w + h of lane
  // (g, t = g / 2) of warp w, r = 16 w + 8 h + g (the generated rows: the distance product's own); the tail's rows
  // 128 + 8 h + g are rows 48 + 8 h + g of its A block (warp 3) against its columns 8 h + g (tile h)
  if ((g >> 1) == t) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = 16 * warp + 8 * h + g;
      store_sqn(r, diagonal(acc, warp, h, g));
      if constexpr (!SQN_IN) {
        store_sqn(kBG + r, diagonal(gram, warp, h, g));
        if (TAIL && warp == 3) store_sqn(128 + 8 * h + g, diagonal(tail, 0, h, g));
      }
    }
  }
#else
#pragma unroll
  for (int c = 0; c < NCH; ++c) {
    cp_async_wait(NCH - 1 - c);
    __syncthreads();
    const u32 base = ys + c * T * 128;
    const int mat = lane >> 3;
#pragma unroll
    for (int ks = 0; ks < kChunk / 16; ++ks) {
      u32 a[4];
      const int arow = 16 * warp + (lane & 7) + 8 * (mat & 1);
      ldsm_x4(base + swizzled(arow, 2 * ks + (mat >> 1)), a);
#pragma unroll
      for (int jp = 0; jp < NT / 2; ++jp) {
        u32 bf[4];
        const int brow = 16 * jp + 8 * (mat >> 1) + (lane & 7);
        ldsm_x4(base + swizzled(brow, 2 * ks + (mat & 1)), bf);
        mma(acc[2 * jp], a, bf[0], bf[1]);
        mma(acc[2 * jp + 1], a, bf[2], bf[3]);
      }
    }
  }
#endif
#if !DRIFT_WGMMA
  // squared norms of every target row (the generated rows' are their own; with SQN_IN only those): 8 lanes per
  // row, one 16-byte segment of each chunk per lane, then a sum over the 8 lanes
  for (int idx = tid; idx < (SQN_IN ? kBG : T) * 8; idx += kThreads) {
    const int row = idx >> 3, seg = idx & 7;
    float sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
      const uint4 v = *reinterpret_cast<const uint4*>(smem + c * T * 128 + swizzled(row, seg));
      const u32 w4[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float lo = bf16_low(w4[q]), hi = bf16_high(w4[q]);
        sum[q & 1] += lo * lo + hi * hi;
      }
    }
    float total = sum[0] + sum[1];
    total += __shfl_xor_sync(0xffffffffu, total, 1);
    total += __shfl_xor_sync(0xffffffffu, total, 2);
    total += __shfl_xor_sync(0xffffffffu, total, 4);
    if (seg == 0) store_sqn(row, total);
  }
#endif
  __syncthreads();

  if constexpr (SQN_OUT) {  // for passes 2 and 3 of this call (sqn is unscaled in pass 1)
    if (tid < TQ) norm[b * nf + R * W + tid] = sqn[kBG + tid];
  }
  if constexpr (PASS == 1) {  // [sum_ij w_j d_ij, C_g sum_j w_j] over the valid rows and targets, as the Triton kernel
    float part_sum[2] = {0.0f, 0.0f};
    const float sq_row[2] = {sqn[row0], sqn[row0 + 8]};
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const float2 sq_col = *reinterpret_cast<const float2*>(sqn + 8 * j + 2 * t);
      const float2 wj = *reinterpret_cast<const float2*>(wts + 8 * j + 2 * t);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = 8 * j + 2 * t + (e & 1);
        const float d2 = (sq_row[e >> 1] + ((e & 1) ? sq_col.y : sq_col.x)) - 2.0f * acc[j][e];
        const float d = sqrt_approx(fmaxf(d2, 1e-8f)) * ((e & 1) ? wj.y : wj.x);
        part_sum[j & 1] += (row_ok[e >> 1] && column_valid<BN>(j, col, CG, CN, CP)) ? d : 0.0f;
      }
    }
    const float total = block_sum(part_sum[0] + part_sum[1], cmin);  // cmin: unused in pass 1, the 4th of its T floats
    if (tid == 0) {
      float weights = 0.0f;
      for (int j = 0; j < T; ++j) weights += wts[j];
      out[2 * b] = total;
      out[2 * b + 1] = weights * CG;
    }
    return;
  }

  const float self_mask = (float)self_mask_d;
  const float grad_factor = (float)grad_factor_d;  // the gradient's factor for a reduced loss (1 / B for a mean)
  const float attraction = (float)attraction_d, repulsion = (float)repulsion_d;

  // normalised distances n_ij = sqrt(max(|x_i|^2 + |y_j|^2 - 2 x_i.y_j, 1e-8)) / scale with the self-mask, in
  // place, as sqrt(max(|x_i|^2 / scale^2 + |y_j|^2 / scale^2 - 2 x_i.y_j / scale^2, 1e-8 / scale^2)) from the scaled
  // norms; their row minima (this lane's two rows) and column minima
  float rmin[2][2] = {{kInf, kInf}, {kInf, kInf}};
  const float self_diag[2] = {2 * t == g ? self_mask : 0.0f, 2 * t + 1 == g ? self_mask : 0.0f};
  {
    const float sq_row[2] = {sqn[row0], sqn[row0 + 8]};
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const float2 sq_col = *reinterpret_cast<const float2*>(sqn + 8 * j + 2 * t);
      float cm[2] = {kInf, kInf};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float d2 = fmaf(acc[j][e], -2.0f * sq_scale, sq_row[e >> 1] + ((e & 1) ? sq_col.y : sq_col.x));
        float n = sqrt_approx(fmaxf(d2, 1e-8f * sq_scale));  // +inf on padding (sqn)
        // the self-mask on the diagonal: tile 2 warp + h (a uniform test) and lane t = g / 2
        if (j < L::NEG0 && (j >> 1) == warp && (j & 1) == (e >> 1)) n += self_diag[e & 1];
        acc[j][e] = n;
        rmin[e >> 1][j & 1] = fminf(rmin[e >> 1][j & 1], n);
        cm[e & 1] = fminf(cm[e & 1], n);
      }
      if constexpr (COLUMNS) *reinterpret_cast<float2*>(part_row + 8 * j + 2 * t) = make_float2(cm[0], cm[1]);
    }
  }
  const float row_min[2] = {quad_min(fminf(rmin[0][0], rmin[0][1])), quad_min(fminf(rmin[1][0], rmin[1][1]))};
  // the problem's smallest normalised distance, and the spread up to the largest column minimum of a valid target
  // (padded ones are +inf): at k2 the largest logit of every column lies within spread k2 of the problem's -min_n k2
  float min_n = 0.0f, spread = kInf;
  if constexpr (COLUMNS) {
    __syncthreads();
    for (int j = tid; j < T; j += kThreads) cmin[j] = combine_partials<true, PART>(part, j);
    __syncthreads();  // cmin; and the partials are free for the column sums
    float lo = kInf, hi = -kInf;
    for (int j = lane; j < T; j += 32) {
      const float c = cmin[j];
      lo = fminf(lo, c);
      if (c < kInf) hi = fmaxf(hi, c);
    }
    min_n = warp_min(lo);
    spread = warp_max(hi) - min_n;
  }
  // temperature k2's column sums with one exponential per entry (kOneExpGap); every warp decides alike
  auto one_exp = [&](float k2) { return COLUMNS && spread * k2 <= kOneExpGap; };
  // row stabilisers m_i = max_j l2_ij = -(min_j n_ij) k2 (0 on padded rows), and fr_i = 2^(m_i - M) for ONE_EXP
  auto row_max = [&](float k2, float (&rm)[2]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) rm[h] = row_ok[h] ? -row_min[h] * k2 : 0.0f;
  };
  auto row_factors = [&](float k2, const float (&rm)[2], float (&fr)[2]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) fr[h] = row_ok[h] ? exp2_approx(fmaf(min_n, k2, rm[h])) : 0.0f;
  };
  // the softmax sums at k2 into rz (and the column partials): of every tile (steps = 0), or of part `step` of
  // `steps`, the tiles j with j steps / NT == step
  float rz[2][2];
  auto sums = [&](float k2, int step, int steps) {
    auto pick = [&](int j) { return steps == 0 || j * steps / NT == step; };
    float rm[2], fr[2] = {0.0f, 0.0f};
    row_max(k2, rm);
    if (one_exp(k2)) {
      row_factors(k2, rm, fr);
#pragma unroll
      for (int j = 0; j < NT; ++j)
        if (pick(j)) softmax_sums<COLUMNS, true>(acc[j], j, k2, rm, fr, rz, cmin, part_row, t);
    } else {
#pragma unroll
      for (int j = 0; j < NT; ++j)
        if (pick(j)) softmax_sums<COLUMNS, false>(acc[j], j, k2, rm, fr, rz, cmin, part_row, t);
    }
  };
  auto all_sums = [&](float k2) { sums(k2, 0, 0); };
  if constexpr (SUMS) all_sums(k2s[0]);

  float coef_total[PASS == 3 ? NT : 1][4];  // pass 3: sum over temperatures of the coefficients / lambda_R
#pragma unroll
  for (int j = 0; j < (PASS == 3 ? NT : 1); ++j)
    coef_total[j][0] = coef_total[j][1] = coef_total[j][2] = coef_total[j][3] = 0.0f;

#pragma unroll 1
  for (int r = 0; r < R; ++r) {
    const float k2 = k2s[r];
    // the normalisers in log2 form: u_i per row (registers), v_j per target (shared memory)
    float u[2];
    const float* v = vsm;
    if constexpr (LOAD_NORM) {
      u[0] = nrm[r * W + row0];
      u[1] = nrm[r * W + row0 + 8];
      v = nrm + r * W + kBG;
    } else if constexpr (NORM == 2) {
      u[0] = u[1] = 0.0f;
    } else {
      if constexpr (PASS == 3) {
        if (r > 0) all_sums(k2);  // pass 2 has them from the last force
      }
      float rm[2];
      row_max(k2, rm);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float z = quad_sum(rz[h][0] + rz[h][1]);
        const float lz = (NORM == 0 ? 0.5f : 1.0f) * (rm[h] + log2_approx(z));
        u[h] = row_ok[h] ? -lz : 0.0f;
      }
      float* nb = norm + b * nf + r * W;
      if constexpr (STORE_NORM) {
        if (t == 0) {
          nb[row0] = u[0];
          nb[row0 + 8] = u[1];
        }
      }
      if constexpr (COLUMNS) {
        __syncthreads();  // the column partials
        const bool one = one_exp(k2);
        for (int j = tid; j < T; j += kThreads) {
          const float z = combine_partials<false, PART>(part, j);  // the sum of 2^(l2 - M), or of 2^(l2 - m_j)
          const float m = one ? -min_n * k2 : -cmin[j] * k2;
          const float vj = target_valid<BN>(j, CG, CN, CP) ? -0.5f * (m + log2_approx(z)) : 0.0f;
          vsm[j] = vj + lw[j];  // the weight's log (above)
          if constexpr (STORE_NORM) nb[kBG + j] = vsm[j];  // so does pass 3's
        }
        __syncthreads();  // v (the partials are rewritten only after it, by the next temperature's sums)
      } else if constexpr (STORE_NORM) {
        for (int j = tid; j < T; j += kThreads) nb[kBG + j] = lw[j];
      }
    }

    // affinities A_ij = max(2^(l2 + u_i + v_j), sqrt(floor)) w_j, computed as max(2^(l2 + u_i + v'_j), sqrt(floor) w_j)
    // with v'_j = v_j + log2 w_j (v and wts hold both), and their row sums over negatives and positives. Padded
    // columns weigh 0; padded rows (u = 0, finite A) get no row sums, hence no coefficients.
    float work[NT][4];
    float s_neg[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}}, s_pos[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const float2 vj = *reinterpret_cast<const float2*>(v + 8 * j + 2 * t);
      const float2 wj = *reinterpret_cast<const float2*>(wts + 8 * j + 2 * t);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float a = fmaxf(exp2_approx(fmaf(acc[j][e], -k2, u[e >> 1]) + ((e & 1) ? vj.y : vj.x)),
                              (e & 1) ? wj.y : wj.x);
        work[j][e] = a;
        if (j < L::POS0) s_neg[e >> 1][j & 1] += a; else s_pos[e >> 1][j & 1] += a;
      }
    }
    float sn[2], sp[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float n_sum = quad_sum(s_neg[h][0] + s_neg[h][1]), p_sum = quad_sum(s_pos[h][0] + s_pos[h][1]);
      sn[h] = row_ok[h] ? n_sum : 0.0f;
      sp[h] = row_ok[h] ? p_sum : 0.0f;
    }
    // W- = A- rowsum(A+), W+ = A+ rowsum(A-); pass 3 folds 1 / lambda_R into one set of coefficients
    const float inv_l = PASS == 3 ? inv_ls[r] : 1.0f;
    const float k_neg = PASS == 3 ? -repulsion * inv_l : -repulsion;
    const float k_pos = PASS == 3 ? attraction * inv_l : attraction;
    const float ks_neg[2] = {k_neg * sp[0], k_neg * sp[1]}, ks_pos[2] = {k_pos * sn[0], k_pos * sn[1]};
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float k = j < L::POS0 ? ks_neg[e >> 1] : ks_pos[e >> 1];
        if constexpr (PASS == 3) coef_total[j][e] = fmaf(work[j][e], k, coef_total[j][e]);
        else work[j][e] *= k;
      }
    if constexpr (PASS == 2) {  // sum over (i, s) of F_R^2, and the next temperature's softmax sums meanwhile
      float f_sq;
      if (SUMS && r + 1 < R) {
        const float k2n = k2s[r + 1];
        f_sq = force<NT, NCH, false, false>(work, ys, lane, warp, S, CG, s_in, 1.0f, grad, b, nullptr,
                                            [&](int step, int steps) { sums(k2n, step, steps); });
      } else {
        f_sq = force<NT, NCH, false, false>(work, ys, lane, warp, S, CG, s_in, 1.0f, grad, b, nullptr,
                                            [](int, int) {});
      }
      f_sq = warp_sum(f_sq);
      if (lane == 0) fsq[4 * r + warp] = f_sq;
    }
  }
  if constexpr (PASS == 2) {
    __syncthreads();
    for (int r = tid; r < R; r += kThreads)
      out[b * (R + 1) + r] = (((fsq[4 * r] + fsq[4 * r + 1]) + fsq[4 * r + 2]) + fsq[4 * r + 3]) / (s_in * s_in);
  }
  if constexpr (PASS == 3) {
    // the column partials are free by now (with LOAD_NORM never used): the warps' gradient stages
    static_assert(16 * kStageRow * 2 * (kThreads / 32) <= 32 * PART * 4, "the stages fit in the column partials");
    u16* stage = reinterpret_cast<u16*>(part) + warp * 16 * kStageRow;
    float loss = force<NT, NCH, true, WRITE_GRAD>(coef_total, ys, lane, warp, S, CG, s_in, grad_factor, grad, b,
                                                 stage, [](int, int) {});
    loss = block_sum(loss, red);
    if (tid == 0) out[b] = loss / (float)(CG * S);
  }
}

}  // namespace drift
