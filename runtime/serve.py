"""sgex-serve: serve one exported task over HTTP with Ray Serve, batching across requests.

The deployment is as thin as a CLI: it parses the request, validates the image and the options,
batches and calls `runtime.Engine`; every model and recipe step stays in the Engine.

HTTP (one task per application, the task of --artifacts):

    POST /v1/<task>     body: the image (PNG or JPEG), options as query parameters; or a JSON body
                        {"image": <base64>, "x2": <base64 aligned 256x256 face, optional>, options}
                        -> the output image, PNG (default) or JPEG (`Accept: image/jpeg`), with the
                        headers x-sgex-bucket, x-sgex-backend, x-sgex-batch-id, x-sgex-batch-size,
                        x-sgex-style-cache (hit | miss | none), x-sgex-queue-ms, x-sgex-engine-ms
    GET  /v1/models     the manifest's task, variant, buckets, precision, backend, versions, random flag
    GET  /healthz       {"status": "ok", ...} with this replica's request and engine-call counters

Options: seed (int >= 0; noise and z), scale (superres: the variant's scales), edit_scale (edit);
align=true runs the face pipeline (runtime.pipeline, as Engine.process_photo) with its options
faces (best | all | N), paste_back, landmarks (JSON: per face 5 or 68 [x, y] points) and padding
(crop half-sizes l,r,t,b); without align the image is x1 as is (sgex-run --no-align). Unknown
options are refused, so a typo is a 400, not a silently ignored setting.

Batching: one `@serve.batch` queue per group key, so one batch is one Engine call. The key of a
synth/translate request is (graph, x1 height, x1 width, edit_scale): only inputs of exactly the
same size stack into one batch (the Engine crops the whole batch to one size). Mixed sizes are not
padded into one batch: each size has its own queue and batches of different sizes run one after
the other on the replica's single engine thread. A queue is a slot of a fixed pool of
max_ongoing_requests slots, bound to one key while it has requests in flight (at most
max_ongoing_requests keys can be in flight at once, so a request never waits for a slot). The
style code (RGB tasks) has its own queue (x2 is always 256x256) and a bounded LRU cache keyed by
the sha256 of x2, so frames of one clip sent with the same x2 pay for the style once.

Backends: the Engine's backends on exported artifacts: ort, trt, openvino (--precision fp32 or a
gated bf16, the fastest CPU path measured here) and auto. The torch backend is not served: it
runs from a checkpoint without the export's buckets, which the batching, the size limits and
GET /v1/models are built on; export the checkpoint (sgex-export) and serve that.

Errors: body over --max-body-bytes or image over --max-pixels or larger than every bucket -> 413;
bad image, options or JSON -> 400 {"error": "..."}; full queue (max_ongoing_requests per replica
plus max_queued_requests at the proxy) -> 503 with Retry-After (Ray Serve's backpressure); any
other failure -> 500 {"error": ..., "id": ...} with the same id in the replica's log.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import itertools
import json
import logging
import math
import os
import signal
import struct
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from runtime._cli import run_main, setup_logging
from runtime.backends.openvino import PRECISIONS  # no OpenVINO import: the names only
from runtime.errors import SgexError, require

log = logging.getLogger("sgex-serve")

PROG = "sgex-serve"
APP_NAME = "sgex"
DEPLOYMENT_NAME = "SgexServer"
OPTIONS = ("seed", "scale", "edit_scale", "align", "faces", "paste_back", "landmarks", "padding")
FACE_OPTIONS = ("faces", "paste_back", "landmarks", "padding")
JSON_IMAGE_FIELDS = ("image", "x2")
MAX_SEED = 2**63 - 1
MEDIA = {"png": ("image/png", ".png"), "jpeg": ("image/jpeg", ".jpg")}

EPILOG = """\
examples:
  # a local Ray on this machine, ONNX Runtime on the CPU, http://127.0.0.1:8000
  sgex-serve --artifacts artifacts/superres
  curl -s --data-binary @lr.png 'http://127.0.0.1:8000/v1/superres?scale=16&seed=0' -o sr.png
  curl -s http://127.0.0.1:8000/v1/models
  # two replicas of one CPU each, batches of up to 4 requests collected for at most 20 ms
  sgex-serve --artifacts artifacts/toonify --replicas 2 --num-cpus 1 --max-batch 4 --batch-wait-ms 20
  # OpenVINO BF16 on a CPU with native BF16 (after sgex-calib --bf16 --artifacts artifacts/superres)
  sgex-serve --artifacts artifacts/superres --backend openvino --precision bf16 --num-cpus 2
  # onto an existing Ray cluster, one GPU per replica, TensorRT engines
  sgex-serve --artifacts /shared/artifacts/superres --address ray://head:10001 --backend trt --num-gpus 1

