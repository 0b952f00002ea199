"""Official StyleGANEX checkpoints: safe loading, config inference, strict 1:1 parameter table,
and random checkpoints in the official format (tests, demos, `--random-weights`).

Official file (spec 3.2): a dict with 'state_dict' (pSp.state_dict(): `encoder.*`, `decoder.*`),
'opts' (dict), 'latent_avg' ((18,D) or (D,)), optionally 'editing_w' ([N,18,D]) and
'discriminator' (ignored). Loading uses torch.load(weights_only=True): no code runs from a file.
The configuration comes from the key set (spec 3.3), the task from runtime.tasks.TASKS.
Constant buffers (blur kernels, fixed noise, BN num_batches_tracked) may or may not be in a file;
export.networks rebuilds them. The blur constants (decoder `*.blur_weight`, `*.blur.kernel`,
`*.upsample.kernel`) are compared with the rebuilt values when present, and a file whose buffer
differs is refused (it was saved by a modified model and would give a different image); fixed
noise and num_batches_tracked are not used at inference and are ignored. Every other key must
match the model exactly (name and shape); anything missing or unexpected is an SgexError naming
the keys.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import re
from dataclasses import dataclass, field

import torch

from export.networks import (BatchNorm, EqualLinear, FusionLayer, ModelConfig, ModulatedConv2d, N_LATENT, StyleGANEX,
                             blur3_kernel, blur4_kernel)
from runtime.errors import SgexError
from runtime.tasks import TASKS, WIDTH_DIVS, get_task

__all__ = [
    "LoadedCheckpoint",
    "load_checkpoint",
    "infer_config",
    "build_model",
    "random_checkpoint",
    "load_or_random",
    "expected_shapes",
    "constant_buffer_shapes",
    "constant_value",
    "RANDOM_NOTICE",
]

log = logging.getLogger(__name__)

RANDOM_NOTICE = "random weights: outputs are noise, pass --ckpt for real results"
_SHOW = 5  # keys named in an error before "... (N in all)"
_DATASET_TYPE = {
    "superres": "ffhq_super_resolution", "edit": "ffhq_edit", "toonify": "toonify",
    "inversion": "ffhq_encode", "sketch2face": "ffhq_sketch_to_face", "mask2face": "ffhq_seg_to_face",
}


@dataclass
class LoadedCheckpoint:
    """A checkpoint read into memory. state_dict: the file's tensors (official key names);
    latent_avg [18,D] float32; editing_w [N,18,D] float32 or None (use [0:1])."""

    state_dict: dict
    config: ModelConfig
    task: str
    variant: str
    latent_avg: torch.Tensor
    editing_w: torch.Tensor | None
    opts: dict = field(default_factory=dict)
    path: str | None = None
    sha256: str | None = None
    random: bool = False
    seed: int | None = None


# --------------------------------------------------------------------------------------------
# Key tables


def _meta_model(cfg: ModelConfig) -> StyleGANEX:
    with torch.device("meta"):
        return StyleGANEX(cfg)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Every key the model loads (parameters and BN running stats) -> shape. No allocation."""
    return dict(_expected_shapes(cfg))


