"""The one table of the official per-task input recipes (pure data; beside runtime/tasks.py).

What the official scripts do to a user's photo or video before the model sees it (spec 4.0-4.5),
read by `Engine.process_photo` / `process_video(faces=...)` and sgex-run. The steps themselves
live in runtime/faces.py; this table only says which of them a task runs and in which variant.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.tasks import TASKS


@dataclass(frozen=True)
class Recipe:
    task: str
    source: str  # the official script the recipe is read from
    face_crop: bool  # crop_params + crop (spec 4.0) give x1
    align: bool  # x2 = align(x1) (FFHQ, 256x256) gives the style code
    pre_resize: str | None = None  # a resize of the whole input before the crop
    first_frame: bool = False  # video: crop params and x2 from the first frame, reused for every frame
    note: str = ""


RECIPES: dict[str, Recipe] = {
    r.task: r
    for r in (
        Recipe("superres", "image_translation.py --use_raw_data (spec 4.1)", face_crop=True, align=True,
               pre_resize="pil-bicubic-scale/4",
               note="the LR photo is PIL-resized (bicubic) to (W*S//4, H*S//4), then cropped and aligned"),
        Recipe("edit", "video_editing.py (spec 4.4)", face_crop=True, align=True, first_frame=True,
               note="zero noise; editing_w x scale"),
        Recipe("toonify", "video_editing.py (spec 4.5)", face_crop=True, align=True, first_frame=True,
               note="zero noise"),
        Recipe("inversion", "web UI 'No optimization' (spec 4.6)", face_crop=True, align=True,
               note="crop and align, no resize"),
        Recipe("sketch2face", "image_translation.py (spec 4.2)", face_crop=False, align=False,
               note="the sketch is used as is (already at the canonical face scale)"),
        Recipe("mask2face", "image_translation.py --use_raw_data (spec 4.3)", face_crop=False, align=False,
               note="a label map in; photo-to-mask parsing (BiSeNet) is not part of sgex"),
    )
}

assert set(RECIPES) == set(TASKS), "every task has exactly one recipe"


def get_recipe(task: str) -> Recipe:
    try:
        return RECIPES[task]
    except KeyError:
        raise KeyError(f"unknown task {task!r} (choose from: {', '.join(RECIPES)})") from None


def pre_resize_size(height: int, width: int, scale: int) -> tuple[int, int]:
    """superres: the (height, width) of the PIL resize, (H * S // 4, W * S // 4) as the official
    script computes it (integer division of the product)."""
    return height * scale // 4, width * scale // 4
