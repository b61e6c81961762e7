"""`sctd report`: the self-contained HTML run report (sctd_ray/report/).

Fixtures build a run folder by hand: a tiny zoo with one real timm teacher (scored for real
by the engine, so the recomputed bridge can be checked against the scan's sctd_cost), made-up
but consistent rows for the other teachers, an error row, and a distillation search.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save

from sctd_ray import ot
from sctd_ray.assess.engine import assess_teacher, batches_from_arrays
from sctd_ray.assess.results import ranking_table, write_table
from sctd_ray.data.targets import load_target, write_target
from sctd_ray.errors import SctdError
from sctd_ray.metrics import NAMES
from sctd_ray.report import add_report_args, cmd_report, collect_report_data, write_report
from sctd_ray.report.bridge import Bridge, mean_plan
from sctd_ray.report.render import fmt_score, render_html
from sctd_ray.zoo.loading import load_teacher
from sctd_ray.zoo.manifest import build_manifest, write_manifest
from sctd_ray.zoo.store import open_store
from sctd_ray.zoo.teacher import TeacherConfig, config_key, weights_key

TEACHER_CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat"]
TARGET_CLASSES = ["ankle-boot", "bag", "sneaker"]
ERROR_REASON = "model.safetensors is corrupt (header is <not> JSON & truncated)"


# --------------------------------------------------------------------------- fixtures

def _make_zoo(root: Path, images: np.ndarray, labels: np.ndarray) -> str:
    """One teacher: a random test_resnet whose head rows point at (scaled, centred) target-class
    prototypes, so its cost matrix and predictions have structure a bug would disturb."""
    zoo = open_store(str(root))
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=len(TEACHER_CLASSES), in_chans=1).eval()
    cfg = TeacherConfig("fm-real", "test_resnet", len(TEACHER_CLASSES), TEACHER_CLASSES,
                        {"input_size": [1, 28, 28], "mean": [0.5], "std": [0.25]},
                        model_args={"in_chans": 1})
    with torch.no_grad():
        x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
        f = model.forward_head(model.forward_features(x), pre_logits=True)
        mu = torch.stack([f[torch.from_numpy(labels == c)].mean(0) for c in range(len(TARGET_CLASSES))])
        mu = mu - f.mean(0)
        w = torch.cat([mu, -mu[:1], mu[1:2] - mu[2:3]])  # 3 + 2 = 5 teacher classes
        model.get_classifier().weight.copy_(w / w.norm(dim=1, keepdim=True).clamp_min(1e-6) * 20)
        model.get_classifier().bias.zero_()
    zoo.write_bytes(config_key(cfg.teacher_id), cfg.to_json().encode())
    zoo.write_bytes(weights_key(cfg.teacher_id),
                    save({k: v.contiguous().clone() for k, v in model.state_dict().items()}))
    write_manifest(zoo, build_manifest(zoo))
    return zoo.uri


def _make_target(root: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """12 images of 3 classes (each class a noisy copy of its own random pattern)."""
    rng = np.random.default_rng(0)
    labels = [c for c in TARGET_CLASSES for _ in range(4)]
    base = {c: rng.integers(0, 256, (28, 28, 1)) for c in TARGET_CLASSES}
    images = np.stack([np.clip(base[c] + rng.integers(-30, 30, (28, 28, 1)), 0, 255)
                       for c in labels]).astype(np.uint8)
    write_target(open_store(str(root)), {"train": images}, {"train": labels})
    return str(root), images, np.array([TARGET_CLASSES.index(c) for c in labels])


def _write_run(run: Path, zoo_uri: str, target_uri: str, real_scores: dict, distill: bool = True):
    store = open_store(str(run))
    rows = [{"target": "tiny", "teacher_id": "fm-real", "architecture": "test_resnet",
             "status": "ok", "error": None, "samples": 12, "seconds": 0.8, "worker": "w0",
             **real_scores}]
    # made-up teachers: one clearly better (so fm-real is not trivially first), one worse
    fake = {"sctd": real_scores["sctd"] - 0.25, "sctd_cost": -0.91, "leep": -1.2, "nce": -1.0,
            "logme": 0.12, "hscore": 0.5, "transrate": 0.05}
    rows.append({"target": "tiny", "teacher_id": "dg-worse", "architecture": "test_resnet",
                 "status": "ok", "error": None, "samples": 12, "seconds": 0.6, "worker": "w1", **fake})
    rows.append({"target": "tiny", "teacher_id": "zz-broken", "architecture": "test_resnet",
                 "status": "error", "error": ERROR_REASON, "samples": 0, "seconds": 0.0,
                 "worker": "driver"})
    ranking = ranking_table(rows, "sctd", NAMES)
    write_table(store, "ranking.parquet", ranking)
    run_json = {
        "zoo": zoo_uri,
        "targets": {"tiny": {"uri": target_uri, "classes": TARGET_CLASSES, "samples": 12}},
        "settings": {"workers": 2, "batch_size": 256, "metrics": list(NAMES), "rank_by": "sctd",
                     "split": "train"},
        "versions": {"sctd_ray": "0.1.0"},
        "timings": {"data_seconds": 0.4, "scan_seconds": 2.25, "total_seconds": 3.5,
                    "teachers_scored": 3, "pairs": 3, "samples_per_second": 16.0},
        "workers": [{"worker": "w0", "peak_rss_mb": 1536.25, "teachers": 2, "device": "cpu"},
                    {"worker": "w1", "peak_rss_mb": 1210.5, "teachers": 1, "device": "cpu"}],
        "errors": 1, "complete": True,
    }
    store.write_bytes("run.json", json.dumps(run_json).encode())
    if distill:
        trials = pd.DataFrame({
            "trial_id": ["t0", "t1", "t2", "t3"],
            "teacher_id": ["fm-real", "fm-real", "dg-worse", None],
            "method": ["ot", "ot", "kd", "ce"],
            "lam": [1.0, 0.5, 1.0, 0.0], "tau": [2.0, 4.0, 2.0, None], "eps": [0.05, 0.1, None, None],
            "lr": [1e-3, 3e-3, 1e-3, 1e-3], "epochs": [6, 3, 2, 6],
            "val_acc": [0.8125, 0.6875, 0.5, 0.75], "test_acc": [0.7917, 0.625, 0.4583, 0.7083],
            "seconds": [12.5, 6.0, 4.0, 10.0], "status": ["ok", "ok", "ok", "ok"],
            "val_curve": [[0.4, 0.6, 0.7, 0.75, 0.8, 0.8125], [0.3, 0.5, 0.6875], [0.4, 0.5],
                          [0.35, 0.5, 0.6, 0.7, 0.72, 0.75]],
        })
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(trials, preserve_index=False), buf)
        store.write_bytes("distill/results.parquet", buf.getvalue())
        store.write_bytes("distill/summary.json", json.dumps({
            "target": "tiny", "best_trial_id": "t0", "best_teacher_id": "fm-real",
            "best_val_acc": 0.8125, "best_test_acc": 0.7917, "ce_val_acc": 0.75,
            "ce_test_acc": 0.7083, "budget_s": 60.0, "used_s": 32.5,
            "student": {"id": "student-tiny", "uri": "zoo/teachers/student-tiny"},
            "best": {"trial_id": "t0", "lam": 100.0, "lr": 0.003, "val_acc": 0.8125},
            "gain_vs_ce_points": 8.34, "export": {"teacher_id": "student-tiny", "uri": "zoo/teachers/student-tiny"},
            "teachers": [{"teacher_id": "fm-real", "rank": 1, "val_acc": 0.8125, "scores": {"sctd": 0.5}}],
        }).encode())
    return str(run)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    target_uri, images, labels = _make_target(root / "tiny")
    zoo_uri = _make_zoo(root / "zoo", images, labels)
    task = load_target(target_uri, splits=("train",))
    tb = batches_from_arrays("tiny", task.splits["train"].images, task.splits["train"].labels,
                             task.num_classes)
    teacher = load_teacher(open_store(zoo_uri), "fm-real")
    scores = assess_teacher(teacher, tb, device="cpu")["tiny"]
    return {"root": root, "zoo": zoo_uri, "target": target_uri, "scores": scores,
            "task": task, "teacher": teacher}


@pytest.fixture(scope="module")
def run(world):
    return _write_run(world["root"] / "run", world["zoo"], world["target"], world["scores"])


@pytest.fixture(scope="module")
def page(run):
    where = write_report(run, device="cpu")
    assert where == str(Path(run) / "report.html")
    return Path(where).read_text(encoding="utf-8")


# --------------------------------------------------------------------------- HTML parsing

VOID = {"meta", "img", "br", "hr", "link", "input", "col", "area", "base", "source", "wbr"}


class Page(HTMLParser):
    """Checks nesting and collects links, ids, images and table rows with their cell texts."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.problems, self.ids, self.tags = [], [], set(), []
        self.links, self.images = [], []
        self.rows: list[tuple[dict, list[str]]] = []
        self.terms: list[str] = []  # <dt>/<dd> texts in order
        self._row = self._cell = None
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.add(a["id"])
        for k in ("src", "href"):
            if k in a:
                self.links.append(a[k])
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag == "tr":
            self._row = (a, [])
        if tag in ("td", "th", "dt", "dd"):
            self._cell = []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        if tag in ("td", "th") and self._row is not None:
            self._row[1].append("".join(self._cell).strip())
            self._cell = None
        if tag in ("dt", "dd"):
            self.terms.append("".join(self._cell).strip())
            self._cell = None
        if tag == "tr":
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def parse(html_text: str) -> Page:
    p = Page()
    p.feed(html_text)
    p.close()
    return p


