"""sgex-run: Run one StyleGANEX task on an image, a folder of images or a video.

Thin CLI: parse, check every input and the output path before any model is loaded (a bad input
exits 2 with one line on stderr and writes nothing), build a `runtime.Engine`, stream the work.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from pathlib import Path

from runtime._cli import Parser, run_main, setup_logging
from runtime.errors import SgexError
from runtime.tasks import TASKS, WIDTH_DIVS, get_task

log = logging.getLogger("sgex-run")

PROG = "sgex-run"

EPILOG = """\
examples:
  # ONNX Runtime / TensorRT on exported artifacts (sgex-export --task superres --out artifacts)
  sgex-run --task superres --artifacts artifacts/superres --input lr.png --output sr.png --scale 16
  # PyTorch straight from an official checkpoint, a whole video (style from the first frame)
  sgex-run --task toonify --backend torch --ckpt pretrained_models/styleganex_toonify_pixar.pt \\
           --input clip.mp4 --output clip_pixar.mp4 --device cuda
  # attribute editing with the web-UI sign (the web UI applies -scale): web slider 2 -> --edit-scale -2
  sgex-run --task edit --artifacts artifacts/edit --input face.jpg --output edited.jpg --edit-scale -2
  # sketch / parsing mask (1-channel label PNG, values 0..18) to face; --seed picks z and the noise
  sgex-run --task sketch2face --artifacts artifacts/sketch2face --input sketch.jpg --output face.png --seed 3
  # a folder of images (the output is a folder), random weights (the output is noise: a smoke test)
  sgex-run --task inversion --backend torch --random-weights --input faces/ --output out/

notes:
  The output is 4x the model input (x1). superres: x1 = the input resized by S/4 with OpenCV
  bicubic (INTER_CUBIC), so the output is S x the input; the official script uses PIL bicubic
  after its own face crop and LR degradation. Without --x2, the aligned face x2 that the style
  code comes from is the centre square of x1 resized to 256x256; that is right only when the face
  fills the centre of the frame (real FFHQ face alignment needs a landmark detector; give an
  aligned 256x256 face with --x2 for official-quality results). Inputs of any size are padded to a
  multiple of 32 (reflect) and the output is cropped back to exactly 4x.
  Noise and z come from --seed (numpy default_rng per image, the same for every image and frame).
