"""The CUDA-on-CPU test runtime (tests/cuda_cpu) itself, and proof that it catches broken kernels.

1. A self-test program checks the runtime's execution model: a block scan is exact with its barriers
   and wrong without one, every warp collective returns what CUDA documents, atomics are exact under
   contention from several host threads, divergent collectives / deadlocks / bad masks are reported,
   launch limits match a device (grid.y/z <= 65535, <= 1024 threads, <= 48 KiB dynamic shared
   memory), dynamic shared memory starts poisoned.
2. The same harness built with AddressSanitizer and UBSan (out-of-bounds accesses, UB).
3. Mutation tests: the project's own csrc/cuda/*.cu kernels, run through a torch-free harness
   against host references, pass; copies with one deliberate defect (a wrong tie-break, a missing
   __syncthreads in the Poisson-binomial block DP or in the labeler's prefix scan) fail.
Needs only g++ (no torch extension build), so it runs wherever the test suite runs.
"""
from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import ROOT

CXX = shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(CXX is None, reason="needs a C++ compiler")

RUNTIME = ROOT / "tests" / "cuda_cpu"
FLAGS = ["-std=c++17", "-O1", "-g0", "-ffp-contract=off", "-DLESIONCOUNT_CUDA_ON_CPU=1", "-w"]


def _compile(args, cwd):
    out = subprocess.run([CXX, *FLAGS, *args], cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]


def _has_sanitizers() -> bool:
    if CXX is None:
        return False
    probe = subprocess.run([CXX, "-fsanitize=address,undefined", "-x", "c++", "-", "-o", "/dev/null"],
                           input="int main() { return 0; }", capture_output=True, text=True)
    return probe.returncode == 0


SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]


def _runtime_object(tmp_path_factory, extra):
    d = tmp_path_factory.mktemp("cuda_cpu_runtime")
    obj = d / "runtime.o"
    _compile([*extra, "-I", str(RUNTIME / "include"), "-I", str(RUNTIME), "-c", str(RUNTIME / "runtime.cpp"), "-o",
              str(obj)], d)
    return obj


@pytest.fixture(scope="module")
def runtime_object(tmp_path_factory):
    return _runtime_object(tmp_path_factory, [])


@pytest.fixture(scope="module")
def sanitized_runtime_object(tmp_path_factory):
    if not _has_sanitizers():
        pytest.skip("the compiler has no AddressSanitizer / UBSan runtime")
    return _runtime_object(tmp_path_factory, SANITIZE)


def _run(exe):
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    return out.returncode, (out.stdout + out.stderr).strip()


def _build_harness(tmp, runtime_object, kind, csrc, extra=()):
    """Harness for `kind` linked with runtime + csrc/cuda/<kind>.cu taken from the tree `csrc`."""
    inc = [*extra, "-I", str(csrc), "-I", str(RUNTIME / "include"), "-I", str(RUNTIME)]
    objs = [str(runtime_object)]
    if kind != "selftest":
        kobj = tmp / f"kernels_{kind}.o"
        _compile([*inc, "-c", str(RUNTIME / f"kernels_{kind}.cpp"), "-o", str(kobj)], tmp)
        objs.append(str(kobj))
    exe = tmp / f"harness_{kind}"
    _compile([*inc, f"-DLC_HARNESS_{kind.upper()}", str(RUNTIME / "harness.cpp"), *objs, "-o", str(exe), "-lpthread"], tmp)
    return exe


def test_runtime_selftest(tmp_path, runtime_object):
    code, text = _run(_build_harness(tmp_path, runtime_object, "selftest", ROOT / "csrc"))
    assert code == 0 and text.endswith("ok"), text


@pytest.mark.parametrize("kind", ["region_max", "poisson_binomial", "label"])
def test_project_kernels_pass_the_harness(tmp_path, runtime_object, kind):
    code, text = _run(_build_harness(tmp_path, runtime_object, kind, ROOT / "csrc"))
    assert code == 0 and text.endswith("ok"), text


