"""Key layouts of the three checkpoint families and the conversions between them.

- ``repvit`` (ours) and ``timm``: ``stem.conv1``, ``stages.S.downsample.{pre_block,...}``,
  ``stages.S.blocks.J.{token_mixer,se,channel_mixer}``, ``head.head`` / ``head.head_dist``.
  In train form the two are identical; in deploy form timm's fused head is ``head.weight``
  where ours is ``head.head.weight``.
- ``official`` (THU-MIG/RepViT): a flat ``features.N`` list (N=0 is the stem) where every
  downsampling layer is two rows (its pre-block, then the stride-2 row), and the head is
  ``classifier.classifier`` / ``classifier.classifier_dist`` (fused: ``classifier``).

All conversion is by prefix tables generated from the stage depths, so every variant and
both token-mixer layouts are covered by the same code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch

from ..models.specs import SPECS

__all__ = [
    "StateInfo", "analyse_ours", "official_depths", "official_to_ours", "ours_to_official",
    "timm_to_ours", "ours_to_timm", "matching_variants",
]

StateDict = dict[str, torch.Tensor]


class CheckpointFormatError(ValueError):
    """A checkpoint's keys do not fit any known RepViT layout."""


class CorruptCheckpointError(CheckpointFormatError):
    """The file cannot be read at all (empty, truncated, not a valid pickle/safetensors file)."""


# --------------------------------------------------------------------------- official <-> ours

_BLOCK_ROW = (("token_mixer.0.", "token_mixer."), ("token_mixer.1.", "se."),
              ("channel_mixer.m.0.", "channel_mixer.conv1."), ("channel_mixer.m.2.", "channel_mixer.conv2."))
_STRIDE2_ROW = (("token_mixer.0.", "spatial_downsample."), ("token_mixer.2.", "channel_downsample."),
                ("channel_mixer.m.0.", "ffn.conv1."), ("channel_mixer.m.2.", "ffn.conv2."))


def official_prefix_table(depths: tuple[int, ...], *, deploy: bool) -> list[tuple[str, str]]:
    """(official prefix, our prefix) pairs for a network with these stage depths."""
    pairs = [("features.0.0.", "stem.conv1."), ("features.0.2.", "stem.conv2.")]
    row = 1

    def add(row_pairs, r: int, ours: str) -> None:
        pairs.extend((f"features.{r}.{a}", ours + b) for a, b in row_pairs)

    for s, d in enumerate(depths):
        if s > 0:
            add(_BLOCK_ROW, row, f"stages.{s}.downsample.pre_block.")
            add(_STRIDE2_ROW, row + 1, f"stages.{s}.downsample.")
            row += 2
        for j in range(d):
            add(_BLOCK_ROW, row, f"stages.{s}.blocks.{j}.")
            row += 1
    if deploy:
        pairs.append(("classifier.", "head.head."))
    else:
        pairs += [("classifier.classifier.", "head.head."), ("classifier.classifier_dist.", "head.head_dist.")]
    return pairs


def official_depths(keys: list[str]) -> tuple[int, ...]:
    """Recover stage depths from official ``features.N`` keys (stride-2 rows own ``token_mixer.2``)."""
    rows = sorted({int(m.group(1)) for k in keys if (m := re.match(r"features\.(\d+)\.", k))} - {0})
    s2 = {int(m.group(1)) for k in keys if (m := re.match(r"features\.(\d+)\.token_mixer\.2\.", k))}
    if not rows:
        raise CheckpointFormatError("no 'features.N' rows found in an official-layout checkpoint")
    depths, count = [], 0
    for r in rows:
        if r + 1 in s2:  # pre-block of the next downsampling layer closes this stage
            depths.append(count)
            count = 0
        elif r not in s2:
            count += 1
    depths.append(count)
    return tuple(depths)


def _rewrite(sd: Mapping[str, torch.Tensor], pairs: list[tuple[str, str]], what: str) -> StateDict:
    pairs = sorted(pairs, key=lambda p: -len(p[0]))  # longest prefix wins
    out, unknown = {}, []
    for k, v in sd.items():
        for src, dst in pairs:
            if k.startswith(src):
                out[dst + k[len(src):]] = v
                break
        else:
            unknown.append(k)
    if unknown:
        raise CheckpointFormatError(
            f"{len(unknown)} key(s) do not fit the {what} layout, e.g. {unknown[:5]}; "
            "the file may hold another architecture or a modified model"
        )
    return out