"""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0].split(": ", 1)[1],
               epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=list(TASKS), help="what to run")
    p.add_argument("--input", required=True, metavar="PATH",
                   help="an image, a folder of images, or a video (mp4/avi/mov/mkv/webm/...)")
    p.add_argument("--output", required=True, metavar="PATH",
                   help="image file, folder (for a folder input; created if missing) or video file")
    p.add_argument("--backend", default="auto", choices=["auto", "ort", "trt", "torch"],
                   help="auto: trt when --artifacts has TensorRT engines and tensorrt imports, else ort; "
                        "torch with --ckpt/--random-weights (default: auto, logged)")
    p.add_argument("--artifacts", metavar="DIR", help="exported task directory (or the export root) for ort/trt")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", metavar="FILE", help="official checkpoint for the torch backend")
    src.add_argument("--random-weights", action="store_true",
                     help="torch backend with random official-format weights (the output is noise)")
    p.add_argument("--width-div", type=int, default=1, choices=WIDTH_DIVS, metavar="N",
                   help=f"with --random-weights: divide every channel count by N, one of "
                        f"{', '.join(map(str, WIDTH_DIVS))} (tiny demo models; default 1)")
    p.add_argument("--variant", help="checkpoint variant (superres: sr|sr32; edit: hair|age; "
                                     "toonify: cartoon|arcane|pixar); checked against the artifacts/checkpoint")
    p.add_argument("--scale", type=int, metavar="S",
                   help="superres only: output = S x input (sr: 4..48 step 4; sr32: 32). Default: the "
                        "variant's smallest (sr: 4, the input is x1 as is; sr32: 32), logged")
    p.add_argument("--x2", metavar="ALIGNED_PNG",
                   help="aligned 256x256 face for the style code (RGB tasks; default: centre square of x1)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the noise maps and of z, an integer >= 0 (default 0)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when the backend finds one, logged)")
    p.add_argument("--edit-scale", type=float, metavar="F",
                   help="edit only: editing_w x F, a finite number (default +1.0 as video_editing.py; "
                        "the web UI uses -F)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_main(PROG, lambda: run(args))


def _backend_source(args) -> str:
    """"artifacts" or "checkpoint", checking the backend/source flags agree."""
    has_ckpt = bool(args.ckpt or args.random_weights)
    if args.backend == "torch":
        if args.artifacts:
            raise SgexError("--backend torch runs a checkpoint: give --ckpt FILE or --random-weights, not --artifacts")
        if not has_ckpt:
            raise SgexError("--backend torch needs --ckpt FILE or --random-weights")
        return "checkpoint"
    if args.backend in ("ort", "trt"):
        if has_ckpt:
            raise SgexError(f"--backend {args.backend} runs exported artifacts: give --artifacts DIR, "
                            f"not --ckpt/--random-weights (or use --backend torch)")
        if not args.artifacts:
            raise SgexError(f"--backend {args.backend} needs --artifacts DIR (export with sgex-export)")
        return "artifacts"
    if args.artifacts and has_ckpt:
        raise SgexError("give either --artifacts (ort/trt) or --ckpt/--random-weights (torch), not both")
    if not args.artifacts and not has_ckpt:
        raise SgexError("give --artifacts DIR (ort/trt) or --ckpt FILE / --random-weights (torch)")
    if has_ckpt:
        return "checkpoint"
    return "artifacts"


def _check_task_flags(args, spec) -> None:
    if args.scale is not None and spec.name != "superres":
        raise SgexError(f"--scale applies to superres only, not {spec.name}")
    if args.edit_scale is not None and not spec.editing:
        raise SgexError(f"--edit-scale applies to edit only, not {spec.name}")
    if args.x2 and "style" not in spec.graphs:
        raise SgexError(f"--x2 applies to RGB tasks only; {spec.name} takes a {spec.input_kind}")
    if args.variant is not None:
        spec.variant(args.variant)
    if args.width_div != 1 and not args.random_weights:
        raise SgexError("--width-div applies to --random-weights only")
    if args.seed < 0:
        raise SgexError(f"--seed must be an integer >= 0 (a numpy seed), got {args.seed}")
    if args.edit_scale is not None and not math.isfinite(args.edit_scale):
        raise SgexError(f"--edit-scale must be a finite number, got {args.edit_scale}")
    if args.device is not None and not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        raise SgexError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if args.scale is not None:
        variants = [spec.variant(args.variant)] if args.variant or args.random_weights else spec.variants
        allowed = sorted({s for v in variants for s in v.scales})
        if args.scale not in allowed:
            which = f" variant {variants[0].name}" if len(variants) == 1 else ""
            raise SgexError(f"--scale {args.scale} is not available for superres{which} ({_shown(allowed)})")


def _input_kind(path: Path) -> str:
    from runtime import io as rio

    if not path.exists():
        raise SgexError(f"{path}: no such file or folder")
    if path.is_dir():
        return "folder"
    return "video" if rio.is_video_path(path) else "image"


def run(args) -> int:
    from runtime import io as rio

    spec = get_task(args.task)
    source = _backend_source(args)
    _check_task_flags(args, spec)
    inp, out = Path(args.input), Path(args.output)
    kind = _input_kind(inp)
    rio.check_output_path(out, kind)
    if out.exists() and out.resolve() == inp.resolve():
        raise SgexError(f"{out}: the output would overwrite the input")

    # Every input is read and checked before a model is loaded.
    x2 = rio.read_x2(args.x2) if args.x2 else None
    reader = image = files = None
    sizes = []  # (what, height, width) of every input, for the bucket check
    if kind == "image":
        image = rio.task_image(rio.read_image(inp), spec, str(inp))
        sizes.append((str(inp), *image.shape[:2]))
    elif kind == "folder":
        files = rio.list_images(inp)
        for f in files:
            sizes.append((str(f), *rio.task_image(rio.read_image(f), spec, str(f)).shape[:2]))
    else:
        from runtime.video import VideoReader

        reader = VideoReader(inp)
        sizes.append((f"{inp}: frame 0", *rio.task_image(reader.first, spec, f"{inp}: frame 0").shape[:2]))

    try:
        if source == "artifacts":
            _check_artifacts(args, spec, sizes)
        engine = _engine(args, source)
        scale = _scale(args, engine)
        prep = (lambda im: rio.resize_for_scale(im, scale)) if scale else (lambda im: im)
        edit_scale = 1.0 if args.edit_scale is None else args.edit_scale
        opts = dict(x2=x2, seed=args.seed, edit_scale=edit_scale)
        if kind == "image":
            y = engine.process(prep(image), **opts)
            rio.write_image(out, y)
            log.info("wrote %s (%dx%d)", out, y.shape[1], y.shape[0])
        elif kind == "folder":
            _run_folder(engine, files, out, prep, opts)
        else:
            from runtime.video import write_video

            frames = (prep(f) for f in reader)
            n = write_video(out, engine.process_video(frames, **opts), reader.info.fps,
                            total=reader.info.frames)
            log.info("wrote %s (%d frames at %.3g fps)", out, n, reader.info.fps)
    finally:
        if reader is not None:
            reader.close()
    return 0


def _engine(args, source: str):
    from runtime.engine import Engine

    if source == "artifacts":  # the variant was checked by _check_artifacts
        return Engine(args.artifacts, backend=args.backend, device=args.device, task=args.task)
    engine = Engine.from_checkpoint(args.task, ckpt=args.ckpt, random_weights=args.random_weights,
                                    device=args.device, width_div=args.width_div, variant=args.variant)
    if args.backend == "auto":  # logged once the engine exists, so a refused input stays one line
        log.info("backend auto -> torch (a checkpoint was given, not --artifacts)")
    return engine


def _shown(allowed) -> str:
    return f"{allowed[0]}..{allowed[-1]} step 4" if len(allowed) > 1 else str(allowed[0])


def _check_artifacts(args, spec, sizes) -> None:
    """What the artifacts' manifest decides, checked before a model loads: the variant, the
    TensorRT engines for --backend trt, --scale, and that every input fits an exported bucket."""
    from runtime import io as rio
    from runtime.buckets import pick
    from runtime.engine import task_dir
    from runtime.manifest import Manifest

    d = task_dir(args.artifacts, args.task)
    m = Manifest.load(d, task=args.task)
    if args.variant is not None and m.variant != args.variant:
        raise SgexError(f"{args.artifacts}: artifacts of variant {m.variant!r}, not {args.variant!r}")
    if args.backend == "trt":
        if not m.engines:
            raise SgexError(f"{d}: the manifest lists no TensorRT engines (build them with sgex-export "
                            f"... --engine, or use --backend ort)")
        from runtime.backends.trt import import_cudart, import_tensorrt

        import_tensorrt()
        import_cudart()
    scale = None
    if spec.name == "superres":
        allowed = spec.variant(m.variant).scales
        scale = allowed[0] if args.scale is None else args.scale
        if scale not in allowed:
            raise SgexError(f"--scale {scale} is not available for superres variant {m.variant} ({_shown(allowed)})")
    buckets = m.buckets()
    for what, h, w in sizes:
        hs, ws = rio.scaled_size(h, w, scale) if scale else (h, w)
        try:
            pick(buckets, hs, ws)
        except ValueError as e:
            at = f" (x1 {hs}x{ws} at --scale {scale})" if (hs, ws) != (h, w) else ""
            raise SgexError(f"{what}{at}: {e}") from None


def _scale(args, engine) -> int | None:
    if engine.spec.name != "superres":
        return None
    allowed = engine.spec.variant(engine.variant).scales
    if args.scale is None:
        # No resize unless asked: the smallest scale of the variant (sr: 4 = the input is x1).
        scale = allowed[0]
        log.info("--scale not given: using %d for superres variant %s (output = %d x input)",
                 scale, engine.variant, scale)
    else:
        scale = args.scale
    if scale not in allowed:
        raise SgexError(f"--scale {scale} is not available for superres variant {engine.variant} ({_shown(allowed)})")
    return scale


def _run_folder(engine, files, out: Path, prep, opts) -> None:
    """Every result is staged and moved into `out` only when all succeeded (io.staged_folder)."""
    from runtime import io as rio
    from runtime.video import Progress

    bar = Progress(len(files), "images")
    try:
        with rio.staged_folder(out) as stage:
            for f in files:
                img = rio.task_image(rio.read_image(f), engine.spec, str(f))
                rio.write_image(stage / f.name, engine.process(prep(img), **opts))
                bar.update()
    finally:
        bar.close()
    log.info("wrote %d images to %s", len(files), out)


if __name__ == "__main__":
    raise SystemExit(main())