def constant_buffer_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Constant buffers an official file may carry for this config (accepted, ignored, rebuilt):
    blur kernels, fixed noise maps (spec 1.3, 1.7) and BN num_batches_tracked."""
    return dict(_constant_buffer_shapes(cfg))


@functools.lru_cache(maxsize=16)
def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in _meta_model(cfg).state_dict().items()}


@functools.lru_cache(maxsize=16)
def _constant_buffer_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for j in range(8):
        out[f"decoder.convs.{2 * j}.conv.blur.kernel"] = (4, 4)
        out[f"decoder.to_rgbs.{j}.upsample.kernel"] = (4, 4)
    for j in range(3):
        out[f"decoder.convs.{2 * j}.conv.blur_weight"] = (1, 1, 3, 3)
        out[f"decoder.to_rgbs.{j}.blur_weight"] = (1, 1, 3, 3)
    for j in range(17):
        r = 2 ** ((j + 5) // 2)
        out[f"decoder.noises.noise_{j}"] = (1, 1, r, r)
    for name, m in _meta_model(cfg).named_modules():
        if isinstance(m, BatchNorm):
            out[f"{name}.num_batches_tracked"] = ()
    return out


CONSTANT_ATOL = 1e-6  # the official constants are exact in float32 (sixteenths); this only admits re-rounding


def constant_value(key: str) -> torch.Tensor | None:
    """The value sgex rebuilds for a constant blur buffer of an official file (spec 1.4, 1.5, 6), or
    None for a buffer that is not a blur constant (fixed noise, num_batches_tracked):
    `*.blur_weight` [1,1,3,3] = outer([1,2,1]) / 16 (gain 1); `*.blur.kernel` and
    `*.upsample.kernel` [4,4] = outer([1,3,3,1]) / 64 * 4 (rosinality's x factor^2 when upsampling)."""
    if key.endswith(".blur_weight"):
        return blur3_kernel()
    if key.endswith(".blur.kernel") or key.endswith(".upsample.kernel"):
        return blur4_kernel(4.0)[0, 0]
    return None


def _check_constants(sd: dict, cfg: ModelConfig, where: str) -> None:
    """Refuse a file whose blur constant differs from the rebuilt one (one line: key, max diff)."""
    for k in constant_buffer_shapes(cfg):
        want = constant_value(k) if k in sd else None
        if want is None:
            continue
        diff = float((sd[k].detach().to(torch.float64) - want.to(torch.float64)).abs().max())
        if not diff <= CONSTANT_ATOL:  # also refuses NaN
            raise SgexError(f"{where}: constant buffer {k} differs from the StyleGANEX constant (max |diff| "
                            f"{diff:.3g}); the file was saved by a modified model")


def _param_table(cfg: ModelConfig) -> dict[str, str]:
    """model key -> checkpoint key. Identity by construction: export.networks uses the official
    module names; written out so the loader is an explicit table (STYLE 5)."""
    return {k: k for k in expected_shapes(cfg)}


def _name_keys(keys, what: str) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_SHOW])
    more = f", ... ({len(keys)} in all)" if len(keys) > _SHOW else ""
    return f"{what}: {shown}{more}"


