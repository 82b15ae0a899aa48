"""Recording demonstrations: fixed-clock sampling of message streams into the zarr dataset.

``sampler`` (clock + episode writer) and ``messages`` (message -> numpy) are shared by the ROS recorder
node and the offline ``bag2zarr`` converter, so both produce the same dataset from the same streams.
"""
