"""Explanations: Grad-CAM and related class activation maps (``bloodcell.explain.gradcam``), and the masks of
a smear's stained cells that measure where the maps look (``bloodcell.explain.cell_masks``)."""
