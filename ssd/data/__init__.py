"""Datasets for training: COCO-format annotation files and a synthetic shapes set."""
