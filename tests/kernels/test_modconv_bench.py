"""kernels.bench: refuses without a GPU (one line, exit 2, no file); on a GPU (marked gpu, slow)
measures a two-shape subset and writes a complete JSON."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from kernels import bench  # noqa: E402


def test_shapes_cover_the_generator():
    names = {s[0] for s in bench.SHAPES}
    for f in (32, 64):
        for d in (8, 4, 2, 1):
            assert f"F{f}-c512-d{d}" in names
    assert {("c128-256", 128, 256), ("c64-512", 64, 512), ("c32-1024", 32, 1024)} <= {
        s[:3] for s in bench.SHAPES}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_refuses_without_gpu(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert bench.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA GPU" in err[0]
    assert not out.exists()


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_run_writes_json(tmp_path):
    out = tmp_path / "b.json"
    assert bench.main(["--out", str(out), "--shapes", "F32-c512-d8", "c128-256", "--iters", "10",
                       "--warmup", "3"]) == 0
    res = json.loads(out.read_text())
    assert res["format"] == "sgex-kernel-bench" and res["machine"]["gpu"]
    assert len(res["results"]) == 2
    for row in res["results"]:
        for name in ("official", "unfused_nchw", "unfused_channels_last", "triton"):
            t = row["impls"][name]
            assert 0 < t["median_ms"] <= t["p90_ms"] <= t["p99_ms"]
            assert t["max_abs_err_vs_fp32_reference"] < 0.1


@pytest.mark.parametrize("dilation", [1, 8])
def test_baselines_compute_the_op(dilation):
    # The two PyTorch baselines are timed against the kernel: they must compute the same op.
    from kernels.modconv import modulated_conv2d_reference

    g = torch.Generator().manual_seed(dilation)
    x, w = torch.randn(2, 6, 12, 12, generator=g), torch.randn(6, 6, 3, 3, generator=g) / 7
    style, noise = torch.randn(2, 6, generator=g) + 1, torch.randn(2, 1, 12, 12, generator=g)
    bias, ns = torch.randn(6, generator=g), torch.tensor([0.3])
    ref = modulated_conv2d_reference(x, w, style, dilation=dilation, noise=noise, noise_strength=ns,
                                     bias=bias)
    for fn in (bench._official(x, w, style, noise, ns, bias),
               bench._unfused(x, w, style, noise, ns, bias, channels_last=False),
               bench._unfused(x, w, style, noise, ns, bias, channels_last=True)):
        torch.testing.assert_close(fn(dilation, dilation), ref, rtol=1e-5, atol=1e-5)
