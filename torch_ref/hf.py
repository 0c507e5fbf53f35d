"""torch_ref as a HuggingFace model: `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.

`jax_residual.convert.save_hf_checkpoint` copies this file and the torch_ref modules it imports
into an exported folder (its `torch_ref.` imports made relative), so the folder carries the
literal reference itself. Parameter names are HF Llama's (`model.layers.{l}.self_attn.q_proj.weight`,
...) plus the method's `model.layers.{l}.<name>`, as in the exported safetensors.

No KV cache: every generation step recomputes the whole prefix (the methods re-run earlier
layers on the current input, so a cache would have to hold more than keys and values).
"""

from __future__ import annotations

import torch
from transformers import GenerationMixin, LlamaConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from torch_ref.modeling.llama import ResidualLlamaForCausalLM
from torch_ref.modeling.pos_emb import NTKAwareRoPE


class ResidualLlamaConfig(LlamaConfig):
    """LlamaConfig plus the residual method and the knobs of methods 1-4 (`rerun_window`,
    `rerun_every`, `rerun_keep_identity`)."""

    model_type = "residual_llama"

    def __init__(self, residual_method: str = "standard", rerun_window: int | None = None, rerun_every: int = 1,
                 rerun_keep_identity: bool = False, **kwargs):
        self.residual_method, self.rerun_window, self.rerun_every = residual_method, rerun_window, rerun_every
        self.rerun_keep_identity = rerun_keep_identity
        super().__init__(**kwargs)


class HFResidualLlamaForCausalLM(PreTrainedModel, GenerationMixin):
    """The torch_ref `ResidualLlamaForCausalLM` of `config.residual_method` behind HF's interface.

    forward(input_ids [b, s]) -> CausalLMOutputWithPast(logits [b, s, v] float32). An
    attention_mask is accepted only without padding (all ones).
    """

    config_class = ResidualLlamaConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ResidualLlamaConfig):
        super().__init__(config)
        with torch.device("cpu"):  # the reference seeds its tables on a real device; HF builds models on "meta"
            reference = ResidualLlamaForCausalLM(config, config.residual_method, config.rerun_window,
                                                 config.rerun_every, config.rerun_keep_identity)
        self.model, self.lm_head = reference.model, reference.lm_head  # the reference's modules, HF key names
        self.post_init()

    def _init_weights(self, module):
        """The reference initialised its parameters when it was built (loading replaces them);
        HF empties non-persistent buffers while loading, so the RoPE tables are rebuilt here."""
        if isinstance(module, NTKAwareRoPE):
            module.cos, module.sin = module._tables(module.ratio, module.cos.dtype, module.cos.device)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs) -> CausalLMOutputWithPast:
        if attention_mask is not None and not bool(torch.all(attention_mask == 1)):
            raise ValueError("padded batches (an attention_mask with zeros) are not supported: pass unpadded input_ids")
        # the reference's own forward, on the same two modules
        return CausalLMOutputWithPast(logits=ResidualLlamaForCausalLM.forward(self, input_ids, inputs_embeds))

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs) -> dict:
        """The whole prefix at every step (no cache)."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}
