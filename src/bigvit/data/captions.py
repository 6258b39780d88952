"""Templated captions of the digits: the class names and the templates, in one place.

The same templates are the zero-shot prompts (conf/data/digits_captions.yaml lists both). The
training split draws one template per image (seeded); the held-out split uses the first template
for every image, so retrieval on it has one caption per digit.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = (
    "a photo of the digit {}",
    "a handwritten {}",
    "the number {}",
    "a blurry image of a {}",
    "a small drawing of the digit {}",
)


def check_templates(templates: Sequence[str], class_names: Sequence[str]) -> None:
    """Each template has exactly one `{}` for the class name; there is one or more of each."""
    if not templates or not class_names:
        raise ValueError(
            f"captions need templates and class names, got {list(templates)} and {list(class_names)}"
        )
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1 or t.count("{") != 1]
    if bad:
        raise ValueError(
            f"templates {bad} must each hold exactly one {{}} (the class name), like 'a photo of a {{}}'"
        )


def captions(
    labels: Sequence[int], class_names: Sequence[str], templates: Sequence[str], *, draw: bool, seed: int
) -> list[str]:
    """One caption per label: a seeded template per item when `draw`, else the first template for all."""
    check_templates(templates, class_names)
    rng = random.Random(seed)
    return [
        (rng.choice(templates) if draw else templates[0]).format(class_names[int(label)]) for label in labels
    ]
