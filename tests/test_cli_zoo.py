"""`sctd zoo ...` on the small demo zoo, locally and on a real SeaweedFS (issue 2, done-when)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from sctd_ray.cli import main
from sctd_ray.zoo.demo import SMALL_TARGETS, SMALL_TEACHERS


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_zoo_layout_and_manifest(demo_zoo):
    root = Path(demo_zoo)
    ids = [s.teacher_id for s in SMALL_TEACHERS]
    assert len(ids) >= 8 and len(SMALL_TARGETS) >= 2
    for tid in ids:
        cfg = json.loads((root / "teachers" / tid / "config.json").read_text())
        assert cfg["pretrained_cfg"]["input_size"] and cfg["label_names"]
        assert cfg["source_task"]["heldout_accuracy"] > 0.5  # real, trained teachers
        assert (root / "teachers" / tid / "model.safetensors").stat().st_size > 10_000
    df = pq.read_table(root / "manifest.parquet").to_pandas()
    assert sorted(df["id"]) == sorted(ids)
    assert (df["status"] == "ok").all()
    assert len(set(df["architecture"])) >= 4
    assert {tuple(v) for v in df["input_size"]} >= {(1, 28, 28), (3, 32, 32)}
    for name in SMALL_TARGETS:
        for split in ("train", "val", "test"):
            t = pq.read_table(root / "targets" / name / f"{split}.parquet")
            assert t.column_names == ["image", "label"]


def test_index_list_verify(demo_zoo, tmp_path, capsys):
    zoo = tmp_path / "zoo"
    shutil.copytree(demo_zoo, zoo)
    (zoo / "manifest.parquet").unlink()
    assert main(["zoo", "index", str(zoo)]) == 0
    assert (zoo / "manifest.parquet").exists()
    assert "indexed 8 teachers" in capsys.readouterr().out
    assert main(["zoo", "list", str(zoo), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == len(SMALL_TEACHERS) and all(r["sha256"] for r in rows)
    assert main(["zoo", "verify", str(zoo)]) == 0
    assert f"{len(SMALL_TEACHERS)} ok, 0 bad" in capsys.readouterr().out
    assert main(["zoo", "verify", str(tmp_path / "typo")]) == 2      # not a zoo: not "0 ok, 0 bad"
    err = capsys.readouterr().err.strip().splitlines()   # one line: not "no manifest.parquet" first
    assert len(err) == 1 and "no teachers found" in err[0], err
    # a broken teacher's row: its unknowns blank, the others' numbers still integers
    (zoo / "teachers" / SMALL_TEACHERS[0].teacher_id / "config.json").write_text("{bad")
    assert main(["zoo", "index", str(zoo)]) == 0
    capsys.readouterr()
    assert main(["zoo", "list", str(zoo)]) == 0
    table = capsys.readouterr().out
    assert "NaN" not in table and ".0 " not in table and "error" in table, table


def test_verify_names_corrupt_and_mismatched_teachers(demo_zoo, tmp_path, capsys):
    zoo = tmp_path / "zoo"
    shutil.copytree(demo_zoo, zoo)
    a, b = SMALL_TEACHERS[0].teacher_id, SMALL_TEACHERS[1].teacher_id
    w = zoo / "teachers" / a / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-200:] = b"\0" * 200  # flipped bytes: the sha256 in the manifest no longer matches
    w.write_bytes(bytes(data))
    cfg_path = zoo / "teachers" / b / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_classes"] += 1
    cfg["label_names"].append("extra")
    cfg_path.write_text(json.dumps(cfg))
    assert main(["zoo", "verify", str(zoo)]) == 1
    out = capsys.readouterr().out
    assert f"ERROR  {a}: teacher '{a}': model.safetensors does not match the manifest's sha256" in out
    assert f"ERROR  {b}" in out and "shape mismatch" in out
    assert "2 bad" in out


def test_verify_names_a_teacher_deleted_after_index(demo_zoo, tmp_path, capsys):
    zoo = tmp_path / "zoo"
    shutil.copytree(demo_zoo, zoo)
    gone = SMALL_TEACHERS[0].teacher_id
    shutil.rmtree(zoo / "teachers" / gone)
    assert main(["zoo", "verify", str(zoo)]) == 1
    out = capsys.readouterr().out
    assert (f"ERROR  {gone}: teacher '{gone}': in manifest.parquet but no longer in the zoo "
            f"(teachers/{gone}/config.json is gone); `sctd zoo index` rewrites the manifest") in out
    assert "1 bad" in out


def test_verify_names_a_teacher_with_nan_or_inf_weights(demo_zoo, tmp_path, capsys):
    """Loadable and runnable, but a NaN in its weights makes all its scores NaN: not ok."""
    from safetensors.torch import load_file, save_file

    zoo = tmp_path / "zoo"
    shutil.copytree(demo_zoo, zoo, ignore=shutil.ignore_patterns("manifest.parquet"))
    a = SMALL_TEACHERS[0].teacher_id
    w = zoo / "teachers" / a / "model.safetensors"
    tensors = load_file(w)
    name = sorted(k for k in tensors if tensors[k].is_floating_point())[-1]
    tensors[name].view(-1)[0] = float("nan")
    tensors[name].view(-1)[-1] = float("inf")
    save_file(tensors, w)
    assert main(["zoo", "verify", str(zoo)]) == 1
    out = capsys.readouterr().out
    assert f"ERROR  {a}: teacher '{a}': 2 NaN or inf value(s) in weight {name!r}" in out and "1 bad" in out


def test_verify_names_a_teacher_that_builds_but_cannot_run(demo_zoo, tmp_path, capsys):
    """A model_args value timm takes at construction but the forward pass cannot use (here a
    string drop_rate): that teacher's ERROR line, not a traceback that ends the verification."""
    zoo = tmp_path / "zoo"
    shutil.copytree(demo_zoo, zoo)
    a = next(s.teacher_id for s in SMALL_TEACHERS if s.arch == "effnet")
    cfg_path = zoo / "teachers" / a / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_args"]["drop_rate"] = "x"
    cfg_path.write_text(json.dumps(cfg))
    assert main(["zoo", "verify", str(zoo)]) == 1
    out = capsys.readouterr().out
    assert f"ERROR  {a}: teacher '{a}': forward failed: TypeError" in out and "1 bad" in out


