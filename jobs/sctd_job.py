"""What every `ray job submit` entrypoint in jobs/ shares: options -> `sctd <command>` argv,
progress lines for `ray job logs`, one clear last line, and the CLI's exit status.

A job takes exactly the options of `sctd <command>` (the argv is handed to
`sctd_ray.cli.main`), plus these job-only options:

  --config FILE             a YAML mapping whose keys are the option names (`zoo`, `target`,
                            `out`, `batch-size` or `batch_size`, ...; also `request-gpus`).
                            Options given on the command line win over the file. Flags are
                            booleans (`quiet: true`), repeatable options take a list
                            (`target: [a, b]`). Local (relative to the working_dir) or s3://.
  --request-gpus N          on an autoscaling cluster whose GPU workers start at 0: ask the
                            autoscaler for N 1-GPU workers and wait for them (up to
                            --request-gpus-timeout seconds, default 900) before the command
                            starts, so it sizes its workers to the GPUs; withdrawn at the end.

Jobs always pass `--resume` where the command has it, so resubmitting a job with the same
`--out` continues it; choose a new `--out` for a new run. A local `--out` must be absolute
(a relative one would be written into Ray's temporary copy of the working_dir) and, on a
cluster of several nodes, seen by all of them (check_out_is_shared).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import sys
import threading
import time
import traceback

PREFIX = "[sctd-job]"


class JobConfigError(Exception):
    """The job's options or --config file are wrong (exit 2, one line)."""


def log(msg: str) -> None:
    """One progress line for `ray job logs`, flushed at once."""
    print(f"{PREFIX} {time.strftime('%H:%M:%S')} {msg}", flush=True)


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            if command not in action.choices:
                raise JobConfigError(f"this sctd-ray has no `sctd {command}` command "
                                     f"(it has: {', '.join(action.choices)})")
            return action.choices[command]
    raise JobConfigError("sctd_ray.cli.build_parser() has no subcommands")


JOB_OPTIONS = {  # job-only options (not passed to the CLI): name -> (type, help)
    "config": (str, "YAML file of option names -> values (local or s3://)"),
    "request-gpus": (int, "ask the autoscaler for this many 1-GPU workers and wait for them "
                          "before starting, so the scan makes one GPU worker per GPU"),
    "request-gpus-timeout": (float, "seconds to wait for --request-gpus (default 900)"),
}


def _pop_job_options(argv: list[str]) -> tuple[dict, list[str]]:
    """Split the job-only options (JOB_OPTIONS) from the argv meant for the CLI."""
    rest, found, i = [], {}, 0
    while i < len(argv):
        a = argv[i]
        name, eq, value = a[2:].partition("=") if a.startswith("--") else ("", "", "")
        if name in JOB_OPTIONS:
            if not eq:
                if i + 1 >= len(argv):
                    raise JobConfigError(f"--{name} needs a value: {JOB_OPTIONS[name][1]}")
                value, i = argv[i + 1], i + 1
            found[name] = _job_value(name, value, "the command line")
        else:
            rest.append(a)
        i += 1
    return found, rest


def _job_value(name: str, value, source: str):
    kind = JOB_OPTIONS[name][0]
    try:
        v = kind(value)
    except (TypeError, ValueError):
        raise JobConfigError(f"--{name} in {source}: expected {kind.__name__}, got {value!r}") from None
    if kind is not str and v < 0:
        raise JobConfigError(f"--{name} in {source}: expected a number >= 0, got {value!r}")
    return v


