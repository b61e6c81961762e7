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
MAX_CLASSES = 1_000_000  # a config.json without label_names gets this many generated ones at most
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
            pcfg = _object(raw, "pretrained_cfg")
            labels = raw.get("label_names") or pcfg.get("label_names")
            if labels is not None and not isinstance(labels, list):
                raise ValueError("'label_names' must be a list of class names")
            num_classes = int(raw.get("num_classes") or pcfg.get("num_classes") or len(labels or ()))
            if not isinstance(arch, str) or not arch:
                raise ValueError("'architecture' must be a non-empty string")
            size = pcfg.get("input_size")
            if (not isinstance(size, list) or len(size) != 3
                    or not all(_positive_int(v) for v in size)):
                raise ValueError("pretrained_cfg.input_size must be [channels, height, width], "
                                 f"three positive integers; got {size!r}")
            if num_classes == 0:   # timm's convention for a model saved without its head
                raise ValueError("num_classes is 0: a headless model (no classifier); a teacher "
                                 "is scored through its linear classifier")
            if not 1 <= num_classes <= MAX_CLASSES:
                raise ValueError(f"num_classes must be between 1 and {MAX_CLASSES}, got {num_classes}")
            num_features = raw.get("num_features")
            if num_features is not None and not _positive_int(num_features):
                raise ValueError(f"'num_features' must be a positive integer, got {num_features!r}")
            model_args, source_task = _object(raw, "model_args"), _object(raw, "source_task")
            if not labels:
                labels = [f"class_{i}" for i in range(num_classes)]
            if len(labels) != num_classes:
                raise ValueError(f"{len(labels)} label_names for num_classes={num_classes}")
        except (KeyError, TypeError, ValueError) as e:
            msg = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise TeacherError(teacher_id, f"config.json: {msg}") from None
        return cls(teacher_id, arch, num_classes, [str(x) for x in labels], pcfg,
                   num_features, model_args, source_task)

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


def _object(raw: dict, name: str) -> dict:
    """``raw[name]`` as a dict ({} when absent or null); a JSON object is required."""
    value = raw.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{name!r} must be a JSON object, got {type(value).__name__}")
    return dict(value)


def _positive_int(value) -> bool:
    """A JSON number that is a whole number above 0 (32 or 32.0; not true, "32" or 32.5)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
            and value == int(value))


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

    Returns ``{"tensors": {name: {"dtype", "shape", "data_offsets"}}, "params": int,
    "header_bytes": int, "file_bytes": int}``: ``file_bytes``, the size the header describes.
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
    if not isinstance(header, dict):
        raise TeacherError(teacher_id, "model.safetensors is corrupt (header is not a JSON object)")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    params = data_bytes = 0
    for name, t in tensors.items():
        try:
            size = 1
            for d in t["shape"]:
                size *= int(d)
            data_bytes = max(data_bytes, int(t["data_offsets"][1]))
        except (KeyError, IndexError, TypeError, ValueError):
            raise TeacherError(teacher_id, f"model.safetensors is corrupt (entry {name!r})") from None
        params += size
    return {"tensors": tensors, "params": params, "header_bytes": 8 + n,
            "file_bytes": 8 + n + data_bytes}
