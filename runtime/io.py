"""Image I/O and the pre/post-processing every backend shares (numpy + OpenCV; no torch).

Conventions: images in memory are uint8, RGB, HWC (a batch is BHWC); model tensors are float32
NCHW. The numbers follow the official inference scripts (spec/styleganex.md 4.0 and 8.17):

    RGB  x in [-1, 1]:  (u8 / 255 - 0.5) / 0.5         (ToTensor then Normalize(0.5, 0.5))
    sketch x in [0, 1]: u8 / 255, one channel          (not normalised to [-1, 1], spec 8.7)
    mask:               label map 0..18 -> one-hot [19, H, W] of 0.0/1.0
    output:             clamp to [-1, 1], then ((y + 1) * 127.5).astype(uint8): truncation, no rounding

Inputs are padded bottom/right to the next multiple of 32 with reflection, and the 4x output is
cropped back to 4H x 4W, so any H, W works and the output is exactly 4x the input.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from runtime.errors import SgexError
from runtime.tasks import ALIGNED_SIZE, N_MASK_CLASSES, OUTPUT_SCALE, SIZE_MULTIPLE, Task

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
VIDEO_EXTS = (".mp4", ".m4v", ".avi", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv")

__all__ = [
    "IMAGE_EXTS", "VIDEO_EXTS", "is_image_path", "is_video_path", "check_input_file", "read_image",
    "decode_image", "encode_image", "write_image",
    "list_images", "check_output_path", "atomic_output", "task_image", "check_batch", "pad_to_multiple",
    "rgb_to_model", "sketch_to_model", "mask_to_model", "to_uint8", "centre_square_x2",
    "resize_for_scale", "check_x2", "check_input_file", "read_x2", "crop_output",
]


def _cv2():
    import cv2  # OpenCV is a base dependency; imported here to keep `import runtime` light

    return cv2


def is_image_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTS


def is_video_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTS


# -- reading and writing ----------------------------------------------------------------------

def check_input_file(path: str | os.PathLike, what: str) -> Path:
    """The path of a readable, non-empty regular file; SgexError (one line) otherwise."""
    p = Path(path)
    if not p.exists():
        raise SgexError(f"{p}: no such file")
    if p.is_dir():
        raise SgexError(f"{p}: is a directory, not {what}")
    if p.stat().st_size == 0:
        raise SgexError(f"{p}: empty file")
    return p


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an 8-bit image file as stored: uint8 [H, W] (grey) or [H, W, 3] RGB or [H, W, 4] RGBA.

    SgexError (one line) for a missing, empty, undecodable or non-8-bit file."""
    p = check_input_file(path, "an image")
    return decode_image(np.fromfile(p, dtype=np.uint8), str(p))  # from memory: no OpenCV path warnings


def decode_image(data: bytes | np.ndarray, what: str = "image") -> np.ndarray:
    """Decode the bytes of an 8-bit image file, as `read_image` (uint8 [H, W], RGB [H, W, 3] or
    RGBA [H, W, 4]); SgexError naming `what` for undecodable or non-8-bit data."""
    cv2 = _cv2()
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    if img is None:
        raise SgexError(f"{what}: not an image OpenCV can decode")
    if img.dtype != np.uint8:
        raise SgexError(f"{what}: {img.dtype} pixels; sgex reads 8-bit images")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA)
    return np.ascontiguousarray(img)