def rows_where(p: Page, attr: str, value: str) -> list[list[str]]:
    return [cells for a, cells in p.rows if a.get(attr) == value]


# --------------------------------------------------------------------------- tests

def test_page_is_balanced_and_self_contained(page):
    p = parse(page)
    assert not p.problems and not p.stack, (p.problems, p.stack)
    assert page.startswith("<!DOCTYPE html>")
    assert not {"script", "link", "iframe", "object"} & set(p.tags)
    assert "url(" not in page and "@import" not in page
    for link in p.links:
        if link.startswith("#"):
            assert link[1:] in p.ids, f"dangling in-page anchor {link}"
        else:
            assert link.startswith("data:image/png;base64,"), link


def test_every_image_decodes(page):
    p = parse(page)
    # score chart, bridge heatmaps, learning curves, best student vs ce
    assert len(p.images) == 4
    for src in p.images:
        im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        im.load()
        assert im.format == "PNG" and im.width > 50 and im.height > 50


def test_ranking_rows_show_every_metric_of_ranking_parquet(run, page):
    p = parse(page)
    ranking = pq.read_table(Path(run) / "ranking.parquet").to_pandas()
    ok = ranking[ranking.status == "ok"]
    assert len(ok) == 2
    for _, r in ok.iterrows():
        (cells,) = rows_where(p, "data-teacher", r["teacher_id"])
        assert cells[0] == str(int(r["rank"]))
        for m in NAMES:
            assert fmt_score(r[m]) in cells, (r["teacher_id"], m)
    assert rows_where(p, "data-teacher", "fm-real")[0][0] == "1"


