"""Image I/O and the pre/post-processing every backend shares (numpy + OpenCV; no torch).

Conventions: images in memory are uint8, RGB, HWC (a batch is BHWC); model tensors are float32
NCHW. The numbers follow the official inference scripts (spec/styleganex.md 4.0 and 8.17):

    RGB  x in [-1, 1]:  (u8 / 255 - 0.5) / 0.5         (ToTensor then Normalize(0.5, 0.5))
    sketch x in [0, 1]: u8 / 255, one channel          (not normalised to [-1, 1], spec 8.7)
    mask:               label map 0..18 -> one-hot [19, H, W] of 0.0/1.0
    output:             clamp to [-1, 1], then ((y + 1) * 127.5).astype(uint8): truncation, no rounding

Sizes (spec 5): x1 sides must be multiples of 8, as the official crop makes them. An input whose
sides are multiples of 8 reaches the model at exactly its size (padding would change the whole
output, not only the border); only a side that is not a multiple of 8 is padded, bottom/right
with reflection, and the 4x output is cropped back to 4H x 4W, so any H, W works and the output
is exactly 4x the input.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from runtime.errors import SgexError
from runtime.image_header import FORMATS, Header, read_header
from runtime.tasks import ALIGNED_SIZE, N_MASK_CLASSES, OUTPUT_SCALE, SIZE_MULTIPLE, Task

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
VIDEO_EXTS = (".mp4", ".m4v", ".avi", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv")

__all__ = [
    "IMAGE_EXTS", "VIDEO_EXTS", "MAX_IMAGE_PIXELS", "is_image_path", "is_video_path", "check_input_file",
    "image_header", "read_image", "decode_image", "encode_image", "write_image",
    "list_images", "check_output_path", "atomic_output", "staged_folder", "write_all", "task_image", "check_batch",
    "pad_to_multiple", "rgb_to_model", "sketch_to_model", "mask_to_model", "to_uint8", "centre_square_x2",
    "resize_for_scale", "check_x2", "check_input_file", "read_x2", "crop_output", "bicubic_downsample",
    "simulate_lr", "x1_size",
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


MAX_IMAGE_PIXELS = 1 << 26  # 67,108,864 pixels (8192 x 8192): 192 MiB decoded as RGB
MAX_IMAGE_BYTES = 8 * MAX_IMAGE_PIXELS  # a file larger than this is refused before it is read


def image_header(path: str | os.PathLike) -> Header:
    """The format and size an image file declares in its header, checked against the limits
    before a pixel is decoded: SgexError (one line) for a missing, empty, oversized or
    unrecognised file, and for an image above MAX_IMAGE_PIXELS."""
    p = check_input_file(path, "an image")
    size = p.stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise SgexError(f"{p}: {size} bytes is larger than any image sgex reads (limit {MAX_IMAGE_BYTES} bytes)")
    with open(p, "rb") as f:
        head = read_header(f)
    if head is None:
        raise SgexError(f"{p}: not an image sgex can read ({', '.join(FORMATS)}), or its header is damaged")
    if head.width < 1 or head.height < 1:
        raise SgexError(f"{p}: the {head.format} header declares an empty image {head.width}x{head.height}")
    if head.pixels > MAX_IMAGE_PIXELS:
        raise SgexError(f"{p}: the {head.format} header declares {head.width}x{head.height} = {head.pixels} "
                        f"pixels, above sgex's limit of {MAX_IMAGE_PIXELS} (8192x8192); nothing was decoded")
    if head.bit_depth is not None and head.bit_depth > 8:
        raise SgexError(f"{p}: {head.bit_depth}-bit samples; sgex reads 8-bit images")
    return head


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an 8-bit image file as stored: uint8 [H, W] (grey) or [H, W, 3] RGB or [H, W, 4] RGBA.

    The header's size is checked against MAX_IMAGE_PIXELS before decoding (image_header).
    SgexError (one line) for a missing, empty, oversized, undecodable or non-8-bit file."""
    head = image_header(path)
    p = Path(path)
    img = decode_image(np.fromfile(p, dtype=np.uint8), str(p))  # from memory: no OpenCV path warnings
    if img.shape[:2] != (head.height, head.width):
        raise SgexError(f"{p}: decoded {img.shape[1]}x{img.shape[0]}, but the {head.format} header declares "
                        f"{head.width}x{head.height}")
    return img


def decode_image(data: bytes | np.ndarray, what: str = "image") -> np.ndarray:
    """Decode the bytes of an 8-bit image file, as `read_image` (uint8 [H, W], RGB [H, W, 3] or
    RGBA [H, W, 4]); SgexError naming `what` for undecodable or non-8-bit data."""
    cv2 = _cv2()
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    if img is None:
        raise SgexError(f"{what}: not an image OpenCV can decode (damaged or truncated)")
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


