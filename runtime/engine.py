"""`Engine`: one exported task behind one backend, with the pre/post-processing of the official
recipes (spec/styleganex.md section 4).

    eng = Engine("artifacts/superres", backend="auto")          # ort / trt on exported graphs
    eng = Engine.from_checkpoint("toonify", ckpt="styleganex_toonify_pixar.pt")   # torch backend
    out = eng.process(rgb_uint8_hwc)                             # uint8 [4H, 4W, 3]

Every input is validated (dtype uint8, channels for the task, sizes; the message names the
offending dimension), routed to the smallest bucket that holds it (runtime.buckets.pick; a bucket
is named by its output side) and split into chunks of the bucket's max batch. An input whose
sides are multiples of 8 reaches the backend at exactly its size, as the official crop gives it;
only a side that is not is padded bottom/right (reflect) to the next multiple of 8 and the output
cropped back, so the output is always exactly 4H x 4W, converted to uint8 by truncation (spec 8.17).

Randomness (one rule, shared by every backend so they compare bit for bit): each sample b of a
call draws from its own generator numpy.random.default_rng(seed_b), where seed_b is the `seed`
argument (an int: the same for every sample, so batching never changes a result; or one int per
sample). From that generator, in this order:
  1. translate tasks (sketch2face, mask2face) only: z = standard_normal(style_dim)
  2. tasks with explicit noise: noise_0..noise_16, standard_normal((1, h_j, w_j)) with
     (h_j, w_j) = runtime.tasks.noise_shapes(H, W)[j] (H, W padded to 8 where they are not multiples)
all cast to float32 and stacked batch-major. Video recipes (edit, toonify) use zero noise.

Editing (edit task): editing_w = ckpt editing_w[0:1] (exported as editing_w.npy) x edit_scale.
The default +1.0 follows the official video_editing.py (+scale_factor). The official web UI
applies -scale instead (spec 8.14), so a web-UI slider value s is edit_scale = -s here.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from runtime import io as rio
from runtime.backends.base import Backend
from runtime.buckets import Bucket, pick, res_for
from runtime.errors import SgexError, require
from runtime.manifest import MANIFEST_NAME, Manifest, graph_key
from runtime.tasks import N_LATENT, N_NOISE, WIDTH_DIVS, Task, get_task, noise_shapes

log = logging.getLogger(__name__)

__all__ = ["Engine", "make_random_inputs", "noise_names", "exported_buckets"]


def noise_names() -> list[str]:
    return [f"noise_{j}" for j in range(N_NOISE)]


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _seeds(seed: int | Sequence[int], batch: int) -> list[int]:
    """One seed per sample: an int >= 0 for all, or a sequence of `batch` of them."""
    if _is_int(seed):
        seeds = [int(seed)] * batch
    elif isinstance(seed, (list, tuple, np.ndarray)) and all(_is_int(s) for s in seed):
        seeds = [int(s) for s in seed]
    else:
        raise SgexError(f"seed must be an integer >= 0 or a list of them, got {type(seed).__name__} {seed!r}")
    if any(s < 0 for s in seeds):
        raise SgexError(f"seed must be >= 0 (a numpy seed), got {min(seeds)}")
    if len(seeds) != batch:
        raise SgexError(f"seed: got {len(seeds)} seeds for a batch of {batch}")
    return seeds


def _edit_scale(edit_scale) -> np.float32:
    if not isinstance(edit_scale, (int, float, np.integer, np.floating)) or isinstance(edit_scale, bool) \
            or not np.isfinite(edit_scale):
        raise SgexError(f"edit_scale must be a finite number, got {edit_scale!r}")
    return np.float32(edit_scale)


def make_random_inputs(seed: int | Sequence[int], batch: int, height: int, width: int, *,
                       noise: bool, z_dim: int | None = None) -> dict[str, np.ndarray]:
    """The seeded graph inputs for a batch at padded size height x width (see the module doc):
    {"z": [B, z_dim]} when z_dim is given, {"noise_j": [B, 1, h_j, w_j]} when noise is True."""
    shapes = noise_shapes(height, width) if noise else []
    zs, maps = [], [[] for _ in shapes]
    for s in _seeds(seed, batch):
        rng = np.random.default_rng(s)
        if z_dim is not None:
            zs.append(rng.standard_normal(z_dim).astype(np.float32))
        for j, (h, w) in enumerate(shapes):
            maps[j].append(rng.standard_normal((1, h, w)).astype(np.float32))
    out = {}
    if z_dim is not None:
        out["z"] = np.stack(zs)
    for j, m in enumerate(maps):
        out[f"noise_{j}"] = np.stack(m)
    return out


def _task_dir(artifacts_dir, task: str | None) -> Path:
    """Accept the task directory itself or the export root holding <task>/manifest.json."""
    d = Path(artifacts_dir)
    if not d.is_dir():
        raise SgexError(f"{d}: artifacts directory does not exist")
    if not (d / MANIFEST_NAME).is_file() and task is not None and (d / task / MANIFEST_NAME).is_file():
        return d / task
    return d


def exported_buckets(artifacts_dir, task: str | None = None) -> tuple[str, list[Bucket]]:
    """(variant, buckets) of an exported task directory (or export root) from its manifest alone:
    no hashing, no model loaded, so a CLI can refuse an input no bucket holds before loading."""
    manifest = Manifest.load(_task_dir(artifacts_dir, task), task=task)
    return manifest.variant, manifest.buckets()


class Engine:
    """One task's graphs behind one backend. Attributes: task (name), spec (runtime.tasks.Task),
    variant, style_dim, manifest (None for the torch backend), backend (runtime.backends.Backend),
    buckets (exported buckets; None for torch, which takes any size), artifacts_dir, checkpoint
    ({file, sha256, random, seed} of the weights), editing_w (edit: float32 [1, 18, D], unscaled)."""

    def __init__(self, artifacts_dir, backend: str = "auto", device: str | None = None, *,
                 task: str | None = None, intra_op_threads: int | None = None, precision: str | None = None,
                 force_precision: bool = False):
        """Load and verify <artifacts_dir>/manifest.json (every file's sha256; with `task`, the
        manifest's task must match) and open `backend` ("auto" | "ort" | "trt" | "openvino");
        intra_op_threads sizes the CPU thread pool of ONNX Runtime (None: its default) and OpenVINO
        (None: the process's CPU set). precision ("fp32" | "bf16") and force_precision (BF16
        without a passing accuracy gate) are the openvino backend's, see runtime/backends/openvino.py."""
        from runtime import backends

        if not isinstance(artifacts_dir, (str, os.PathLike)):
            raise SgexError(f"artifacts_dir must be a path, got {type(artifacts_dir).__name__}")
        if device is not None and not isinstance(device, str):
            raise SgexError(f"device must be None, 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        d = _task_dir(artifacts_dir, task)
        manifest = Manifest.load(d, task=task)
        manifest.verify(d)
        spec = get_task(manifest.task)
        editing_w = None
        if spec.editing:
            if "editing_w.npy" not in manifest.files:
                raise SgexError(f"{d}: the edit export lacks editing_w.npy in its manifest")
            data = manifest.read_verified(d, "editing_w.npy", kind="file")
            try:
                editing_w = np.load(io.BytesIO(data), allow_pickle=False)
            except ValueError as e:
                raise SgexError(f"{d / 'editing_w.npy'}: not a numpy array file ({e})") from None
        graph = spec.graphs[-1]
        inputs = None
        for key, g in manifest.graphs.items():
            if key.startswith(graph + "@"):
                inputs = [i["name"] for i in g["inputs"]]
                break
        if inputs is None:
            raise SgexError(f"{d}: the manifest has no {graph!r} graph for any bucket")
        be = backends.create(backend, d, manifest, device, intra_op_threads=intra_op_threads,
                             precision=precision, force_precision=force_precision)
        if manifest.checkpoint.get("random"):  # after every check that can refuse the directory
            log.warning("%s was exported from RANDOM weights (seed %s): outputs are noise; export "
                        "with --ckpt for real results", d, manifest.checkpoint.get("seed"))
        self._setup(spec, manifest.variant, manifest.style_dim, be, manifest=manifest,
                    buckets=manifest.buckets(), inputs=inputs, editing_w=editing_w, artifacts_dir=d)

    @classmethod
    def from_checkpoint(cls, task: str, ckpt: str | None = None, random_weights: bool = False,
                        device: str | None = "cpu", seed: int = 0, width_div: int = 1, *,
                        variant: str | None = None, modconv_impl: str | None = None,
                        torch_options: dict | None = None) -> "Engine":
        """The torch backend straight from an official checkpoint (or random official-format
        weights with `random_weights`: the output is then noise). No artifacts, no buckets.
        torch_options: TorchBackend's precision / plan / cuda_graphs / compile_mode."""
        require("torch", "torch", "PyTorch")
        from export.checkpoint import build_model, load_or_random

        from runtime.backends.torch_backend import TorchBackend, resolve_device

        spec = get_task(task)
        if ckpt is not None and not isinstance(ckpt, (str, os.PathLike)):
            raise SgexError(f"ckpt must be a path, got {type(ckpt).__name__}")
        if not _is_int(seed) or seed < 0:
            raise SgexError(f"seed (of the random weights) must be an integer >= 0, got {seed!r}")
        if width_div not in WIDTH_DIVS or not _is_int(width_div):
            raise SgexError(f"width_div must be one of {', '.join(map(str, WIDTH_DIVS))}, got {width_div!r}")
        if device is not None and not isinstance(device, str):
            raise SgexError(f"device must be None, 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        if variant is not None:
            spec.variant(variant)  # UnknownName (an SgexError) naming the variants
        if device is not None:
            resolve_device(device)  # a missing CUDA device is refused before the weights load
        loaded = load_or_random(task, ckpt, random_weights, seed=seed, width_div=width_div,
                                variant=variant if random_weights else None)
        if variant is not None and loaded.variant != variant:
            raise SgexError(f"{ckpt}: a checkpoint of variant {loaded.variant!r}, not {variant!r}")
        model = build_model(loaded, task)
        editing_w = None
        if spec.editing:
            if loaded.editing_w is None:
                raise SgexError(f"{ckpt}: the edit checkpoint has no editing_w")
            editing_w = loaded.editing_w[0:1].detach().float().cpu().numpy()
        inputs = _default_inputs(spec)
        be = TorchBackend(model, device, modconv_impl=modconv_impl, **(torch_options or {}))
        eng = cls.__new__(cls)
        eng._setup(spec, loaded.variant, loaded.config.style_dim, be, manifest=None, buckets=None,
                   inputs=inputs, editing_w=editing_w, artifacts_dir=None)
        eng.checkpoint = {"file": loaded.path, "sha256": loaded.sha256, "random": bool(loaded.random),
                          "seed": loaded.seed}
        return eng

    def _setup(self, spec: Task, variant: str, style_dim: int, backend: Backend, *, manifest,
               buckets, inputs: list[str], editing_w, artifacts_dir) -> None:
        self.spec = spec
        self.task = spec.name
        self.variant = variant
        self.style_dim = int(style_dim)
        self.backend = backend
        self.manifest = manifest
        self.buckets: list[Bucket] | None = buckets
        self.artifacts_dir = artifacts_dir
        self.checkpoint = dict(manifest.checkpoint) if manifest is not None else None
        self._inputs = list(inputs)
        self._noise = "noise_0" in self._inputs
        self._random_memo: tuple | None = None
        if spec.editing:
            want = (1, N_LATENT, self.style_dim)
            if editing_w is None or tuple(editing_w.shape) != want:
                got = None if editing_w is None else list(editing_w.shape)
                raise SgexError(f"editing_w must be float32 {list(want)}, got {got}")
            editing_w = editing_w.astype(np.float32, copy=False)
        self.editing_w = editing_w
        log.info("engine: task %s (variant %s), backend %s, noise %s", self.task, variant,
                 backend.describe(), "explicit (seeded)" if self._noise else "zero")

    # -- routing ----------------------------------------------------------------------------------
    @property
    def bucket_graph(self) -> str:
        """"synth" or "translate"."""
        return self.spec.graphs[-1]

    def route(self, height: int, width: int) -> tuple[str, int | None]:
        """(graph key, max batch) for an x1 of height x width (before padding to 8).
        Artifacts: the smallest bucket that holds it. Torch: any size (keyed by the bucket that
        would hold it), no batch limit."""
        if self.buckets is None:
            return graph_key(self.bucket_graph, res_for(height, width)), None
        try:
            b = pick(self.buckets, height, width)
        except ValueError as e:
            raise SgexError(str(e)) from None
        return graph_key(self.bucket_graph, b.side), b.max_batch

    def _style_max_batch(self) -> int | None:
        return None if not self.buckets else min(b.max_batch for b in self.buckets)

    def _run_chunked(self, key: str, feeds: dict[str, np.ndarray], max_batch: int | None,
                     output: str) -> np.ndarray:
        batch = next(iter(feeds.values())).shape[0]
        step = batch if max_batch is None else max_batch
        outs = []
        for s in range(0, batch, step):
            chunk = {k: np.ascontiguousarray(v[s:s + step]) for k, v in feeds.items()}
            outs.append(self.backend.run(key, chunk)[output])
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    # -- the graphs -----------------------------------------------------------------------------
    def compute_style(self, x2: np.ndarray) -> np.ndarray:
        """Aligned faces uint8 [B, 256, 256, 3] (or one [256, 256, 3]) -> wplus float32 [B, 18, D]
        (latent_avg included)."""
        if "style" not in self.spec.graphs:
            raise SgexError(f"task {self.task} has no style graph (it takes a {self.spec.input_kind} only)")
        x2 = rio.check_x2(x2)
        feeds = {"x2": rio.rgb_to_model(x2)}
        return self._run_chunked("style", feeds, self._style_max_batch(), "wplus")

    def _check_wplus(self, wplus: np.ndarray, batch: int) -> np.ndarray:
        want = (N_LATENT, self.style_dim)
        if not isinstance(wplus, np.ndarray) or wplus.ndim != 3 or tuple(wplus.shape[1:]) != want:
            got = list(wplus.shape) if isinstance(wplus, np.ndarray) else type(wplus).__name__
            raise SgexError(f"wplus: expected float32 [B, {want[0]}, {want[1]}], got {got}")
        if wplus.shape[0] not in (1, batch):
            raise SgexError(f"wplus: batch (dimension 0) must be 1 or {batch} (the x1 batch), got {wplus.shape[0]}")
        return np.ascontiguousarray(np.broadcast_to(wplus.astype(np.float32, copy=False),
                                                    (batch,) + want))

    def synthesize_float(self, x1: np.ndarray, wplus: np.ndarray, *, seed: int | Sequence[int] = 0,
                         edit_scale: float = 1.0) -> np.ndarray:
        """x1 uint8 [B, H, W, 3], wplus [B or 1, 18, D] -> float32 [B, 3, 4H, 4W], unclamped."""
        if self.bucket_graph != "synth":
            raise SgexError(f"task {self.task} has no synth graph; use translate()")
        x1 = rio.check_batch(x1, 3, "x1")
        b, h, w = x1.shape[:3]
        key, max_batch = self.route(h, w)
        xp = rio.pad_to_multiple(x1)
        feeds = {"x1": rio.rgb_to_model(xp), "wplus": self._check_wplus(wplus, b)}
        scale = _edit_scale(edit_scale)
        if "editing_w" in self._inputs:
            ew = self.editing_w * scale
            feeds["editing_w"] = np.ascontiguousarray(np.broadcast_to(ew, (b,) + ew.shape[1:]))
        if self._noise:
            feeds.update(self._random_inputs(seed, b, xp.shape[1], xp.shape[2]))
        y = self._run_chunked(key, feeds, max_batch, "y")
        return rio.crop_output(y, h, w)

    def synthesize(self, x1: np.ndarray, wplus: np.ndarray, *, seed: int | Sequence[int] = 0,
                   edit_scale: float = 1.0) -> np.ndarray:
        """x1 uint8 [B, H, W, 3], wplus [B or 1, 18, D] -> uint8 [B, 4H, 4W, 3]."""
        return rio.to_uint8(self.synthesize_float(x1, wplus, seed=seed, edit_scale=edit_scale))

    def translate_float(self, x: np.ndarray, *, seed: int | Sequence[int] = 0) -> np.ndarray:
        """sketch uint8 [B, H, W] (0..255) or mask labels uint8 [B, H, W] (0..18)
        -> float32 [B, 3, 4H, 4W], unclamped."""
        if self.bucket_graph != "translate":
            raise SgexError(f"task {self.task} has no translate graph; use synthesize()")
        x = rio.check_batch(x, None, "x")
        b, h, w = x.shape
        if self.spec.input_kind == "mask" and int(x.max()) >= 19:
            raise SgexError(f"x: mask labels must be 0..18, found {int(x.max())}")
        key, max_batch = self.route(h, w)
        xp = rio.pad_to_multiple(x)
        model_x = rio.sketch_to_model(xp) if self.spec.input_kind == "sketch" else rio.mask_to_model(xp)
        feeds = {"x": model_x}
        feeds.update(self._random_inputs(seed, b, xp.shape[1], xp.shape[2], z_dim=self.style_dim))
        y = self._run_chunked(key, feeds, max_batch, "y")
        return rio.crop_output(y, h, w)

    def translate(self, x: np.ndarray, *, seed: int | Sequence[int] = 0) -> np.ndarray:
        """sketch/mask uint8 [B, H, W] -> uint8 [B, 4H, 4W, 3]."""
        return rio.to_uint8(self.translate_float(x, seed=seed))

    # -- whole images and clips -------------------------------------------------------------------
    def _style_for(self, first: np.ndarray, x2: np.ndarray | None) -> np.ndarray:
        if x2 is None:
            x2 = rio.centre_square_x2(first)
        return self.compute_style(x2)

    def process(self, image: np.ndarray, *, x2: np.ndarray | None = None, seed: int = 0,
                edit_scale: float = 1.0) -> np.ndarray:
        """One image -> uint8 [4H, 4W, 3]. RGB tasks: uint8 [H, W, 3], style from `x2` (aligned
        face uint8 [256, 256, 3]) or, without it, from the centre square of the image resized to
        256. sketch2face: uint8 [H, W] (or RGB: channel 0); mask2face: labels uint8 [H, W]."""
        img = rio.task_image(image, self.spec)
        if self.bucket_graph == "translate":
            if x2 is not None:
                raise SgexError(f"task {self.task} takes no x2 (aligned face)")
            return self.translate(img[None], seed=seed)[0]
        wplus = self._style_for(img, x2)
        return self.synthesize(img[None], wplus, seed=seed, edit_scale=edit_scale)[0]

    def process_video(self, frames: Iterable[np.ndarray], *, x2: np.ndarray | None = None,
                      seed: int = 0, edit_scale: float = 1.0, batch_size: int = 1,
                      faces=None, scale: int | None = None) -> Iterator[np.ndarray]:
        """Frames (uint8 RGB [H, W, 3], all the same size) -> output frames uint8 [4H, 4W, 3], lazily.

        As the official video recipe: the style code comes once from `x2` or the first frame (its
        centre square), then synth runs per frame (in chunks of `batch_size`). Every frame uses the
        same `seed`, so explicit noise is identical from frame to frame.

        faces (runtime.pipeline.FaceOptions): the face pipeline instead of the whole frame (the
        first frame's crop and x2, or tracking; paste-back), see runtime.pipeline.process_video;
        `scale` is the superres S of its recipe."""
        if not _is_int(batch_size) or batch_size < 1:
            raise SgexError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        _seeds(seed, 1)
        _edit_scale(edit_scale)
        if faces is not None:
            from runtime import pipeline

            if x2 is not None:
                raise SgexError("give x2 inside FaceOptions(x2=...) when faces are processed")
            yield from pipeline.process_video(self, frames, faces, scale=scale, seed=seed,
                                              edit_scale=edit_scale, batch_size=batch_size)
            return
        try:
            it = iter(frames)
        except TypeError:
            raise SgexError(f"frames must be an iterable of images, got {type(frames).__name__}") from None
        first = next(it, None)
        if first is None:
            raise SgexError("the video has no frames")
        first = rio.task_image(first, self.spec, "frame 0")
        wplus = None if self.bucket_graph == "translate" else self._style_for(first, x2)
        shape = first.shape
        chunk: list[np.ndarray] = []
        for i, frame in enumerate(itertools.chain([first], it)):
            frame = rio.task_image(frame, self.spec, f"frame {i}")
            if frame.shape != shape:
                raise SgexError(f"frame {i}: size {frame.shape[:2]} differs from frame 0 {shape[:2]}")
            chunk.append(frame)
            if len(chunk) == batch_size:
                yield from self._video_chunk(chunk, wplus, seed, edit_scale)
                chunk = []
        if chunk:
            yield from self._video_chunk(chunk, wplus, seed, edit_scale)

    def process_photo(self, image: np.ndarray, faces=None, *, scale: int | None = None, seed: int = 0,
                      edit_scale: float = 1.0):
        """A real photo -> runtime.pipeline.PhotoResult: the official recipe of this task (detect,
        crop, align; superres: the PIL resize by `scale`/4 first), every selected face through the
        engine (batched by crop size), and paste-back when asked. faces: a
        runtime.pipeline.FaceOptions (default: the best face, no paste-back). SgexError with one
        line when no face is found."""
        from runtime import pipeline

        img = rio.task_image(image, self.spec)
        return pipeline.process_photo(self, img, faces, scale=scale, seed=seed, edit_scale=edit_scale)

    def _video_chunk(self, chunk, wplus, seed, edit_scale) -> Iterator[np.ndarray]:
        batch = np.stack(chunk)
        if wplus is None:
            out = self.translate(batch, seed=seed)
        else:
            out = self.synthesize(batch, wplus, seed=seed, edit_scale=edit_scale)
        yield from out

    def _random_inputs(self, seed, b: int, h: int, w: int, z_dim: int | None = None) -> dict:
        """make_random_inputs for this task, remembered for the last (seed, batch, size, z_dim):
        the frames of a clip share one draw instead of re-drawing the same maps per frame.
        Backends only read their feeds, so the arrays are shared, not copied."""
        seeds = _seeds(seed, b)
        key = (tuple(seeds), b, h, w, z_dim)
        if self._random_memo is None or self._random_memo[0] != key:
            self._random_memo = (key, make_random_inputs(seeds, b, h, w, noise=self._noise, z_dim=z_dim))
        return self._random_memo[1]

    def describe(self) -> str:
        where = str(self.artifacts_dir) if self.artifacts_dir is not None else "checkpoint"
        return f"{self.task}/{self.variant} on {self.backend.describe()} ({where})"

    def close(self) -> None:
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _default_inputs(spec: Task) -> list[str]:
    """Graph inputs of the per-bucket graph as export writes them for this task."""
    names = ["x1", "wplus"] if spec.graphs[-1] == "synth" else ["x", "z"]
    if spec.editing:
        names.append("editing_w")
    if spec.noise == "random":
        names += noise_names()
    return names

