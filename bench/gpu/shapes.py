"""Every stride-1 modulated conv the generator runs at one size, read off the model itself.

`modconv_calls(config, x1_side, batch)` runs `synth` on the meta device (shapes only, no
arithmetic) with `export.networks.modulated_conv2d` intercepted and returns one record per call in
layer order: the layer path, x's shape, the weight's shape, dilation, padding and the epilogue
flags. The GPU tests and the kernel microbenchmark take their shapes from here, so they cover
exactly what the generator runs, at every output size, without a second table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModconvCall:
    layer: str            # e.g. "decoder.convs.3" (the StyledConv / ToRGB holding the conv)
    x_shape: tuple        # [B, Cin, H, W] as the op sees it (after the blur of dilated up-convs)
    weight_shape: tuple   # [Cout, Cin, k, k]
    dilation: int
    padding: int
    demodulate: bool
    noise: bool
    bias: bool
    activate: bool

    @property
    def out_side(self) -> tuple[int, int]:
        k, d, p = self.weight_shape[-1], self.dilation, self.padding
        return (self.x_shape[2] + 2 * p - d * (k - 1), self.x_shape[3] + 2 * p - d * (k - 1))

    @property
    def flop(self) -> int:
        """2 * B * Cout * Ho * Wo * Cin * k * k."""
        b, cin = self.x_shape[:2]
        cout, _, k, _ = self.weight_shape
        ho, wo = self.out_side
        return 2 * b * cout * ho * wo * cin * k * k

    def key(self) -> tuple:
        """What the kernel's specialisation and tiling depend on (not the layer or the batch)."""
        return (self.x_shape[1:], self.weight_shape, self.dilation, self.padding, self.demodulate,
                self.noise, self.bias, self.activate)

    def as_dict(self) -> dict:
        return dict(asdict(self), out_side=list(self.out_side), flop=self.flop)


def modconv_calls(config, x1_side: int, batch: int = 1, noise: bool = True) -> list[ModconvCall]:
    """The stride-1 modulated convs of synth for x1 [batch, 3, x1_side, x1_side] (output 4x)."""
    import torch

    import export.networks as nets
    from runtime.tasks import N_LATENT, noise_shapes

    calls: list[ModconvCall] = []
    layer_of: dict[int, str] = {}
    with torch.device("meta"):
        model = nets.StyleGANEX(config).eval()
    for name, m in model.named_modules():
        if isinstance(m, nets.ModulatedConv2d):
            layer_of[id(m)] = name.rsplit(".conv", 1)[0]
    current: list[str] = []
    real = nets.modulated_conv2d

    def spy(x, weight, style, **kw):
        calls.append(ModconvCall(
            layer=current[-1] if current else "?", x_shape=tuple(x.shape), weight_shape=tuple(weight.shape),
            dilation=int(kw.get("dilation", 1)),
            padding=int(kw["padding"]) if kw.get("padding") is not None
            else int(kw.get("dilation", 1)) * (weight.shape[-1] - 1) // 2,
            demodulate=bool(kw.get("demodulate", True)), noise=kw.get("noise") is not None,
            bias=kw.get("bias") is not None, activate=bool(kw.get("activate", True))))
        return real(x, weight, style, **kw)

    # ModulatedConv2d is called through .run(), not forward: wrap run to name the layer.
    originals = {}
    for m in model.modules():
        if isinstance(m, nets.ModulatedConv2d):
            originals[m] = m.run

            def run(*a, _m=m, **kw):
                current.append(layer_of[id(_m)])
                try:
                    return originals[_m](*a, **kw)
                finally:
                    current.pop()

            m.run = run
    nets.modulated_conv2d = spy
    try:
        with torch.device("meta"), torch.inference_mode():
            x1 = torch.zeros(batch, 3, x1_side, x1_side)
            wplus = torch.zeros(batch, N_LATENT, config.style_dim)
            noises = [torch.zeros(batch, 1, h, w) for h, w in noise_shapes(x1_side, x1_side)] if noise else None
            model.synth(x1, wplus, noises=noises)
    finally:
        nets.modulated_conv2d = real
    return calls


def distinct(calls) -> list[ModconvCall]:
    """One call per kernel key, first occurrence kept (layer order)."""
    seen, out = set(), []
    for c in calls:
        if c.key() not in seen:
            seen.add(c.key())
            out.append(c)
    return out


def bench_shapes(calls) -> list[tuple[str, int, int, int]]:
    """kernels.bench's (name, channels, side, dilation) for the 3x3 "same"-padded calls with
    Cin == Cout (the GEMM sizes of every 3x3 layer: a dilated up-conv at dilation d on the blurred
    map is the same GEMM as the "same" conv at d), deduplicated, in layer order."""
    out, seen = [], set()
    for c in calls:
        cout, cin, k, _ = c.weight_shape
        if k != 3 or cin != cout:
            continue
        side = c.out_side[0]
        key = (cin, side, c.dilation)
        if key not in seen:
            seen.add(key)
            out.append((f"c{cin}-{side}-d{c.dilation}", cin, side, c.dilation))
    return out
