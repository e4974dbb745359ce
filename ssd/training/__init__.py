"""Training pieces for SSD300: target encoding, the multibox loss and the training augmentation."""
