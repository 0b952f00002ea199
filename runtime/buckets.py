"""The one table of resolution buckets (pure data; importable without torch).

A bucket is named by the largest x1 side it accepts, a multiple of 32. Its graphs take any batch
1..max_batch and any height and width that are multiples of 32 up to the bucket side; outputs
are 4x the input. The runtime pads an input to the next multiple of 32 (reflect), routes it to
the smallest bucket that holds it, and crops the output. The TensorRT optimization profile of a
bucket is derived here too, so no bucket number lives anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.tasks import ALIGNED_SIZE, OUTPUT_SCALE, SIZE_MULTIPLE

DEFAULT_LADDER = (256, 512, 768, 1024)
DEFAULT_MAX_BATCH = 4
MIN_SIDE = SIZE_MULTIPLE
# The largest bucket side (x1 1024 -> output 4096). Its export traces the model at full size and
# its output layers hold 32 x 4096 x 4096 float32 activations (2 GiB each), at the limit of a
# 16-32 GiB machine; beyond it, an export would run out of memory or disk part-way.
MAX_SIDE = 1024


@dataclass(frozen=True)
class Bucket:
    side: int
    max_batch: int = DEFAULT_MAX_BATCH

    def __post_init__(self):
        check_side(self.side)
        if self.max_batch < 1:
            raise ValueError(f"max batch must be >= 1, got {self.max_batch}")

    @property
    def name(self) -> str:
        return str(self.side)

    def holds(self, height: int, width: int) -> bool:
        return max(padded(height), padded(width)) <= self.side

    def profile(self, opt_batch: int = 1) -> dict[str, tuple[tuple[int, int, int], ...]]:
        """min/opt/max of (batch, height, width) for x1 in this bucket (TensorRT profile)."""
        opt_batch = min(max(1, opt_batch), self.max_batch)
        return {
            "min": (1, MIN_SIDE, MIN_SIDE),
            "opt": (opt_batch, self.side, self.side),
            "max": (self.max_batch, self.side, self.side),
        }

    def style_profile(self, opt_batch: int = 1) -> dict[str, tuple[tuple[int, int, int], ...]]:
        """The style graph is fixed at 256x256; only its batch is dynamic."""
        opt_batch = min(max(1, opt_batch), self.max_batch)
        a = ALIGNED_SIZE
        return {"min": (1, a, a), "opt": (opt_batch, a, a), "max": (self.max_batch, a, a)}


def check_side(side: int, what: str = "--res") -> int:
    """`side` if it is a bucket side sgex can export and run; ValueError naming `what` otherwise."""
    if not isinstance(side, int) or side < MIN_SIDE or side % SIZE_MULTIPLE:
        raise ValueError(
            f"{what} must be a multiple of {SIZE_MULTIPLE} and at least {MIN_SIDE}, got {side}"
        )
    if side > MAX_SIDE:
        raise ValueError(f"{what} must be at most {MAX_SIDE} (output {MAX_SIDE * OUTPUT_SCALE}x"
                         f"{MAX_SIDE * OUTPUT_SCALE}, the largest bucket sgex exports), got {side}")
    return side


def padded(side: int) -> int:
    """The side rounded up to the next multiple of 32."""
    return -(-side // SIZE_MULTIPLE) * SIZE_MULTIPLE


def pick(buckets: list[Bucket] | tuple[Bucket, ...], height: int, width: int) -> Bucket:
    """The smallest bucket that holds height x width after padding to 32."""
    fitting = [b for b in buckets if b.holds(height, width)]
    if not fitting:
        largest = max((b.side for b in buckets), default=0)
        raise ValueError(
            f"input {height}x{width} (padded {padded(height)}x{padded(width)}) is larger than the "
            f"largest exported bucket ({largest}); export a bucket with --res {max(padded(height), padded(width))}"
        )
    return min(fitting, key=lambda b: b.side)


def ladder(res: int | None = None, max_batch: int = DEFAULT_MAX_BATCH) -> list[Bucket]:
    """The bucket for --res, or the default ladder when res is None."""
    sides = DEFAULT_LADDER if res is None else (check_side(res),)
    return [Bucket(s, max_batch) for s in sides]