def test_push_pull_round_trip_is_byte_identical(demo_zoo, s3_bucket, tmp_path, capsys):
    src = Path(demo_zoo)
    assert main(["zoo", "push", str(src), f"{s3_bucket}/zoo", "--quiet"]) == 0
    assert "skipped 0" in capsys.readouterr().out
    assert main(["zoo", "push", str(src), f"{s3_bucket}/zoo", "--quiet"]) == 0
    assert "copied 0 files" in capsys.readouterr().out  # unchanged files are skipped
    assert main(["zoo", "list", f"{s3_bucket}/zoo"]) == 0
    assert SMALL_TEACHERS[0].teacher_id in capsys.readouterr().out
    assert main(["zoo", "verify", f"{s3_bucket}/zoo"]) == 0
    dst = tmp_path / "back"
    assert main(["zoo", "pull", f"{s3_bucket}/zoo", str(dst), "--quiet"]) == 0
    assert _files(dst) == _files(src)
    # the manifest is copied after the files it describes, both ways: a scan of either copy
    # takes none of them for a change made since `sctd zoo index`
    from sctd_ray.zoo.manifest import current_manifest
    from sctd_ray.zoo.store import open_store

    for copy in (f"{s3_bucket}/zoo", str(dst)):
        said = []
        assert len(current_manifest(open_store(copy), log=said.append)) == len(SMALL_TEACHERS)
        assert said == [], copy


