"""What every `ray job submit` entrypoint in jobs/ shares: options -> `sctd <command>` argv,
progress lines for `ray job logs`, one clear last line, and the CLI's exit status.

A job takes exactly the options of `sctd <command>` (the argv is handed to
`sctd_ray.cli.main`), plus `--config FILE`: a YAML mapping whose keys are the option names
(`zoo`, `target`, `out`, `batch-size` or `batch_size`, ...). Options given on the command
line win over the file. Flags are booleans (`quiet: true`), repeatable options take a list
(`target: [a, b]`). The file may be local (relative to the job's working_dir) or `s3://`.

Jobs always pass `--resume` where the command has it, so resubmitting a job with the same
`--out` continues it; choose a new `--out` for a new run.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import sys
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


def _pop_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """Split the job-only option `--config FILE` from the argv meant for the CLI."""
    rest, config, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == "--config":
            if i + 1 >= len(argv):
                raise JobConfigError("--config needs a file (a YAML mapping of option names to values)")
            config, i = argv[i + 1], i + 2
            continue
        if a.startswith("--config="):
            config = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return config, rest


def read_config(uri: str) -> dict:
    """Load a job file (local path or s3://bucket/key) as a mapping."""
    import yaml

    if uri.startswith("s3://"):
        from sctd_ray.zoo.store import open_store

        parent, _, name = uri.rpartition("/")
        text = open_store(parent).read_bytes(name).decode()
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


def _given(argv: list[str], action: argparse.Action) -> bool:
    return any(a == s or a.startswith(s + "=") for a in argv for s in action.option_strings)


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
        if value is None or (action.option_strings and _given(argv, action)):
            continue
        flag = f"--{name}"
        if not action.option_strings:
            positionals.extend(str(v) for v in (value if isinstance(value, list) else [value]))
        elif action.nargs == 0:  # store_true / store_false / store_const
            if not isinstance(value, bool):
                raise JobConfigError(f"key {key!r} in {source} is a flag: expected true or false, "
                                     f"got {value!r}")
            if value == (action.const is not False):
                tokens.append(flag)
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
    if parser is None:
        from sctd_ray.cli import build_parser

        parser = build_parser()
    sub = _subparser(parser, command)
    config, rest = _pop_config(list(argv))
    extra = config_argv(sub, read_config(config), rest, config) if config else []
    out = [command, *extra, *rest]
    if "--resume" in sub._option_string_actions and "--resume" not in out:
        out.append("--resume")
    return out


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


_MEANING = {1: "finished, but some results are error rows (see above)",
            2: "stopped on a problem you can fix",
            15: "stopped by SIGTERM (`ray job stop`?); results written so far are kept, resubmit to resume",
            130: "interrupted; results written so far are kept, resubmit to resume"}


def _on_sigterm(signum, frame):  # `ray job stop` sends SIGTERM first: stop like Ctrl-C
    raise KeyboardInterrupt


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
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        pass
    code, message = 0, ""
    try:
        full = build_argv(command, argv)
        where = os.environ.get("RAY_ADDRESS") or "local Ray (no RAY_ADDRESS)"
        log(f"job {os.environ.get('RAY_JOB_SUBMISSION_ID') or '(not submitted)'} on "
            f"{socket.gethostname()}, Ray at {where}")
        log(f"running: sctd {shlex.join(full)}")
        from sctd_ray.cli import main

        code = int(main(full) or 0)
    except JobConfigError as e:
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
        sys.stderr = tee._stream
    took = f"{time.time() - t0:.1f}s"
    if code == 0:
        log(f"sctd {command} finished in {took} (exit 0)")
    else:
        reason = message or tee.last_error or _MEANING.get(code, "see the lines above")
        log(f"FAILED: sctd {command} exited with status {code} after {took}: {reason}")
    return code


def main(command: str) -> None:
    """Entrypoint body of jobs/<command>.py."""
    sys.exit(run(command))