notes:
  ONNX Runtime's intra-op threads follow the replica's CPU share (--num-cpus, rounded down, at
  least 1), never one thread per core per replica. Requests beyond --max-ongoing per replica queue
  at the proxy up to --max-queued; beyond that the answer is 503 with Retry-After. Ray's own
  metrics (ray_serve_* request counts, latency histograms, queue lengths) are exported in
  Prometheus format on each node's metrics port (--metrics-port for the local Ray).
"""


# -- configuration --------------------------------------------------------------------------------

BACKENDS = ("auto", "ort", "trt", "openvino")  # Engine backends on exported artifacts (torch: see the module doc)


@dataclass
class ServeConfig:
    """What the deployment needs; JSON-serializable so Ray can ship it to replicas."""

    artifacts: str
    backend: str = "auto"
    device: str | None = None
    precision: str | None = None  # openvino only: fp32 | bf16 (bf16 needs a passing BF16 gate)
    replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_batch: int = 4
    batch_wait_ms: float = 10.0
    max_ongoing: int = 16
    max_queued: int = 64
    retry_after_s: float = 1.0
    max_body_bytes: int = 32 << 20
    max_pixels: int = 4096 * 4096
    style_cache: int = 256

    def intra_op_threads(self) -> int:
        """ONNX Runtime / OpenCV threads of one replica: its CPU share, rounded down, at least 1."""
        return max(1, int(math.floor(self.num_cpus)))

    def check(self) -> "ServeConfig":
        for name, lo in (("replicas", 1), ("max_batch", 1), ("max_ongoing", 1), ("max_body_bytes", 1),
                         ("max_pixels", 1), ("style_cache", 0)):
            if getattr(self, name) < lo:
                raise SgexError(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(self, name)}")
        for name in ("num_cpus", "num_gpus", "batch_wait_ms", "retry_after_s"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise SgexError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.max_queued < -1:
            raise SgexError(f"--max-queued must be >= 0 (or -1: no limit), got {self.max_queued}")
        if self.max_ongoing < self.max_batch:
            raise SgexError(f"--max-ongoing ({self.max_ongoing}) must be >= --max-batch ({self.max_batch}), "
                            f"or a batch can never fill")
        if self.backend not in BACKENDS:
            raise SgexError(f"--backend {self.backend!r}: sgex-serve runs exported artifacts ({', '.join(BACKENDS)})")
        if self.precision is not None and self.backend != "openvino":
            raise SgexError(f"--precision {self.precision} is for --backend openvino (the other backends run "
                            f"the export's precision)")
        if self.precision not in (None, *PRECISIONS):
            raise SgexError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        return self


class EngineFailure(RuntimeError):
    """The Engine refused a batch whose every input was already validated here: a server-side
    fault (500), not the user's, since a batch holds several users' requests."""


class HttpError(Exception):
    """A refused request: HTTP status and a one-line message (the JSON body's "error")."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = " ".join(str(message).split())
        self.headers = headers or {}


# -- request parsing (pure: no Ray, no model) -----------------------------------------------------

def image_dimensions(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from a PNG or JPEG header, without decoding the pixels (so a
    decompression bomb is refused before it is decoded). HttpError 400 for anything else."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise HttpError(400, "image: truncated PNG header")
        w, h = struct.unpack(">II", data[16:24])
        return "png", int(w), int(h)
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 4 <= len(data):
            if data[i] != 0xFF:
                raise HttpError(400, "image: corrupt JPEG (bad marker)")
            marker = data[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            (length,) = struct.unpack(">H", data[i + 2:i + 4])
            # SOF0..SOF15 carry the frame size, except DHT (C4), JPG (C8) and DAC (CC)
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                if i + 9 > len(data):
                    break
                h, w = struct.unpack(">HH", data[i + 5:i + 9])
                return "jpeg", int(w), int(h)
            i += 2 + length
        raise HttpError(400, "image: truncated JPEG (no frame header)")
    raise HttpError(400, "image: not a PNG or JPEG file")


def _b64(value, name: str) -> bytes:
    if not isinstance(value, str):
        raise HttpError(400, f"{name}: expected a base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, f"{name}: not valid base64") from None


def parse_body(body: bytes, content_type: str, query: dict) -> tuple[bytes, bytes | None, dict]:
    """(image bytes, x2 bytes or None, raw options) from a raw-image or a JSON request."""
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype == "application/json":
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HttpError(400, f"body: not valid JSON ({e})") from None
        if not isinstance(doc, dict) or "image" not in doc:
            raise HttpError(400, 'body: a JSON request is an object with an "image" field (base64)')
        image = _b64(doc.pop("image"), "image")
        x2 = _b64(doc.pop("x2"), "x2") if "x2" in doc else None
        both = set(doc) & set(query)
        if both:
            raise HttpError(400, f"option {sorted(both)[0]!r} given both as a query parameter and in the JSON body")
        return image, x2, {**query, **doc}
    if not body:
        raise HttpError(400, "body: empty; send a PNG or JPEG image (or a JSON request)")
    return body, None, dict(query)


def _int_option(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise HttpError(400, f"{name}: expected an integer, got {value!r}")
    try:
        v = int(value)
    except ValueError:
        raise HttpError(400, f"{name}: expected an integer, got {value!r}") from None
    if not lo <= v <= hi:
        raise HttpError(400, f"{name}: must be {lo}..{hi}, got {v}")
    return v


def _bool_option(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "0", "false", "no"):
        return value.lower() in ("1", "true", "yes")
    raise HttpError(400, f"{name}: expected true or false, got {value!r}")


def _face_options(raw: dict, spec) -> dict | None:
    """The face pipeline's options (runtime.pipeline.FaceOptions fields) when align is on, else
    None; face options without align are refused (as sgex-run refuses them with --no-align)."""
    align = _bool_option("align", raw.get("align", False))
    given = [k for k in FACE_OPTIONS if k in raw]
    if not align:
        if given:
            raise HttpError(400, f"{given[0]}: needs the face pipeline (align=true)")
        return None
    from runtime.recipes import get_recipe

    if not get_recipe(spec.name).face_crop:
        raise HttpError(400, f"align: task {spec.name} takes its {spec.input_kind} as is (no face crop)")
    out: dict = {"paste_back": _bool_option("paste_back", raw.get("paste_back", False))}
    faces = raw.get("faces", "best")
    if isinstance(faces, str) and faces.isdigit():
        faces = int(faces)
    if not (faces in ("best", "all") or (isinstance(faces, int) and not isinstance(faces, bool) and faces >= 1)):
        raise HttpError(400, f"faces: best, all or a count >= 1, got {faces!r}")
    out["faces"] = faces
    if "padding" in raw:
        pad = raw["padding"]
        parts = pad.split(",") if isinstance(pad, str) else pad
        if not isinstance(parts, (list, tuple)) or len(parts) != 4:
            raise HttpError(400, f"padding: four crop half-sizes (left, right, top, bottom), got {pad!r}")
        out["padding"] = tuple(_int_option("padding", v, 8, 4096) for v in parts)
    if "landmarks" in raw:
        try:
            pts = tuple(np.asarray(face, dtype=np.float64) for face in raw["landmarks"])
        except (TypeError, ValueError):
            raise HttpError(400, "landmarks: a list of faces, each a list of [x, y] points") from None
        if not pts or any(p.ndim != 2 or p.shape[1] != 2 or p.shape[0] not in (5, 68) or
                          not np.isfinite(p).all() for p in pts):
            raise HttpError(400, "landmarks: every face needs 5 or 68 finite [x, y] points")
        out["landmarks"] = pts
    return out


def parse_options(raw: dict, spec, variant: str) -> dict:
    """Raw options (query strings or JSON values) -> {"seed", "scale", "edit_scale", "faces"},
    checked against the task: scale for superres only (the variant's scales; default its
    smallest, as sgex-run), edit_scale for edit only (a finite float; default +1.0), faces: the
    face pipeline's options with align=true (faces, paste_back, landmarks (JSON only), padding),
    else None. HttpError 400 otherwise."""
    unknown = sorted(set(raw) - set(OPTIONS))
    if unknown:
        raise HttpError(400, f"unknown option {unknown[0]!r} (options: {', '.join(OPTIONS)})")
    seed = _int_option("seed", raw.get("seed", 0), 0, MAX_SEED)
    scale = None
    if spec.name == "superres":
        allowed = spec.variant(variant).scales
        scale = allowed[0] if "scale" not in raw else _int_option("scale", raw["scale"], 1, max(allowed))
        if scale not in allowed:
            raise HttpError(400, f"scale: {scale} is not available for superres variant {variant} "
                                 f"(allowed: {', '.join(map(str, allowed))})")
    elif "scale" in raw:
        raise HttpError(400, f"scale: applies to superres only, not {spec.name}")
    edit_scale = 1.0
    if "edit_scale" in raw:
        if not spec.editing:
            raise HttpError(400, f"edit_scale: applies to edit only, not {spec.name}")
        v = raw["edit_scale"]
        try:
            edit_scale = float(v) if not isinstance(v, bool) else math.nan
        except (TypeError, ValueError):
            edit_scale = math.nan
        if not math.isfinite(edit_scale):
            raise HttpError(400, f"edit_scale: expected a finite number, got {v!r}")
    return {"seed": seed, "scale": scale, "edit_scale": edit_scale, "faces": _face_options(raw, spec)}


def response_format(accept: str) -> str:
    """"png" or "jpeg" from an Accept header (PNG when absent or */*); HttpError 406 otherwise."""
    if not accept.strip():
        return "png"
    for part in accept.split(","):
        media = part.split(";", 1)[0].strip().lower()
        if media in ("image/png", "image/*", "*/*"):
            return "png"
        if media in ("image/jpeg", "image/jpg"):
            return "jpeg"
    raise HttpError(406, f"Accept: {accept!r}; this server answers image/png or image/jpeg")


class StyleCache:
    """A bounded LRU of style codes: sha256 of x2 -> wplus float32 [1, 18, D]. Size 0 disables it."""

    def __init__(self, size: int):
        self.size = size
        self._d: OrderedDict[str, np.ndarray] = OrderedDict()

    @staticmethod
    def key(x2: np.ndarray) -> str:
        return hashlib.sha256(np.ascontiguousarray(x2).tobytes()).hexdigest()

    def get(self, key: str) -> np.ndarray | None:
        v = self._d.get(key)
        if v is not None:
            self._d.move_to_end(key)
        return v

    def put(self, key: str, wplus: np.ndarray) -> None:
        if self.size == 0:
            return
        self._d[key] = wplus
        self._d.move_to_end(key)
        while len(self._d) > self.size:
            self._d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)


@dataclass
class _Item:
    """One request's work in a batch: the model input and its per-sample options."""

    x: np.ndarray                 # x1 uint8 [H, W, 3] or sketch/labels uint8 [H, W]
    wplus: np.ndarray | None      # [1, 18, D] (RGB tasks) or None
    seed: int
    queued: float = field(default_factory=time.perf_counter)


@dataclass
class _Done:
    """One request's result: the output image and the facts of the engine call that made it."""

    y: np.ndarray
    batch_id: int
    batch_size: int
    queue_ms: float
    engine_ms: float
    faces: int = 1


class _Slot:
    """One `@serve.batch` queue, bound to one group key while it has requests in flight."""

    def __init__(self, fn):
        self.fn = fn
        self.key = None
        self.pending = 0


# -- the deployment --------------------------------------------------------------------------------

class SgexServer:
    """The Ray Serve deployment class (wrapped by `serve.deployment` in `build_app`, so this module
    imports without Ray). One replica = one Engine, one engine thread, one style cache."""

    def __init__(self, config: dict):
        from ray import serve

        from runtime.engine import Engine

        self.config = ServeConfig(**config).check()
        threads = self.config.intra_op_threads()
        _cv2_threads(threads)
        self.engine = Engine(self.config.artifacts, backend=self.config.backend, device=self.config.device,
                             intra_op_threads=threads, precision=self.config.precision)
        self.spec = self.engine.spec
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sgex-engine")
        wait_s = self.config.batch_wait_ms / 1000.0
        self._slots = [_Slot(serve.batch(max_batch_size=self.config.max_batch, batch_wait_timeout_s=wait_s)(
            self._run_batch)) for _ in range(self.config.max_ongoing)]
        self._style = serve.batch(max_batch_size=self.config.max_batch, batch_wait_timeout_s=wait_s)(
            self._run_style_batch)
        self._style_cache = StyleCache(self.config.style_cache)
        self._style_inflight: dict[str, asyncio.Future] = {}
        self._batch_ids = itertools.count(1)
        self._counts = {"requests": 0, "engine_calls": 0, "style_calls": 0, "style_hits": 0, "style_misses": 0,
                        "errors_4xx": 0, "errors_5xx": 0}
        self._models = models_document(self.engine)
        log.info("sgex-serve replica: %s; intra-op threads %d; max batch %d, wait %.1f ms, style cache %d",
                 self.engine.describe(), threads, self.config.max_batch, self.config.batch_wait_ms,
                 self.config.style_cache)

    # -- HTTP ----------------------------------------------------------------------------------
    async def __call__(self, request):
        from starlette.responses import JSONResponse, Response

        path = request.url.path.rstrip("/") or "/"
        try:
            if path == "/healthz" and request.method == "GET":
                return JSONResponse({"status": "ok", **self.stats()})
            if path == "/v1/models" and request.method == "GET":
                return JSONResponse(self._models)
            if path.startswith("/v1/") and path.count("/") == 2:
                if request.method != "POST":
                    raise HttpError(405, f"{request.method} {path}: use POST", {"Allow": "POST"})
                task = path.split("/")[2]
                if task != self.engine.task:
                    raise HttpError(404, f"task {task!r} is not served here (this application serves "
                                         f"{self.engine.task!r}; see GET /v1/models)")
                self._counts["requests"] += 1
                body, headers, ctype = await self._handle(request)
                return Response(body, media_type=ctype, headers=headers)
            raise HttpError(404, f"{request.method} {path}: no such endpoint (POST /v1/{self.engine.task}, "
                                 f"GET /v1/models, GET /healthz)")
        except HttpError as e:
            self._counts["errors_4xx"] += 1
            return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)
        except SgexError as e:  # refused while validating this request's own input: never a 500
            self._counts["errors_4xx"] += 1
            return JSONResponse({"error": " ".join(str(e).split())}, status_code=400)
        except Exception:
            self._counts["errors_5xx"] += 1
            rid = uuid.uuid4().hex
            log.exception("request %s (%s %s) failed", rid, request.method, path)
            return JSONResponse({"error": "internal error; see the server log", "id": rid}, status_code=500)

    async def _read_body(self, request) -> bytes:
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise HttpError(413, f"body: {int(length)} bytes, the limit is {limit}")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                raise HttpError(413, f"body: more than {limit} bytes, the limit is {limit}")
            chunks.append(chunk)
        return b"".join(chunks)

    def _decode(self, data: bytes, what: str) -> np.ndarray:
        from runtime import io as rio

        _, w, h = image_dimensions(data)
        if w < 1 or h < 1:
            raise HttpError(400, f"{what}: empty image {w}x{h}")
        if w * h > self.config.max_pixels:
            raise HttpError(413, f"{what}: {w}x{h} = {w * h} pixels, the limit is {self.config.max_pixels}")
        try:
            return rio.decode_image(data, what)
        except SgexError as e:
            raise HttpError(400, str(e)) from None

    def _check_fits(self, h: int, w: int) -> None:
        buckets = self.engine.buckets
        if buckets is not None and not any(b.holds(h, w) for b in buckets):
            fit = ", ".join(str(b.side) for b in buckets)
            raise HttpError(413, f"image: the model input is {h}x{w}, larger than every bucket this "
                                 f"server has (buckets {fit})")

    async def _handle(self, request):
        from runtime import io as rio

        t0 = time.perf_counter()
        fmt = response_format(request.headers.get("accept", ""))
        body = await self._read_body(request)
        data, x2_data, raw = parse_body(body, request.headers.get("content-type", ""),
                                        dict(request.query_params))
        opts = parse_options(raw, self.spec, self.engine.variant)
        image = rio.task_image(self._decode(data, "image"), self.spec, "image")
        x2 = None
        if x2_data is not None:
            if self.engine.bucket_graph != "synth":
                raise HttpError(400, f"x2: task {self.engine.task} takes no aligned face")
            x2 = rio.check_x2(self._decode(x2_data, "x2"), "x2")[0]
        headers = {}
        if opts["faces"] is not None:
            y, done, x1, cached = await self._photo(image, x2, opts)
            headers["x-sgex-faces"] = str(done.faces)
        else:
            x1 = rio.resize_for_scale(image, opts["scale"]) if opts["scale"] else image
            self._check_fits(x1.shape[0], x1.shape[1])
            wplus, cached = None, None
            if self.engine.bucket_graph == "synth":
                wplus, cached = await self._style_code(rio.centre_square_x2(x1) if x2 is None else x2)
            done = await self._submit(self._key(x1, opts), _Item(x1, wplus, opts["seed"]))
            y = done.y
        headers["x-sgex-style-cache"] = "none" if cached is None else ("hit" if cached else "miss")
        media, ext = MEDIA[fmt]
        out = rio.encode_image(y, ext, "output")
        graph_key, _ = self.engine.route(x1.shape[0], x1.shape[1])
        headers.update({
            "x-sgex-bucket": graph_key.split("@", 1)[-1],
            "x-sgex-backend": self.engine.backend.name,
            "x-sgex-batch-id": str(done.batch_id),
            "x-sgex-batch-size": str(done.batch_size),
            "x-sgex-queue-ms": f"{done.queue_ms:.2f}",
            "x-sgex-engine-ms": f"{done.engine_ms:.2f}",
            "x-sgex-total-ms": f"{(time.perf_counter() - t0) * 1000:.2f}",
        })
        return out, headers, media

    async def _photo(self, image: np.ndarray, x2, opts) -> tuple:
        """The face pipeline (runtime.pipeline, as Engine.process_photo): detect, crop and align in
        the engine thread, then every face through the shared style cache and the size-keyed
        batches (faces of other requests with the same crop size share a batch), then paste-back.
        Returns (output, the first face's _Done with .faces set, its x1, style cached?)."""
        from runtime import pipeline

        fo = pipeline.FaceOptions(x2=x2, **opts["faces"])
        loop = asyncio.get_running_loop()
        frame, jobs = await loop.run_in_executor(
            self._pool, lambda: pipeline.prepare(image, self.engine.task, fo, what="image", scale=opts["scale"]))
        for j in jobs:
            self._check_fits(j.x1.shape[0], j.x1.shape[1])
        styles = await asyncio.gather(*(self._style_code(j.x2) for j in jobs))
        dones = await asyncio.gather(*(self._submit(self._key(j.x1, opts), _Item(j.x1, w, opts["seed"]))
                                       for j, (w, _) in zip(jobs, styles)))
        ys = [d.y for d in dones]
        y = ys[0]
        if fo.paste_back:
            y = await loop.run_in_executor(self._pool, pipeline.compose, frame, [j.params for j in jobs], ys)
        dones[0].faces = len(jobs)
        return y, dones[0], jobs[0].x1, all(c for _, c in styles)

    def _key(self, x1: np.ndarray, opts) -> tuple:
        """The batch group of one model input: same graph, same x1 size, same edit scale."""
        return self.engine.bucket_graph, x1.shape[0], x1.shape[1], opts["edit_scale"]

    # -- batching ------------------------------------------------------------------------------
    async def _submit(self, key, item: _Item) -> _Done:
        slot = next((s for s in self._slots if s.key == key), None)
        if slot is None:
            slot = next((s for s in self._slots if s.pending == 0), None)
            if slot is None:  # cannot happen while max_ongoing_requests bounds the requests in flight
                raise RuntimeError(f"all {len(self._slots)} batch slots are busy")
            slot.key = key
        slot.pending += 1
        try:
            return await slot.fn(item, key)
        except SgexError as e:
            raise EngineFailure(f"synth batch {key}: {e}") from e
        finally:
            slot.pending -= 1
            if slot.pending == 0:
                slot.key = None

    async def _run_batch(self, items: list[_Item], keys: list) -> list[_Done]:
        """One batch of one slot: every item has the same key, so this is one Engine call."""
        if any(k != keys[0] for k in keys):
            raise RuntimeError(f"a batch mixed group keys {sorted(set(map(str, keys)))}")
        edit_scale = keys[0][3]
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        ys = await loop.run_in_executor(self._pool, self._engine_call, items, edit_scale)
        engine_ms = (time.perf_counter() - start) * 1000
        self._counts["engine_calls"] += 1
        bid = next(self._batch_ids)
        return [_Done(y, bid, len(items), (start - it.queued) * 1000, engine_ms) for y, it in zip(ys, items)]

    def _engine_call(self, items: list[_Item], edit_scale: float) -> np.ndarray:
        x = np.stack([it.x for it in items])
        seeds = [it.seed for it in items]
        if self.engine.bucket_graph == "translate":
            return self.engine.translate(x, seed=seeds)
        wplus = np.concatenate([it.wplus for it in items])
        return self.engine.synthesize(x, wplus, seed=seeds, edit_scale=edit_scale)

    async def _style_code(self, x2: np.ndarray) -> tuple[np.ndarray, bool]:
        """(wplus [1, 18, D], from the cache?) for one aligned face; concurrent requests with the
        same x2 share one computation."""
        key = StyleCache.key(x2)
        hit = self._style_cache.get(key)
        if hit is not None:
            self._counts["style_hits"] += 1
            return hit, True
        fut = self._style_inflight.get(key)
        if fut is not None:  # another request is computing this style code: share it
            self._counts["style_hits"] += 1
            return await asyncio.shield(fut), True
        self._counts["style_misses"] += 1
        fut = asyncio.get_running_loop().create_future()
        self._style_inflight[key] = fut
        try:
            try:
                wplus = await self._style(x2)
            except SgexError as e:
                raise EngineFailure(f"style batch: {e}") from e
            self._style_cache.put(key, wplus)
            fut.set_result(wplus)
            return wplus, False
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved here, so an unawaited future logs nothing
            raise
        finally:
            del self._style_inflight[key]

    async def _run_style_batch(self, x2s: list[np.ndarray]) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        w = await loop.run_in_executor(self._pool, self.engine.compute_style, np.stack(x2s))
        self._counts["style_calls"] += 1
        return [w[i:i + 1] for i in range(len(x2s))]

    def stats(self) -> dict:
        """This replica's counters: requests, engine calls (synth/translate batches), style calls,
        style-cache hits and misses, refused (4xx) and failed (5xx) requests, cache entries, and
        the ONNX Runtime intra-op threads the backend was opened with."""
        return {**self._counts, "style_cache_entries": len(self._style_cache),
                "intra_op_threads": getattr(self.engine.backend, "intra_op_threads",
                                            getattr(self.engine.backend, "threads", None))}

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)


def _cv2_threads(n: int) -> None:
    import cv2

    cv2.setNumThreads(n)


def models_document(engine) -> dict:
    """GET /v1/models: what this application serves, from the verified manifest."""
    m = engine.manifest
    ckpt = m.checkpoint or {}
    return {"models": [{
        "task": engine.task,
        "variant": engine.variant,
        "endpoint": f"/v1/{engine.task}",
        "buckets": [{"side": b.side, "max_batch": b.max_batch} for b in engine.buckets or []],
        "precision": m.precision,
        "flavor": m.flavor,
        "backend": engine.backend.describe(),
        "random_weights": bool(ckpt.get("random")),
        "checkpoint_sha256": ckpt.get("sha256"),
        "versions": m.versions,
        "created": m.data.get("created"),
    }]}


# -- application and process ----------------------------------------------------------------------

def build_app(config: ServeConfig):
    """The bound Ray Serve application for `config` (ray.serve imported here)."""
    from ray import serve
    from ray.serve.config import BackpressureConfig

    actor = {"num_cpus": config.num_cpus}
    if config.num_gpus:
        actor["num_gpus"] = config.num_gpus
    deployment = serve.deployment(
        SgexServer, name=DEPLOYMENT_NAME, num_replicas=config.replicas, ray_actor_options=actor,
        max_ongoing_requests=config.max_ongoing, max_queued_requests=config.max_queued,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=config.retry_after_s),
    )
    return deployment.bind(asdict(config))


def check_artifacts(config: ServeConfig) -> None:
    """Refuse a missing or tampered export before Ray starts (the replica verifies it again)."""
    from runtime.engine import _task_dir
    from runtime.manifest import Manifest

    d = _task_dir(config.artifacts, None)
    Manifest.load(d).verify(d)


def start(config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
          metrics_port: int | None = None, blocking_timeout_s: float = 300.0) -> None:
    """Start (or join) Ray, start Serve's HTTP proxy on host:port and deploy the application;
    returns once the replicas are up."""
    ray = require("ray", "serve", "Ray")
    serve = require("ray.serve", "serve", "Ray Serve")
    init = {"address": address, "include_dashboard": False, "logging_level": logging.WARNING}
    if address is None:
        init["num_cpus"] = max(os.cpu_count() or 1, math.ceil(config.num_cpus * config.replicas))
        if config.num_gpus:
            init["num_gpus"] = math.ceil(config.num_gpus * config.replicas)
        if metrics_port is not None:
            init["_metrics_export_port"] = metrics_port
        log.info("starting a local Ray (%d CPUs)", init["num_cpus"])
    elif metrics_port is not None:
        raise SgexError("--metrics-port applies to the local Ray only (a cluster's nodes set their own)")
    ray.init(**init)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
    deadline = time.monotonic() + blocking_timeout_s
    while serve.status().applications[APP_NAME].status != "RUNNING":
        st = serve.status().applications[APP_NAME]
        if st.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise SgexError(f"the sgex application failed to deploy: {st.message}")
        if time.monotonic() > deadline:
            raise SgexError(f"the sgex application was not running after {blocking_timeout_s:.0f} s")
        time.sleep(0.2)


def stop() -> None:
    """Delete the application, stop Serve and disconnect (a local Ray's processes end here)."""
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


# -- CLI ------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0].split(": ", 1)[1],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", required=True, metavar="DIR", help="exported task directory (sgex-export)")
    p.add_argument("--backend", default="auto", choices=list(BACKENDS),
                   help="auto: trt when the export has TensorRT engines and tensorrt imports; on a CPU, "
                        "openvino bf16 when the export passed its BF16 gate; else ort (logged)")
    p.add_argument("--precision", choices=list(PRECISIONS),
                   help="--backend openvino only: fp32 (default) or bf16 (needs a passing sgex-calib --bf16)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: the backend's choice, logged)")
    p.add_argument("--replicas", type=int, default=1, metavar="N", help="replicas of the deployment (default 1)")
    res = p.add_mutually_exclusive_group()
    res.add_argument("--num-cpus", type=float, metavar="C",
                     help="CPUs per replica; also ONNX Runtime's intra-op threads (default: a local Ray's "
                          "CPUs / replicas; on a cluster 1)")
    res.add_argument("--num-gpus", type=float, metavar="G", help="GPUs per replica (one CPU each)")
    p.add_argument("--max-batch", type=int, default=4, metavar="B",
                   help="most requests in one engine call (default 4; the bucket's max batch still applies)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, metavar="T",
                   help="longest wait for a batch to fill (default 10 ms)")
    p.add_argument("--max-ongoing", type=int, metavar="N",
                   help="requests in flight per replica (Ray's max_ongoing_requests; default 4 x --max-batch)")
    p.add_argument("--max-queued", type=int, default=64, metavar="N",
                   help="requests queued at the proxy beyond that before 503 (default 64; -1: no limit)")
    p.add_argument("--retry-after", type=float, default=1.0, metavar="S",
                   help="Retry-After seconds on a 503 (default 1)")
    p.add_argument("--max-body-bytes", type=int, default=32 << 20, metavar="N",
                   help="largest request body (default 32 MiB; larger: 413)")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, metavar="N",
                   help="largest decoded image, width x height (default 4096*4096; larger: 413)")
    p.add_argument("--style-cache", type=int, default=256, metavar="N",
                   help="style codes kept per replica, keyed by the sha256 of x2 (default 256; 0: off)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--address", metavar="ADDR",
                   help="an existing Ray cluster (ray://head:10001 or auto); default: start a local Ray")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="local Ray only: port of Ray's Prometheus metrics (ray_serve_*); default Ray's choice")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def config_from_args(args) -> ServeConfig:
    if args.num_gpus is not None:
        num_cpus, num_gpus = 1.0, args.num_gpus
    elif args.num_cpus is not None:
        num_cpus, num_gpus = args.num_cpus, 0.0
    else:
        num_cpus = 1.0 if args.address else max(1.0, float((os.cpu_count() or 1) // max(1, args.replicas)))
        num_gpus = 0.0
    max_ongoing = args.max_ongoing if args.max_ongoing is not None else 4 * args.max_batch
    return ServeConfig(
        artifacts=str(args.artifacts), backend=args.backend, device=args.device, precision=args.precision,
        replicas=args.replicas,
        num_cpus=num_cpus, num_gpus=num_gpus, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
        max_ongoing=max_ongoing, max_queued=args.max_queued, retry_after_s=args.retry_after,
        max_body_bytes=args.max_body_bytes, max_pixels=args.max_pixels, style_cache=args.style_cache,
    ).check()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_main(PROG, lambda: _serve(args))


def _serve(args) -> int:
    config = config_from_args(args)
    if not 0 < args.port < 65536:
        raise SgexError(f"--port must be 1..65535, got {args.port}")
    if args.address is None:
        check_artifacts(config)  # a cluster's nodes may see another filesystem: the replicas check there
    if args.num_cpus is None and args.num_gpus is None:
        log.info("--num-cpus not given: %g CPU(s) per replica (%s)", config.num_cpus,
                 "on a cluster" if args.address else f"{os.cpu_count()} CPUs / {args.replicas} replica(s)")
    stopping = threading.Event()

    def _on_signal(signum, frame):
        stopping.set()

    old = {}
    try:
        start(config, host=args.host, port=args.port, address=args.address, metrics_port=args.metrics_port)
        # Installed after ray.init, which sets its own handlers: a stop signal ends the wait below
        # and the `finally` shuts Serve and Ray down in order.
        old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        log.info("serving %s at http://%s:%d/v1/ (Ctrl-C or SIGTERM stops)", config.artifacts, args.host, args.port)
        print(f"sgex-serve: ready http://{args.host}:{args.port}", flush=True)
        while not stopping.wait(0.5):
            pass
        log.info("stopping")
    finally:
        stop()
        for s, h in old.items():
            signal.signal(s, h)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