def test_a_push_after_a_change_since_the_index_writes_a_current_manifest(demo_zoo, s3_bucket, tmp_path,
                                                                        capsys):
    """A teacher retrained in place after `sctd zoo index`: a scan of the source sees that by the
    files' times. Its stale manifest, copied as it is after the files, would look current at the
    destination: the old row listed, the new weights refused. The copy gets it up to date."""
    import os

    from sctd_ray.zoo.manifest import current_manifest
    from sctd_ray.zoo.store import open_store, sha256_file

    zoo = tmp_path / "zoo"
    shutil.copytree(demo_zoo, zoo)
    assert main(["zoo", "index", str(zoo)]) == 0
    a, b = "fm-tops-effnet", "fm-rot-all-effnet"     # 5 and 10 classes, one architecture
    later = (zoo / "manifest.parquet").stat().st_mtime + 10
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(zoo / "teachers" / b / name, zoo / "teachers" / a / name)
        os.utime(zoo / "teachers" / a / name, (later, later))
    capsys.readouterr()
    for dst in (f"{s3_bucket}/zoo", str(tmp_path / "copy")):
        assert main(["zoo", "push", str(zoo), dst, "--quiet"]) == 0
        assert "is written up to date instead" in capsys.readouterr().err
        said = []
        row = current_manifest(open_store(dst), log=said.append).set_index("id").loc[a]
        assert said == [] and row["num_classes"] == 10, dst
        assert row["sha256"] == sha256_file(zoo / "teachers" / a / "model.safetensors")


def test_errors_are_one_line_with_nonzero_exit(tmp_path, s3):
    env = {**s3.env(), "AWS_SECRET_ACCESS_KEY": "wrong-secret-123"}
    cases = [
        (["zoo", "list", str(tmp_path / "nowhere")], None),
        (["zoo", "list", "s3://nobucket/zoo", "--s3-endpoint", "http://127.0.0.1:1"], None),
        (["zoo", "list", "s3://zoo/x"], env),
    ]
    import os
    for argv, extra in cases:
        p = subprocess.run([sys.executable, "-m", "sctd_ray.cli", *argv], capture_output=True, text=True,
                           env={**os.environ, **(extra or {})}, timeout=120)
        assert p.returncode != 0, argv
        lines = [line for line in p.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("sctd: error:"), p.stderr
        assert "Traceback" not in p.stderr and "wrong-secret-123" not in p.stderr


def test_a_reader_that_goes_away_ends_the_listing_quietly(demo_zoo):
    """`sctd zoo list | head`: the pipe closes before sctd writes; it stops as `cat` does
    (status 141, 128 + SIGPIPE), not with a BrokenPipeError traceback."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)                                   # the reader has gone
    try:
        p = subprocess.run([sys.executable, "-m", "sctd_ray.cli", "zoo", "list", demo_zoo],
                           stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert "Traceback" not in p.stderr and "BrokenPipeError" not in p.stderr, p.stderr
    assert p.returncode == 141


def test_verify_names_an_unreadable_or_missing_manifest(demo_zoo, tmp_path, capsys):
    """Verify checks weights against the manifest's sha256: a corrupt manifest is an error, not
    a zoo reported fine with nothing checked; a missing one is said."""
    zoo = tmp_path / "zoo"
    shutil.copytree(demo_zoo, zoo)
    (zoo / "manifest.parquet").write_bytes(b"not parquet at all")
    assert main(["zoo", "verify", str(zoo)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "manifest.parquet is not a valid Parquet file" in err[0]
    assert f"`sctd zoo index {zoo}` writes it again" in err[0]      # and how to fix it
    (zoo / "manifest.parquet").unlink()
    assert main(["zoo", "verify", str(zoo)]) == 0
    assert "no manifest.parquet: no sha256 to check the weights against" in capsys.readouterr().err


def test_output_to_a_full_disk_is_one_line_not_a_traceback(demo_zoo):
    if not Path("/dev/full").exists():
        import pytest

        pytest.skip("no /dev/full")
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-m", "sctd_ray.cli", "zoo", "list", demo_zoo],
                           stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "no space left on device" in lines[0], p.stderr
