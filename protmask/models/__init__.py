"""The protmask model family, registered with the transformers `Auto*` classes on import so that a saved
folder loads with `AutoModelForMaskedLM.from_pretrained(path)` and no `trust_remote_code`."""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer

from .configuration_protmask import ProtMaskConfig
from .modeling_protmask import ProtMaskForMaskedLM, ProtMaskModel, ProtMaskPreTrainedModel, masked_lm_loss
from .tokenization_protmask import ProtMaskTokenizer

AutoConfig.register(ProtMaskConfig.model_type, ProtMaskConfig, exist_ok=True)
AutoModel.register(ProtMaskConfig, ProtMaskModel, exist_ok=True)
AutoModelForMaskedLM.register(ProtMaskConfig, ProtMaskForMaskedLM, exist_ok=True)
AutoTokenizer.register(ProtMaskConfig, tokenizer_class=ProtMaskTokenizer, exist_ok=True)

__all__ = ["ProtMaskConfig", "ProtMaskModel", "ProtMaskForMaskedLM", "ProtMaskPreTrainedModel", "ProtMaskTokenizer",
           "masked_lm_loss"]
