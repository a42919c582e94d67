"""Data stages: dataset layouts, the index (manifest), splits, the decoded cache and augmentation."""