def check_output_path(path: str | os.PathLike, kind: str) -> Path:
    """Refuse an output path that cannot be written, before any work is done.

    kind: "image" (extension OpenCV can encode), "video" (a VIDEO_EXTS extension) or "folder"
    (created if missing; its parent must exist)."""
    p = Path(path)
    if kind == "folder":
        if p.exists() and not p.is_dir():
            raise SgexError(f"{p}: the input is a folder, so the output must be a folder, not a file")
        parent = p if p.is_dir() else p.parent
    else:
        if p.is_dir():
            raise SgexError(f"{p}: is a directory; give an output file name")
        if kind == "image" and not (is_image_path(p) and _cv2().haveImageWriter(str(p))):
            raise SgexError(f"{p}: output must be an image file ({', '.join(IMAGE_EXTS)})")
        if kind == "video":
            from runtime.video import FOURCC

            if p.suffix.lower() not in FOURCC:
                raise SgexError(f"{p}: the input is a video, so the output must be a video file "
                                f"({', '.join(FOURCC)})")
        parent = p.parent
    parent = parent if str(parent) else Path(".")
    if not parent.is_dir():
        raise SgexError(f"{parent}: output directory does not exist")
    try:  # os.access is not enough (root, read-only mounts): really create a file
        fd, probe = tempfile.mkstemp(prefix=".sgex-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SgexError(f"{parent}: output directory is not writable ({e.strerror})") from None
    return p


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class atomic_output:
    """Context manager yielding a temp path beside `path` (same extension, so encoders pick the
    right format); on success the temp file replaces `path`, on any error it is removed.
    No partial output file ever carries the final name."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=f".tmp{self.path.suffix}",
                                   dir=self.path.parent if str(self.path.parent) else ".")
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            if not self.tmp.exists() or self.tmp.stat().st_size == 0:
                self.tmp.unlink(missing_ok=True)
                raise SgexError(f"{self.path}: nothing was written")
            os.chmod(self.tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
        return False


def encode_image(image: np.ndarray, ext: str, what: str = "image") -> bytes:
    """uint8 RGB [H, W, 3] (or grey [H, W]) -> the bytes of an image file of extension `ext`
    (".png", ".jpg", ...), OpenCV's default encoder settings."""
    cv2 = _cv2()
    img = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    ok, buf = cv2.imencode(ext.lower(), img)
    if not ok:
        raise SgexError(f"{what}: OpenCV cannot encode {ext!r} images")
    return buf.tobytes()


def write_image(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Encode uint8 RGB [H, W, 3] (or grey [H, W]) by the extension of `path`, written atomically."""
    p = Path(path)
    data = encode_image(image, p.suffix, str(p))
    with atomic_output(p) as tmp:
        tmp.write_bytes(data)
    return p


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files (by extension) directly inside `folder`, sorted by name; SgexError if none."""
    d = Path(folder)
    files = sorted(f for f in d.iterdir() if f.is_file() and is_image_path(f))
    if not files:
        raise SgexError(f"{d}: no image files ({', '.join(IMAGE_EXTS)}) in the folder")
    return files


# -- per-task input checks ---------------------------------------------------------------------

def task_image(image: np.ndarray, task: Task, what: str = "input") -> np.ndarray:
    """One decoded image -> what the task consumes, or SgexError naming the offending dimension.

    RGB tasks: uint8 [H, W, 3]. sketch2face: uint8 [H, W] (channel 0 of an RGB image, as the
    official web UI does). mask2face: uint8 label map [H, W] with values < 19."""
    if image.dtype != np.uint8:
        raise SgexError(f"{what}: dtype must be uint8, got {image.dtype}")
    if image.ndim not in (2, 3):
        raise SgexError(f"{what}: expected an image [H, W] or [H, W, C], got {image.ndim} dimensions")
    c = 1 if image.ndim == 2 else image.shape[2]
    kind = task.input_kind
    if kind == "rgb":
        if c != 3:
            raise SgexError(f"{what}: task {task.name} needs 3 channels (RGB), got {c} (dimension C of [H, W, C])")
        out = image
    elif kind == "sketch":
        if c not in (1, 3):
            raise SgexError(f"{what}: task {task.name} needs a 1-channel sketch (or RGB, channel 0 is used), "
                            f"got {c} channels (dimension C of [H, W, C])")
        out = image if c == 1 and image.ndim == 2 else image[:, :, 0]
    else:
        if c != 1:
            raise SgexError(f"{what}: task {task.name} needs a 1-channel label map (values 0..18), "
                            f"got {c} channels (dimension C of [H, W, C])")
        out = image if image.ndim == 2 else image[:, :, 0]
        top = int(out.max()) if out.size else 0
        if top >= N_MASK_CLASSES:
            raise SgexError(f"{what}: mask labels must be 0..{N_MASK_CLASSES - 1}, found {top}")
    if min(out.shape[:2]) < 1:
        raise SgexError(f"{what}: empty image {out.shape[0]}x{out.shape[1]}")
    return np.ascontiguousarray(out)


def check_batch(x: np.ndarray, channels: int | None, what: str) -> np.ndarray:
    """Validate a uint8 batch: [B, H, W, channels] (channels None: [B, H, W] or [B, H, W, 1]).
    Returns [B, H, W, C] or [B, H, W]; SgexError naming the offending dimension."""
    if not isinstance(x, np.ndarray):
        raise SgexError(f"{what}: expected a numpy array, got {type(x).__name__}")
    if x.dtype != np.uint8:
        raise SgexError(f"{what}: dtype must be uint8, got {x.dtype}")
    if channels is None:
        if x.ndim == 4 and x.shape[3] == 1:
            x = x[..., 0]
        if x.ndim != 3:
            raise SgexError(f"{what}: expected [B, H, W] (one channel), got shape {list(x.shape)}")
    else:
        if x.ndim != 4:
            raise SgexError(f"{what}: expected [B, H, W, {channels}], got shape {list(x.shape)}")
        if x.shape[3] != channels:
            raise SgexError(f"{what}: channels (dimension 3 of [B, H, W, C]) must be {channels}, got {x.shape[3]}")
    if x.shape[0] < 1:
        raise SgexError(f"{what}: batch (dimension 0) is empty")
    if x.shape[1] < 1 or x.shape[2] < 1:
        raise SgexError(f"{what}: height and width must be >= 1, got {x.shape[1]}x{x.shape[2]}")
    return x


def check_x2(x2: np.ndarray, what: str = "x2") -> np.ndarray:
    """The aligned face: uint8 [B, 256, 256, 3] (or one [256, 256, 3])."""
    if isinstance(x2, np.ndarray) and x2.ndim == 3:
        x2 = x2[None]
    x2 = check_batch(x2, 3, what)
    for dim, name in ((1, "height"), (2, "width")):
        if x2.shape[dim] != ALIGNED_SIZE:
            raise SgexError(f"{what}: {name} (dimension {dim} of [B, H, W, 3]) must be {ALIGNED_SIZE} "
                            f"(the aligned face), got {x2.shape[dim]}")
    return x2


def read_x2(path: str | os.PathLike) -> np.ndarray:
    """An aligned face file -> uint8 [256, 256, 3] RGB, or SgexError naming what is wrong."""
    img = read_image(path)
    c = 1 if img.ndim == 2 else img.shape[2]
    if c != 3:
        raise SgexError(f"{path}: the aligned face must have 3 channels (RGB), got {c}")
    return check_x2(img, str(path))[0]


# -- pre-processing ------------------------------------------------------------------------------

def pad_to_multiple(x: np.ndarray, multiple: int = SIZE_MULTIPLE) -> np.ndarray:
    """Reflect-pad the bottom and right of [B, H, W(, C)] so H and W are multiples of `multiple`."""
    h, w = x.shape[1], x.shape[2]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return x
    pad = [(0, 0), (0, ph), (0, pw)] + [(0, 0)] * (x.ndim - 3)
    return np.pad(x, pad, mode="reflect")


def rgb_to_model(x: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1] (ToTensor, Normalize(0.5, 0.5))."""
    f = x.astype(np.float32) / np.float32(255.0)
    f = (f - np.float32(0.5)) / np.float32(0.5)
    return np.ascontiguousarray(f.transpose(0, 3, 1, 2))


def sketch_to_model(x: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W] -> float32 [B, 1, H, W] in [0, 1]."""
    return np.ascontiguousarray((x.astype(np.float32) / np.float32(255.0))[:, None])


def mask_to_model(x: np.ndarray) -> np.ndarray:
    """uint8 labels [B, H, W] (0..18) -> float32 one-hot [B, 19, H, W]."""
    classes = np.arange(N_MASK_CLASSES, dtype=x.dtype).reshape(1, -1, 1, 1)
    return (x[:, None] == classes).astype(np.float32)


def to_uint8(y: np.ndarray) -> np.ndarray:
    """float [B, 3, H, W] (unclamped generator output) -> uint8 [B, H, W, 3]: clamp to [-1, 1],
    then ((y + 1) * 127.5) truncated, as the official scripts (spec 8.17)."""
    y = np.clip(y.astype(np.float32, copy=False), np.float32(-1.0), np.float32(1.0))
    u = ((y + np.float32(1.0)) * np.float32(127.5)).astype(np.uint8)
    return np.ascontiguousarray(u.transpose(0, 2, 3, 1))


def crop_output(y: np.ndarray, height: int, width: int) -> np.ndarray:
    """[B, C, >=4H, >=4W] -> [B, C, 4H, 4W] (undo the bottom/right padding)."""
    return y[:, :, : height * OUTPUT_SCALE, : width * OUTPUT_SCALE]


def centre_square_x2(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> [256, 256, 3]: the centred square of side min(H, W), resized (INTER_AREA
    when shrinking, INTER_CUBIC when enlarging). A stand-in for the official FFHQ face alignment,
    which needs a landmark detector; it is right when the face fills the centre of the frame."""
    cv2 = _cv2()
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    sq = np.ascontiguousarray(image[top:top + s, left:left + s])
    if s == ALIGNED_SIZE:
        return sq
    interp = cv2.INTER_AREA if s > ALIGNED_SIZE else cv2.INTER_CUBIC
    return cv2.resize(sq, (ALIGNED_SIZE, ALIGNED_SIZE), interpolation=interp)


def resize_for_scale(image: np.ndarray, scale: int) -> np.ndarray:
    """Superres x1: the LR input resized by scale/4 with OpenCV bicubic (INTER_CUBIC), so the 4x
    generator output is `scale` x the input. (The official script uses PIL bicubic after its own
    face crop; the values differ slightly.) [h, w, 3] -> [round(h*scale/4), round(w*scale/4), 3]."""
    cv2 = _cv2()
    h, w = image.shape[:2]
    nh, nw = int(round(h * scale / OUTPUT_SCALE)), int(round(w * scale / OUTPUT_SCALE))
    if (nh, nw) == (h, w):
        return image
    return cv2.resize(image, (nw, nh), interpolation=cv2.INTER_CUBIC)
