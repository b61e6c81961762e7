"""A teacher's config.json (timm hub layout) and teacher-id validation.

    <zoo>/teachers/<id>/config.json        architecture, num_classes, num_features, model_args,
                                           label_names, pretrained_cfg (input_size, mean, std)
    <zoo>/teachers/<id>/model.safetensors
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from ..errors import TeacherError, ZooError

TEACHERS_PREFIX = "teachers"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_teacher_id(teacher_id: str) -> str:
    """Return the id if it is a plain name; refuse anything that could escape the zoo."""
    if (not isinstance(teacher_id, str) or not _ID_RE.match(teacher_id) or ".." in teacher_id):
        raise ZooError(f"invalid teacher id {teacher_id!r}: use letters, digits, '.', '_' and '-' "
                       "(no '/', no '..', at most 128 characters)")
    return teacher_id


def config_key(teacher_id: str) -> str:
    return f"{TEACHERS_PREFIX}/{check_teacher_id(teacher_id)}/{CONFIG_FILE}"


def weights_key(teacher_id: str) -> str:
    return f"{TEACHERS_PREFIX}/{check_teacher_id(teacher_id)}/{WEIGHTS_FILE}"


@dataclass
class TeacherConfig:
    """The parts of config.json that sctd-ray uses (timm's ``save_for_hf`` layout)."""

    teacher_id: str
    architecture: str
    num_classes: int
    label_names: list[str]
    pretrained_cfg: dict
    num_features: int | None = None
    model_args: dict = field(default_factory=dict)
    source_task: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, teacher_id: str, data: bytes | str) -> "TeacherConfig":
        try:
            raw = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TeacherError(teacher_id, f"config.json is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise TeacherError(teacher_id, "config.json must hold a JSON object")
        try:
            arch = raw["architecture"]
            pcfg = dict(raw.get("pretrained_cfg") or {})
            labels = raw.get("label_names") or pcfg.get("label_names")
            num_classes = int(raw.get("num_classes") or pcfg.get("num_classes") or len(labels or ()))
            if not isinstance(arch, str) or not arch:
                raise ValueError("'architecture' must be a non-empty string")
            if "input_size" not in pcfg or len(pcfg["input_size"]) != 3:
                raise ValueError("pretrained_cfg.input_size must be [channels, height, width]")
            if not labels:
                labels = [f"class_{i}" for i in range(num_classes)]
            if len(labels) != num_classes:
                raise ValueError(f"{len(labels)} label_names for num_classes={num_classes}")
        except (KeyError, TypeError, ValueError) as e:
            msg = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise TeacherError(teacher_id, f"config.json: {msg}") from None
        return cls(teacher_id, arch, num_classes, [str(x) for x in labels], pcfg,
                   raw.get("num_features"), dict(raw.get("model_args") or {}),
                   dict(raw.get("source_task") or {}))

    def to_json(self) -> str:
        return json.dumps({
            "architecture": self.architecture,
            "num_classes": self.num_classes,
            "num_features": self.num_features,
            "model_args": self.model_args,
            "label_names": self.label_names,
            "pretrained_cfg": {**self.pretrained_cfg, "num_classes": self.num_classes,
                               "label_names": self.label_names},
            "source_task": self.source_task,
        }, indent=2)
