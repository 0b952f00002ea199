"""The one table of resolution buckets (pure data; importable without torch).

A bucket is named by its **output** side R (`--res`), a multiple of 32 as in the paper: the first
feature f is 1/32 of the output, and x1 (the encoder input) is 1/4 of it. Bucket R holds every x1
(or sketch/mask) whose sides are multiples of 8 (runtime.tasks.SIZE_MULTIPLE, what the official
crop produces, spec 4.0 and 5) and at most R/4, at batch 1..max_batch; its graphs are dynamic over
exactly that. The runtime pads only a side that is not a multiple of 8 (reflect, bottom/right),
routes the input to the smallest bucket that holds it, and crops the output back. The TensorRT
optimization profile of a bucket is derived here too, so no bucket number lives anywhere else.

Default ladder: R = 512, 1024, 1536, 2048 (x1 up to 128, 256, 384, 512). The official recipes crop
x1 to at most 512x512 (inter-ocular distance 64 px, +-256 px around the eyes), so 2048 covers every
official crop and output; 1024 is the paper's headline super-resolution (x1 256 -> 1024x1024); 1536
holds the training-size crops (256..320) and most crops of faces near a frame border without
paying for 2048's profile; 512 serves previews and small faces cheaply. Larger buckets stay
available with `--res` (e.g. 4096 for x1 up to 1024).
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.tasks import ALIGNED_SIZE, OUTPUT_SCALE, SIZE_MULTIPLE

RES_MULTIPLE = SIZE_MULTIPLE * OUTPUT_SCALE  # 32: an output side that is a multiple of 32 = an x1 side multiple of 8
DEFAULT_LADDER = (512, 1024, 1536, 2048)
DEFAULT_MAX_BATCH = 4
MIN_SIDE = SIZE_MULTIPLE  # smallest x1 side every graph accepts (8: f is 1x1; checked by tests/export)
MIN_RES = MIN_SIDE * OUTPUT_SCALE
# The largest bucket (output side 4096, x1 1024). Its output layers hold 32 x 4096 x 4096 float32
# activations (2 GiB each), at the limit of a 16-32 GiB machine; beyond it an export would run
# out of memory or disk part-way.
MAX_SIDE = 4096


@dataclass(frozen=True)
class Bucket:
    """side: the output side R (multiple of 32); x1 sides are multiples of 8 up to R/4."""

    side: int
    max_batch: int = DEFAULT_MAX_BATCH

    def __post_init__(self):
        check_side(self.side)
        if self.max_batch < 1:
            raise ValueError(f"max batch must be >= 1, got {self.max_batch}")

    @property
    def name(self) -> str:
        return str(self.side)

    @property
    def max_input(self) -> int:
        """The largest x1 side this bucket takes (R/4)."""
        return self.side // OUTPUT_SCALE

    def holds(self, height: int, width: int) -> bool:
        """x1 of height x width (before padding to 8) fits this bucket."""
        return max(padded(height), padded(width)) <= self.max_input

    def profile(self, opt_batch: int = 1) -> dict[str, tuple[tuple[int, int, int], ...]]:
        """min/opt/max of x1 (batch, height, width) in this bucket (TensorRT profile): min 8x8,
        the smallest size the graphs support; opt and max at R/4."""
        opt_batch = min(max(1, opt_batch), self.max_batch)
        top = self.max_input
        return {
            "min": (1, MIN_SIDE, MIN_SIDE),
            "opt": (opt_batch, top, top),
            "max": (self.max_batch, top, top),
        }

    def style_profile(self, opt_batch: int = 1) -> dict[str, tuple[tuple[int, int, int], ...]]:
        """The style graph is fixed at 256x256; only its batch is dynamic."""
        opt_batch = min(max(1, opt_batch), self.max_batch)
        a = ALIGNED_SIZE
        return {"min": (1, a, a), "opt": (opt_batch, a, a), "max": (self.max_batch, a, a)}


def check_side(side: int, what: str = "--res") -> int:
    """A valid bucket (output) side, or ValueError naming the rule and `what`."""
    if not isinstance(side, int) or isinstance(side, bool) or side < MIN_RES or side % RES_MULTIPLE:
        raise ValueError(
            f"{what} is the output side: a multiple of {RES_MULTIPLE} and at least {MIN_RES} "
            f"(x1 = res/{OUTPUT_SCALE}, a multiple of {SIZE_MULTIPLE}), got {side}"
        )
    if side > MAX_SIDE:
        raise ValueError(f"{what} must be at most {MAX_SIDE} (output {MAX_SIDE}x{MAX_SIDE}, x1 "
                         f"{MAX_SIDE // OUTPUT_SCALE}: the largest bucket sgex exports), got {side}")
    return side


def padded(side: int) -> int:
    """An x1 side rounded up to the next multiple of 8 (unchanged when it already is one)."""
    return -(-side // SIZE_MULTIPLE) * SIZE_MULTIPLE


def res_for(height: int, width: int) -> int:
    """The smallest bucket (output side) that holds x1 of height x width."""
    return max(padded(height), padded(width)) * OUTPUT_SCALE


def pick(buckets: list[Bucket] | tuple[Bucket, ...], height: int, width: int) -> Bucket:
    """The smallest bucket that holds x1 of height x width (sides padded to 8)."""
    fitting = [b for b in buckets if b.holds(height, width)]
    if not fitting:
        largest = max(buckets, key=lambda b: b.side, default=None)
        have = (f"the largest exported bucket {largest.side} holds x1 up to "
                f"{largest.max_input}x{largest.max_input}" if largest else "no bucket is exported")
        need = res_for(height, width)
        raise ValueError(
            f"x1 {height}x{width} does not fit: {have}; bucket {need} would hold it "
            f"(export it with --res {need})"
        )
    return min(fitting, key=lambda b: b.side)


def ladder(res: int | None = None, max_batch: int = DEFAULT_MAX_BATCH) -> list[Bucket]:
    """The bucket for --res, or the default ladder when res is None."""
    sides = DEFAULT_LADDER if res is None else (check_side(res),)
    return [Bucket(s, max_batch) for s in sides]
