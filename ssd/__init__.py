"""SSD300 (ResNet-50) object detection: NVIDIA's published model and checkpoints, with a safe and fast toolkit."""
