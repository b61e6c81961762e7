"""Safe loading of a teacher into timm: config.json -> ``timm.create_model`` -> strict
``load_state_dict`` from model.safetensors. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.preprocess import Preprocessing
from ..errors import StoreAuthError, StoreError, StoreUnreachable, TeacherError
from .teacher import (TeacherConfig, config_key, parse_safetensors_header, read_config_bytes,  # noqa: F401 (re-exported)
                      read_config, weights_key)

# Weights at least this large are built on the meta device (timm's random init of a big model
# costs more than meta's per-op overhead: resnet50 66 ms vs ~0.5 s); smaller ones on the CPU,
# which is faster for them (tiny demo teachers: 6-8 ms vs 10-34 ms) and spares a process that
# never builds on meta the ~2 s its first meta build costs (bench/scan_bench.py, docs/benchmarks.md)
META_BUILD_MIN_BYTES = 8 * 1024 * 1024


@dataclass
class LoadedTeacher:
    """A ready-to-run teacher: its config, the timm model (eval mode), its preprocessing."""

    config: TeacherConfig
    model: torch.nn.Module
    preprocessing: Preprocessing
    config_sha256: str | None = None   # of the config.json bytes it was built from

    @property
    def teacher_id(self) -> str:
        return self.config.teacher_id


def build_model(config: TeacherConfig, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Instantiate the timm architecture named in config.json, without weights.

    With ``device="meta"`` no memory is allocated and no random init runs: the weights are
    then assigned by ``load_weights`` (several times faster for large teachers)."""
    import timm

    if not timm.is_model(config.architecture):
        raise TeacherError(config.teacher_id, f"unknown timm architecture {config.architecture!r}")
    try:
        with torch.device(device):
            # timm's save_for_hf records num_classes in model_args too; the config's own wins,
            # as in timm's create_model (a model_args key never overrides an explicit argument)
            return timm.create_model(config.architecture, pretrained=False,
                                     **{**config.model_args, "num_classes": config.num_classes})
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:
        raise TeacherError(config.teacher_id, f"cannot build {config.architecture!r} with "
                           f"model_args {config.model_args}: {e}") from None


def read_weights(config: TeacherConfig, weights: bytes | str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (bytes or path), on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load, load_file

    try:
        if isinstance(weights, (bytes, bytearray)):   # safetensors parses bytes only
            return load(weights if isinstance(weights, bytes) else bytes(weights))
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise TeacherError(config.teacher_id, f"model.safetensors is corrupt or unreadable: {e}") from None


def load_weights(config: TeacherConfig, model: torch.nn.Module, weights: bytes | str | Path) -> None:
    """Load safetensors weights strictly (every key present, every shape equal)."""
    state = read_weights(config, weights)
    check_weights(config, model.state_dict(), state)
    model.load_state_dict(state, strict=True, assign=True)


def check_weights(config: TeacherConfig, own: dict, state: dict) -> None:
    """TeacherError unless ``state`` has exactly the keys of ``own`` with the same shapes."""
    tid = config.teacher_id
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[0]!r})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors (e.g. {unexpected[0]!r})")
        raise TeacherError(tid, "weights do not match the architecture: " + ", ".join(parts))
    for name in own:  # in the model's order, so the first mismatch reported is stable
        tensor = state[name]
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise TeacherError(tid, f"shape mismatch for {name!r}: weights {tuple(tensor.shape)}, "
                               f"model {tuple(own[name].shape)}")


def body_key(config: TeacherConfig) -> tuple:
    """What a timm model's structure depends on apart from its head's size: teachers with equal
    keys can run in one model instance, one after the other (``teacher_from_files(reuse=...)``)."""
    return (config.architecture, json.dumps(config.model_args, sort_keys=True, default=str))


