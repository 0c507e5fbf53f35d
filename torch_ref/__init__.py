"""torch_ref: the literal PyTorch reference of docs/maths.md, used as the parity oracle."""

from torch_ref.functional import apply_rotary_pos_emb
from torch_ref.modeling.llama import ResidualLlamaForCausalLM
from torch_ref.modeling.norm import GroupRMSNorm
from torch_ref.modeling.pos_emb import NTKAwareRoPE
from torch_ref.modeling.vocab_emb import ParallelVocabEmbedding, VocabEmbedding
