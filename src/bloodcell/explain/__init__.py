"""Explanations: Grad-CAM and related class activation maps (``bloodcell.explain.gradcam``)."""
