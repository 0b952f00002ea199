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
from runtime.video import DEFAULT_CRF

log = logging.getLogger("sgex-run")

PROG = "sgex-run"

EPILOG = """\
examples:
  # ONNX Runtime / TensorRT on exported artifacts (sgex-export --task superres --out artifacts)
  sgex-run --task superres --artifacts artifacts/superres --input lr.png --output sr.png --scale 16
  # the paper's demo path: degrade an HR crop to LR (official BicubicDownSample), then super-resolve
  sgex-run --task superres --artifacts artifacts/superres --input crop.png --output sr.png --no-align --simulate-lr --scale 32
  # PyTorch straight from an official checkpoint, a whole video (style from the first frame)
  sgex-run --task toonify --backend torch --ckpt pretrained_models/styleganex_toonify_pixar.pt \\
           --input clip.mp4 --output clip_pixar.mp4 --device cuda
  # H.264 at crf 20 with the source's audio copied, 4 frames per engine call (needs the video extra)
  sgex-run --task toonify --artifacts artifacts/toonify --input clip.mov --output toon.mp4 --batch 4 --crf 20
  # attribute editing with the web-UI sign (the web UI applies -scale): web slider 2 -> --edit-scale -2
  sgex-run --task edit --artifacts artifacts/edit --input face.jpg --output edited.jpg --edit-scale -2
  # sketch / parsing mask (1-channel label PNG, values 0..18) to face; --seed picks z and the noise
  sgex-run --task sketch2face --artifacts artifacts/sketch2face --input sketch.jpg --output face.png --seed 3
  # OpenVINO on the CPU in BF16 (the export needs a passing gate: sgex-calib --bf16 --artifacts DIR)
  sgex-run --task superres --artifacts artifacts/superres --backend openvino --precision bf16 \
           --input lr.png --output sr.png --scale 16
  # a folder of images (the output is a folder), random weights (the output is noise: a smoke test)
  sgex-run --task inversion --backend torch --random-weights --input faces/ --output out/
  # every face of a group photo, pasted back into the whole frame; a moving face followed in a video
  sgex-run --task toonify --ckpt styleganex_toonify_pixar.pt --input group.jpg --output toon.png --faces all --paste-back
  sgex-run --task toonify --ckpt styleganex_toonify_pixar.pt --input clip.mp4 --output out.mp4 --track --paste-back
  # landmarks from another detector (68 dlib-order or 5 points), or an input that is already a crop
  sgex-run --task superres --ckpt styleganex_sr.pt --input lr.png --output sr.png --landmarks lr.json
  sgex-run --task inversion --ckpt styleganex_inversion.pt --input crop.png --output inv.png --no-align

notes:
  RGB tasks (superres, edit, toonify, inversion) run the official recipe on a real photo or video
  (spec 4.0): dlib finds the faces (best first), the frame is rescaled so the eyes are 64 px apart
  and cropped +-256 px around them (x1, sides multiples of 8), and the face is FFHQ-aligned to
  256x256 (x2, the style source); the output is 4x the crop. superres first resizes the input by
  S/4 with PIL bicubic (image_translation.py --use_raw_data). Videos take the crop and x2 of the
  first frame (--track follows a moving face). No face found: exit 2, nothing written.
  --no-align keeps the whole image as x1: superres then resizes it to (w*S//4, h*S//4) with PIL
  bicubic, and without --x2 the style code comes from the centre square of x1 resized to 256.
  --simulate-lr (superres, with --no-align): the input is an HR image, first degraded as the
  official demo does (BicubicDownSample by S/4, then PIL bicubic back to the input size); the
  output is 4x the input (S x the simulated LR).
  Sizes: an x1 whose sides are multiples of 8 (what the official face crop gives) runs at exactly
  its size; only a side that is not is padded bottom/right to the next multiple of 8 (reflect) and
  the output cropped back, so the output is exactly 4x. Exported artifacts take x1 up to --res/4
  of their largest bucket (--res is the output side).
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
    p.add_argument("--backend", default="auto", choices=["auto", "ort", "trt", "openvino", "torch"],
                   help="auto: trt when --artifacts has TensorRT engines and tensorrt imports, else on the "
                        "CPU openvino bf16 when the export passed the BF16 gate and the CPU has native "
                        "BF16, else ort; torch with --ckpt/--random-weights (default: auto, logged)")
    p.add_argument("--precision", choices=["fp32", "bf16"],
                   help="openvino only: inference precision (default fp32; bf16 needs a passing BF16 gate)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="ort/openvino: CPU threads (default: ONNX Runtime's own; openvino: the CPUs this "
                        "process may run on)")
    p.add_argument("--force-precision", action="store_true",
                   help="openvino only: run bf16 on an export without a passing BF16 gate (warned)")
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
    p.add_argument("--simulate-lr", action="store_true",
                   help="superres only: the input is an HR image; make its LR as the official demo does "
                        "(BicubicDownSample by S/4, then PIL bicubic back up) and super-resolve that "
                        "(default --scale 32 then, the official resize_factor)")
    p.add_argument("--x2", metavar="ALIGNED_PNG",
                   help="aligned 256x256 face for the style code (RGB tasks; default: centre square of x1)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the noise maps and of z, an integer >= 0 (default 0)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when the backend finds one, logged)")
    p.add_argument("--edit-scale", type=float, metavar="F",
                   help="edit only: editing_w x F, a finite number (default +1.0 as video_editing.py; "
                        "the web UI uses -F)")
    v = p.add_argument_group("video (PyAV, extra 'video'; without it OpenCV writes mp4v and drops the audio)")
    v.add_argument("--batch", type=int, default=1, metavar="N",
                   help="frames per engine call (default 1); decode and encode run in their own threads")
    v.add_argument("--crf", type=int, metavar="Q",
                   help=f"encoder quality, lower is better (libx264 0..51, 0 = lossless; default {DEFAULT_CRF})")
    v.add_argument("--codec", metavar="NAME",
                   help="FFmpeg video encoder (default: libx264 for mp4/mov/mkv/avi, libvpx-vp9 for webm; logged "
                        "if the build lacks it); the source's audio is copied as is")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _add_face_flags(p)
    return p


def _add_face_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "faces", "RGB tasks run the official recipe by default (spec 4.0): dlib finds the face, the frame is "
                 "rescaled so the eyes are 64 px apart and cropped +-256 px around them (x1), the face is "
                 "FFHQ-aligned to 256x256 (x2, the style source). Needs sgex[faces].")
    g.add_argument("--no-align", action="store_true",
                   help="no detection, crop or alignment: the whole image is x1 (for inputs that are already crops)")
    g.add_argument("--faces", default="best", metavar="best|all|N",
                   help="which detected faces to process, best first (score, then size); default best. "
                        "Several faces without --paste-back write OUTPUT_face0.png, OUTPUT_face1.png, ...")
    g.add_argument("--paste-back", action="store_true",
                   help="output the whole frame at the best face's output scale (the source upscaled bicubic) "
                        "with every processed face blended back over its crop box")
    g.add_argument("--track", action="store_true",
                   help="video: re-detect every frame and follow the face (moving average of the eye centre, "
                        "runtime.faces.TRACK_ALPHA); default: the first frame's crop for every frame, as the official code")
    g.add_argument("--landmarks", metavar="FILE.json",
                   help="face points from another detector instead of dlib: a list of 68 (dlib order) or 5 "
                        "(eye centres, nose tip, mouth corners) [x, y] pairs, or a list of such lists")


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
    if args.threads is not None and args.threads < 1:
        raise SgexError(f"--threads must be >= 1, got {args.threads}")
    if (args.precision or args.force_precision) and args.backend not in ("auto", "openvino"):
        raise SgexError(f"--precision/--force-precision apply to --backend openvino, not {args.backend}")
    if args.backend in ("ort", "trt", "openvino"):
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
    if args.simulate_lr and spec.name != "superres":
        raise SgexError(f"--simulate-lr applies to superres only, not {spec.name}")
    if args.simulate_lr and not args.no_align:
        raise SgexError("--simulate-lr degrades an image that is already the face crop: add --no-align "
                        "(degrading inside the face pipeline is not implemented)")
    if args.edit_scale is not None and not spec.editing:
        raise SgexError(f"--edit-scale applies to edit only, not {spec.name}")
    if args.x2 and "style" not in spec.graphs:
        raise SgexError(f"--x2 applies to RGB tasks only; {spec.name} takes a {spec.input_kind}")
    if args.variant is not None:
        spec.variant(args.variant)
    if args.width_div != 1 and not args.random_weights:
        raise SgexError("--width-div applies to --random-weights only")
    if args.batch < 1:
        raise SgexError(f"--batch must be >= 1, got {args.batch}")
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
    if kind != "video" and (args.crf is not None or args.codec is not None or args.batch != 1):
        raise SgexError("--batch, --crf and --codec apply to a video input only")
    x2 = rio.read_x2(args.x2) if args.x2 else None
    face_opts = _face_options(args, spec, kind, x2)
    if source == "artifacts":
        _check_manifest(args, spec)
    reader = image = files = encoding = None
    selected: dict = {}
    sizes = []  # (name, height, width) of every whole-image input, for the bucket check
    if kind == "image":
        image = rio.task_image(rio.read_image(inp), spec, str(inp))
        sizes.append((str(inp), *image.shape[:2]))
        if face_opts is not None:
            face_opts = _with_landmarks(face_opts, args, image.shape)
            selected[inp] = _find_faces(image, face_opts, str(inp))
    elif kind == "folder":
        files = rio.list_images(inp)
        for f in files:
            img = rio.task_image(rio.read_image(f), spec, str(f))
            sizes.append((str(f), *img.shape[:2]))
            if face_opts is not None:
                selected[f] = _find_faces(img, face_opts, str(f))
    else:
        from runtime.video import VideoReader, resolve_encoding

        reader = VideoReader(inp)
        reader.check_complete()
        sizes.append((str(inp), *rio.task_image(reader.first, spec, f"{inp}: frame 0").shape[:2]))
        if face_opts is not None:
            face_opts = _with_landmarks(face_opts, args, reader.first.shape)
            _find_faces(reader.first, face_opts, str(inp))
        encoding = resolve_encoding(out, reader.lib, codec=args.codec, crf=args.crf, source=reader.info)
    if source == "artifacts" and face_opts is None:  # face crops are routed (and refused) by Engine
        _check_buckets(args, spec, sizes)

    try:
        engine = _engine(args, source)
        scale = _scale(args, engine.spec, engine.variant)
        if face_opts is not None:
            return _run_faces(engine, face_opts, kind, inp, out, image, files, reader, selected, scale, args,
                              encoding=encoding)
        prep = _x1_prep(scale, args.simulate_lr)
        edit_scale = 1.0 if args.edit_scale is None else args.edit_scale
        opts = dict(x2=x2, seed=args.seed, edit_scale=edit_scale)
        if kind == "image":
            y = engine.process(prep(image), **opts)
            rio.write_image(out, y)
            log.info("wrote %s (%dx%d)", out, y.shape[1], y.shape[0])
        elif kind == "folder":
            _run_folder(engine, files, out, prep, opts)
        else:
            from runtime.video import run_video

            n = run_video(reader, out, lambda frames: engine.process_video(frames, batch_size=args.batch, **opts),
                          encoding=encoding, prep=prep, queue_frames=2 * args.batch)
            log.info("wrote %s (%d frames at %.3g fps, %s)", out, n, reader.info.fps, encoding.describe())
    finally:
        if reader is not None:
            reader.close()
    return 0


def _engine(args, source: str):
    from runtime.engine import Engine

    if source == "artifacts":  # the variant was checked by _check_manifest
        return Engine(args.artifacts, backend=args.backend, device=args.device, task=args.task,
                      precision=args.precision, intra_op_threads=args.threads,
                      force_precision=args.force_precision)
    if args.precision or args.threads or args.force_precision:
        raise SgexError("--precision/--threads/--force-precision apply to --backend openvino on --artifacts")
    engine = Engine.from_checkpoint(args.task, ckpt=args.ckpt, random_weights=args.random_weights,
                                    device=args.device, width_div=args.width_div, variant=args.variant)
    if args.backend == "auto":  # logged once the engine exists, so a refused input stays one line
        log.info("backend auto -> torch (a checkpoint was given, not --artifacts)")
    return engine


def _shown(allowed) -> str:
    return f"{allowed[0]}..{allowed[-1]} step 4" if len(allowed) > 1 else str(allowed[0])


def _check_manifest(args, spec):
    """What the artifacts' manifest decides, checked before any input is searched for faces and
    before a model loads: the variant, the TensorRT engines for --backend trt, --scale."""
    from runtime.engine import _task_dir
    from runtime.manifest import Manifest

    d = _task_dir(args.artifacts, args.task)
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
    if spec.name == "superres" and args.scale is not None:
        allowed = spec.variant(m.variant).scales
        if args.scale not in allowed:
            raise SgexError(f"--scale {args.scale} is not available for superres variant {m.variant} "
                            f"({_shown(allowed)})")
    return m


def _check_buckets(args, spec, sizes) -> None:
    """Refuse, before a model loads, an input whose x1 no exported bucket holds (one line naming the
    --res that would hold it). Reads only the manifest; Engine verifies the files when it loads."""
    from runtime.buckets import pick
    from runtime.engine import exported_buckets
    from runtime.io import x1_size

    variant, buckets = exported_buckets(args.artifacts, args.task)
    scale = _scale(args, spec, variant, quiet=True)
    for name, h, w in sizes:
        xh, xw = x1_size(h, w, scale, args.simulate_lr)
        try:
            pick(buckets, xh, xw)
        except ValueError as e:
            raise SgexError(f"{name}: {e}") from None


def _scale(args, spec, variant: str, quiet: bool = False) -> int | None:
    if spec.name != "superres":
        return None
    allowed = spec.variant(variant).scales
    say = (lambda *a: None) if quiet else log.info
    if args.scale is None and args.simulate_lr:
        scale = 32  # the official resize_factor default; both variants allow it
        say("--scale not given: using %d with --simulate-lr (LR = input / %d, output = 4 x input)",
            scale, scale // 4)
    elif args.scale is None:
        # No resize unless asked: the smallest scale of the variant (sr: 4 = the input is x1).
        scale = allowed[0]
        say("--scale not given: using %d for superres variant %s (the photo is resized by %d/4 "
            "before the face crop; the output is 4 x the model input)", scale, variant, scale)
    else:
        scale = args.scale
    if scale not in allowed:
        raise SgexError(f"--scale {scale} is not available for superres variant {variant} ({_shown(allowed)})")
    return scale


def _x1_prep(scale: int | None, simulate_lr: bool):
    """image -> x1: the input itself (no --scale: not superres), the official raw path
    (runtime.io.resize_for_scale) or, with --simulate-lr, the official demo path (runtime.io.simulate_lr)."""
    from runtime import io as rio

    def prep(image):
        if scale is None:
            return image
        if simulate_lr:
            return rio.simulate_lr(image, scale)[0]
        return rio.resize_for_scale(image, scale)

    return prep


def _face_options(args, spec, kind: str, x2):
    """runtime.pipeline.FaceOptions for the face pipeline, or None (--no-align, or a task whose
    recipe takes its input as is); conflicting face flags are refused here."""
    from runtime.pipeline import FaceOptions
    from runtime.recipes import get_recipe

    given = [f for f, on in (("--faces", args.faces != "best"), ("--paste-back", args.paste_back),
                             ("--track", args.track), ("--landmarks", args.landmarks)) if on]
    if not get_recipe(spec.name).face_crop:
        if given:
            raise SgexError(f"{given[0]} applies to RGB face tasks; {spec.name} takes its {spec.input_kind} as is")
        return None
    if args.no_align:
        if given:
            raise SgexError(f"{given[0]} needs the face pipeline; it does not go with --no-align")
        return None
    if args.track and kind != "video":
        raise SgexError("--track applies to video inputs only")
    if args.landmarks and kind == "folder":
        raise SgexError("--landmarks gives one image's points; it does not apply to a folder")
    return FaceOptions(faces=args.faces, paste_back=args.paste_back, track=args.track, x2=x2)


def _with_landmarks(opts, args, shape):
    import dataclasses

    from runtime.pipeline import read_landmarks

    if not args.landmarks:
        return opts
    return dataclasses.replace(opts, landmarks=read_landmarks(args.landmarks, shape))


def _find_faces(image, opts, what: str) -> list:
    from runtime.pipeline import find_faces

    found = find_faces(image, opts, what)
    log.info("%s: %d face%s selected", what, len(found), "s" if len(found) != 1 else "")
    return found


def _face_outputs(out: Path, n: int) -> list[Path]:
    """One output per face: OUTPUT itself for one, OUTPUT_face<i> for several."""
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}_face{i}{out.suffix}") for i in range(n)]


def _write_photo(res, out: Path, paste_back: bool) -> None:
    from runtime import io as rio

    if paste_back:
        rio.write_image(out, res.image)
        log.info("wrote %s (%dx%d, %d face%s pasted back)", out, res.image.shape[1], res.image.shape[0],
                 len(res.faces), "s" if len(res.faces) != 1 else "")
        return
    for path, f in zip(_face_outputs(out, len(res.faces)), res.faces):
        rio.write_image(path, f.output)
        log.info("wrote %s (%dx%d, crop %dx%d)", path, f.output.shape[1], f.output.shape[0],
                 f.job.params.size[1], f.job.params.size[0])


def _run_faces(engine, opts, kind, inp, out, image, files, reader, selected, scale, args, encoding=None) -> int:
    from runtime import pipeline

    edit_scale = 1.0 if args.edit_scale is None else args.edit_scale
    common = dict(scale=scale, seed=args.seed, edit_scale=edit_scale)
    if kind == "image":
        res = pipeline.process_photo(engine, image, opts, what=str(inp), selected=selected[inp], **common)
        _write_photo(res, out, opts.paste_back)
    elif kind == "folder":
        from runtime import io as rio
        from runtime.video import Progress

        bar = Progress(len(files), "images")
        try:
            with rio.staged_folder(out) as stage:  # all results, or none
                for f in files:
                    img = rio.task_image(rio.read_image(f), engine.spec, str(f))
                    res = pipeline.process_photo(engine, img, opts, what=str(f), selected=selected[f], **common)
                    _write_photo(res, stage / f.name, opts.paste_back)
                    bar.update()
        finally:
            bar.close()
        log.info("wrote %d images to %s", len(files), out)
    else:
        from runtime.video import run_video

        n = run_video(reader, out, lambda frames: engine.process_video(frames, faces=opts, batch_size=args.batch,
                                                                       **common),
                      encoding=encoding, queue_frames=2 * args.batch)
        log.info("wrote %s (%d frames at %.3g fps, %s)", out, n, reader.info.fps, encoding.describe())
    return 0


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