@pytest.mark.parametrize("kind", ["selftest", "region_max", "poisson_binomial", "label"])
def test_project_kernels_under_address_and_ub_sanitizers(tmp_path, sanitized_runtime_object, kind):
    """The kernels (and the runtime) built with -fsanitize=address,undefined: no out-of-bounds
    access, use of a dead object or undefined arithmetic on the harness inputs (what the runtime
    itself cannot trap; compute-sanitizer does the same on a GPU in benchmarks/gpu_check.sh)."""
    exe = _build_harness(tmp_path, sanitized_runtime_object, kind, ROOT / "csrc", SANITIZE)
    code, text = _run(exe)
    # (ASan warns once that fibers switch stacks; only its error reports count)
    assert code == 0 and "ok" in text.splitlines(), text
    assert "ERROR: AddressSanitizer" not in text and "runtime error" not in text, text


# (kernel, what breaks, [(exact text in the kernel source, its broken replacement), ...])
MUTATIONS = [
    (
        "region_max",
        "tie-break to the largest flat index (packed key)",
        [
            ("(key << 32) | (0xFFFFFFFFull - static_cast<unsigned long long>(i))",
             "(key << 32) | static_cast<unsigned long long>(i)"),
            ("static_cast<long long>(0xFFFFFFFFull - (key & 0xFFFFFFFFull))", "static_cast<long long>(key & 0xFFFFFFFFull)"),
        ],
    ),
    (
        "region_max",
        "segmented warp max that crosses region boundaries",
        [("if (lane + d <= end && other > key) key = other;", "if (other > key) key = other;")],
    ),
    (
        "region_max",
        "_region_topk: ties between regions to the larger label",
        [("return {(key & 0xFFFFFFFF00000000ull) | (0xFFFFFFFFull - static_cast<unsigned long long>(slot)), 0ull};",
          "return {(key & 0xFFFFFFFF00000000ull) | static_cast<unsigned long long>(slot), 0ull};"),
         ("if (two_pass) return {key, ~static_cast<unsigned long long>(slot)};",
          "if (two_pass) return {key, static_cast<unsigned long long>(slot)};")],
    ),
    (
        "region_max",
        "_region_topk: missing __syncthreads after the block-wide histogram",
        [("          if (compare_prefix(sk, prefix, digits) == 0) atomicAdd(&hist[digit_of(sk, d)], 1ull);\n        }\n"
          "        __syncthreads();\n",
          "          if (compare_prefix(sk, prefix, digits) == 0) atomicAdd(&hist[digit_of(sk, d)], 1ull);\n        }\n")],
    ),
    (
        "region_max",
        "_region_max_backward: a shared voxel keeps one gradient instead of the sum",
        [("        acc = add_like_cpu(acc, grad[u]);", "        acc = grad[u];")],
    ),
    (
        "poisson_binomial",
        "missing __syncthreads between DP steps of the block kernel",
        [(
            "dst[j] = bin_step<LOG>(src, j, M, a, b);\n      __syncthreads();\n      cur ^= 1;\n    }\n"
            "    for (long long j = threadIdx.x; j < W; j += blockDim.x) store(out",
            "dst[j] = bin_step<LOG>(src, j, M, a, b);\n      cur ^= 1;\n    }\n"
            "    for (long long j = threadIdx.x; j < W; j += blockDim.x) store(out",
        )],
    ),
    (
        "label",
        "missing __syncthreads after the warp-sum scan of the bitmap prefix sum",
        [(
            "    if (lane < NT / 32) warp_sums[lane] = s;  // inclusive sums of the warps\n  }\n  __syncthreads();\n",
            "    if (lane < NT / 32) warp_sums[lane] = s;  // inclusive sums of the warps\n  }\n",
        )],
    ),
]


# where a kind's kernels live when not in csrc/cuda/<kind>.cu (the Poisson-binomial kernels are shared
# by its four per-dtype translation units)
KERNEL_SOURCE = {"poisson_binomial": "poisson_binomial_kernels.cuh"}


@pytest.mark.parametrize("kind,defect,edits", MUTATIONS, ids=[m[1] for m in MUTATIONS])
def test_broken_kernel_fails(tmp_path, runtime_object, kind, defect, edits):
    tree = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", tree)
    source = tree / "cuda" / KERNEL_SOURCE.get(kind, f"{kind}.cu")
    text = source.read_text()
    for old, new in edits:
        # the kernel text this mutation targets must still exist (else update the mutation)
        assert text.count(old) == 1, f"mutation target not found exactly once in {source.name}: {old!r}"
        text = text.replace(old, new)
    source.write_text(text)
    code, out = _run(_build_harness(tmp_path, runtime_object, kind, tree))
    assert code != 0 and "FAILED" in out, f"the {defect!r} defect went unnoticed: {out}"
