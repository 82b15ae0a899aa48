# Two commands on a fresh machine: `make demo` (main job) and `make test` (test suite).
# Both create .venv on first use. torch + torchvision come from the package registry as one matched
# build (a CPU-only torch wheel cached on some machines breaks torchvision, so pip runs --isolated).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CERT ?= /etc/ssl/certs/ca-certificates.crt
STAMP := $(VENV)/.installed
export MUJOCO_GL ?= egl
export PYOPENGL_PLATFORM ?= egl

# onnxruntime build: cpu (onnxruntime) or gpu (onnxruntime-gpu: TensorRT / CUDA / CPU providers), never both
ORT ?= cpu
ROS2_LAUNCH ?= ../shared/ros2-jazzy-launch
ROS2_STAMP := $(VENV)/.ros2_launch_installed

.PHONY: venv demo demo-pipeline demo-multipath test test-slow clean

# `ros2 launch` + colcon for the launch tests (tests/launch) on machines without a ROS install: installed into
# the venv when ../shared/ros2-jazzy-launch is beside the clone; without it (and without a ROS 2 on PATH) the
# launch tests skip and say why.
venv: $(STAMP) $(if $(wildcard $(ROS2_LAUNCH)/install.sh),$(ROS2_STAMP))

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || \
	  $(BIN)/pip install -q --isolated $$(test -f $(CERT) && echo --cert $(CERT)) torch==2.13.0 torchvision==0.28.0
	$(BIN)/pip install -q -e ".[ros,sim,dev,$(ORT)]" -e ros2_ws/src/vqbet_ros
	$(BIN)/python -c "import torch, torchvision, zarr, onnxruntime, rclpy; print('venv ready: torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $(STAMP)

# Again after every pip run above: that run puts back the lark-parser 0.12 that install.sh replaces with lark 1.x
# (install.sh alone would see its marker and do nothing).
$(ROS2_STAMP): $(STAMP) $(ROS2_LAUNCH)/src/SOURCES
	rm -f $(VENV)/.ros2_jazzy_launch
	bash $(ROS2_LAUNCH)/install.sh $(VENV)
	touch $@

# The main job: the shipped goal-conditioned image model (models/kitchen_image_goal) runs operator-ordered
# kitchen sequences through policy_node, driving sim_robot_node (MuJoCo Franka Kitchen) over ROS 2 (loopback DDS).
demo: venv
	$(BIN)/python -m vqbet_ros.kitchen_demo --out runs/kitchen_demo

# The whole pipeline on embedded defaults: demonstrations -> VQ-BeT -> ONNX -> policy_node on the simulated block push.
demo-pipeline: venv
	$(BIN)/python -m vqbet_ros.sim_demo --out runs/sim_demo

# Multimodal learning check: VQ-BeT vs a plain MSE policy on the BeT paper's multipath point mass.
demo-multipath: venv
	$(BIN)/python -m vqbet_core.demo --out runs/demo

test: venv
	$(BIN)/python -m pytest -q tests

test-slow: venv
	$(BIN)/python -m pytest -q -m slow tests

clean:
	rm -rf runs .pytest_cache
