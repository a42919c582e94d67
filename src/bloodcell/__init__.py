"""bloodcell: a leakage-aware, explainable and deployable classifier of B-ALL subtypes.

Research tool only; not a medical device.
"""

__version__ = "0.1.0"

#: Canonical class names, in the order every model, manifest and report uses.
CLASSES: tuple[str, ...] = ("Benign", "Early Pre-B", "Pre-B", "Pro-B")

#: The input sizes (pixels a side) a model card may declare: every predictor allocates its batches by it, so a
#: card someone hands you must not ask for gigabytes (training's own sizes are 32-512).
CARD_INPUT_SIZES = range(8, 1025)
#: The temperatures a model card may hold (fitting gives 0.05-20): both card readers refuse others, so a card
#: cannot make every probability 1/K (an infinite temperature) or overflow the softmax (a tiny one).
CARD_TEMPERATURES = (1e-3, 1e3)