def _reload(config: TeacherConfig, model: torch.nn.Module, weights) -> torch.nn.Module | None:
    """``model`` (a previous teacher's, of the same ``body_key``) with this teacher's head size
    and weights copied into it; None when it does not fit them exactly (other keys, shapes or
    dtypes), so the caller builds the model afresh (whose checks report what is wrong)."""
    state = read_weights(config, weights)
    head = getattr(model, "num_classes", None)
    if head != config.num_classes:
        if not hasattr(model, "reset_classifier"):
            return None
        model.reset_classifier(config.num_classes)   # a new linear head, the body unchanged
    own = model.state_dict()
    try:
        check_weights(config, own, state)
    except TeacherError:
        return None
    if any(own[k].dtype != state[k].dtype for k in own):
        return None
    with torch.no_grad():
        model.load_state_dict(state, strict=True)    # copies, on the device the model is on
    return model.eval()


def _file_size(path) -> int:
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0   # load_weights reports the unreadable file


def _has_meta_tensors(model: torch.nn.Module) -> bool:
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def teacher_from_files(config: TeacherConfig, weights: bytes | str | Path, reuse=None) -> LoadedTeacher:
    """Build and load a teacher from its parsed config and its safetensors bytes or path
    (large ones built on the meta device, see ``META_BUILD_MIN_BYTES``).

    ``reuse(body_key)`` may hand over a model that an earlier teacher of the same architecture
    and model arguments no longer needs: its head is resized and this teacher's weights are
    copied into it, instead of building a model (the Python-heavy part of loading)."""
    old = reuse(body_key(config)) if reuse is not None else None
    if old is not None:
        model = _reload(config, old, weights)
        if model is not None:
            return LoadedTeacher(config, model, _preprocessing(config))
    size = len(weights) if isinstance(weights, (bytes, bytearray)) else _file_size(weights)
    model = None
    if size >= META_BUILD_MIN_BYTES:
        try:
            model = build_model(config, "meta")
        except TeacherError:  # e.g. an architecture that computes at construction: build for real
            model = None
    if model is not None:
        load_weights(config, model, weights)
    if model is None or _has_meta_tensors(model):  # non-persistent buffers (Swin) need a real init
        model = build_model(config)
        load_weights(config, model, weights)
    model.eval()
    return LoadedTeacher(config, model, _preprocessing(config))


def _preprocessing(config: TeacherConfig) -> Preprocessing:
    try:
        return Preprocessing.from_pretrained_cfg(config.pretrained_cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise TeacherError(config.teacher_id, f"bad preprocessing in config.json: {e}") from None


def load_teacher(store, teacher_id: str, cache=None, sha256: str | None = None, reuse=None) -> LoadedTeacher:
    """Fetch config + weights from a store (through the content cache when a sha256 is known)
    and return the loaded teacher (``reuse``: see ``teacher_from_files``). Every problem raises
    TeacherError naming the teacher, except an unreachable store or refused credentials, which
    concern the whole scan. With ``sha256`` (the manifest's), weights with another content are
    refused: results record that hash as what was scored, and a resume trusts them by it."""
    stale = "; the zoo changed after its manifest was written: run `sctd zoo index`"
    try:
        raw = read_config_bytes(store, teacher_id)
    except TeacherError as e:
        raise TeacherError(teacher_id, e.reason + (stale if sha256 else "")) from None
    config = TeacherConfig.from_json(teacher_id, raw)
    key = weights_key(teacher_id)
    try:
        if cache is not None and sha256:
            weights = cache.fetch(store, key, sha256)
        else:
            weights = store.read_bytes(key)
    except (StoreUnreachable, StoreAuthError):
        raise
    except StoreError as e:
        raise TeacherError(teacher_id, f"cannot read model.safetensors: {e}"
                                       + (stale if sha256 else "")) from None
    if sha256 and isinstance(weights, bytes):
        got = hashlib.sha256(weights).hexdigest()
        if got != sha256.lower():
            raise TeacherError(teacher_id, f"model.safetensors has sha256 {got[:12]}..., the manifest "
                                           f"{sha256.lower()[:12]}...{stale}")
    loaded = teacher_from_files(config, weights, reuse)
    loaded.config_sha256 = hashlib.sha256(raw).hexdigest()
    return loaded