def test_errors_are_shown_with_their_reasons_escaped(page):
    p = parse(page)
    (cells,) = rows_where(p, "data-teacher", "zz-broken")
    assert "error" in cells and ERROR_REASON in cells
    assert "zz-broken: " + ERROR_REASON in "".join(p.text)
    assert "<not>" not in page and "&lt;not&gt; JSON &amp; truncated" in page


def test_run_facts(page):
    p = parse(page)
    facts = dict(zip(p.terms[::2], p.terms[1::2]))
    assert facts["assess wall time (s)"] == "3.5" and facts["samples/s"] == "16"
    assert facts["teachers scanned (this run)"] == "3" and facts["errors"] == "1"
    assert facts["zoo"].endswith("zoo") and facts["complete"] == "yes"
    assert ["w0", "1536.2", "2", "cpu"] in [cells for _, cells in p.rows]  # worker usage


def test_distill_numbers_match_results_parquet(run, page):
    p = parse(page)
    trials = pq.read_table(Path(run) / "distill/results.parquet").to_pandas()
    best = trials.loc[trials.val_acc.idxmax()]
    ce = trials[trials.method == "ce"].iloc[0]
    (best_cells,) = rows_where(p, "data-role", "best student")
    (ce_cells,) = rows_where(p, "data-role", "ce baseline")
    assert best["trial_id"] in best_cells and ce["trial_id"] in ce_cells
    for col in ("val_acc", "test_acc"):
        assert fmt_score(best[col]) in best_cells
        assert fmt_score(ce[col]) in ce_cells
    assert "32.5 of 60.0" in page  # budget used
    facts = dict(zip(p.terms[::2], p.terms[1::2]))
    assert facts["best student vs ce (test accuracy, points)"] == "+8.3"
    assert facts["exported student"] == "zoo/teachers/student-tiny"
    # summary.json: hyper-parameters as numbers, accuracies as scores, a list of teachers by item
    assert facts["best.lam"] == "100" and facts["best.lr"] == "0.003" and facts["best.val_acc"] == "0.8125"
    assert facts["teachers.0.teacher_id"] == "fm-real" and facts["teachers.0.scores.sctd"] == "0.5000"
    for tid in trials.trial_id:
        assert len(rows_where(p, "data-trial", tid)) == 1