TEMP_PREFIX = ".sgex-"  # every temp output is ".sgex-<random>.tmp<ext>": at most ~40 bytes whatever
MAX_TEMP_SUFFIX = 16    # the output name (NAME_MAX is 255), so a legal output name always has a temp


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable; filesystems that cannot fsync a directory are skipped."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_all(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write `data` to `path` with os.write until every byte is out (a short write is retried;
    ENOSPC and other errors raise OSError)."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        view = memoryview(data).cast("B")
        while view:
            n = os.write(fd, view)
            view = view[n:]
    finally:
        os.close(fd)


class atomic_output:
    """Context manager yielding a temp path beside `path`; the one writer discipline of sgex.

        with atomic_output("out.mp4", verify=check_frames) as tmp:
            encode(tmp)

    The temp file is `.sgex-<random>.tmp<ext>` in the output's folder (same filesystem, so the
    rename is atomic; the same extension, so encoders pick the right format; short, so any legal
    output name works). On success: the file is fsync'd, `verify(tmp)` runs when given (it raises
    to refuse the result), the file gets the usual umask mode, is renamed over `path`, and the
    folder is fsync'd. On any error, KeyboardInterrupt and termination signals included, the temp
    file is removed and an existing `path` is left untouched. An OSError while writing (disk full,
    quota, I/O error) becomes one SgexError line naming the output."""

    def __init__(self, path: str | os.PathLike, verify: Callable[[Path], None] | None = None):
        self.path = Path(path)
        self.verify = verify
        self.tmp: Path | None = None

    def _failed(self, e: OSError) -> SgexError:
        kept = "; the existing file is unchanged" if self.path.exists() else ""
        return SgexError(f"{self.path}: writing failed ({e.strerror or e}){kept}")

    def __enter__(self) -> Path:
        parent = self.path.parent if str(self.path.parent) else Path(".")
        try:
            fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=f".tmp{self.path.suffix[:MAX_TEMP_SUFFIX]}",
                                       dir=parent)
        except OSError as e:
            raise self._failed(e) from None
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise self._failed(exc) from None
            return False
        try:
            if not self.tmp.exists() or self.tmp.stat().st_size == 0:
                raise SgexError(f"{self.path}: nothing was written")
            fd = os.open(self.tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if self.verify is not None:
                self.verify(self.tmp)
            os.chmod(self.tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
            os.replace(self.tmp, self.path)
            _fsync_dir(self.tmp.parent)
        except OSError as e:
            self.tmp.unlink(missing_ok=True)
            raise self._failed(e) from None
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
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
    """Encode uint8 RGB [H, W, 3] (or grey [H, W]) by the extension of `path`, written atomically
    (atomic_output); the encoded bytes are decoded again before the rename, so a written image
    always decodes."""
    p = Path(path)
    data = encode_image(image, p.suffix, str(p))

    def verify(tmp: Path) -> None:
        back = decode_image(np.fromfile(tmp, dtype=np.uint8), str(p))
        if back.shape[:2] != image.shape[:2]:
            raise SgexError(f"{p}: the written file does not decode back to a {image.shape[1]}x{image.shape[0]} image")

    with atomic_output(p, verify=verify) as tmp:
        write_all(tmp, data)
    return p


class staged_folder:
    """Context manager for a run that writes many files into the folder `out`: it yields a
    staging folder (`out/.sgex-<random>/`); only when the whole block succeeds are the staged files
    renamed into `out` (each rename atomic, the folder fsync'd). On any error, KeyboardInterrupt and
    termination signals included, the staging folder is removed, no new file appears in `out`, no
    existing file there is replaced, and an `out` this run created is removed again."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.stage: Path | None = None
        self._created = False

    def __enter__(self) -> Path:
        self._created = not self.out.exists()
        try:
            self.out.mkdir(exist_ok=True)
            self.stage = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=self.out))
        except OSError as e:
            self._undo()
            raise SgexError(f"{self.out}: cannot create the output folder ({e.strerror or e})") from None
        return self.stage

    def _undo(self) -> None:
        import shutil

        if self.stage is not None:
            shutil.rmtree(self.stage, ignore_errors=True)
        if self._created:
            try:
                self.out.rmdir()  # only when empty: never removes anything but what this run made
            except OSError:
                pass

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._undo()
            return False
        try:
            staged = sorted(p for p in self.stage.iterdir())
            clash = [p.name for p in staged if (self.out / p.name).is_dir()]
            if clash:
                raise SgexError(f"{self.out / clash[0]}: is a directory; an output file of that name "
                                f"cannot replace it (nothing was written)")
            for p in staged:
                os.replace(p, self.out / p.name)
            self.stage.rmdir()
            _fsync_dir(self.out)
        except OSError as e:
            self._undo()
            raise SgexError(f"{self.out}: writing the results failed ({e.strerror or e})") from None
        except BaseException:
            self._undo()
            raise
        return False


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
    if not isinstance(image, np.ndarray):
        raise SgexError(f"{what}: expected a numpy uint8 image, got {type(image).__name__}")
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
    """Reflect-pad the bottom and right of [B, H, W(, C)] so H and W are multiples of `multiple`
    (8); returns `x` itself when both already are, and pads only the side that is not."""
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
    """[B, C, >=4H, >=4W] -> [B, C, 4H, 4W] (undo the bottom/right padding; `y` itself when
    nothing was padded)."""
    if y.shape[2] == height * OUTPUT_SCALE and y.shape[3] == width * OUTPUT_SCALE:
        return y
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


def x1_size(height: int, width: int, scale: int | None, simulate_lr: bool = False) -> tuple[int, int]:
    """The x1 size sgex-run makes from an input of height x width: (h*scale//4, w*scale//4) for
    superres (resize_for_scale), the input size with simulate_lr or without a scale."""
    from runtime.recipes import pre_resize_size

    if scale is None or simulate_lr:
        return height, width
    return pre_resize_size(height, width, scale)


def resize_for_scale(image: np.ndarray, scale: int) -> np.ndarray:
    """Superres x1 from an LR image, as image_translation.py's raw path (spec 4.1): PIL bicubic to
    (w*scale//4, h*scale//4) (floor sizes), so the 4x generator output is `scale` x the input.
    [h, w, 3] -> [h*scale//4, w*scale//4, 3]; the image itself when the size does not change. (The
    official script then applies its face crop; sgex-run takes the result as x1.)"""
    h, w = image.shape[:2]
    nh, nw = x1_size(h, w, scale)
    if (nh, nw) == (h, w):
        return image
    if min(nh, nw) < 1:
        raise SgexError(f"input {h}x{w} at --scale {scale} gives an empty x1 ({nh}x{nw})")
    from runtime.faces import pil_resize

    return pil_resize(image, nh, nw)


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter a (spec 4.1: a = -0.5)."""
    x = np.abs(x)
    return np.where(x <= 1, (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1,
                    np.where(x < 2, a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a, 0.0))


def bicubic_downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """The official BicubicDownSample (spec 4.1) of uint8 RGB [H, W, 3] by an integer `factor`
    -> uint8 [H//factor, W//factor, 3].

    Separable kernel of 4*factor taps k(i) = cubic((i - 2*factor + 0.5) / factor), a = -0.5,
    normalised to sum 1; reflect padding of 3*factor per axis (top/left: half, floored); stride
    `factor`; the vertical pass then the horizontal pass, in float32 on x/255; the result clamped to
    [0, 1] and converted with x255 and truncation. factor 1 is a 4-tap half-pixel shift, not the
    identity."""
    if factor < 1:
        raise SgexError(f"downsample factor must be >= 1, got {factor}")
    size = 4 * factor
    taps = _cubic((np.arange(size, dtype=np.float64) - size // 2 + 0.5) / factor)
    k = (taps / taps.sum()).astype(np.float32)
    pad = size - factor
    lo, hi = pad // 2, pad - pad // 2
    x = image.astype(np.float32) / np.float32(255.0)  # [H, W, 3]
    h, w = x.shape[:2]
    if min(h, w) <= hi:
        raise SgexError(f"image {h}x{w} is too small to downsample by {factor}")
    out_h, out_w = (h + pad - size) // factor + 1, (w + pad - size) // factor + 1
    x = np.pad(x, ((lo, hi), (0, 0), (0, 0)), mode="reflect")
    rows = np.arange(out_h)[:, None] * factor + np.arange(size)[None, :]  # [out_h, size]
    x = np.einsum("osc,s->oc", x[rows].reshape(out_h, size, -1), k).reshape(out_h, w, 3)
    x = np.pad(x, ((0, 0), (lo, hi), (0, 0)), mode="reflect")
    cols = np.arange(out_w)[:, None] * factor + np.arange(size)[None, :]
    x = np.einsum("hosc,s->hoc", x[:, cols], k)
    return (np.clip(x, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)


def simulate_lr(image: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """The official super-resolution demo path (spec 4.1 default path) on an HR image uint8
    [H, W, 3]: LR = bicubic_downsample(image, scale // 4), then x1 = LR resized back to (W, H) with
    PIL bicubic. Returns (x1 [H, W, 3], LR [H//f, W//f, 3]); the output of x1 is 4H x 4W, i.e.
    `scale` x the LR."""
    from runtime.faces import pil_resize

    lr = bicubic_downsample(image, scale // OUTPUT_SCALE)
    h, w = image.shape[:2]
    return pil_resize(lr, h, w), lr
