"""Sizes of a ViT from its config alone (parameters, FLOPs, activation memory), the dry run on a fake
process group, and the analytic planner behind `bigvit-plan`."""
