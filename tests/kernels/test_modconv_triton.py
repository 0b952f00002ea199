"""The Triton kernel against the reference.

CPU: every case of modconv_cases.py runs under the Triton interpreter in ONE subprocess started
with TRITON_INTERPRET=1. A subprocess because triton fixes the interpreter mode when it is first
imported (it decorates its own tl.* helpers then): setting the variable inside this pytest process
would be too late if anything imported triton earlier, and would leak into every later module
(a GPU run of `pytest -m gpu` would then interpret the GPU kernels). GPU: the same cases, on CUDA,
in-process (marked gpu).

Tolerances (defined once, here):
  FP32_REL_TOL = 1e-4, on max|y - ref| / max|ref|. Both sides accumulate in fp32 (the kernel with
    tf32x3 products on a GPU, numpy fp32 in the interpreter) over Cin*k*k <= 180 unit-scale terms
    in different orders: the expected gap is ~1e-6 relative; 1e-4 leaves room for summation order
    and still catches any wrong tap, mask or epilogue term (those are O(1e-1) relative).
  FP16_ABS_TOL = 2e-2, on max|y - ref| with ref computed in fp32 from the same fp16-rounded
    x / weight / noise / bias. The kernel also rounds the modulated weight to fp16 before the
    tensor-core product (relative 2^-11 per term, a random walk over <= 180 terms) and the output
    to fp16 (half an ulp is 0.004 for |y| in [4, 8)): unit-scale outputs stay within ~1e-2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).parent))
from modconv_cases import CASES, FP16_ABS_TOL, FP32_REL_TOL, run_case  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _assert_within(name: str, r: dict) -> None:
    assert "error" not in r, f"{name}: {r['error']}"
    assert r["shape_ok"], f"{name}: output shape differs from the reference"
    if r["dtype"] == "float32":
        rel = r["err"] / r["ref_max"]
        assert rel <= FP32_REL_TOL, f"{name}: fp32 rel err {rel:.3g} > {FP32_REL_TOL}"
    else:
        assert r["dtype"] == "float16", r
        assert r["err"] <= FP16_ABS_TOL, f"{name}: fp16 abs err {r['err']:.3g} > {FP16_ABS_TOL}"


@pytest.fixture(scope="module")
def interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "modconv_cases.py")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("name", list(CASES))
def test_interpreter_matches_reference(interpreted, name):
    _assert_within(name, interpreted[name])


def test_interpreter_uses_one_config(interpreted):
    assert interpreted["_interpreter_configs"] == 1


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
def test_gpu_matches_reference(name):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set in this process")
    _assert_within(name, run_case(CASES[name], "cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("dilation,channels,side", [(8, 512, 64), (2, 512, 128), (1, 128, 256),
                                                     (1, 64, 512)])
def test_gpu_generator_shapes(dtype, dilation, channels, side):
    # Real layer sizes, through the autotuner: B = 2, Cin = Cout = channels, H = W = side.
    case = dict(shape=(2, channels, channels, side, side), k=3, dilation=dilation, dtype=dtype,
                seed=dilation, demodulate=True, noise=True, bias=True, activate=True)
    r = run_case(case, "cuda")
    # fp16 at Cin*9 = 4608 terms: the fp16 rounding of the modulated weight is a random walk over
    # more terms than the CPU cases, so compare relative to the output scale here.
    if dtype == "fp16":
        assert r["err"] <= FP16_ABS_TOL * max(1.0, r["ref_max"] / 4), r
    else:
        _assert_within(f"gpu-{dilation}-{channels}-{side}-{dtype}", r)


def test_launcher_checks_without_interpreter():
    from kernels.modconv_triton import modulated_conv2d_triton

    g = torch.Generator().manual_seed(0)
    x, wt, st = torch.randn(1, 4, 6, 6, generator=g), torch.randn(5, 4, 3, 3, generator=g), torch.randn(1, 4)
    with pytest.raises(TypeError, match="weight dtype"):
        modulated_conv2d_triton(x, wt.half(), st)
    with pytest.raises(TypeError, match="float16 or float32"):
        modulated_conv2d_triton(x.double(), wt.double(), st)
    with pytest.raises(ValueError, match="noise must be"):
        modulated_conv2d_triton(x, wt, st, noise=torch.zeros(1, 1, 5, 6))
    with pytest.raises(ValueError, match="empty output"):
        modulated_conv2d_triton(x, wt, st, dilation=8, padding=0)
    with pytest.raises(ValueError, match="disagree"):
        modulated_conv2d_triton(x, wt[:, :3], st)
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        with pytest.raises(RuntimeError, match="CPU tensors run only under TRITON_INTERPRET=1"):
            modulated_conv2d_triton(x, wt, st)
