"""The exception type the CLI turns into a single clear line and a non-zero exit, and its one special case."""


class UserError(Exception):
    """A problem the user can fix (bad path, empty folder, bad option); the message says what to do."""


class NoFeatureMap(UserError):
    """A network without a convolutional feature map for an automatic Grad-CAM layer (a transformer, an
    MLP). Evaluation and the service go on without Grad-CAM; ``explain`` asks for ``--target-layer``."""


class ModelFileError(UserError, ValueError):
    """A model's card or weights cannot be used (damaged, truncated, of another architecture or shape, or
    holding non-finite numbers). A ValueError too, as the card's own validation errors always were."""


class ParityError(RuntimeError):
    """ONNX Runtime's probabilities differ from PyTorch's by more than the tolerance (an export failed its
    check). Here, not in the exporter, so the torch-free CLI paths can catch it without importing torch."""
