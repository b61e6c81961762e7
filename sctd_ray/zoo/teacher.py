"""A teacher's files: config.json (timm hub layout), the safetensors header, teacher-id
validation. Torch-free: what the zoo's manifest and a scan's driver read without loading a model.

    <zoo>/teachers/<id>/config.json        architecture, num_classes, num_features, model_args,
                                           label_names, pretrained_cfg (input_size, mean, std)
    <zoo>/teachers/<id>/model.safetensors
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field

from ..errors import NotFound, TeacherError, ZooError

TEACHERS_PREFIX = "teachers"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024
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


def read_config_bytes(store, teacher_id: str) -> bytes:
    """The bytes of ``teachers/<id>/config.json`` (their sha256 stamps what a score used)."""
    try:
        return store.read_bytes(config_key(teacher_id))
    except NotFound:
        raise TeacherError(teacher_id, "config.json is missing") from None


def read_config(store, teacher_id: str) -> TeacherConfig:
    """Read and parse ``teachers/<id>/config.json`` from a store."""
    return TeacherConfig.from_json(teacher_id, read_config_bytes(store, teacher_id))


def parse_safetensors_header(teacher_id: str, read_range) -> dict:
    """Read only the JSON header of a safetensors file via ``read_range(start, length)``.

    Returns ``{"tensors": {name: {"dtype", "shape"}}, "params": int, "header_bytes": int}``.
    """
    head = read_range(0, 8)
    if len(head) < 8:
        raise TeacherError(teacher_id, "model.safetensors is truncated (no header)")
    (n,) = struct.unpack("<Q", head)
    if n <= 1 or n > MAX_HEADER_BYTES:
        raise TeacherError(teacher_id, f"model.safetensors is corrupt (header length {n})")
    raw = read_range(8, n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TeacherError(teacher_id, "model.safetensors is corrupt (header is not JSON)") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    params = 0
    for name, t in tensors.items():
        if not isinstance(t, dict) or "shape" not in t:
            raise TeacherError(teacher_id, f"model.safetensors is corrupt (entry {name!r})")
        size = 1
        for d in t["shape"]:
            size *= int(d)
        params += size
    return {"tensors": tensors, "params": params, "header_bytes": 8 + n}