def _check_keys(shapes: dict[str, tuple], cfg: ModelConfig, where: str) -> None:
    expected = expected_shapes(cfg)
    constants = constant_buffer_shapes(cfg)
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected and k not in constants]
    wrong = [f"{k} {list(shapes[k])} (expected {list(s)})" for k, s in expected.items()
             if k in shapes and tuple(shapes[k]) != s]
    wrong += [f"{k} {list(shapes[k])} (expected {list(s)})" for k, s in constants.items()
              if k in shapes and tuple(shapes[k]) != s]
    problems = []
    if missing:
        problems.append(_name_keys(missing, "missing keys"))
    if unexpected:
        problems.append(_name_keys(unexpected, "unexpected keys"))
    if wrong:
        problems.append(_name_keys(wrong, "wrong shapes"))
    if problems:
        raise SgexError(f"{where}: state_dict does not match the inferred config {cfg}: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# Config inference


def infer_config(shapes: dict[str, tuple]) -> tuple[ModelConfig, str, str]:
    """Config, task and (default) variant from the state_dict key set and shapes (spec 3.3):
    L = number of encoder.fusion indices; fusion_skip -> skip_torgb; linear.* count - 1 ->
    use_att; T's first conv in-channels -> label_nc; width from decoder.style.1.weight."""
    key = "decoder.style.1.weight"
    if key not in shapes:
        raise SgexError(f"not a StyleGANEX state_dict: no {key}")
    dim = int(shapes[key][0])
    if dim <= 0 or 512 % dim or 512 // dim not in WIDTH_DIVS:
        raise SgexError(f"unsupported style dim {dim} in {key} (expected 512, or 128/256 for tiny test models)")
    fusion = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.fusion\.(\d+)\.", k))})
    if fusion != list(range(len(fusion))) or len(fusion) > 7:
        raise SgexError(f"encoder.fusion indices must be 0..L-1 with L <= 7, got {fusion}")
    n_fusion = len(fusion)
    n_linear = sum(1 for k in shapes if re.fullmatch(r"encoder\.fusion\.0\.linear\.\d+\.weight", k))
    use_att = max(0, n_linear - 1)
    skip_torgb = "encoder.fusion.0.fusion_skip.weight" in shapes
    tkey = "encoder.input_label_layer.model.0.weight"
    label_nc = int(shapes[tkey][1]) if tkey in shapes else 0
    if label_nc not in (0, 1, 19):
        raise SgexError(f"unsupported translation-network input channels {label_nc} in {tkey} (expected 1 or 19)")
    cfg = ModelConfig(n_fusion=n_fusion, use_att=use_att, skip_torgb=skip_torgb, label_nc=label_nc,
                      width_div=512 // dim)
    in_ch = label_nc or 3
    for task in TASKS.values():
        if task.in_channels != in_ch:
            continue
        for v in task.variants:
            if v.n_fusion == n_fusion and v.use_att == use_att:
                return cfg, task.name, v.name
    raise SgexError(f"checkpoint configuration matches no known task (input channels {in_ch}, "
                    f"fusion layers {n_fusion}, attention {use_att})")


# --------------------------------------------------------------------------------------------
# Loading


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _describe_header(head: bytes) -> str:
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head.startswith(b"\xff\xd8\xff"):
        return "a JPEG image"
    if not head:
        return "an empty file"
    if all(32 <= c < 127 or c in (9, 10, 13) for c in head):
        return "a text file"
    return f"unknown header {head[:4].hex()}"


def _read(path: str) -> dict:
    if not os.path.isfile(path):
        raise SgexError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(16)
    is_zip = head.startswith(b"PK\x03\x04")
    if not (is_zip or head.startswith(b"\x80")):
        raise SgexError(f"{path}: not a PyTorch checkpoint ({_describe_header(head)})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as e:  # damaged files raise RuntimeError, EOFError, UnpicklingError, ...
        text = str(e)
        refused = re.search(r"Unsupported global: (?:GLOBAL )?(\S+)", text)
        if isinstance(e, pickle.UnpicklingError) and (refused or "Weights only load failed" in text):
            what = f"an object of type {refused.group(1)}" if refused else "non-tensor objects"
            raise SgexError(f"{path}: holds {what}, which safe loading (torch.load weights_only=True) "
                            "refuses to unpickle; official checkpoints hold only tensors and plain types") from None
        first = text.splitlines()[0] if text else ""
        raise SgexError(f"{path}: truncated or corrupt checkpoint ({type(e).__name__}: {first})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        got = sorted(obj)[:_SHOW] if isinstance(obj, dict) else type(obj).__name__
        raise SgexError(f"{path}: not a StyleGANEX checkpoint (expected a dict with 'state_dict', got {got})")
    return obj


def _from_object(obj: dict, path: str | None, sha256: str | None) -> LoadedCheckpoint:
    where = path or "random checkpoint"
    sd = obj["state_dict"]
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise SgexError(f"{where}: " + _name_keys(bad, "state_dict entries that are not tensors"))
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    cfg, task, variant = infer_config(shapes)
    _check_keys(shapes, cfg, where)
    _check_constants(sd, cfg, where)
    opts = obj.get("opts") or {}
    if not isinstance(opts, dict):
        raise SgexError(f"{where}: 'opts' must be a dict, got {type(opts).__name__}")
    if opts.get("max_pooling"):
        raise SgexError(f"{where}: opts.max_pooling=True (max-pooled style heads) is not supported")
    if opts.get("output_size", 1024) != 1024:
        raise SgexError(f"{where}: opts.output_size={opts.get('output_size')} is not supported (1024 only)")
    if path:
        base = os.path.basename(path)
        for v in get_task(task).variants:
            if v.checkpoint == base:
                variant = v.name
    d = cfg.style_dim
    la = obj.get("latent_avg")
    if la is None:
        if opts.get("start_from_latent_avg", True):
            raise SgexError(f"{where}: missing 'latent_avg'")
        la = torch.zeros(N_LATENT, d)
    if not isinstance(la, torch.Tensor) or tuple(la.shape) not in ((N_LATENT, d), (d,), (1, d), (1, N_LATENT, d)):
        raise SgexError(f"{where}: latent_avg must be [{N_LATENT},{d}] or [{d}], got "
                        f"{list(la.shape) if isinstance(la, torch.Tensor) else type(la).__name__}")
    latent_avg = la.float().reshape(-1, d).expand(N_LATENT, d).clone()
    ew = obj.get("editing_w")
    if ew is not None:
        if not isinstance(ew, torch.Tensor) or ew.ndim != 3 or tuple(ew.shape[1:]) != (N_LATENT, d) or ew.shape[0] < 1:
            raise SgexError(f"{where}: editing_w must be [N,{N_LATENT},{d}], got "
                            f"{list(ew.shape) if isinstance(ew, torch.Tensor) else type(ew).__name__}")
        ew = ew.float()
    elif get_task(task).editing:
        raise SgexError(f"{where}: {task} checkpoint without 'editing_w'")
    seed = opts.get("sgex_random_seed")
    return LoadedCheckpoint(state_dict=sd, config=cfg, task=task, variant=variant, latent_avg=latent_avg,
                            editing_w=ew, opts=opts, path=path, sha256=sha256, random=seed is not None,
                            seed=seed)


def load_checkpoint(path: str) -> LoadedCheckpoint:
    """Read an official (or random_checkpoint) file safely; SgexError with one line on a missing,
    foreign, truncated or mismatching file."""
    path = os.fspath(path)
    obj = _read(path)
    return _from_object(obj, path, _sha256(path))


def build_model(ckpt: LoadedCheckpoint, task: str | None = None, device=None) -> StyleGANEX:
    """StyleGANEX in eval mode with every parameter loaded strictly through the key table,
    latent_avg and editing_w set, gradients off. task: refuse a checkpoint of another task."""
    if task is not None and task != ckpt.task:
        src = ckpt.path or "random checkpoint"
        raise SgexError(f"{src} is a {ckpt.task} checkpoint ({ckpt.variant}), not {task}")
    cfg = ckpt.config
    _check_keys({k: tuple(v.shape) for k, v in ckpt.state_dict.items()}, cfg, ckpt.path or "random checkpoint")
    model = StyleGANEX(cfg)
    table = _param_table(cfg)
    sd = {dst: ckpt.state_dict[src].to(torch.float32) for dst, src in table.items()}
    model.load_state_dict(sd, strict=True)
    model.latent_avg.copy_(ckpt.latent_avg)
    if ckpt.editing_w is not None:
        model.editing_w = ckpt.editing_w.clone()
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return model


# --------------------------------------------------------------------------------------------
# Random official-format checkpoints


def _opts(task: str, variant, cfg: ModelConfig, seed: int) -> dict:
    t = get_task(task)
    return {
        "output_size": 1024, "encoder_type": "GradualStyleEncoder", "n_styles": N_LATENT,
        "input_nc": t.in_channels, "label_nc": 0 if t.in_channels == 3 else t.in_channels, "res_num": 2,
        "use_skip": cfg.n_fusion > 0, "skip_max_layer": cfg.n_fusion, "use_skip_torgb": cfg.skip_torgb,
        "use_att": cfg.use_att, "max_pooling": False, "start_from_latent_avg": True, "learn_in_w": False,
        "dataset_type": _DATASET_TYPE[task], "toonify_weights": None, "feat_ind": 0,
        "resize_factors": {"sr": "1,2,4,8,16", "sr32": "8"}.get(variant.name),
        "checkpoint_path": None, "sgex_random_seed": int(seed), "sgex_width_div": cfg.width_div,
    }


def _random_state_dict(cfg: ModelConfig, gen: torch.Generator) -> dict:
    """Official-like init: randn modulated/const weights, EqualLinear randn/lr_mul with bias_init
    (modulation 1), He-normal plain convs/linears, BN weight 1 / bias 0 (running statistics are
    set afterwards by _calibrate_batchnorm), PReLU 0.25, fusion
    identity pass-through as the official init. Noise strengths are small random values
    (official init 0) so explicit noise visibly reaches the output in tests."""
    model = _meta_model(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sd: dict[str, torch.Tensor] = {}

    def randn(shape):
        return torch.randn(shape, generator=gen)

    def uniform(shape, bound):
        return torch.empty(shape).uniform_(-bound, bound, generator=gen)

    for name, m in model.named_modules():
        p = f"{name}." if name else ""
        if isinstance(m, EqualLinear):
            sd[p + "weight"] = randn(m.weight.shape) / m.lr_mul
            sd[p + "bias"] = torch.full(m.bias.shape, m.bias_init)
        elif isinstance(m, ModulatedConv2d):
            sd[p + "weight"] = randn(m.weight.shape)
        elif isinstance(m, BatchNorm):
            c = m.weight.shape[0]
            sd.update({p + "weight": torch.ones(c), p + "bias": torch.zeros(c),
                       p + "running_mean": torch.zeros(c), p + "running_var": torch.ones(c)})
        elif isinstance(m, torch.nn.PReLU):
            sd[p + "weight"] = torch.full(m.weight.shape, 0.25)
        elif isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
            w = m.weight
            fan_in = w.shape[1] * (w[0, 0].numel() if w.ndim > 2 else 1)
            # He (std sqrt(2/fan_in)) rather than torch's default kaiming-uniform(a=sqrt(5)), whose
            # 1/sqrt(3) gain per conv shrinks the style heads' output to ~1e-6: with it w+ would
            # not depend on the input and the tests and demos would check nothing.
            sd[p + "weight"] = randn(w.shape) * (2.0 / fan_in) ** 0.5
            if m.bias is not None:
                sd[p + "bias"] = uniform(m.bias.shape, 1.0 / fan_in ** 0.5)
        elif isinstance(m, FusionLayer):
            pass  # its convs/linears are handled above; identity init applied below
        elif name.endswith(".noise"):
            sd[p + "weight"] = 0.05 + 0.1 * torch.rand(1, generator=gen)
        elif name.endswith(".activate"):
            sd[p + "bias"] = torch.zeros(m.bias.shape)
        elif name == "decoder.input":
            sd[p + "input"] = randn(m.input.shape)
    for name in [n for n in shapes if n.startswith("decoder.to_rgb") and n.endswith(".bias") and ".conv." not in n]:
        sd[name] = torch.zeros(shapes[name])
    for name, m in model.named_modules():
        if isinstance(m, FusionLayer):
            outc = m.fusion_out.weight.shape[0]
            w = sd[f"{name}.fusion_out.weight"] * 0.01
            w[:, :outc, 1, 1] += torch.eye(outc)
            sd[f"{name}.fusion_out.weight"] = w
            if m.skip_torgb:
                w = sd[f"{name}.fusion_skip.weight"] * 0.01
                w[:, :3, 1, 1] += torch.eye(3)
                sd[f"{name}.fusion_skip.weight"] = w
            if m.use_att:
                b = sd[f"{name}.norm.style.bias"]
                half = b.shape[0] // 2
                b[:half], b[half:] = 1.0, 0.0
    missing = set(shapes) - set(sd)
    if missing:  # a module type without an init rule: a bug here, not a user error
        raise RuntimeError(f"random init has no rule for {sorted(missing)[:5]}")
    sd = {k: sd[k] for k in shapes}  # model (official) order
    for k, s in constant_buffer_shapes(cfg).items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(0, dtype=torch.int64)
        elif constant_value(k) is not None:  # the official constants, as a real file holds them
            sd[k] = constant_value(k).clone()
        else:
            sd[k] = randn(s)
    return sd


def _calibrate_batchnorm(sd: dict, cfg: ModelConfig, gen: torch.Generator) -> None:
    """Data-dependent init of the encoder's BatchNorm statistics, as training leaves them: one
    pass of a random 256x256 image through the input stage and the body in which every BN first
    sets its running mean/var to the statistics of its own input, then normalizes with them.
    With identity statistics the He-initialised residual units compound: at the official width
    w+ reached ~5e3 and the images ~1e6, where float32 rounding dominates every comparison."""
    model = StyleGANEX(cfg)
    table = _param_table(cfg)
    model.load_state_dict({dst: sd[src] for dst, src in table.items()}, strict=True)
    src_of = {dst: src for dst, src in table.items()}

    def set_stats(bn, args):
        var, mean = torch.var_mean(args[0], dim=(0, 2, 3), unbiased=False)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)

    bns = {name: m for name, m in model.named_modules() if isinstance(m, BatchNorm)}
    hooks = [m.register_forward_pre_hook(set_stats) for m in bns.values()]
    try:
        x = torch.rand(2, 3, 256, 256, generator=gen) * 2 - 1
        with torch.no_grad():
            model.encoder.taps(x, "running")
    finally:
        for h in hooks:
            h.remove()
    for name, m in bns.items():
        for stat in ("running_mean", "running_var"):
            sd[src_of[f"{name}.{stat}"]] = getattr(m, stat).detach().clone()


def _latent_avg(sd: dict, cfg: ModelConfig, gen: torch.Generator) -> torch.Tensor:
    """Mean of the mapping network over 256 random z, repeated to [18,D] (as a StyleGAN ckpt)."""
    d = cfg.style_dim
    x = torch.randn(256, d, generator=gen)
    x = x * torch.rsqrt(x.square().mean(1, keepdim=True) + 1e-8)
    for i in range(1, 9):
        w, b = sd[f"decoder.style.{i}.weight"], sd[f"decoder.style.{i}.bias"]
        x = torch.nn.functional.leaky_relu(x @ (w * 0.01 / d ** 0.5).t() + b * 0.01, 0.2) * 2 ** 0.5
    return x.mean(0, keepdim=True).expand(N_LATENT, d).clone()


def random_checkpoint(task: str, seed: int = 0, variant: str | None = None, width_div: int = 1,
                      path: str | None = None) -> dict:
    """A checkpoint in the official format with random weights for `task` (variant: default of
    the task). width_div=1 gives every key of spec/checkpoint_keys.txt the task's config has,
    with the official shapes. If path is given the file is written atomically. Returns the dict."""
    if task not in TASKS:
        raise SgexError(f"unknown task {task!r} (choose from: {', '.join(TASKS)})")
    t = get_task(task)
    try:
        v = t.variant(variant)
    except KeyError as e:
        raise SgexError(str(e.args[0])) from None
    try:
        cfg = ModelConfig(n_fusion=v.n_fusion, use_att=v.use_att, skip_torgb=False,
                          label_nc=0 if t.in_channels == 3 else t.in_channels, width_div=int(width_div))
    except ValueError as e:
        raise SgexError(str(e)) from None
    gen = torch.Generator().manual_seed(int(seed))
    sd = _random_state_dict(cfg, gen)
    _calibrate_batchnorm(sd, cfg, gen)
    obj = {"state_dict": sd, "opts": _opts(task, v, cfg, seed), "latent_avg": _latent_avg(sd, cfg, gen)}
    if t.editing:
        obj["editing_w"] = 0.2 * torch.randn(1, N_LATENT, cfg.style_dim, generator=gen)
    if path is not None:
        path = os.fspath(path)
        tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp{os.getpid()}")
        try:
            torch.save(obj, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return obj


def load_or_random(task: str, ckpt_path: str | None, random_weights: bool, seed: int = 0,
                   width_div: int = 1, variant: str | None = None) -> LoadedCheckpoint:
    """A checkpoint file for `task` (refused if it is another task's), or random weights of
    `variant` (default: the task's first) with RANDOM_NOTICE logged as a warning. Exactly one of
    ckpt_path / random_weights."""
    if task not in TASKS:
        raise SgexError(f"unknown task {task!r} (choose from: {', '.join(TASKS)})")
    if ckpt_path and random_weights:
        raise SgexError("give either a checkpoint (--ckpt) or --random-weights, not both")
    if ckpt_path:
        ck = load_checkpoint(ckpt_path)
        if ck.task != task:
            raise SgexError(f"{ckpt_path} is a {ck.task} checkpoint ({ck.variant}), not {task}")
        return ck
    if not random_weights:
        raise SgexError(f"task {task} needs a checkpoint: pass --ckpt PATH "
                        f"(official file {get_task(task).default_variant.checkpoint}) or --random-weights")
    log.warning(RANDOM_NOTICE)
    ck = _from_object(random_checkpoint(task, seed=seed, variant=variant, width_div=width_div), None, None)
    if variant is not None:
        # Variants of one task can share every shape (toonify styles): the name is given, not inferred.
        ck.variant = get_task(task).variant(variant).name
    return ck