def official_to_ours(sd: Mapping[str, torch.Tensor]) -> StateDict:
    keys = list(sd)
    deploy = not any(k.endswith("running_mean") for k in keys)
    return _rewrite(sd, official_prefix_table(official_depths(keys), deploy=deploy), "official RepViT")


def ours_to_official(sd: Mapping[str, torch.Tensor]) -> StateDict:
    info = analyse_ours(sd)
    pairs = [(b, a) for a, b in official_prefix_table(info.depths, deploy=info.form == "deploy")]
    return _rewrite(sd, pairs, "repvit")


# --------------------------------------------------------------------------- timm <-> ours


def timm_to_ours(sd: Mapping[str, torch.Tensor]) -> StateDict:
    # timm's fused classifier is a bare Linear at ``head``; ours keeps it at ``head.head``
    return {("head.head." + k[5:] if k in ("head.weight", "head.bias") else k): v for k, v in sd.items()}


def ours_to_timm(sd: Mapping[str, torch.Tensor]) -> StateDict:
    deploy = not any(k.endswith("running_mean") for k in sd)
    if not deploy:
        return dict(sd)
    return {("head." + k[10:] if k in ("head.head.weight", "head.head.bias") else k): v for k, v in sd.items()}


# --------------------------------------------------------------------------- what a state dict holds


@dataclass(frozen=True)
class StateInfo:
    """Architecture read off a state dict in our layout."""

    widths: tuple[int, ...]
    depths: tuple[int, ...]
    legacy: bool | None  # None: deploy form, where both token-mixer layouts fold to the same network
    form: str  # "train" | "deploy"
    num_classes: int
    distillation: bool
    in_chans: int

    def describe(self) -> str:
        names = matching_variants(self)
        arch = f"widths {list(self.widths)}, depths {list(self.depths)}"
        return f"{' / '.join(names) if names else 'an unknown variant'} ({arch}, {self.form} form)"


def _not_repvit(keys: list[str], missing: str) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"the 'stem.*'/'stages.*' keys do not follow the RepViT layout (no {missing!r}; first keys: {keys[:5]}). "
        "The file probably holds another timm architecture with the same top-level names (ConvNeXt, FastViT, "
        "EfficientFormer, ...), not RepViT weights"
    )


def analyse_ours(sd: Mapping[str, torch.Tensor]) -> StateInfo:
    keys = list(sd)
    if not any(k.startswith("stem.") for k in keys):
        raise CheckpointFormatError("no 'stem.*' keys: not a RepViT state dict in repvit/timm layout")
    form = "train" if any(k.endswith("running_mean") for k in keys) else "deploy"
    sfx = "c.weight" if form == "train" else "weight"
    stem_w = sd.get(f"stem.conv1.{sfx}")
    if not isinstance(stem_w, torch.Tensor) or stem_w.dim() != 4:
        raise _not_repvit(keys, f"stem.conv1.{sfx}")
    widths, depths = [], []
    for s in range(4):
        blocks = {int(m.group(1)) for k in keys if (m := re.match(rf"stages\.{s}\.blocks\.(\d+)\.", k))}
        if not blocks:
            break
        depths.append(max(blocks) + 1)
        key = f"stages.{s}.blocks.0.channel_mixer.conv2.{sfx}"
        w = sd.get(key)
        if not isinstance(w, torch.Tensor) or w.dim() != 4:
            raise _not_repvit(keys, key)
        widths.append(int(w.shape[0]))
    if not depths:
        raise _not_repvit(keys, "stages.0.blocks.0.*")
    if form == "train":
        legacy = any(k.endswith("token_mixer.conv1.c.weight") for k in keys)
    else:
        legacy = None
    head_w = sd.get("head.head.l.weight", sd.get("head.head.weight"))
    num_classes = int(head_w.shape[0]) if head_w is not None else 0
    return StateInfo(
        widths=tuple(widths), depths=tuple(depths), legacy=legacy, form=form, num_classes=num_classes,
        distillation=any(k.startswith("head.head_dist.") for k in keys),
        in_chans=int(stem_w.shape[1]),
    )


def matching_variants(info: StateInfo) -> list[str]:
    return [
        name for name, spec in SPECS.items()
        if spec.widths == info.widths and spec.depths == info.depths
        and (info.legacy is None or spec.legacy == info.legacy)
    ]
