"""Teacher format, id validation and safe loading (issue 2, items 2 and 4)."""

import json

import pytest
import timm
import torch
from safetensors.torch import save

from sctd_ray.errors import TeacherError, ZooError
from sctd_ray.zoo.loading import load_teacher, parse_safetensors_header, teacher_from_files
from sctd_ray.zoo.store import open_store
from sctd_ray.zoo.teacher import TeacherConfig, check_teacher_id, config_key, weights_key


def _config(tid="t1", arch="test_resnet", num_classes=3, **kw):
    return TeacherConfig(tid, arch, num_classes, [f"c{i}" for i in range(num_classes)],
                         {"input_size": [1, 28, 28], "mean": [0.5], "std": [0.25]},
                         model_args={"in_chans": 1}, **kw)


def _write(store, cfg, state):
    store.write_bytes(config_key(cfg.teacher_id), cfg.to_json().encode())
    store.write_bytes(weights_key(cfg.teacher_id), save(state))


@pytest.fixture
def zoo(tmp_path):
    return open_store(str(tmp_path / "zoo"))


def _state(num_classes=3):
    torch.manual_seed(0)
    m = timm.create_model("test_resnet", num_classes=num_classes, in_chans=1)
    return m, {k: v.contiguous().clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("bad", ["../x", "..", "a/b", "/abs", "", "a b", ".hidden", "x" * 129, "a\\b", "é"])
def test_traversal_and_odd_ids_are_refused(bad):
    with pytest.raises(ZooError, match="invalid teacher id"):
        check_teacher_id(bad)


def test_good_ids_pass():
    for ok in ["fm-all-resnet", "a.b_c-1", "X9"]:
        assert check_teacher_id(ok) == ok
    with pytest.raises(ZooError):
        config_key("../../etc")


def test_load_round_trip_gives_identical_outputs(zoo):
    model, state = _state()
    cfg = _config()
    _write(zoo, cfg, state)
    loaded = load_teacher(zoo, "t1")
    x = torch.randn(4, 1, 28, 28)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    assert loaded.config.label_names == ["c0", "c1", "c2"]
    assert loaded.preprocessing.input_size == (1, 28, 28)


def test_config_round_trips_through_json():
    cfg = _config(source_task={"dataset": "digits"})
    back = TeacherConfig.from_json("t1", cfg.to_json())
    assert back.to_json() == cfg.to_json()
    assert (back.architecture, back.num_classes, back.label_names, back.model_args, back.source_task) == (
        cfg.architecture, cfg.num_classes, cfg.label_names, cfg.model_args, cfg.source_task)


def test_shape_mismatch_names_teacher_and_tensor(zoo):
    _, state = _state(num_classes=5)
    _write(zoo, _config(num_classes=3), state)
    with pytest.raises(TeacherError, match=r"teacher 't1'.*shape mismatch for 'fc\.weight'"):
        load_teacher(zoo, "t1")


def test_missing_tensors_are_reported(zoo):
    _, state = _state()
    state.pop("fc.bias")
    _write(zoo, _config(), state)
    with pytest.raises(TeacherError, match="missing 1 tensors"):
        load_teacher(zoo, "t1")


def test_corrupt_safetensors(zoo):
    _, state = _state()
    cfg = _config()
    _write(zoo, cfg, state)
    data = bytearray(zoo.read_bytes(weights_key("t1")))
    zoo.write_bytes(weights_key("t1"), bytes(data[:100]))
    with pytest.raises(TeacherError, match="corrupt"):
        load_teacher(zoo, "t1")


def test_pickle_weights_are_never_loaded(zoo, tmp_path):
    _, state = _state()
    cfg = _config()
    zoo.write_bytes(config_key("t1"), cfg.to_json().encode())
    torch.save(state, tmp_path / "w.pt")  # a pickle where safetensors should be
    zoo.write_bytes(weights_key("t1"), (tmp_path / "w.pt").read_bytes())
    with pytest.raises(TeacherError, match="corrupt"):
        load_teacher(zoo, "t1")


def test_unknown_architecture(zoo):
    _, state = _state()
    _write(zoo, _config(arch="no_such_net"), state)
    with pytest.raises(TeacherError, match="unknown timm architecture 'no_such_net'"):
        load_teacher(zoo, "t1")


def test_missing_and_invalid_config(zoo):
    _, state = _state()
    zoo.write_bytes(weights_key("t1"), save(state))
    with pytest.raises(TeacherError, match="config.json is missing"):
        load_teacher(zoo, "t1")
    zoo.write_bytes(config_key("t1"), b"{not json")
    with pytest.raises(TeacherError, match="not valid JSON"):
        load_teacher(zoo, "t1")
    zoo.write_bytes(config_key("t1"), json.dumps({"architecture": "test_resnet"}).encode())
    with pytest.raises(TeacherError, match="input_size"):
        load_teacher(zoo, "t1")


def _without_labels(raw):
    raw.pop("label_names")
    raw["pretrained_cfg"].pop("label_names")
    raw["num_classes"] = raw["pretrained_cfg"]["num_classes"] = 0


@pytest.mark.parametrize("edit, match", [
    (lambda raw: raw.update(pretrained_cfg=[1, 2]), "'pretrained_cfg' must be a JSON object"),
    (lambda raw: raw["pretrained_cfg"].update(input_size=[1, "x", 28]), "three positive integers"),
    (lambda raw: raw["pretrained_cfg"].update(input_size="abc"), "three positive integers"),
    (lambda raw: raw["pretrained_cfg"].update(input_size=[1, -28, 28]), "three positive integers"),
    (lambda raw: raw.update(model_args=[1]), "'model_args' must be a JSON object"),
    (lambda raw: raw.update(source_task="digits"), "'source_task' must be a JSON object"),
    (lambda raw: raw.update(num_features="abc"), "'num_features' must be a positive integer"),
    (lambda raw: raw.update(label_names="abc"), "'label_names' must be a list"),
    (_without_labels, "num_classes is 0: a headless model"),
    (lambda raw: raw.update(num_classes=-3), "num_classes must be between 1 and"),
])
def test_a_config_field_of_the_wrong_type_is_that_teachers_error(zoo, edit, match):
    """A value of the wrong type in one config.json is a TeacherError naming the teacher (an
    error row of the manifest), not a TypeError or ValueError that stops `sctd zoo index`,
    `list`, `verify` and `assess` for the whole zoo."""
    from sctd_ray.zoo.manifest import describe_teacher

    raw = json.loads(_config().to_json())
    edit(raw)
    with pytest.raises(TeacherError, match=match):
        TeacherConfig.from_json("t1", json.dumps(raw))
    zoo.write_bytes(config_key("t1"), json.dumps(raw).encode())
    zoo.write_bytes(weights_key("t1"), save(_state()[1]))
    row = describe_teacher(zoo, "t1")
    assert row["status"] == "error" and "teacher 't1': config.json: " in row["error"]


def test_missing_weights(zoo):
    zoo.write_bytes(config_key("t1"), _config().to_json().encode())
    with pytest.raises(TeacherError, match="model.safetensors"):
        load_teacher(zoo, "t1")


def test_weights_other_than_the_manifests_are_refused(zoo):
    """Scoring records the manifest's sha256 as what was scored: weights that changed after
    `sctd zoo index` are refused, naming the fix, not scored under the old hash."""
    import hashlib

    _, state = _state()
    _write(zoo, _config(), state)
    sha = hashlib.sha256(zoo.read_bytes(weights_key("t1"))).hexdigest()
    assert load_teacher(zoo, "t1", sha256=sha).teacher_id == "t1"
    with pytest.raises(TeacherError, match=r"t1.*sha256 .* the manifest .*sctd zoo index"):
        load_teacher(zoo, "t1", sha256="0" * 64)
    zoo.delete(weights_key("t1"))
    with pytest.raises(TeacherError, match=r"model.safetensors.*sctd zoo index"):
        load_teacher(zoo, "t1", sha256=sha)


@pytest.mark.parametrize("cut", [True, False])
def test_the_index_names_weights_cut_after_their_header(zoo, cut):
    """A copy interrupted after the header (or bytes run on past the last tensor): the header
    alone says how long the file must be, so `sctd zoo index` gives an error row, not "ok" for
    a teacher that cannot load."""
    from sctd_ray.zoo.manifest import describe_teacher

    _, state = _state()
    _write(zoo, _config(), state)
    assert describe_teacher(zoo, "t1")["status"] == "ok"
    data = save(state)
    zoo.write_bytes(weights_key("t1"), data[:len(data) // 2] if cut else data + b"\0")
    row = describe_teacher(zoo, "t1")
    assert row["status"] == "error" and "model.safetensors is truncated or corrupt" in row["error"]


def test_a_file_deleted_after_the_index_is_seen_by_the_listing(zoo):
    """Deleting a teacher's weights leaves no newer modification time behind: the listing that
    decides what changed since the index shows the file gone, and the teacher is read again
    (an error row), not listed "ok" from the manifest."""
    from sctd_ray.zoo.manifest import build_manifest, current_manifest, write_manifest

    _, state = _state()
    for tid in ("t1", "t2"):
        _write(zoo, _config(tid), state)
    write_manifest(zoo, build_manifest(zoo))
    zoo.delete(weights_key("t1"))
    said = []
    rows = current_manifest(zoo, log=said.append).set_index("id")
    assert rows.loc["t1", "status"] == "error" and "model.safetensors is missing" in rows.loc["t1", "error"]
    assert rows.loc["t2", "status"] == "ok" and "read again (t1)" in said[0]


def test_hidden_folders_are_no_teachers_and_a_copy_names_its_own_location(zoo, tmp_path):
    """`teachers/.ipynb_checkpoints/` (Jupyter's) is left out, not an "invalid teacher id" error
    row that made every assess exit 1; a manifest copied to another zoo (`sctd zoo push/pull`)
    gives the teachers' locations in that zoo, not in the one indexed."""
    import shutil

    from sctd_ray.zoo.manifest import build_manifest, list_teacher_ids, read_manifest, write_manifest

    _, state = _state()
    _write(zoo, _config("t1"), state)
    zoo.write_bytes("teachers/.ipynb_checkpoints/config-checkpoint.json", b"{}")
    assert list_teacher_ids(zoo) == ["t1"]
    write_manifest(zoo, build_manifest(zoo))
    shutil.copytree(tmp_path / "zoo", tmp_path / "copy")
    copy = open_store(str(tmp_path / "copy"))
    assert list(read_manifest(copy)["uri"]) == [copy.join("teachers/t1")]


def test_header_only_read_counts_params():
    model, state = _state()
    data = save(state)
    reads = []

    def read_range(start, n):
        reads.append((start, n))
        return data[start:start + n]
    header = parse_safetensors_header("t1", read_range)
    assert header["params"] == sum(v.numel() for v in state.values())
    assert sum(n for _, n in reads) == header["header_bytes"] < len(data)


def test_teacher_from_bytes_is_eval_mode():
    _, state = _state()
    t = teacher_from_files(_config(), save(state))
    assert not t.model.training
    # a bytearray (what a buffer filled in place is) loads the same
    t2 = teacher_from_files(_config(), bytearray(save(state)))
    assert all(torch.equal(a, b) for a, b in zip(t.model.state_dict().values(),
                                                 t2.model.state_dict().values()))


def test_large_teachers_are_built_on_meta_small_ones_on_the_cpu(monkeypatch):
    """Both routes give the same teacher; which one runs depends on the weights' size."""
    from sctd_ray.zoo import loading

    seen = []
    real = loading.build_model
    monkeypatch.setattr(loading, "build_model",
                        lambda cfg, device="cpu": seen.append(str(device)) or real(cfg, device))
    _, state = _state()
    data = save(state)
    small = teacher_from_files(_config(), data)
    monkeypatch.setattr(loading, "META_BUILD_MIN_BYTES", len(data))
    large = teacher_from_files(_config(), data)
    assert seen == ["cpu", "meta"]
    a, b = small.model.state_dict(), large.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch,args", [
    ("test_resnet", {"in_chans": 1}), ("test_efficientnet", {"in_chans": 3}), ("test_byobnet", {"in_chans": 3}),
    ("test_nfnet", {"in_chans": 3}), ("test_mambaout", {"in_chans": 1}),
    ("test_vit", {"in_chans": 1, "img_size": 32, "patch_size": 8})])
def test_a_reused_model_equals_a_fresh_build(arch, args):
    """Model reuse (the shard worker's): another teacher's model of the same body key, its head
    resized to this teacher's classes and this teacher's weights copied in, holds exactly the
    state of a fresh build and gives the same outputs, for each demo architecture."""
    from sctd_ray.zoo.loading import body_key

    def teacher(tid, k, seed):
        torch.manual_seed(seed)
        m = timm.create_model(arch, num_classes=k, **args)
        cfg = TeacherConfig(tid, arch, k, [f"c{i}" for i in range(k)],
                            {"input_size": [args["in_chans"], 32, 32], "mean": [0.5] * args["in_chans"],
                             "std": [0.25] * args["in_chans"]}, model_args=dict(args))
        return cfg, save({n: t.contiguous() for n, t in m.state_dict().items()})

    (ca, wa), (cb, wb) = teacher("a", 7, 0), teacher("b", 3, 1)
    assert body_key(ca) == body_key(cb)
    previous = teacher_from_files(ca, wa).model
    handed = []
    reused = teacher_from_files(cb, wb, reuse=lambda key: handed.append(key) or previous)
    fresh = teacher_from_files(cb, wb)
    assert handed == [body_key(cb)] and reused.model is previous and not reused.model.training
    a, b = reused.model.state_dict(), fresh.model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(4, args["in_chans"], 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(reused.model(x), fresh.model(x), rtol=0, atol=0)


def test_a_model_that_cannot_take_the_weights_is_built_afresh():
    """A parked model whose state does not match (here: other weights' dtype) is not used: the
    teacher is built as if nothing were parked."""
    cfg = _config("b", num_classes=3)
    m, state = _state(3)
    half = save({k: (v.half() if v.is_floating_point() else v) for k, v in state.items()})
    previous = teacher_from_files(cfg, save(state)).model
    loaded = teacher_from_files(cfg, half, reuse=lambda key: previous)
    assert loaded.model is not previous


def test_a_teacher_saved_by_timms_save_for_hf_loads(tmp_path):
    """timm's save_for_hf writes num_classes into model_args as well: building such a teacher
    was 'create_model() got multiple values for keyword argument num_classes', an error row
    for every teacher exported by timm itself."""
    from timm.models import save_for_hf

    model = timm.create_model("test_resnet", pretrained=False, num_classes=5)
    save_for_hf(model, tmp_path / "teachers" / "t1", safe_serialization=True)
    raw = json.loads((tmp_path / "teachers" / "t1" / "config.json").read_text())
    assert raw["model_args"].get("num_classes") == 5   # the layout this is about
    loaded = load_teacher(open_store(tmp_path), "t1")
    assert loaded.config.num_classes == 5 and loaded.model.num_classes == 5
    x = torch.rand(2, *loaded.preprocessing.input_size)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model.eval()(x))


def test_a_headless_timm_model_is_named_as_such():
    """timm saves a model created with num_classes=0 (features only) with num_classes 0 and no
    label names: its error row says why it cannot be a teacher, not only a range."""
    raw = {"architecture": "test_resnet", "num_classes": 0, "num_features": 64,
           "model_args": {"num_classes": 0}, "pretrained_cfg": {"input_size": [3, 32, 32], "num_classes": 0}}
    with pytest.raises(TeacherError, match="num_classes is 0: a headless model"):
        TeacherConfig.from_json("t1", json.dumps(raw))