def read_config(uri: str) -> dict:
    """Load a job file (local path or s3://bucket/key) as a mapping."""
    import yaml

    if uri.startswith("s3://"):
        from sctd_ray.zoo.store import open_store

        from sctd_ray.errors import SctdError

        parent, _, name = uri.rpartition("/")
        try:
            text = open_store(parent).read_bytes(name).decode()
        except SctdError as e:   # not found, refused credentials, unreachable: one line
            raise JobConfigError(f"cannot read job file {uri}: {e}") from None
    else:
        try:
            with open(uri, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise JobConfigError(f"cannot read job file {uri}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise JobConfigError(f"job file {uri} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise JobConfigError(f"job file {uri} must be a mapping of option names to values, "
                             f"got a {type(data).__name__}")
    return data


def _given(argv: list[str], sub: argparse.ArgumentParser, action: argparse.Action) -> bool:
    """Whether `argv` sets the destination of `action` (by it, or by a paired --no-x)."""
    strings = [s for a in sub._actions if a.dest == action.dest for s in a.option_strings]
    return any(a == s or a.startswith(s + "=") for a in argv for s in strings)


def _flag_tokens(sub: argparse.ArgumentParser, action: argparse.Action, value: bool) -> list[str]:
    """Tokens that leave `action.dest` as `key: value` in the YAML means (--x or --no-x)."""
    if not isinstance(action.const, bool):  # store_const: true = give the flag
        return [action.option_strings[-1]] if value else []
    want = action.const if value else not action.const
    for a in sub._actions:
        if a.dest == action.dest and a.nargs == 0 and a.const is want and a.option_strings:
            return [next((s for s in a.option_strings if s.startswith("--")), a.option_strings[0])]
    if sub.get_default(action.dest) == want:
        return []
    raise JobConfigError(f"`{sub.prog}` has no option that sets {action.dest} to {want}")


def config_argv(sub: argparse.ArgumentParser, config: dict, argv: list[str], source: str) -> list[str]:
    """CLI tokens for the `config` keys not already given in `argv`, checked against `sub`."""
    by_name = {}
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if action.option_strings:
            for s in action.option_strings:
                if s.startswith("--"):
                    by_name[s[2:]] = action
        else:
            by_name[action.dest.replace("_", "-")] = action
    tokens: list[str] = []
    positionals: list[str] = []
    for key, value in config.items():
        name = str(key).replace("_", "-")
        action = by_name.get(name)
        if action is None:
            known = ", ".join(sorted(by_name))
            raise JobConfigError(f"unknown key {key!r} in {source}: the options of `{sub.prog}` are {known}")
        if value is None or (action.option_strings and _given(argv, sub, action)):
            continue
        flag = f"--{name}"
        if not action.option_strings:
            positionals.extend(str(v) for v in (value if isinstance(value, list) else [value]))
        elif action.nargs == 0:  # store_true / store_false / store_const
            if not isinstance(value, bool):
                raise JobConfigError(f"key {key!r} in {source} is a flag: expected true or false, "
                                     f"got {value!r}")
            tokens += _flag_tokens(sub, action, value)
        elif isinstance(value, list):
            if isinstance(action, argparse._AppendAction):
                for v in value:
                    tokens += [flag, str(v)]
            elif action.nargs in ("+", "*") or isinstance(action.nargs, int):
                tokens += [flag, *map(str, value)]
            elif all(not isinstance(v, (list, dict)) for v in value):
                tokens += [flag, ",".join(map(str, value))]  # comma-separated options
            else:
                raise JobConfigError(f"key {key!r} in {source}: expected a value, got {value!r}")
        elif isinstance(value, dict):
            raise JobConfigError(f"key {key!r} in {source}: expected a value, got a mapping")
        else:
            tokens += [flag, str(value).lower() if isinstance(value, bool) else str(value)]
    return positionals + tokens


def build_argv(command: str, argv: list[str], parser: argparse.ArgumentParser | None = None) -> list[str]:
    """The full `sctd` argv for a job: command, --config keys, command-line options, --resume."""
    return build_job(command, argv, parser)[0]


def build_job(command: str, argv: list[str], parser: argparse.ArgumentParser | None = None):
    """(`sctd` argv, job-only options) for a job; see the module docstring."""
    if parser is None:
        from sctd_ray.cli import build_parser

        parser = build_parser()
    sub = _subparser(parser, command)
    job, rest = _pop_job_options(list(argv))
    extra = []
    if "config" in job:
        config = dict(read_config(job["config"]))
        for name in [k for k in config if str(k).replace("_", "-") in JOB_OPTIONS]:
            key = str(name).replace("_", "-")
            value = config.pop(name)
            if key != "config" and key not in job and value is not None:
                job[key] = _job_value(key, value, job["config"])
        extra = config_argv(sub, config, rest, job["config"])
    out = [command, *extra, *rest]
    if "--resume" in sub._option_string_actions and "--resume" not in out:
        out.append("--resume")
    return out, job


class JobError(Exception):
    """The cluster cannot run the job as asked (exit 2, one line)."""


# A cluster holds one `request_resources` request: the last one sent. Ray Data's
# AutoscalingCoordinator (a detached actor that the first dataset read on a cluster starts, and
# that outlives the job) sends its own merged request every 20 s and whenever a read starts or
# ends, which replaces a plain `request_resources` call: the GPU workers were dropped while the
# job waited for them, or went idle and were removed before the scan's actors claimed them (the
# scan then sized itself to fewer GPUs). So the request goes through that coordinator, merged
# with Ray Data's own; with a Ray without it, it is re-sent every second instead.
REQUEST_EXPIRE_S = 120.0    # through the coordinator: gone this long after a driver killed -9
_held: dict = {}


def _coordinator():
    """Ray Data's AutoscalingCoordinator actor (created if absent), or None (another Ray)."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import \
            get_or_create_autoscaling_coordinator
        return get_or_create_autoscaling_coordinator()
    except Exception:  # noqa: BLE001 - private API: fall back to request_resources
        return None


def _hold_request(ray, bundles: list[dict]) -> None:
    """Send the request now, then keep it in force until `release_gpus` (see above)."""
    from ray.autoscaler.sdk import request_resources

    actor, rid = _coordinator(), f"sctd-job-{submission_id() or os.getpid()}"
    if actor is not None:
        try:
            ray.get(actor.request_resources.remote(requester_id=rid, resources=bundles,
                                                   expire_after_s=REQUEST_EXPIRE_S), timeout=60)
        except Exception:  # noqa: BLE001 - another coordinator API: fall back
            actor = None

    def send():
        if actor is not None:
            actor.request_resources.remote(requester_id=rid, resources=bundles,
                                           expire_after_s=REQUEST_EXPIRE_S)
        else:
            request_resources(bundles=bundles)
    if actor is None:
        send()
    stop = threading.Event()

    def run():
        while not stop.wait(REQUEST_EXPIRE_S / 4 if actor is not None else 1.0):
            try:
                send()
            except Exception:  # noqa: BLE001 - Ray shutting down: the job is ending anyway
                return

    thread = threading.Thread(target=run, name="sctd-request-gpus", daemon=True)
    thread.start()
    _held.update(stop=stop, thread=thread, actor=actor, rid=rid)


def request_gpus(n: int, timeout: float, address: str | None = None) -> None:
    """Ask the autoscaler for `n` 1-GPU bundles and wait until the cluster has `n` GPUs."""
    from sctd_ray.assess.scan import ensure_ray

    ray = ensure_ray(address)
    _hold_request(ray, [{"GPU": 1}] * n)
    log(f"requested {n} GPU worker(s) from the autoscaler; waiting up to {timeout:.0f}s")
    t0, last = time.time(), -1.0
    while True:
        have = int(ray.cluster_resources().get("GPU", 0))
        if have >= n:
            log(f"{have} GPU(s) in the cluster after {time.time() - t0:.0f}s")
            return
        waited = time.time() - t0
        if waited >= timeout:
            raise JobError(f"--request-gpus {n}: the cluster has {have} of {n} GPU(s) after {timeout:.0f}s; "
                           f"check that the autoscaler can start {n} GPU workers (the GPU worker type's "
                           "max_workers or maxReplicas; `ray status`, `ray monitor cluster/aws.yaml`, "
                           "or the KubeRay operator's events)")
        if waited - last >= 30:
            log(f"waiting for GPUs: {have} of {n} ({waited:.0f}s)")
            last = waited
        time.sleep(min(5.0, max(0.1, timeout - waited)))


def release_gpus() -> None:
    """Withdraw the resource request, so idle GPU workers scale down."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized() or not _held:
        return  # never connected, so nothing was requested
    _held["stop"].set()
    _held["thread"].join(timeout=10)
    actor, rid = _held["actor"], _held["rid"]
    _held.clear()
    try:
        if actor is not None:
            ray.get(actor.cancel_request.remote(rid), timeout=30)
            return
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[])
    except Exception as e:  # noqa: BLE001 - the job's result stands; say why scale-down may lag
        log(f"could not withdraw the GPU request ({type(e).__name__}: {e}); "
            "idle GPU workers stay until the next request")


class _StderrTee:
    """Forwards writes to stderr and remembers the last error line the CLI wrote."""

    def __init__(self, stream):
        self._stream = stream
        self.last_error = ""
        self._partial = ""

    def write(self, s):
        self._partial += s
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            line = line.rsplit("\r", 1)[-1].strip()
            if ": error: " in line or line.startswith("sctd: "):
                self.last_error = line
        return self._stream.write(s)

    def __getattr__(self, name):
        return getattr(self._stream, name)


_MEANING = {1: "finished, but not everything succeeded (teachers that are error rows, or no "
               "student within the budget): see the lines above",
            2: "stopped on a problem you can fix",
            15: "stopped by SIGTERM (`ray job stop`?); results written so far are kept, resubmit to resume",
            130: "interrupted; results written so far are kept, resubmit to resume"}


S3_IN_JOBS = ("a job reads S3 with the credentials of the nodes it runs on: their role, their "
              "environment when Ray started, or env_vars in the runtime env; docs/cluster.md, "
              "'S3 endpoint and credentials in a job'")


def _address(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--address" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--address="):
            return a.split("=", 1)[1]
    return None


def submission_id() -> str | None:
    """The Ray job's submission id (in the driver's job config), or None outside a job."""
    try:
        return json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"])["metadata"]["job_submission_id"]
    except (KeyError, TypeError, ValueError):
        return None


def _on_sigterm(signum, frame):  # `ray job stop` sends SIGTERM first: stop like Ctrl-C
    raise KeyboardInterrupt


def check_out_is_kept(argv: list[str]) -> None:
    """A relative local --out would land in Ray's temporary copy of the working_dir (lost with
    the session; a changed checkout is another copy, so a resubmitted job would not resume)."""
    for i, tok in enumerate(argv):
        value = argv[i + 1] if tok == "--out" and i + 1 < len(argv) else \
            tok.split("=", 1)[1] if tok.startswith("--out=") else None
        if value and "://" not in value and not os.path.isabs(os.path.expanduser(value)):
            raise JobConfigError(f"--out {value!r} is relative: in a job it would be written into "
                                 "Ray's temporary copy of the working_dir and lost; give s3://... or "
                                 "an absolute path that every node of the cluster sees")


def _local_run_folders(argv: list[str]) -> list[str]:
    """The local (not s3://) folders the command writes its run to: --out, and a distill's --run
    (its default --out is under it)."""
    found = []
    for i, tok in enumerate(argv):
        for opt in ("--out", "--run"):
            value = argv[i + 1] if tok == opt and i + 1 < len(argv) else \
                tok.split("=", 1)[1] if tok.startswith(opt + "=") else None
            if value and "://" not in value:
                found.append(os.path.expanduser(value))
    return found


def _nearest_folder(path: str) -> str | None:
    """``path`` or the nearest folder above it that exists: a node that sees it sees a folder
    made under it (None: a file is in the way, the command says so)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path if os.path.isdir(path) else None


def check_out_is_shared(argv: list[str], address: str | None) -> None:
    """A local --out is a folder of the node the driver runs on (the head): the scan's workers and
    the Tune trials on the other nodes write into the same path on their own disks (result files
    a resubmitted job never sees; trials that fail on Ray's storage check). So on a cluster of
    several nodes, every node must see the folder (a shared filesystem such as NFS/EFS), or the
    job stops in one line before any work. Checked on the nodes present now (after
    --request-gpus, the GPU workers too)."""
    folders = _local_run_folders(argv)
    if not folders or not (address or os.environ.get("RAY_ADDRESS")):
        return   # s3://, or an embedded local Ray: one node
    import uuid

    from sctd_ray.assess.scan import ensure_ray
    from sctd_ray.errors import SctdError

    try:
        ray = ensure_ray(address)
    except SctdError:
        return   # the command says why, in its own line
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, max_retries=0)
    def sees(path: str) -> bool:
        return os.path.exists(path)

    for folder in folders:
        # a marker in the folder, or the nearest one above it: nothing made, so none left behind
        there = _nearest_folder(folder)
        if there is None:
            continue
        marker = os.path.join(there, f".sctd-shared-check-{uuid.uuid4().hex[:12]}")
        blind, unasked = [], []
        try:
            try:
                open(marker, "wb").close()
            except OSError:
                continue   # not writable here: the command says why, in its own line
            refs = [(n, sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                n["NodeID"], soft=False)).remote(marker)) for n in nodes]
            for n, ref in refs:
                try:
                    if not ray.get(ref, timeout=300):
                        blind.append(n)
                except Exception as e:  # noqa: BLE001 - a node gone, a runtime env still installing
                    unasked.append((n, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"))
        finally:
            if os.path.exists(marker):
                os.remove(marker)
        if unasked:
            names = ", ".join(f"{n.get('NodeManagerAddress')} ({n['NodeID'][:8]})" for n, _ in unasked[:3])
            log(f"could not check whether {len(unasked)} node(s) see {folder} ({names}): "
                f"{unasked[0][1]}; going on")
        if blind:
            names = ", ".join(f"{n.get('NodeManagerAddress')} ({n['NodeID'][:8]})" for n in blind[:3])
            raise JobConfigError(
                f"{folder} is a local folder of {socket.gethostname()}, and {len(blind)} of the "
                f"cluster's {len(nodes)} nodes do not see it ({names}): the scan's workers and the "
                "distillation trials there would write into their own disks; give s3://... or a "
                "folder that every node mounts (NFS/EFS)")


def run(command: str, argv: list[str] | None = None) -> int:
    """Run `sctd <command>` as a Ray job and return its exit status (logs say why)."""
    argv = sys.argv[1:] if argv is None else argv
    for stream in (sys.stdout, sys.stderr):  # every line reaches `ray job logs` at once
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    os.environ.setdefault("TQDM_MININTERVAL", "5")  # progress bar: a line every few seconds, not 10/s
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    t0 = time.time()
    tee = _StderrTee(sys.stderr)
    sys.stderr = tee
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        previous = None
    code, message, gpus, started = 0, "", 0, False
    try:
        full, job = build_job(command, argv)
        check_out_is_kept(full)
        where = os.environ.get("RAY_ADDRESS") or "local Ray (no RAY_ADDRESS)"
        log(f"job {submission_id() or '(not submitted with ray job submit)'} on "
            f"{socket.gethostname()}, Ray at {where}")
        gpus = job.get("request-gpus", 0)
        if gpus:
            request_gpus(gpus, job.get("request-gpus-timeout", 900.0), _address(full))
        check_out_is_shared(full, _address(full))
        log(f"running: sctd {shlex.join(full)}")
        from sctd_ray.cli import main

        started = True
        code = int(main(full) or 0)
    except (JobConfigError, JobError) as e:
        code, message = 2, str(e)
        print(f"sctd-job: error: {e}", file=sys.stderr)
    except SystemExit as e:  # argparse: bad or missing option (it printed usage + the error)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except KeyboardInterrupt:
        code = 130
    except Exception as e:  # a bug, not a user error: keep the traceback for the report
        traceback.print_exc()
        code, message = 1, f"unexpected {type(e).__name__}: {e} (traceback above)"
    finally:
        if gpus:
            release_gpus()
        sys.stderr = tee._stream
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    took = f"{time.time() - t0:.1f}s"
    if code == 0:
        log(f"sctd {command} finished in {took} (exit 0)")
    else:
        reason = message or tee.last_error or _MEANING.get(code, "see the lines above")
        if code in (15, 130):
            reason = _MEANING[code]
        if "S3 credentials" in reason or "S3 refused access" in reason:
            reason += f" ({S3_IN_JOBS})"
        word = "STOPPED" if code in (15, 130) else "FAILED"
        what = f"sctd {command} exited with status {code}" if started else \
            f"the job ended before sctd {command} started (status {code})"
        log(f"{word}: {what} after {took}: {reason}")
    return code


def main(command: str) -> None:
    """Entrypoint body of jobs/<command>.py."""
    sys.exit(run(command))
