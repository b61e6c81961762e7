"""Write a trained student back to the zoo as a new teacher entry (SPEC 5, ARCHITECTURE: zoo
format): ``teachers/<id>/config.json`` + ``model.safetensors`` in timm's hub layout, the
target's class names as label names and the student's preprocessing, plus ``card.json``
recording where it came from. The entry is loaded back strictly before it is reported, and
the zoo's manifest (if it has one) gains its row.
"""

from __future__ import annotations

import hashlib
import json
import re
import time

from ..errors import SctdError
from ..zoo.teacher import TEACHERS_PREFIX, TeacherConfig, check_teacher_id, config_key, weights_key

CARD_FILE = "card.json"


def card_key(teacher_id: str) -> str:
    return f"{TEACHERS_PREFIX}/{check_teacher_id(teacher_id)}/{CARD_FILE}"


def student_id(target: str, source: str, salt: str) -> str:
    """A valid, stable teacher id for the student of ``target`` distilled from ``source``
    (a teacher id or "ce"); ``salt`` (e.g. the search's output uri) keeps two searches apart
    while a resumed search overwrites its own export."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"student-{target}-from-{source}")
    slug = re.sub(r"\.{2,}", ".", slug).strip("-.")   # a target folder "digits..v2": no '..' in an id
    tag = hashlib.sha256(salt.encode()).hexdigest()[:8]
    return check_teacher_id(f"{slug[:110]}-{tag}")


def export_student(store, teacher_id: str, config_json: str, weights: bytes, card: dict) -> str:
    """Write config.json, model.safetensors and card.json under ``teachers/<teacher_id>/`` of
    the zoo ``store``; verify the entry loads strictly; update the manifest. Returns its uri."""
    from ..zoo.loading import load_teacher

    raw = json.loads(config_json)
    cfg = TeacherConfig.from_json(teacher_id, json.dumps(raw))
    cfg.source_task = {**cfg.source_task, "distilled": {k: card.get(k) for k in (
        "target", "target_fingerprints", "teacher_id", "method", "val_acc", "test_acc", "search")}}
    store.write_bytes(weights_key(teacher_id), weights)
    store.write_bytes(config_key(teacher_id), cfg.to_json().encode())
    store.write_bytes(card_key(teacher_id), json.dumps(
        {**card, "student_id": teacher_id, "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        indent=2, default=str).encode())
    loaded = load_teacher(store, teacher_id)
    if loaded.config.label_names != list(card.get("class_names", loaded.config.label_names)):
        raise SctdError(f"exported student {teacher_id!r} lost its label names")
    _update_manifest(store, teacher_id)
    return store.join(f"{TEACHERS_PREFIX}/{teacher_id}")


def _update_manifest(store, teacher_id: str) -> None:
    """Add (or replace) the student's row in ``manifest.parquet`` when the zoo has one."""
    import pandas as pd

    from ..zoo.manifest import MANIFEST_FILE, describe_teacher, read_manifest, write_manifest

    if not store.exists(MANIFEST_FILE):
        return
    df = read_manifest(store, build_if_missing=False)
    row = pd.DataFrame([describe_teacher(store, teacher_id)])
    df = pd.concat([df[df["id"] != teacher_id], row], ignore_index=True)
    write_manifest(store, df.sort_values("id").reset_index(drop=True))
