"""bloodcell: a leakage-aware, explainable and deployable classifier of B-ALL subtypes.

Research tool only; not a medical device.
"""

from pathlib import Path

__version__ = "0.1.0"

#: Canonical class names, in the order every model, manifest and report uses.
CLASSES: tuple[str, ...] = ("Benign", "Early Pre-B", "Pre-B", "Pro-B")

#: The input sizes (pixels a side) a model card may declare: every predictor allocates its batches by it, so a
#: card someone hands you must not ask for gigabytes (training's own sizes are 32-512).
CARD_INPUT_SIZES = range(8, 1025)
#: The temperatures a model card may hold (fitting gives 0.05-20): both card readers refuse others, so a card
#: cannot make every probability 1/K (an infinite temperature) or overflow the softmax (a tiny one).
CARD_TEMPERATURES = (1e-3, 1e3)
#: The ``format`` of the model cards this version writes and reads: both card readers refuse another (a
#: later layout would be read field by field as this one). A card without one is taken for this format.
CARD_FORMAT = "bloodcell-model/1"
#: The largest ``card.json`` either reader parses: a written card is a few kB (its training config is the
#: bulk), and parsing a 60 MB one took 3.8 GB of memory.
CARD_MAX_BYTES = 4_000_000
#: Bounds on a card's class names: every prediction reports a probability under each of them.
CARD_MAX_CLASSES = 1000
CARD_MAX_CLASS_NAME = 255  # a folder name's limit (class names come from folders): no trained model refused


def card_bytes(path: Path) -> bytes:
    """The bytes of a ``card.json``, read only up to :data:`CARD_MAX_BYTES` (both card readers; OSError as
    ``open`` raises it)."""
    from bloodcell.errors import ModelFileError

    with path.open("rb") as file:
        raw = file.read(CARD_MAX_BYTES + 1)
    if len(raw) > CARD_MAX_BYTES:  # parsing a 60 MB card took 3.8 GB
        raise ModelFileError(f"{path}: over {CARD_MAX_BYTES // 1_000_000} MB, too large for a model card")
    return raw


def card_format_problem(value: object) -> str | None:
    """Why ``value`` cannot be a model card's ``format`` (None when it is :data:`CARD_FORMAT`)."""
    if value == CARD_FORMAT:
        return None
    return (f"must be {CARD_FORMAT!r} (the one this version reads), got {str(value)[:80]!r}: written by another "
            "version of bloodcell?")


def card_classes_problem(classes: object) -> str | None:
    """Why ``classes`` cannot be a model card's class names (None when it can). Both card readers ask, so a
    model loads with both backends or with neither. Distinct names, because each probability is reported
    under its class's name: a repeated name hid the other class's probability."""
    shown = repr(classes)[:80]
    if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes):
        return f"must be a list of class names (strings), got {shown}"
    if not 2 <= len(classes) <= CARD_MAX_CLASSES:
        return f"must name 2 to {CARD_MAX_CLASSES} classes, got {len(classes)}"
    # Any characters a folder name may hold (a control character is shown escaped wherever a name is printed):
    # a rule stricter than training's would refuse, after the work, the card of a model trained on such folders.
    if not all(name.strip() and len(name) <= CARD_MAX_CLASS_NAME for name in classes):
        return f"must be names of 1 to {CARD_MAX_CLASS_NAME} characters, not blank, got {shown}"
    if len(set(classes)) != len(classes):
        return f"must be distinct, got {shown}"
    return None


def card_temperature_problem(temperature: object) -> str | None:
    """Why ``temperature`` cannot be a model card's temperature (None when it can): a negative one would turn
    the ranking of the classes upside down, an infinite or NaN one make every probability 1/K or NaN, a tiny
    one overflow the softmax. Both card readers ask."""
    low, high = CARD_TEMPERATURES
    number = isinstance(temperature, int | float) and not isinstance(temperature, bool)
    if not (number and low <= temperature <= high):  # type: ignore[operator]  # a number, checked just before
        return f"must be a number from {low:g} to {high:g}, got {temperature!r}"
    return None
