"""Seq2SeqTrainer with checkpoint loading that survives transformers 5's weight renaming."""

import os

from transformers import Seq2SeqTrainer
from transformers.utils import SAFE_WEIGHTS_NAME


def load_checkpoint_weights(model, checkpoint: str, **from_pretrained_kwargs) -> None:
    """Load a saved checkpoint's weights into `model` in place, strictly.

    transformers 5 saves ViT encoder weights under their legacy names and renames them only
    inside `from_pretrained`; Trainer's resume and load-best paths call `load_state_dict`
    on the raw file, which silently leaves the whole encoder untouched (every key is
    'missing' and 'unexpected'). Going through `from_pretrained` applies the renaming."""
    loaded = type(model).from_pretrained(checkpoint, **from_pretrained_kwargs)
    model.load_state_dict(loaded.state_dict(), strict=True)


class OcrTrainer(Seq2SeqTrainer):
    """Resume and best-model loading through `from_pretrained` for plain (non-DeepSpeed,
    non-FSDP) models; the trainer's own paths are kept for sharded engines."""

    def _plain_checkpoint(self, checkpoint: str) -> bool:
        return (
            not self.is_deepspeed_enabled
            and not self.is_fsdp_enabled
            and os.path.isfile(os.path.join(checkpoint, SAFE_WEIGHTS_NAME))
        )

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self._plain_checkpoint(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_checkpoint_weights(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)

    def _load_best_model(self):
        if not self._plain_checkpoint(self.state.best_model_checkpoint):
            return super()._load_best_model()
        load_checkpoint_weights(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)
