// Connectivity tables shared by the CPU and CUDA labelers.
//
// A voxel's neighbours that precede it in raster (C) order lie either earlier in its own row
// (handled by runs: consecutive foreground voxels of a row are one run) or in up to four earlier
// rows. For each such row we record its offset (dz, dy) and how far the neighbourhood reaches along
// x: reach 0 means only the same column x, reach 1 means columns x-1, x, x+1. Two runs [a0, a1) and
// [b0, b1) in neighbouring rows touch when b0 <= a1 - 1 + reach and a0 <= b1 - 1 + reach.
// 2D images are treated as volumes with depth 1.
#pragma once

#if defined(__CUDACC__)
#define LC_HOST_DEVICE __host__ __device__
#else
#define LC_HOST_DEVICE
#endif

namespace lesioncount {

struct PrecedingRow {
  int dz;     // 0 or -1
  int dy;     // -1, 0 or +1
  int reach;  // 0 or 1 (columns x-reach .. x+reach are neighbours)
};

// True for the neighbour counts this library supports for the given spatial rank (2 or 3).
LC_HOST_DEVICE inline bool is_valid_connectivity(int spatial_rank, long long connectivity) {
  if (spatial_rank == 2) return connectivity == 4 || connectivity == 8;
  if (spatial_rank == 3) return connectivity == 6 || connectivity == 18 || connectivity == 26;
  return false;
}

// Fills `rows` with the earlier rows that hold neighbours of a voxel and returns how many there
// are (at most 4). Returns 0 for an unsupported connectivity.
LC_HOST_DEVICE inline int preceding_rows(int connectivity, PrecedingRow rows[4]) {
  switch (connectivity) {
    case 4:  // 2D: up
      rows[0] = {0, -1, 0};
      return 1;
    case 8:  // 2D: up-left, up, up-right
      rows[0] = {0, -1, 1};
      return 1;
    case 6:  // faces: (0,-1,0) and (-1,0,0)
      rows[0] = {0, -1, 0};
      rows[1] = {-1, 0, 0};
      return 2;
    case 18:  // faces + edges: |dz|+|dy|+|dx| <= 2
      rows[0] = {0, -1, 1};
      rows[1] = {-1, -1, 0};
      rows[2] = {-1, 0, 1};
      rows[3] = {-1, 1, 0};
      return 4;
    case 26:  // the whole 3x3x3 cube
      rows[0] = {0, -1, 1};
      rows[1] = {-1, -1, 1};
      rows[2] = {-1, 0, 1};
      rows[3] = {-1, 1, 1};
      return 4;
    default:
      return 0;
  }
}

// Whether voxel offset (dz, dy, dx) is a neighbour under `connectivity` (3D: 6/18/26, 2D: 4/8 with
// dz == 0). Used by tests and by voxel-level kernels.
LC_HOST_DEVICE inline bool is_neighbour_offset(int connectivity, int dz, int dy, int dx) {
  const int adz = dz < 0 ? -dz : dz, ady = dy < 0 ? -dy : dy, adx = dx < 0 ? -dx : dx;
  if (adz > 1 || ady > 1 || adx > 1) return false;
  const int l1 = adz + ady + adx;
  if (l1 == 0) return false;
  switch (connectivity) {
    case 4: return dz == 0 && l1 == 1;
    case 8: return dz == 0;
    case 6: return l1 == 1;
    case 18: return l1 <= 2;
    case 26: return true;
    default: return false;
  }
}

}  // namespace lesioncount
