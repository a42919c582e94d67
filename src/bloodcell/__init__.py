"""bloodcell: a leakage-aware, explainable and deployable classifier of B-ALL subtypes.

Research tool only; not a medical device.
"""

__version__ = "0.1.0"

#: Canonical class names, in the order every model, manifest and report uses.
CLASSES: tuple[str, ...] = ("Benign", "Early Pre-B", "Pre-B", "Pro-B")
