"""Slurm orchestration: admin templates, pre-submission checks, array submission and status.

Nothing here imports torch or MONAI, so submitting a sweep stays fast on a login node.
"""
