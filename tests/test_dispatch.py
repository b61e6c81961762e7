"""The scan's dispatch loop (``assess.scan._dispatch``) on a scripted fake of the few Ray calls
it makes: exactly when each ping, result or worker death arrives is decided here, so the
sequences of a lost node (a replacement waiting for a node, dying, or never starting) are
replayed deterministically, in well under a second, with no Ray."""

from __future__ import annotations

import types

import pytest

from sctd_ray.assess import scan


class RayActorError(Exception):
    def __init__(self, msg="The actor died unexpectedly before finishing this task."):
        super().__init__(msg)
        self.actor_init_failed = False


class Ref:
    def __init__(self, what: str, tid: str | None = None):
        self.what, self.tid, self.done, self.value, self.exc = what, tid, False, None, None


class Actor:
    def __init__(self, fake: "FakeRay", name: str):
        self.fake, self.name, self.dead, self.pending, self.scored = fake, name, False, [], []
        fake.actors.append(self)
        self.ping = self._method("ping")
        self.score = self._method("score")
        self.usage = self._method("usage")

    def _method(self, meth):
        actor = self

        class Method:
            @staticmethod
            def remote(*args):
                ref = Ref(f"{actor.name}.{meth}", args[0] if meth == "score" else None)
                if actor.dead:
                    ref.done, ref.exc = True, RayActorError()
                elif meth == "usage":
                    ref.done, ref.value = True, {"worker": actor.name}
                else:
                    actor.pending.append(ref)
                    if meth == "score" and actor.name.endswith(tuple(actor.fake.doomed)):
                        actor.die()   # its node is gone: the first call kills it
                return ref
        return Method

    def run(self):
        """Its constructor returns: the ping answers."""
        for ref in self.pending:
            if ref.what.endswith(".ping"):
                ref.done, ref.value = True, self.name
        self.pending = [r for r in self.pending if not r.done]

    def die(self):
        self.dead = True
        for ref in self.pending:
            ref.done, ref.exc = True, RayActorError()
        self.pending = []

    def finish(self, tid: str | None = None) -> bool:
        for ref in self.pending:
            if ref.what.endswith(".score") and tid in (None, ref.tid) and self.ran:
                ref.done, ref.value = True, []
                self.pending.remove(ref)
                self.scored.append(ref.tid)
                return True
        return False

    @property
    def ran(self) -> bool:
        return not any(r.what.endswith(".ping") for r in self.pending)


class FakeRay:
    """``ray.wait`` runs the script when nothing is ready: first the pings of actors that start
    on their own (``starts``), then the next scripted event, then (unless ``manual``) one
    pending teacher of a running actor finishes."""

    exceptions = types.SimpleNamespace(RayActorError=RayActorError, RayTaskError=type("RayTaskError", (Exception,), {}))

    def __init__(self, script=(), starts=lambda name: "-r" not in name, manual=False):
        self.actors, self.script, self.starts, self.manual = [], list(script), starts, manual
        self.doomed: set[str] = set()
        self.waited_with_timeout = []

    def actor(self, suffix: str) -> Actor:
        return [a for a in self.actors if a.name.endswith(suffix)][-1]

    def remote(self, **kw):
        fake = self

        def wrap(cls):
            class Options:
                @staticmethod
                def options(name):
                    return types.SimpleNamespace(remote=lambda *args: Actor(fake, name))
            return Options
        return wrap

    def kill(self, actor, no_restart=True):
        if not actor.dead:
            actor.die()

    def get(self, ref, timeout=None):
        assert ref.done
        if ref.exc:
            raise ref.exc
        return ref.value

    def wait(self, refs, num_returns=1, timeout=None, fetch_local=True):
        while True:
            ready = [r for r in refs if r.done][:num_returns]
            if len(ready) >= num_returns or timeout == 0:
                return ready, [r for r in refs if r not in ready]
            if not self._step():
                assert timeout is not None, "the scan would wait forever: " + \
                    str([(a.name, [r.what for r in a.pending]) for a in self.actors if a.pending])
                self.waited_with_timeout.append(timeout)
                return [], list(refs)

    def _step(self) -> bool:
        for a in self.actors:
            if not a.dead and not a.ran and self.starts(a.name):
                a.run()
                return True
        if self.script:
            self.script.pop(0)(self)
            return True
        return not self.manual and any(a.finish() for a in self.actors if not a.dead)


class Results:
    store = None

    def __init__(self):
        self.rows = []

    def add(self, row):
        self.rows.append(row)

    write = add


def dispatch(fake: FakeRay, shards: list[list[str]]):
    """Run ``_dispatch`` on the fake; every teacher's rows (ok rows are written by the workers,
    so only error rows show here) and the log."""
    todo = {t: ["tg"] for shard in shards for t in shard}
    s = types.SimpleNamespace(metrics=["sctd"], batch_size=8, prefetch=1, device_cache_mb=0, progress=False)
    results, said = Results(), []
    fatal, usage = scan._dispatch(fake, s, "zoo", results, [types.SimpleNamespace(name="tg", fingerprint="f")],
                                  shards, todo, {t: {"sha256": "x"} for t in todo}, {"num_cpus": 1}, 10,
                                  log=said.append)
    assert fatal is None
    return {r["teacher_id"]: r["error"] for r in results.rows}, said


def scored(fake: FakeRay) -> list[str]:
    return sorted(t for a in fake.actors for t in a.scored)