def test_bridge_is_recomputed_with_the_engine(world, run):
    data = collect_report_data(run, device="cpu")
    (s,) = data.targets
    b = s.bridge
    assert s.top_teacher == "fm-real" and b is not None and s.bridge_note is None
    assert b.teacher_classes == TEACHER_CLASSES and b.target_classes == TARGET_CLASSES
    assert b.cost.shape == b.plan.shape == (5, 3)
    # the same teacher outputs, independently: M from ot.ground_cost, J by its definition
    x = world["teacher"].preprocessing(torch.from_numpy(world["task"].splits["train"].images))
    model = world["teacher"].model.eval()
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True).double()
        probs = torch.softmax(model.get_classifier()(feats.float()).double(), 1).numpy()
    y = world["task"].splits["train"].labels
    w = model.get_classifier().weight.detach().double().numpy()
    np.testing.assert_allclose(b.cost, ot.ground_cost(feats.numpy(), y, w), atol=1e-5)
    for c in range(3):
        np.testing.assert_allclose(b.plan[:, c], probs[y == c].sum(0) / len(y), atol=1e-6)
    np.testing.assert_allclose(b.plan.sum(), 1.0)
    # <J, M> is the scan's mean transport cost, -sctd_cost (SPEC 2)
    assert b.transport_cost == pytest.approx(-world["scores"]["sctd_cost"], abs=1e-5)


def test_bridge_caption_reports_the_transport_cost(world, page):
    assert f"= {fmt_score(-world['scores']['sctd_cost'])}" in page
    assert "the scan&#x27;s \u2212sctd_cost" in page or "the scan's \u2212sctd_cost" in page


@pytest.fixture(scope="module")
def offline_run(world):
    """A run whose zoo has gone away since the scan, and without a distillation search."""
    return _write_run(world["root"] / "offline-run", str(world["root"] / "gone-zoo"),
                      world["target"], world["scores"], distill=False)


def test_unreachable_zoo_still_writes_a_report(world, offline_run):
    where = write_report(offline_run, device="cpu")
    text = Path(where).read_text(encoding="utf-8")
    p = parse(text)
    assert not p.problems
    assert len(p.images) == 1  # the score chart; no heatmaps
    assert "was unreachable when this report was written" in text
    assert str(world["root"] / "gone-zoo") in text
    assert 'id="distill"' not in text and "#distill" not in text
    assert rows_where(p, "data-teacher", "fm-real")  # the ranking is still there


def test_unreachable_s3_zoo_still_writes_a_report(world, tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3",
                 "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    run = _write_run(tmp_path / "run", "s3://no-bucket/zoo", world["target"], world["scores"],
                     distill=False)
    where = write_report(run, s3_endpoint=f"http://127.0.0.1:{port}", device="cpu")
    text = Path(where).read_text(encoding="utf-8")
    assert "s3://no-bucket/zoo was unreachable" in text and "cannot reach S3 endpoint" in text


