"""kitsjobs: Slurm-native training, inference and evaluation for KiTS23 segmentation."""

__version__ = "0.1.0"
