"""The teacher runner (SPEC 0): channels_last memory order on the CPU too, with the features of
a plain NCHW timm forward (issue 3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sctd_ray.assess.engine import TeacherRunner
from sctd_ray.data.targets import load_target
from sctd_ray.zoo.loading import load_teacher
from sctd_ray.zoo.store import open_store


@pytest.mark.parametrize("tid", ["fm-misc-byob", "fm-rot-all-effnet", "fm-inv-all-vit", "dg-all-resnet"])
def test_runner_runs_channels_last_with_the_plain_forwards_features(demo_zoo, tid):
    """A conv teacher's 4-D weights go channels_last (oneDNN's faster order); features and
    logits equal a plain contiguous forward of the same weights to float32 rounding, for
    grey and RGB inputs, conv nets and a ViT."""
    x = torch.from_numpy(load_target(str(Path(demo_zoo) / "targets" / "fm-mix5"),
                                     splits=("train",)).splits["train"].images.copy())
    plain = load_teacher(open_store(demo_zoo), tid)
    with torch.inference_mode():
        f_ref = plain.model.forward_head(plain.model.forward_features(plain.preprocessing(x)), pre_logits=True)
        z_ref = plain.model.get_classifier()(f_ref)

    runner = TeacherRunner(load_teacher(open_store(demo_zoo), tid), "cpu")
    convs = [m.weight for m in runner.model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    f, z = runner.forward(x)
    torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-5 * float(f_ref.abs().max()))
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5 * float(z_ref.abs().max()))

    contiguous = TeacherRunner(load_teacher(open_store(demo_zoo), tid), "cpu", channels_last=False)
    assert all(m.weight.is_contiguous() for m in contiguous.model.modules() if isinstance(m, torch.nn.Conv2d))
    torch.testing.assert_close(contiguous.forward(x)[0], f_ref, rtol=1e-6, atol=1e-6 * float(f_ref.abs().max()))


def test_a_nan_in_the_classifier_is_a_teacher_error_that_says_so(demo_zoo):
    """A corrupt head makes every score NaN: the teacher's error row names the cause and the
    check that finds it, not a score function's input error."""
    from sctd_ray.errors import TeacherError

    teacher = load_teacher(open_store(demo_zoo), "fm-all-resnet")
    with torch.no_grad():
        teacher.model.get_classifier().weight[2, 3] = float("nan")
        teacher.model.get_classifier().bias[0] = float("inf")
    with pytest.raises(TeacherError, match=r"fm-all-resnet.*2 NaN or inf value\(s\) in the classifier's "
                                           r"weights .*sctd zoo verify"):
        TeacherRunner(teacher, "cpu")


def _tiny_teacher(tid, arch, model_args, size=32, num_classes=4):
    """A randomly initialised (BatchNorm statistics perturbed) timm teacher, built in memory."""
    import timm

    from sctd_ray.data.preprocess import Preprocessing
    from sctd_ray.zoo.loading import LoadedTeacher
    from sctd_ray.zoo.teacher import TeacherConfig

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **model_args).eval()
    with torch.no_grad():   # non-trivial BatchNorm folds: running statistics away from 0 / 1
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    pcfg = {"input_size": [3, size, size], "mean": [0.5] * 3, "std": [0.25] * 3}
    cfg = TeacherConfig(tid, arch, num_classes, [f"c{i}" for i in range(num_classes)], pcfg,
                        model_args=dict(model_args))
    return LoadedTeacher(cfg, model, Preprocessing.from_pretrained_cfg(pcfg))


# heads that are no nn.Linear but an affine map of the pre-logits in eval mode
FOLDABLE = {
    "levit-distilled": ("levit_128s", {"img_size": 32}),                    # (NormLinear, NormLinear)
    "levit": ("levit_128s", {"img_size": 32, "distilled": False}),           # NormLinear (BN + Linear)
    "dla": ("dla46_c", {}),                                                 # 1x1 Conv2d
}


@pytest.mark.parametrize("name", sorted(FOLDABLE))
def test_a_head_that_is_an_affine_map_of_the_pre_logits_is_scored_with_the_models_own_logits(name):
    """LeViT's BatchNorm+Linear heads (two of them, averaged, when distilled) and DLA's 1x1 conv
    classifier are folded into one linear head W_t, b_t: the runner's logits are the model's,
    the teacher scores, and `sctd zoo verify` accepts it as a scan does."""
    from sctd_ray.assess.engine import TargetBatches, assess_teacher
    from sctd_ray.zoo.verify import check_runs

    arch, args = FOLDABLE[name]
    teacher = _tiny_teacher(name, arch, args)
    assert not isinstance(teacher.model.get_classifier(), torch.nn.Linear)
    images = torch.randint(0, 256, (12, 32, 32, 1), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(12) % 3
    with torch.inference_mode():
        want = teacher.model(teacher.preprocessing(images))
    check_runs(teacher)
    runner = TeacherRunner(teacher, "cpu", channels_last=False)
    feats, logits = runner.forward(images)
    assert runner.weight.shape == (4, feats.shape[1])
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    scores = assess_teacher(teacher, TargetBatches("t", 3, lambda: iter([(images, labels)])), device="cpu")["t"]
    assert all(np.isfinite(v) for v in scores.values()), scores


def test_a_distilled_vit_and_an_unpooled_model_are_errors_that_say_why_in_scan_and_verify():
    """DeiT's distillation head reads another token than its pre-logits: no W_t, b_t scores it.
    A model_args global_pool='' leaves a feature map as pre-logits. Both are TeacherErrors that
    name the teacher and the cause, the same in the runner (a scan's error row) and in verify,
    never a matrix-shape RuntimeError."""
    from sctd_ray.errors import TeacherError
    from sctd_ray.zoo.verify import check_runs

    deit = _tiny_teacher("deit-d", "deit_tiny_distilled_patch16_224",
                         {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2})
    for check in (lambda: TeacherRunner(deit, "cpu"), lambda: check_runs(deit)):
        with pytest.raises(TeacherError, match=r"deit-d.*2 heads \(Linear, Linear\).*not an affine function"):
            check()
    flat = _tiny_teacher("no-pool", "test_resnet", {"global_pool": ""})
    images = torch.zeros(3, 32, 32, 3, dtype=torch.uint8)
    for check in (lambda: TeacherRunner(flat, "cpu").forward(images), lambda: check_runs(flat)):
        with pytest.raises(TeacherError, match=r"no-pool.*pre-logits have shape \(\d+, 96, 1, 1\), "
                                               r"classifier expects \(batch, 96\) features"):
            check()
