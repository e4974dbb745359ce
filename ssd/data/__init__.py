"""Datasets and class vocabularies: COCO's names and ids."""
