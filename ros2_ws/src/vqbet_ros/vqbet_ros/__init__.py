"""ROS 2 nodes of vqbet-ros: thin shells over ``vqbet_core`` (message <-> numpy, QoS, parameters)."""
