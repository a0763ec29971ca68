"""Constitutional AI and RLAIF: principles in a readable file (``constitution``)."""

from posttrain.cai.constitution import (
    Constitution,
    ConstitutionError,
    Example,
    Principle,
    load_constitution,
)

__all__ = ["Constitution", "ConstitutionError", "Example", "Principle", "load_constitution"]
