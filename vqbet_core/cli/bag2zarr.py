"""``vqbet bag2zarr BAG... --calibration C.yaml --out D.zarr``: ROS 2 bags -> dataset, no ROS install needed."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bags", nargs="+", metavar="BAG", help="rosbag2 folders (sqlite3 .db3 or mcap storage)")
    parser.add_argument("--calibration", required=True, help="calibration YAML (joint order, cameras, crop/resize)")
    parser.add_argument("--out", required=True, help="zarr dataset to create or append to")
    parser.add_argument("--joint-states", default="/joint_states", help="JointState topic (default: %(default)s)")
    parser.add_argument("--command", dest="command_topic", default="/teleop/joint_command",
                        help="teleop command topic, JointState or JointTrajectory; becomes 'action' (default: %(default)s)")
    parser.add_argument("--camera", action="append", default=[], metavar="NAME=TOPIC",
                        help="topic of a calibration camera in these bags (repeatable); default: the calibration's topics")
    parser.add_argument("--episode-topic", default=None,
                        help="std_msgs/String marker topic that splits episodes ('start [task]', 'end', 'discard', "
                             "or the recorder's ~/episode_events JSON); default: one episode per bag")
    parser.add_argument("--subtask-topic", default=None,
                        help="std_msgs/String 'subtask done' marks (the recorder's ~/subtask_done: a subtask name, "
                             "stamped with its log time, or JSON {\"task\": name, \"stamp\": seconds}) -> per-step "
                             "data/task_index; needs --task-names")
    parser.add_argument("--task-names", default="",
                        help="comma-separated subtask names data/task_index indexes, in order (e.g. the recorder's "
                             "task_names); with --subtask-topic")
    parser.add_argument("--control-hz", type=float, default=None, help="sampling rate (default: the calibration's)")
    parser.add_argument("--max-age", type=float, default=0.1, help="drop a tick when a stream's latest message is older (s)")
    parser.add_argument("--max-wait", type=float, default=0.5,
                        help="longest a tick waits for a quiet stream's next message, as the recorder does (s)")
    parser.add_argument("--stamp", choices=("header", "receive"), default="header",
                        help="sample messages by header stamp (zero stamps fall back to log time) or by log time")
    parser.add_argument("--future-tolerance", type=float, default=0.1,
                        help="a header stamp more than this ahead of its log time is a bad message, not used (s; "
                             "docs/reference/safety.md)")
    parser.add_argument("--no-preprocess", action="store_true", help="store full camera frames (no crop/resize)")
    parser.add_argument("--task", default="", help="task label for episodes without one")
    parser.add_argument("--min-free-mb", type=float, default=1024.0, help="free disk needed to start an episode")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes converting segments of an episode in parallel (0: one per CPU, 1: a single pass)")
    parser.add_argument("--segment-seconds", type=float, default=2.0, help="seconds of recording per parallel segment")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from vqbet_core.calibration import load_calibration
    from vqbet_core.errors import VqbetError
    from vqbet_core.recording.bag2zarr import BagOptions, convert_bags

    cameras = {}
    for item in args.camera:
        name, sep, topic = item.partition("=")
        if not sep or not name or not topic:
            raise VqbetError(f"--camera {item!r}: expected NAME=TOPIC")
        cameras[name] = topic
    calibration = load_calibration(args.calibration)
    options = BagOptions(
        joint_states_topic=args.joint_states, command_topic=args.command_topic, camera_topics=cameras,
        episode_topic=args.episode_topic, control_hz=args.control_hz, max_age=args.max_age, max_wait=args.max_wait,
        stamp_source=args.stamp, future_tolerance=args.future_tolerance, preprocess=not args.no_preprocess, task=args.task,
        min_free_mb=args.min_free_mb, stop_free_mb=min(256.0, args.min_free_mb),
        workers=args.workers, segment_seconds=args.segment_seconds, subtask_topic=args.subtask_topic,
        task_names=[n.strip() for n in args.task_names.split(",") if n.strip()],
    )
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    reports = convert_bags(args.bags, calibration, args.out, options, progress=not args.no_progress, log=log)
    for r in reports:
        print(json.dumps({"bag": r.bag, "episodes": [{"index": i, "length": n} for i, n in r.episodes],
                          "skipped": r.skipped, "dropped": r.dropped, "stale": r.stale, "bad": r.bad,
                          "ok": not r.error}))
    return 2 if any(r.error for r in reports) else 0