def test_a_lost_worker_is_replaced_and_every_teacher_scored_once():
    def kill_0(fake):
        fake.actor("-0").die()

    fake = FakeRay([kill_0], starts=lambda name: True)
    errors, said = dispatch(fake, [["a", "b", "c"], ["d", "e", "f"]])
    assert errors == {} and scored(fake) == list("abcdef")
    assert any("worker 0 lost" in line for line in said) and any("replacement runs" in line for line in said)


def test_a_replacement_that_ran_and_died_before_its_ping_was_seen_does_not_retire_the_slot():
    """Both workers die; both replacements start; worker 1's dies at its first teacher (its node
    is gone) before the driver reads its ping; its next replacement must still get teachers."""
    def kill_both(fake):
        for a in list(fake.actors):
            a.die()
        fake.doomed.add("-1-r1")

    def start_r1s(fake):
        fake.actor("-0-r1").run()
        fake.actor("-1-r1").run()

    def start_r2(fake):
        fake.actor("-1-r2").run()

    fake = FakeRay([kill_both, start_r1s, start_r2])
    errors, said = dispatch(fake, [["a", "c", "e", "g"], ["b", "d", "f", "h"]])
    assert set(errors) == {"b", "d"}   # in flight at both of worker 1's deaths
    assert scored(fake) == list("acefgh")
    assert fake.actor("-1-r2").scored, said   # the slot kept working
    assert not any("died before it ran" in line for line in said), said


def test_an_idle_worker_takes_the_last_teacher_of_a_replacement_that_has_not_started():
    """Worker 0 dies twice with the same two teachers (error rows); its last queued teacher must
    go to the idle worker 1, not wait for a replacement whose node never comes."""
    def kill(suffix):
        return lambda fake: fake.actor(suffix).die()

    def finish(tid):
        return lambda fake: next(a for a in fake.actors if not a.dead and a.finish(tid))

    def start(suffix):
        return lambda fake: fake.actor(suffix).run()

    fake = FakeRay([kill("-0"), finish("d"), start("-0-r1"), finish("f"), finish("g"), finish("e"),
                    kill("-0-r1"), finish("c")], manual=True)
    errors, said = dispatch(fake, [["a", "b", "c", "e"], ["d", "f", "g"]])
    assert set(errors) == {"a", "b"} and all("worker died 2 times" in e for e in errors.values())
    assert "c" in fake.actor("-1").scored


def test_when_no_replacement_ever_starts_the_teachers_become_error_rows(monkeypatch):
    """Every node lost, none comes back: after REPLACEMENT_WAIT_S with nothing scoring, the
    teachers left are error rows (`--resume` retries them), not a scan that waits forever."""
    monkeypatch.setattr(scan, "REPLACEMENT_WAIT_S", 7.0)

    def kill_all(fake):
        for a in list(fake.actors):
            a.die()

    fake = FakeRay([kill_all])
    errors, said = dispatch(fake, [["a", "b", "c"], ["d", "e", "f"]])
    assert fake.waited_with_timeout == [7.0]
    assert set(errors) == set("abcdef")
    assert all("did not start within 7 s" in e for e in errors.values()), errors
    assert any("no worker left to score 6 teacher(s)" in line for line in said)


@pytest.mark.parametrize("n_workers", [1, 3])
def test_nothing_lost_nothing_replaced(n_workers):
    fake = FakeRay()
    teachers = [f"t{i}" for i in range(7)]
    errors, said = dispatch(fake, [teachers[i::n_workers] for i in range(n_workers)])
    assert errors == {} and scored(fake) == sorted(teachers) and len(fake.actors) == n_workers


def test_a_call_that_raised_is_an_error_row_with_the_reason_not_rays_header():
    """A teacher's ``score`` call that raised (a bug, or a failure the worker does not catch):
    its error row says what was raised, not the first line of Ray's message, which is the
    coloured ``ray::ShardActor.score() (pid=..., actor_id=...)`` header."""
    class TaskError(Exception):
        def __init__(self, cause):
            super().__init__("\x1b[36mray::ShardActor.score()\x1b[39m (pid=1, ip=10.0.0.1, actor_id=ab, "
                             "repr=<ShardActor object>)\n  File \"worker.py\", line 1\nTypeError: boom")
            self.cause = cause

    def fail_a(fake):
        for actor in fake.actors:
            for ref in actor.pending:
                if ref.what.endswith(".score") and ref.tid == "a":
                    actor.pending.remove(ref)
                    ref.done, ref.exc = True, TaskError(TypeError("'>' not supported"))
                    return

    fake = FakeRay([fail_a], starts=lambda name: True)
    fake.exceptions = types.SimpleNamespace(RayActorError=RayActorError, RayTaskError=TaskError)
    errors, _ = dispatch(fake, [["a", "b"], ["c"]])
    assert errors == {"a": "worker failed: TypeError: '>' not supported"}


@pytest.mark.parametrize("node_cpus, workers, each", [
    ([16], 8, 2),          # 8 teachers on 16 cores: two threads each
    ([2], 1, 2),           # --workers 1 takes the whole machine
    ([2], 2, 1), ([2], 5, 1), ([0], 1, 1),   # as many workers as CPUs or more; no CPU yet
    ([8, 8, 4], 3, 4),     # 20 // 3 = 6 would leave the third worker without a node
    ([8, 8], 1, 8),        # one worker holds at most one node
])
def test_cpu_workers_share_the_cpus_of_the_nodes_alive(node_cpus, workers, each):
    nodes = [{"Alive": True, "Resources": {"CPU": c}} for c in node_cpus]
    nodes.append({"Alive": False, "Resources": {"CPU": 64}})   # a dead node holds nothing
    fake = types.SimpleNamespace(nodes=lambda: nodes)
    assert scan._cpus_per_worker(fake, workers) == each
