"""The one table of StyleGANEX tasks (pure data; importable without torch).

Facts from the official inference scripts (spec/styleganex.md sections 2.5, 3 and 4). Everything
else in sgex (checkpoint config inference, export graphs, runtime pre-processing, CLI choices)
refers to a task by name and reads its properties here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.errors import UnknownName

N_LATENT = 18
STYLE_DIM = 512
N_NOISE = 17  # conv1 + convs.0..15
ALIGNED_SIZE = 256  # x2, the aligned face the style code is computed from
SIZE_MULTIPLE = 8  # x1 sides are multiples of this: the official crop floors to 8, and skip fusion
#                   needs it (spec 5); only a side that is not one is padded (runtime.io)
OUTPUT_SCALE = 4  # generator output = 4 x the x1 size
INJECT_ROWS = tuple(range(8, 18))  # sketch/mask: rows of w+ replaced by the injected code
INJECT_SCALE = 0.7  # inject = 0.7 * mapping(z), a plain scaling (not truncation)


@dataclass(frozen=True)
class Variant:
    """One official checkpoint family of a task (configs differ only where noted)."""

    name: str
    checkpoint: str  # official file name
    n_fusion: int  # L = number of encoder.fusion layers (0: no skip fusion)
    use_att: int = 0  # attention MLP depth of the fusion layers (editing checkpoints)
    scales: tuple[int, ...] = ()  # superres: allowed --scale values (output / input side)


@dataclass(frozen=True)
class Task:
    name: str
    summary: str
    graphs: tuple[str, ...]  # "style"+"synth", or "translate"
    in_channels: int  # x1 channels: 3 RGB in [-1,1], 1 sketch in [0,1], 19 one-hot mask
    noise: str  # official noise: "random" (seeded explicit inputs in sgex) or "zero"
    variants: tuple[Variant, ...]
    editing: bool = False  # uses ckpt["editing_w"] * scale
    inject: bool = False  # sketch/mask: rows 8..17 <- 0.7 * mapping(z)
    per_sample_norm: bool = False  # encoder BN with per-sample statistics (official: train mode, batch 1)
    video: bool = False  # official recipe is per video frame (style from the first frame)
    extra: dict = field(default_factory=dict)

    @property
    def default_variant(self) -> Variant:
        return self.variants[0]

    def variant(self, name: str | None) -> Variant:
        if name is None:
            return self.default_variant
        for v in self.variants:
            if v.name == name:
                return v
        names = ", ".join(v.name for v in self.variants)
        raise UnknownName(f"task {self.name!r} has no variant {name!r} (choose from: {names})")

    @property
    def input_kind(self) -> str:
        return {3: "rgb", 1: "sketch", 19: "mask"}[self.in_channels]


SR_SCALES = tuple(range(4, 49, 4))

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            name="superres",
            summary="face super-resolution (output = scale x input)",
            graphs=("style", "synth"),
            in_channels=3,
            noise="random",
            variants=(
                Variant("sr", "styleganex_sr.pt", n_fusion=2, scales=SR_SCALES),
                Variant("sr32", "styleganex_sr32.pt", n_fusion=4, scales=(32,)),
            ),
        ),
        Task(
            name="edit",
            summary="video facial attribute editing (hair colour, age)",
            graphs=("style", "synth"),
            in_channels=3,
            noise="zero",
            editing=True,
            video=True,
            variants=(
                Variant("hair", "styleganex_edit_hair.pt", n_fusion=7, use_att=1),
                Variant("age", "styleganex_edit_age.pt", n_fusion=7, use_att=1),
            ),
        ),
        Task(
            name="toonify",
            summary="video toonification",
            graphs=("style", "synth"),
            in_channels=3,
            noise="zero",
            video=True,
            variants=(
                Variant("cartoon", "styleganex_toonify_cartoon.pt", n_fusion=7),
                Variant("arcane", "styleganex_toonify_arcane.pt", n_fusion=7),
                Variant("pixar", "styleganex_toonify_pixar.pt", n_fusion=7),
            ),
        ),
        Task(
            name="inversion",
            summary="encoder-only inversion (reconstruction without optimisation)",
            graphs=("style", "synth"),
            in_channels=3,
            noise="random",
            variants=(Variant("inversion", "styleganex_inversion.pt", n_fusion=0),),
        ),
        Task(
            name="sketch2face",
            summary="sketch to face (one-channel sketch in [0,1])",
            graphs=("translate",),
            in_channels=1,
            noise="random",
            inject=True,
            per_sample_norm=True,
            variants=(Variant("sketch2face", "styleganex_sketch2face.pt", n_fusion=1),),
        ),
        Task(
            name="mask2face",
            summary="parsing mask to face (19-class label map)",
            graphs=("translate",),
            in_channels=19,
            noise="random",
            inject=True,
            per_sample_norm=True,
            variants=(Variant("mask2face", "styleganex_mask2face.pt", n_fusion=2),),
        ),
    )
}

N_MASK_CLASSES = 19
WIDTH_DIVS = (1, 2, 4)  # random tiny models: channel divisors (SE reduction 16 needs >= 16 channels at depth 64)


def get_task(name: str) -> Task:
    """The task called `name`; UnknownName (an SgexError and a KeyError) naming the choices."""
    if isinstance(name, str) and name in TASKS:
        return TASKS[name]
    raise UnknownName(f"unknown task {name!r} (choose from: {', '.join(TASKS)})")


def feature_size(side: int) -> int:
    """F, the side of the first-layer feature f, for an x1 side (a multiple of 8)."""
    return side // 8


def noise_shapes(height: int, width: int) -> list[tuple[int, int]]:
    """Spatial size of each of the 17 noise maps (conv1, convs.0..15) for x1 of height x width.

    The shallow layers run at F = side/8; real x2 upsampling starts at convs.6 (layer 7)."""
    fh, fw = feature_size(height), feature_size(width)
    out = []
    for j in range(N_NOISE):
        up = 2 ** max(0, (j - 5) // 2)
        out.append((fh * up, fw * up))
    return out


def output_size(height: int, width: int) -> tuple[int, int]:
    return height * OUTPUT_SCALE, width * OUTPUT_SCALE