def test_an_unreachable_s3_run_is_named_as_such(tmp_path, monkeypatch, capsys):
    import socket

    from sctd_ray.cli import main

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    assert main(["report", "s3://no-bucket/run", "--s3-endpoint", f"http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot reach S3 endpoint" in err and "Parquet" not in err   # not "not a readable Parquet file"


def test_cmd_report_through_argparse(offline_run, tmp_path, capsys):
    run = offline_run
    parser = argparse.ArgumentParser(prog="sctd")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report")
    add_report_args(r)
    r.set_defaults(func=cmd_report)
    (Path(run) / "report.html").unlink(missing_ok=True)
    args = parser.parse_args(["report", run])
    assert args.func(args) == 0
    assert (Path(run) / "report.html").is_file()
    assert str(Path(run) / "report.html") in capsys.readouterr().out
    out = tmp_path / "elsewhere" / "r.html"
    args = parser.parse_args(["report", run, "--out", str(out)])
    assert args.func(args) == 0 and out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_a_folder_without_a_ranking_is_a_clear_error(tmp_path):
    with pytest.raises(SctdError, match="ranking.parquet not found.*not a finished scan run folder"):
        write_report(str(tmp_path))
    assert not (tmp_path / "report.html").exists()


def test_mean_plan_is_the_soft_joint():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.25, 0.25]])
    labels = np.array([1, 0, 1, 1])
    j = mean_plan(probs, labels, 2)
    expected = np.zeros((3, 2))
    for p, y in zip(probs, labels):
        expected[:, y] += p / 4
    np.testing.assert_allclose(j, expected)


