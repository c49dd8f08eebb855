// CUDA-on-CPU test runtime: the __nv_bfloat16 type and its conversions (round-to-nearest-even as
// CUDA's __float2bfloat16_rn; NaN becomes the canonical 0x7fff as on the device).
#pragma once

#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  uint16_t __x;
  __nv_bfloat16() = default;
  inline __nv_bfloat16(float f);
  inline operator float() const;
};

inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t bits = uint32_t(b.__x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  __nv_bfloat16 b;
  if ((x & 0x7fffffffu) > 0x7f800000u) {
    b.__x = 0x7fffu;
    return b;
  }
  x += 0x7fffu + ((x >> 16) & 1u);
  b.__x = static_cast<uint16_t>(x >> 16);
  return b;
}

inline __nv_bfloat16::__nv_bfloat16(float f) : __x(__float2bfloat16_rn(f).__x) {}
inline __nv_bfloat16::operator float() const { return __bfloat162float(*this); }
