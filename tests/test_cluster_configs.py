"""cluster/: the Ray cluster launcher config and the KubeRay manifests (issue 7).

The launcher config goes through Ray's own preparation and schema validation (what `ray up`
runs before it touches AWS); the KubeRay manifests are checked for the fields KubeRay needs
and for agreement with each other, the Dockerfile, jobs/ and the installed Ray.
"""

from __future__ import annotations

import copy
import fnmatch
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
sys.path.insert(0, str(REPO / "jobs"))
import sctd_job  # noqa: E402


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _prepared(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# ------------------------------------------------------------------ cluster/aws.yaml
@pytest.fixture(scope="module")
def aws():
    return _load(CLUSTER / "aws.yaml")


def test_aws_config_passes_ray_validation(aws):
    cfg = _prepared(aws)
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker type"
    for name, t in gpu_types.items():
        assert t["min_workers"] == 0, f"{name} must scale from 0"
        assert 1 <= t["max_workers"] <= cfg["max_workers"], name
        assert "InstanceType" in t["node_config"] and "IamInstanceProfile" in t["node_config"], name


def test_ray_validation_catches_a_broken_copy(aws):
    """The validation used above is real: a fractional GPU count or an unknown head type fails."""
    from jsonschema import ValidationError

    bad = copy.deepcopy(aws)
    next(t for t in bad["available_node_types"].values() if t["resources"].get("GPU"))["resources"]["GPU"] = 0.5
    with pytest.raises(ValidationError):
        _prepared(bad)
    bad = copy.deepcopy(aws)
    bad["head_node_type"] = "no-such-type"
    with pytest.raises(ValueError):
        _prepared(bad)


def test_aws_config_turns_on_token_auth_and_installs_sctd_ray(aws):
    cfg = _prepared(aws)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    src = cfg["file_mounts"]["~/sctd-ray"]
    assert (REPO / src / "pyproject.toml").exists()  # "." from the repository root
    assert any(re.search(r"pip install .*~/sctd-ray", c) for c in cfg["setup_commands"])
    text = (CLUSTER / "aws.yaml").read_text()
    for needle in ("s3:GetObject", "s3:ListBucket", "s3:PutObject", "iam:PassRole"):
        assert needle in text, f"the IAM comment should name {needle}"


def _tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    return [p for p in out.stdout.splitlines() if p.startswith(("sctd_ray/", "jobs/")) or p == "pyproject.toml"]


def test_aws_rsync_excludes_keep_the_package(aws):
    """rsync matches an unanchored pattern against every path component: `zoo` would drop
    sctd_ray/zoo/. Every file the cluster needs must survive every exclude."""
    files = _tracked_files()
    assert "sctd_ray/cli.py" in files and any(f.startswith("sctd_ray/zoo/") for f in files)
    for pattern in aws["rsync_exclude"]:
        if pattern.startswith("/"):
            anchored = pattern.lstrip("/")
            hit = [f for f in files if f == anchored or f.startswith(anchored + "/")]
        else:
            name = pattern.removeprefix("**/").removesuffix("/**")
            hit = [f for f in files if any(fnmatch.fnmatch(part, name) for part in f.split("/"))]
        assert not hit, f"rsync_exclude {pattern!r} drops {hit[:3]}"


# ------------------------------------------------------------------ cluster/kuberay
@pytest.fixture(scope="module")
def raycluster():
    return _load(KUBERAY / "raycluster.yaml")


@pytest.fixture(scope="module")
def rayjob():
    return _load(KUBERAY / "rayjob.yaml")


def _check_cluster_spec(spec: dict) -> None:
    import ray

    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head
    head_containers = head["template"]["spec"]["containers"]
    assert head_containers and all(c.get("name") and c.get("image") for c in head_containers)
    assert "nvidia.com/gpu" not in head_containers[0].get("resources", {}).get("limits", {})
    groups = spec["workerGroupSpecs"]
    gpu_groups = [g for g in groups
                  if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu_groups, "no GPU worker group"
    for g in gpu_groups:
        assert g["groupName"] and "rayStartParams" in g
        assert g["minReplicas"] == 0 and g["maxReplicas"] >= 1
        assert g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"]
        for c in g["template"]["spec"]["containers"]:
            assert c.get("name") and c.get("image")
            res = c["resources"]
            assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"]


def test_raycluster_has_token_auth_and_an_autoscaling_gpu_group(raycluster):
    assert raycluster["apiVersion"] == "ray.io/v1" and raycluster["kind"] == "RayCluster"
    assert raycluster["metadata"]["name"]
    _check_cluster_spec(raycluster["spec"])


def test_rayjob_creates_the_same_cluster_and_runs_scan_from_jobs(rayjob, raycluster):
    from ray.runtime_env import RuntimeEnv

    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    _check_cluster_spec(spec["rayClusterSpec"])
    assert spec["rayClusterSpec"] == raycluster["spec"], "rayjob.yaml's cluster drifted from raycluster.yaml"
    assert spec["shutdownAfterJobFinishes"] is True
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and argv[1] == "jobs/scan.py"
    assert (REPO / argv[1]).is_file()
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**{**env, "working_dir": str(REPO)})  # in the image, working_dir is this checkout
    # The working_dir is the repository inside the image (where the Dockerfile copies it).
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    assert re.search(rf"^COPY .*\s\.\s+{re.escape(env['working_dir'])}\s*$", dockerfile, re.M)
    assert not any(e.strip("/") in ("sctd_ray", "jobs", "sctd_ray/zoo") or e in ("zoo/", "zoo")
                   for e in env["excludes"])


def test_rayjob_entrypoint_options_are_scan_options(rayjob):
    from sctd_ray.cli import build_parser

    argv = shlex.split(rayjob["spec"]["entrypoint"])[2:]
    full = sctd_job.build_argv("scan", argv)
    build_parser().parse_args(full)
    job, _ = sctd_job._pop_job_options(argv)
    assert job.get("request-gpus", 0) <= rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"]


def test_images_use_the_installed_ray_version(aws):
    import ray

    base = re.search(r"^FROM\s+(\S+)", (KUBERAY / "Dockerfile").read_text(), re.M).group(1)
    images = [base, aws["docker"]["head_image"], aws["docker"]["worker_image"]]
    for image in images:
        assert image.startswith(f"rayproject/ray:{ray.__version__}-"), image
    assert aws["docker"]["worker_image"].endswith("-gpu") and base.endswith("-gpu")


def test_job_submissions_to_these_clusters_use_the_preinstalled_runtime_env():
    """Every `ray job submit` shown for cluster/'s clusters (where sctd-ray is installed) ships
    the checkout with jobs/runtime_env_preinstalled.yaml, as docs/cluster.md does: a bare
    `--working-dir .` uploads a local zoo/ or runs/ too and drops the runtime env's
    RAY_JOB_STOP_WAIT_TIME_S; jobs/runtime_env.yaml pip-installs sctd-ray again on every node."""
    sources = [CLUSTER / "aws.yaml", KUBERAY / "raycluster.yaml", REPO / "docs" / "cluster.md"]
    seen = 0
    for path in sources:
        text = re.sub(r"\\\n\s*(#\s*)?", " ", path.read_text())   # join continued lines
        for line in text.splitlines():
            if "ray job submit" not in line or "`ray job submit`" in line:
                continue
            seen += 1
            argv = shlex.split(line.split("ray job submit", 1)[1].split(" -- ")[0])
            assert "--runtime-env" in argv, f"{path.name}: {line.strip()}"
            assert argv[argv.index("--runtime-env") + 1] == "jobs/runtime_env_preinstalled.yaml", \
                f"{path.name}: {line.strip()}"
    assert seen >= 4