@pytest.mark.parametrize("layout", ["parquet", "imagefolder"])
def test_the_bridge_streams_the_target_a_batch_at_a_time(world, monkeypatch, tmp_path, layout):
    """The report's bridge reads the split a batch at a time (a large target is never loaded
    whole into the report's process) and gives the bridge of the split held in memory."""
    from PIL import Image

    import sctd_ray.data.targets as targets
    from sctd_ray.assess.engine import TeacherRunner
    from sctd_ray.report import bridge

    uri, task = world["target"], world["task"]
    if layout == "imagefolder":
        uri = str(tmp_path / "tiny")
        for i, (im, y) in enumerate(zip(task.splits["train"].images, task.splits["train"].labels)):
            path = tmp_path / "tiny" / "train" / task.class_names[y] / f"{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(im[:, :, 0]).save(path)
    whole = bridge.compute_bridge(world["teacher"], task.splits["train"].images, task.splits["train"].labels,
                                  "tiny", task.class_names)
    monkeypatch.setattr(targets, "read_split_records", lambda *a: pytest.fail("the whole split read"))
    monkeypatch.setattr(bridge, "BATCH_SIZE", 7)
    seen, forward = [], TeacherRunner.forward
    monkeypatch.setattr(TeacherRunner, "forward", lambda self, x: seen.append(len(x)) or forward(self, x))
    streamed = bridge.load_bridge(open_store(world["zoo"]), "fm-real", "tiny", uri)
    assert seen == [7, 5] and streamed.samples == 12 and streamed.target_classes == task.class_names
    np.testing.assert_allclose(streamed.cost, whole.cost, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(streamed.plan, whole.plan, rtol=1e-6, atol=1e-12)


def test_large_label_spaces_show_the_heaviest_teacher_classes():
    plan = np.zeros((100, 3))
    plan[[7, 42, 3], 0] = [0.5, 0.3, 0.2]
    b = Bridge("t", "x", "train", [f"k{i}" for i in range(100)], ["a", "b", "c"],
               np.ones((100, 3)), plan, 10)
    assert list(b.shown_rows(2)) == [7, 42]
    assert list(b.shown_rows(200)) == list(range(100))
    assert list(b.shown_cols(40)) == [0, 1, 2]


@pytest.mark.integration
def test_run_zoo_and_target_on_s3(world, s3_bucket):
    """RUN, zoo and target all on S3 (SeaweedFS): read, recomputed and written through the stores."""
    from sctd_ray.zoo.sync import sync

    sync(world["zoo"], f"{s3_bucket}/zoo", progress=False)
    sync(world["target"], f"{s3_bucket}/tiny", progress=False)
    local = _write_run(world["root"] / "s3-run-src", f"{s3_bucket}/zoo", f"{s3_bucket}/tiny",
                       world["scores"])
    sync(local, f"{s3_bucket}/run", progress=False)
    where = write_report(f"{s3_bucket}/run", device="cpu")
    assert where == f"{s3_bucket}/run/report.html"
    text = open_store(f"{s3_bucket}/run").read_bytes("report.html").decode("utf-8")
    p = parse(text)
    assert not p.problems and len(p.images) == 4
    assert f"= {fmt_score(-world['scores']['sctd_cost'])}" in text  # bridge recomputed from S3


def test_clashing_target_names_and_a_target_without_any_ok_teacher(world, tmp_path):
    store = open_store(str(tmp_path / "run"))
    rows = [{"target": "a b", "teacher_id": "fm-real", "architecture": "test_resnet", "status": "ok",
             "error": None, "samples": 12, "seconds": 1.0, "worker": "w0", **world["scores"]},
            {"target": "a-b", "teacher_id": "fm-real", "architecture": "test_resnet",
             "status": "error", "error": "cannot score: class 'bag' has no samples",
             "samples": 0, "seconds": 0.0, "worker": "w0"}]
    write_table(store, "ranking.parquet", ranking_table(rows, "sctd", NAMES))
    store.write_bytes("run.json", json.dumps({
        "zoo": world["zoo"], "settings": {"rank_by": "sctd", "metrics": list(NAMES)},
        "targets": {"a b": {"uri": world["target"], "classes": TARGET_CLASSES, "samples": 12},
                    "a-b": {"uri": world["target"], "classes": TARGET_CLASSES, "samples": 12}}}).encode())
    text = Path(write_report(str(tmp_path / "run"), device="cpu")).read_text(encoding="utf-8")
    p = parse(text)
    assert not p.problems and {"target-a-b", "target-a-b-2"} <= p.ids
    assert len(p.images) == 2  # "a b": score chart and heatmaps; "a-b": nothing to draw
    assert "No teacher was scored without error on this target." in text
    assert "cannot score: class &#x27;bag&#x27; has no samples" in text
    assert "The run description" not in text  # run.json was there


def test_a_scan_of_several_targets_shows_each_targets_search(world, run, tmp_path):
    """``sctd scan`` with several targets writes RUN/distill/<target>/ (run_distill_for_scan):
    each search is shown with its own numbers, none is reported as missing."""
    import shutil

    multi = tmp_path / "multi"
    shutil.copytree(run, multi)
    for name in ("tiny", "other"):
        (multi / "distill" / name).mkdir(parents=True)
        for f in ("results.parquet", "summary.json"):
            shutil.copy(multi / "distill" / f, multi / "distill" / name / f)
    for f in ("results.parquet", "summary.json"):
        (multi / "distill" / f).unlink()
    data = collect_report_data(str(multi), bridges=False)
    assert [d.target for d in data.distill] == ["other", "tiny"]
    assert all(d.best["trial_id"] == "t0" and not d.notes for d in data.distill)
    text = render_html(data)
    assert "is missing" not in text
    assert 'id="distill-tiny"' in text and 'id="distill-other"' in text
    assert text.count("<h2>Distillation search: ") == 2


def test_a_first_targets_search_and_the_ones_added_on_resume_are_all_shown(world, run, tmp_path):
    """A one-target scan's search in RUN/distill, then targets added by `--resume` in
    RUN/distill/<target>: every search has its section, the first named by its summary's target."""
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(run, mixed)
    (mixed / "distill" / "other").mkdir()
    for f in ("results.parquet", "summary.json"):
        shutil.copy(mixed / "distill" / f, mixed / "distill" / "other" / f)
    data = collect_report_data(str(mixed), bridges=False)
    assert [d.target for d in data.distill] == ["tiny", "other"]
    text = render_html(data)
    assert text.count("<h2>Distillation search: ") == 2 and "is missing" not in text


def test_an_interrupted_search_says_so(world, run, tmp_path):
    import shutil

    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    summary = json.loads((cut / "distill" / "summary.json").read_text())
    (cut / "distill" / "summary.json").write_text(json.dumps({**summary, "complete": False}))
    text = render_html(collect_report_data(str(cut), bridges=False))
    assert "This search was interrupted" in text and "--resume" in text


def test_the_bridge_decodes_the_target_as_the_scan_did(world, run, tmp_path, monkeypatch):
    """A scan of a teacher with inputs larger than the default decode size decodes the target
    larger (run.json settings.decode_max_side): the report's bridge reads it the same way."""
    import shutil

    import sctd_ray.data.targets as targets

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    meta = json.loads((copy / "run.json").read_text())
    meta["settings"]["decode_max_side"] = 600
    (copy / "run.json").write_text(json.dumps(meta))
    seen, real = [], targets.iter_split
    monkeypatch.setattr(targets, "iter_split", lambda *a, **k: seen.append(k.get("max_side")) or real(*a, **k))
    data = collect_report_data(str(copy), device="cpu")
    assert seen == [600] and data.targets[0].bridge is not None


def test_class_and_target_names_with_dollar_signs_are_drawn_as_they_are(world, tmp_path):
    """matplotlib reads text between two '$' as mathematical text: a class named `$\\frac$`
    failed the whole report with a traceback, one named `$5-$10` was drawn garbled."""
    from sctd_ray.report import figures

    names = ["$5-$10", "$\\frac$", "50$"]
    task = world["task"]
    labels = [names[i] for i in task.splits["train"].labels]
    uri = str(tmp_path / "price $x$ tiny")
    write_target(open_store(uri), {"train": task.splits["train"].images}, {"train": labels})
    store = open_store(str(tmp_path / "run"))
    rows = [{"target": "price $x$ tiny", "teacher_id": "fm-real", "architecture": "test_resnet",
             "status": "ok", "error": None, "samples": 12, "seconds": 1.0, "worker": "w0",
             **world["scores"]}]
    write_table(store, "ranking.parquet", ranking_table(rows, "sctd", NAMES))
    store.write_bytes("run.json", json.dumps({
        "zoo": world["zoo"], "settings": {"rank_by": "sctd", "metrics": list(NAMES)},
        "targets": {"price $x$ tiny": {"uri": uri, "classes": sorted(names), "samples": 12}}}).encode())
    data = collect_report_data(str(tmp_path / "run"), device="cpu")
    fig, _, _ = figures.bridge_heatmaps(data.targets[0].bridge)
    figures.png_base64(fig)   # draws every label
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert [t._preprocess_math(t.get_text()) for t in fig.axes[0].get_xticklabels()] == \
        [(n, False) for n in sorted(names)], ticks
    assert fig._suptitle._preprocess_math(fig._suptitle.get_text()) == \
        ("label-space bridge: fm-real \u2192 price $x$ tiny", False)
    text = Path(write_report(str(tmp_path / "run"), device="cpu")).read_text(encoding="utf-8")
    assert not parse(text).problems and len(parse(text).images) == 2


def test_long_names_that_share_a_prefix_keep_distinct_labels():
    """Names cut to 24 characters from the start all read `a-very-long-shared-pref...` in the
    heatmap, and a 200-character class name stretched the figure to its 16-inch limit."""
    from sctd_ray.report import figures

    prefix = "a-very-long-shared-prefix-" * 8
    cols = [prefix + s for s in ("bag", "coat", "sneaker")] + ["L" * 200]
    b = Bridge("t", "x", "train", ["k0", "k1"], cols, np.ones((2, 4)), np.full((2, 4), 0.125), 8)
    fig, _, _ = figures.bridge_heatmaps(b)
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert len(set(ticks)) == 4 and all(len(t) <= figures.LABEL_CHARS for t in ticks), ticks
    assert ticks[0].endswith("prefix-bag") and ticks[2].endswith("sneaker")
    assert fig.get_figheight() < 6
    assert figures._labels(["ab" * 20 + "x", "ab" * 20 + "y"], 8) == ["aba\u2026babx", "aba\u2026baby"]
    assert len(set(figures._labels(["p" + "m" * 40 + "s", "p" + "n" * 40 + "s"], 8))) == 2


def test_a_name_the_font_cannot_draw_gives_no_warning_per_glyph():
    """Class names in CJK or with emoji: the figure draws boxes (DejaVu Sans lacks them) without
    a 'Glyph ... missing from font' line on stderr for each character; the tables show them."""
    import warnings

    from matplotlib.figure import Figure

    from sctd_ray.report.figures import png_base64

    fig = Figure()
    fig.add_subplot().set_title("猫 犬 🐱")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert png_base64(fig)
    assert not [w for w in seen if "missing from font" in str(w.message)]
