// CUDA-on-CPU test runtime: the __half type and the conversions the kernels use (IEEE binary16,
// round-to-nearest-even, as CUDA's __float2half_rn and torch's CPU conversion).
#pragma once

#include <cstdint>
#include <cstring>

struct __half {
  uint16_t __x;
  __half() = default;
  inline __half(float f);
  inline operator float() const;
};

inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.__x & 0x8000u) << 16;
  uint32_t exp = (h.__x >> 10) & 0x1fu;
  uint32_t man = h.__x & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);  // inf / NaN (payload kept)
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while ((man & 0x400u) == 0);
    bits = sign | (uint32_t(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline __half __float2half_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  __half h;
  if (ax > 0x7f800000u) {  // NaN: quiet, keep the top payload bits
    h.__x = static_cast<uint16_t>(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
    return h;
  }
  if (ax >= 0x477ff000u) {  // rounds to >= 65520: infinity
    h.__x = static_cast<uint16_t>(sign | 0x7c00u);
    return h;
  }
  if (ax < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    if (ax < 0x33000000u) {  // < 2^-25 rounds to zero (2^-25 itself is a tie to even = 0)
      h.__x = sign;
      return h;
    }
    const uint32_t e = ax >> 23;
    const uint32_t man = (ax & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // value = man * 2^(e - 150); half subnormal unit = 2^-24
    uint32_t q = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
    h.__x = static_cast<uint16_t>(sign | q);
    return h;
  }
  uint32_t r = ax - 0x38000000u;  // rebias exponent (127 -> 15)
  const uint32_t rem = r & 0x1fffu;
  uint32_t q = r >> 13;
  if (rem > 0x1000u || (rem == 0x1000u && (q & 1u))) ++q;
  h.__x = static_cast<uint16_t>(sign | q);
  return h;
}

inline __half::__half(float f) : __x(__float2half_rn(f).__x) {}
inline __half::operator float() const { return __half2float(*this); }
