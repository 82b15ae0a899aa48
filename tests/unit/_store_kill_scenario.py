"""The recording scenario of test_store_crash.py, killed at each of its writes.

``python _store_kill_scenario.py WORKDIR``: runs the scenario once in a forked child that only counts the
writes (``vqbet_core.data.store.set_write_hook`` is called after every write to the store folder), then,
for every write k, forks a child that runs the same scenario into ``WORKDIR/k/`` and dies with
``os._exit(137)`` right after write k (no cleanup, no flush: what SIGKILL leaves). Forking after the
imports (no thread has started yet) keeps each case at a few hundred milliseconds.

Each child appends to ``WORKDIR/k/acks``: ``begin E L`` before it commits episode E of L steps and ``ack E L``
once the commit returned (an episode acknowledged to the operator). ``WORKDIR/labels.json`` lists the writes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from vqbet_core.data import store
from vqbet_core.recording.sampler import EpisodeWriter

#: (verb, steps, task): episodes 0, 2 and 3 are committed, 1 is discarded; the writer is reopened before 3
PLAN = [("commit", 5, "pick"), ("discard", 4, "junk"), ("commit", 7, "place"), ("reopen", 0, ""), ("commit", 3, "push")]
ATTRS = {"joint_names": ["a", "b", "c"], "control_hz": 10.0, "cameras": {"front": {"size": [6, 4]}}, "source": "kill-test"}
NS = 1_000_000_000


def step(episode: int, t: int) -> dict:
    """One step whose values encode (episode, t), so a mix-up or a torn write is visible bit for bit."""
    joint = np.array([episode, t, episode * 100 + t], np.float32)
    return {"camera_front": np.full((4, 6, 3), (episode * 16 + t) % 251, np.uint8), "robot_joint": joint, "action": -joint}


def stamp(episode: int, t: int) -> int:
    return (10 + episode) * NS + t * NS // 10


def expected_episodes() -> list[dict]:
    """What the committed episodes must hold, in order (dataset keys -> arrays, plus the task)."""
    out = []
    for e, (verb, n, task) in enumerate(PLAN):
        if verb == "commit":
            steps = [step(e, t) for t in range(n)]
            ep = {k: np.stack([s[k] for s in steps]) for k in steps[0]}
            ep["timestamp"] = np.array([stamp(e, t) for t in range(n)], np.float64) / NS
            out.append({"task": task, "data": ep})
    return out


def scenario(out: Path, log) -> None:
    path = out / "d.zarr"
    writer = EpisodeWriter(path, ATTRS, min_free_mb=0, stop_free_mb=0, flush_every=3, background=False)
    for e, (verb, n, task) in enumerate(PLAN):
        if verb == "reopen":
            writer.close()
            writer = EpisodeWriter(path, ATTRS, min_free_mb=0, stop_free_mb=0, flush_every=3, background=False)
            continue
        writer.start(task=task)
        for t in range(n):
            writer.add(stamp(e, t), step(e, t))
        if verb == "discard":
            writer.discard()
            continue
        log(f"begin {e} {n}")
        result = writer.commit()
        log(f"ack {e} {result.length}")
    writer.close()


def run_child(out: Path, kill_at: int, labels: list) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / "acks", os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def hook(label: str) -> None:
        labels.append(label)
        if len(labels) == kill_at:
            os._exit(137)

    store.set_write_hook(hook)
    scenario(out, lambda line: os.write(fd, (line + "\n").encode()))


def fork(fn) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn()
        except BaseException:  # noqa: BLE001 - reported through the exit code and stderr
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)
    return os.waitpid(pid, 0)[1]


def main(workdir: Path) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    labels_file = workdir / "labels.json"

    def count() -> None:
        labels: list = []
        run_child(workdir / "full", 0, labels)
        labels_file.write_text(json.dumps(labels))

    if fork(count) != 0:
        return 1
    labels = json.loads(labels_file.read_text())
    for k in range(1, len(labels) + 1):
        status = fork(lambda: run_child(workdir / str(k), k, []))
        if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 137):
            print(f"case {k}: the child was not killed at its write (status {status})", file=sys.stderr)
            return 1
    print(json.dumps({"writes": len(labels)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
