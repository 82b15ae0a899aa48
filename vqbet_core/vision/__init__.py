"""Image observations: one preprocessing definition and the frozen ResNet-18 encoder."""
