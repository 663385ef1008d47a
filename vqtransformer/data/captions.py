"""Captions of ``shapes`` scenes: a pure function of the scene, derived after drawing (the images
do not change).

A caption names the dominant object (most visible pixels, the scene's ``class_label``) first, then
the runner-up and where the dominant one lies relative to it, then the background:

    "a large red circle above a small blue square on a striped background"

* colour: the bin of the object's drawn (unshaded) colour, each RGB channel above or below half:
  the eight corners of the RGB cube, ``COLOUR_NAMES`` (a colour the judge can learn, a name
  a person agrees with);
* size: ``large`` when the radius is in the upper half of ``data.object_scale``, else ``small``;
* position: ``above`` / ``below`` / ``left of`` / ``right of``, the larger of the centres'
  offsets (image y grows downwards);
* background: ``striped`` (``data.background=textured``) or ``plain``;
* scenes with more than two visible objects end with ``", with N more shapes"``.
"""

from __future__ import annotations

from dataclasses import dataclass

COLOUR_NAMES = ("black", "blue", "green", "cyan", "red", "magenta", "yellow", "white")  # index = 4r + 2g + b
BACKGROUND_WORDS = {"textured": "striped", "plain": "plain"}


@dataclass(frozen=True)
class SceneObject:
    kind: str  # a name of SHAPE_CLASSES
    radius: float  # fraction of the resolution
    centre: tuple[float, float]  # (x, y), fractions of the resolution
    colour: tuple[float, float, float]  # drawn RGB in [0, 255], before shading
    visible: int  # pixels not occluded by later objects


def colour_bin(rgb) -> int:
    """Index into ``COLOUR_NAMES``: one bit per channel (r, g, b), set when the channel exceeds 127.5."""
    r, g, b = (int(float(c) > 127.5) for c in rgb)
    return 4 * r + 2 * g + b


def _relation(a: SceneObject, b: SceneObject) -> str:
    """Where ``a`` lies relative to ``b``."""
    dx, dy = a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "left of" if dx < 0 else "right of"


def _phrase(o: SceneObject, scale: tuple[float, float]) -> str:
    size = "large" if o.radius >= 0.5 * (scale[0] + scale[1]) else "small"
    return f"a {size} {COLOUR_NAMES[colour_bin(o.colour)]} {o.kind}"


def caption(objects: list[SceneObject], background: str, object_scale: tuple[float, float]) -> str:
    """The caption of a scene (see the module docstring); ``objects`` in drawing order."""
    shown = sorted((o for o in objects if o.visible > 0), key=lambda o: -o.visible)
    ground = f"on a {BACKGROUND_WORDS[background]} background"
    if not shown:
        return f"nothing {ground}"
    first = _phrase(shown[0], object_scale)
    if len(shown) == 1:
        return f"{first} {ground}"
    text = f"{first} {_relation(shown[0], shown[1])} {_phrase(shown[1], object_scale)} {ground}"
    if len(shown) > 2:
        more = len(shown) - 2
        text += f", with {more} more shape{'s' if more > 1 else ''}"
    return text


def main_object(text: str) -> tuple[str, str] | None:
    """(colour name, shape name) of the object a ``shapes`` caption names first ("a large red circle
    ..." -> ("red", "circle")), or None for a caption not in this grammar."""
    words = text.lower().split()
    if len(words) >= 4 and words[0] == "a" and words[2] in COLOUR_NAMES:
        return words[2], words[3]
    if len(words) >= 3 and words[0] == "a" and words[1] in COLOUR_NAMES:  # "a red triangle above ..."
        return words[1], words[2]
    return None
