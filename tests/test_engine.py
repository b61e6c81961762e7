"""The teacher runner (SPEC 0): channels_last memory order on the CPU too, with the features of
a plain NCHW timm forward (issue 3)."""

from __future__ import annotations

from pathlib import Path

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
