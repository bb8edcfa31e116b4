"""protmask: a structure-conditioned masked protein language model and its Accelerate trainer.

``import protmask`` registers the model with the transformers ``Auto*`` classes.
"""

from .data.collator import ProtMaskProcessor
from .design import design_sequences, load_model
from .evaluation import evaluate as evaluate_structures
from .models import ProtMaskConfig, ProtMaskForMaskedLM, ProtMaskModel, ProtMaskTokenizer
from .structure import ContextAtoms, ParsedEntry, ProteinChain, StructureError, parse_entry, parse_structure

__version__ = "0.1.0"

__all__ = [
    "ProtMaskConfig",
    "ProtMaskForMaskedLM",
    "ProtMaskModel",
    "ProtMaskProcessor",
    "ProtMaskTokenizer",
    "ContextAtoms",
    "ParsedEntry",
    "ProteinChain",
    "StructureError",
    "design_sequences",
    "evaluate_structures",
    "load_model",
    "parse_entry",
    "parse_structure",
]
