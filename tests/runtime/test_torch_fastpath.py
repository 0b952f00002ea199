"""The torch fast path on CPU: FP16 island selection and numerics, CUDA-graph cache keying and
replay with a fake graph API, torch.compile plumbing with a fake compiler. The same path on a real
GPU is tests/gpu/test_gpu_path.py (marked gpu)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from runtime.backends import torch_gpu  # noqa: E402
from runtime.errors import SgexError  # noqa: E402
from runtime.tasks import N_LATENT, noise_shapes  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model():
    import copy

    from export.checkpoint import build_model, load_or_random

    base = build_model(load_or_random("superres", None, True, seed=0, width_div=4), "superres").eval()
    return lambda: copy.deepcopy(base)


def test_default_islands_are_the_plan_scopes_and_vectors(tiny_model):
    m = tiny_model()
    isl = torch_gpu.fp32_islands(m)
    assert isl["decoder.conv1"] == "scope" and isl["decoder.to_rgb1"] == "scope"
    # modules inside a scope island are not listed separately
    assert not any(p.startswith("decoder.conv1.") for p in isl)
    assert isl["decoder.convs.3.conv.modulation"] == "vector"
    assert all(isl[f"decoder.style.{i}"] == "vector" for i in range(9))  # PixelNorm + 8 EqualLinear
    assert isl["encoder.styles.0.linear"] == "vector"
    # spatial layers are FP16
    assert "decoder.convs.3" not in isl and "encoder.body.0" not in isl


def test_plan_without_vector_rule_and_with_scopes(tiny_model, caplog):
    m = tiny_model()
    plan = {"format": "sgex-precision-plan", "version": 1, "task": "superres",
            "rules": {"io_fp32": True, "vectors_fp32": False},
            "graphs": {"synth": {"fp32_scopes": ["decoder.convs.3", "decoder.nope"], "fp32_nodes": []}}}
    isl = torch_gpu.fp32_islands(m, plan)
    assert isl == {"decoder.convs.3": "scope"}
    assert "'decoder.nope' names no module" in caplog.text
    bad = dict(plan, format="nope")
    with pytest.raises(SgexError, match="not an sgex precision plan"):
        torch_gpu.fp32_islands(m, bad)


def test_to_fp16_dtypes(tiny_model):
    m = tiny_model()
    isl = torch_gpu.to_fp16(m)
    assert m.decoder.convs[3].conv.weight.dtype == torch.float16
    assert m.decoder.convs[3].conv.modulation.weight.dtype == torch.float32
    assert m.decoder.conv1.conv.weight.dtype == torch.float32
    assert m.latent_avg.dtype == torch.float32
    assert m.encoder.body[0].res_layer[1].weight.dtype == torch.float16
    assert set(isl.values()) <= {"scope", "vector", "vector-cast"}


def _inputs(B=1, side=32, seed=0, dim=128):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.rand(B, 3, side, side, generator=g) * 2 - 1
    x2 = torch.rand(B, 3, 256, 256, generator=g) * 2 - 1
    noises = [torch.randn(B, 1, h, w, generator=g) for h, w in noise_shapes(side, side)]
    return x1, x2, noises


def _psnr_rel(a, b):
    a, b = a.double(), b.double()
    peak = float(b.max() - b.min())
    return 10 * np.log10(peak**2 / float(((a - b) ** 2).mean()))


def test_fp16_path_matches_fp32_on_cpu(tiny_model):
    # CPU FP16 convs exist in torch >= 2.x; this checks the islands wire up (dtypes meet) and the
    # result is close to FP32. Threshold: FP16 has 11 significant bits (~66 dB of its range per op);
    # through ~100 layers of random weights 35 dB relative to the output range is a loose floor
    # that any wrong cast (e.g. a style rounded to FP16 before demodulation overflowing) fails.
    ref_m, m16 = tiny_model(), tiny_model()
    p32 = torch_gpu.TorchPath(ref_m, "cpu")
    p16 = torch_gpu.TorchPath(m16, "cpu", precision="fp16")
    x1, x2, noises = _inputs()
    with torch.inference_mode():
        w32 = p32.run("style", x2=x2)
        y32 = p32.run("synth", x1=x1, wplus=w32, editing_w=None, noises=noises)
        w16 = p16.run("style", x2=x2.half())
        assert w16.dtype == torch.float32  # w+ stays FP32
        y16 = p16.run("synth", x1=x1.half(), wplus=w16, editing_w=None, noises=[n.half() for n in noises])
    assert y16.dtype == torch.float16 and torch.isfinite(y16).all()
    assert _psnr_rel(y16, y32) > 35.0


class FakeGraphAPI:
    """Records warm-ups and captures; replay re-runs the captured fn into the static output, so a
    cache that forgot to copy new inputs into the static buffers returns a stale result."""

    def __init__(self):
        self.warmups, self.captured = 0, 0

    def warmup(self, fn, n):
        self.warmups += n
        for _ in range(n):
            fn()

    def capture(self, fn):
        self.captured += 1
        out = fn()

        class G:
            def replay(self_inner):
                out.copy_(fn())

        return G(), out


def test_graph_cache_keys_capture_and_replay():
    api = FakeGraphAPI()
    cache = torch_gpu.GraphCache(api, warmup=2)
    fn = lambda a, b: a * 2 + (0 if b is None else b)  # noqa: E731
    x = torch.ones(2, 3)
    y = cache("synth", 256, fn, {"a": x, "b": None})
    assert torch.equal(y, x * 2) and api.captured == 1 and api.warmups == 2
    y2 = cache("synth", 256, fn, {"a": x * 3, "b": None})  # same key: replay with new data
    assert api.captured == 1 and torch.equal(y2, x * 6)
    assert y2 is y  # the static output buffer
    cache("synth", 256, fn, {"a": torch.ones(4, 3), "b": None})  # other batch
    cache("synth", 256, fn, {"a": torch.ones(2, 5), "b": None})  # other size
    cache("synth", 512, fn, {"a": x, "b": None})  # other bucket
    cache("style", 256, fn, {"a": x, "b": None})  # other graph
    cache("synth", 256, fn, {"a": x, "b": torch.ones(2, 3)})  # other inputs present
    cache("synth", 256, fn, {"a": x.double(), "b": None})  # other dtype
    assert api.captured == cache.captures == 7
    k = torch_gpu.GraphCache.key("synth", 256, {"a": torch.ones(4, 3), "b": None})
    assert k[:3] == ("synth", 256, 4)


def test_path_with_graphs_matches_eager_and_clones(tiny_model):
    api = FakeGraphAPI()
    eager = torch_gpu.TorchPath(tiny_model(), "cpu")
    graphed = torch_gpu.TorchPath(tiny_model(), "cpu", cuda_graphs=True, graph_api=api)
    outs = []
    with torch.inference_mode():
        for seed in (1, 2):
            x1, x2, noises = _inputs(seed=seed)
            w = eager.run("style", 32, x2=x2)
            ye = eager.run("synth", 32, x1=x1, wplus=w, editing_w=None, noises=noises)
            wg = graphed.run("style", 32, x2=x2)
            yg = graphed.run("synth", 32, x1=x1, wplus=wg, editing_w=None, noises=noises)
            torch.testing.assert_close(yg, ye, rtol=1e-5, atol=1e-4)
            outs.append(yg)
    assert api.captured == 2  # style and synth once each; the second clip replayed
    assert not torch.equal(outs[0], outs[1])  # clones, not the static buffer
    assert "CUDA graphs" in graphed.describe()


def test_graphs_refused_on_cpu_without_fake(tiny_model):
    with pytest.raises(SgexError, match="CUDA graphs need a CUDA device"):
        torch_gpu.TorchPath(tiny_model(), "cpu", cuda_graphs=True)


def test_compile_plumbing(tiny_model):
    calls = []

    def compiler(fn, **kw):
        calls.append((fn.__name__, kw))
        return fn

    p = torch_gpu.TorchPath(tiny_model(), "cpu", compile_mode="max-autotune-no-cudagraphs", compiler=compiler)
    assert sorted(c[0] for c in calls) == ["style", "synth", "translate"]
    assert all(c[1] == {"mode": "max-autotune-no-cudagraphs", "dynamic": False} for c in calls)
    assert "torch.compile(max-autotune-no-cudagraphs)" in p.describe()
    with pytest.raises(SgexError, match="compile mode"):
        torch_gpu.TorchPath(tiny_model(), "cpu", compile_mode="fast", compiler=compiler)
    with pytest.raises(SgexError, match="precision"):
        torch_gpu.TorchPath(tiny_model(), "cpu", precision="bf16")


def test_torch_backend_uses_the_path(tiny_model):
    from runtime.backends.torch_backend import TorchBackend

    be = TorchBackend(tiny_model(), "cpu", precision="fp16")
    x1, x2, noises = _inputs()
    w = be.run("style", {"x2": x2.numpy()})["wplus"]
    assert w.dtype == np.float32 and w.shape == (1, N_LATENT, 128)
    feeds = {"x1": x1.numpy(), "wplus": w, **{f"noise_{j}": n.numpy() for j, n in enumerate(noises)}}
    y = be.run("synth@32", feeds)["y"]
    assert y.shape == (1, 3, 128, 128) and np.isfinite(y).all()
    assert "fp16" in be.describe()
