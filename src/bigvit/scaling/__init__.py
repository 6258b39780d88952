"""Sizes of a ViT from its config alone: parameters and FLOPs, for MFU and memory planning."""
