"""``sctd zoo verify``: every teacher's hash and loadability, with the reason for each bad one."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import SctdError, StoreAuthError, StoreUnreachable, TeacherError, ZooError
from .loading import read_config, teacher_from_files
from .manifest import MANIFEST_FILE, describe_teacher, list_teacher_ids, read_manifest
from .teacher import weights_key


def check_runs(teacher) -> None:
    """Finite weights, then one forward pass on a blank input: pre-logits and a linear
    classifier (or one a scan folds into one, ``engine.linear_head``) must work (a NaN or inf weight would make every score of the teacher NaN)."""
    for name, tensor in teacher.model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise TeacherError(teacher.teacher_id, f"{bad} NaN or inf value(s) in weight {name!r}")
    from ..assess.engine import check_pre_logits, linear_head

    c, h, w = teacher.preprocessing.input_size
    head = linear_head(teacher)   # the classifier as scans use it (a foldable head folded)
    with torch.inference_mode():
        feats = teacher.model.forward_head(teacher.model.forward_features(torch.zeros(2, c, h, w)),
                                           pre_logits=True)
    check_pre_logits(teacher.teacher_id, feats, head.in_features)


def verify_teacher(store, teacher_id: str, expected_sha256: str | None) -> dict:
    """Return {'id', 'status': ok|error, 'error'} after hashing, loading and running it."""
    try:
        row = describe_teacher(store, teacher_id)
        if row["status"] != "ok":
            return {"id": teacher_id, "status": "error", "error": row["error"]}
        cfg = read_config(store, teacher_id)
        data = store.read_bytes(weights_key(teacher_id))
        if expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256:
            raise TeacherError(teacher_id, "model.safetensors does not match the manifest's sha256 "
                               "(changed or corrupted since `sctd zoo index`)")
        try:
            check_runs(teacher_from_files(cfg, data))
        except SctdError:
            raise
        except Exception as e:  # built, but cannot run (a model_args value timm took at construction)
            first = (str(e).splitlines() or [""])[0][:300]
            raise TeacherError(teacher_id, f"forward failed: {type(e).__name__}: {first}") from None
        return {"id": teacher_id, "status": "ok", "error": ""}
    except (StoreUnreachable, StoreAuthError):
        raise
    except SctdError as e:
        return {"id": teacher_id, "status": "error", "error": str(e)}


def verify_zoo(store, workers: int = 2, log=print) -> list[dict]:
    """Every teacher checked (``verify_teacher``) against the manifest's sha256. A zoo without
    a manifest is checked all the same, and said to be; an unreadable manifest is an error."""
    listed = list_teacher_ids(store)   # first: a wrong path or bucket is one error line, alone
    expected = {}
    if store.exists(MANIFEST_FILE):
        manifest = read_manifest(store, build_if_missing=False)
        expected = dict(zip(manifest["id"], manifest["sha256"]))
    elif listed:
        log(f"no {MANIFEST_FILE}: no sha256 to check the weights against (`sctd zoo index` writes one)")
    ids = sorted(set(listed) | set(expected))
    if not ids:
        raise ZooError(f"{store.uri}: no teachers found (expected teachers/<id>/config.json)")
    present = set(listed)

    def check(t: str) -> dict:
        if t not in present:    # indexed, then deleted or moved
            return {"id": t, "status": "error",
                    "error": f"teacher {t!r}: in {MANIFEST_FILE} but no longer in the zoo "
                             f"(teachers/{t}/config.json is gone); `sctd zoo index` rewrites the manifest"}
        return verify_teacher(store, t, expected.get(t))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(check, ids))
