"""diffusion_policy's ReplayBuffer checks, run by a Python that has zarr 2 (what diffusion_policy uses).

``python _replay_buffer_zarr2.py STORE...`` prints one JSON object: store -> {"ok", "ends", "keys"} or
{"ok": false, "error"}. The checks are ``ReplayBuffer.__init__``'s (diffusion_policy/common/replay_buffer.py)
after ``zarr.open(path, "r")`` as ``create_from_path`` does, plus reading every array whole.
"""

import json
import sys

import zarr

results = {}
for path in sys.argv[1:]:
    try:
        root = zarr.open(path, "r")
        assert "data" in root
        assert "meta" in root
        assert "episode_ends" in root["meta"]
        for key, value in root["data"].items():
            assert value.shape[0] == root["meta"]["episode_ends"][-1], (key, value.shape)
            value[:]
        ends = root["meta"]["episode_ends"][:]
        results[path] = {"ok": True, "zarr": zarr.__version__, "ends": ends.tolist(), "keys": sorted(root["data"].array_keys())}
    except Exception as exc:  # noqa: BLE001 - reported per store
        results[path] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
print(json.dumps(results))
