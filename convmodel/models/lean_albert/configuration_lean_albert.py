"""LeanAlbertConfig: the architecture of LeanALBERT (RuLeanALBERT, CALM) as a transformers config.

This file ships inside exported model folders (trust_remote_code loading): it imports only
transformers and the standard library.
"""

import math

from transformers import PretrainedConfig

# Written into every saved config.json, so that each Auto class finds its model in the copied
# code whichever head was saved (a ForPreTraining checkpoint still loads in a fill-mask pipeline).
AUTO_MAP = {
    "AutoConfig": "configuration_lean_albert.LeanAlbertConfig",
    "AutoModel": "modeling_lean_albert.LeanAlbertModel",
    "AutoModelForPreTraining": "modeling_lean_albert.LeanAlbertForPreTraining",
    "AutoModelForMaskedLM": "modeling_lean_albert.LeanAlbertForMaskedLM",
    "AutoModelForSequenceClassification": "modeling_lean_albert.LeanAlbertForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_lean_albert.LeanAlbertForTokenClassification",
}


class LeanAlbertConfig(PretrainedConfig):
    """ALBERT that shares only its large matrices and keeps activation memory low.

    Defaults are the released RuLeanALBERT architecture (vocabulary aside): hidden 4096, 32 layers,
    64 heads, GEGLU feed-forward of 16384, rotary positions, factorised embeddings of 128, and one
    set of large matrices shared by all layers.

    Args:
        vocab_size: Number of tokens (rows of the word embeddings and columns of the MLM decoder).
        embedding_size: Width E of the token embeddings, projected to hidden_size inside the embeddings.
        hidden_size: Width H of the residual stream.
        num_hidden_layers: Number of transformer blocks (each has its own norms and biases).
        num_attention_heads: Attention heads per block; hidden_size must divide evenly.
        intermediate_size: Width I of the feed-forward; with hidden_act_gated the first matrix is 2 x I wide.
        hidden_act: Activation name from transformers' ACT2FN (feed-forward and MLM head).
        hidden_act_gated: GLU-style feed-forward: act(x W_gate) * (x W_lin), e.g. GEGLU for gelu.
        share_large_matrices: 0 = every block has its own QKV, attention-out, FFN-in and FFN-out
            matrices; k >= 1 = k sets of them, each used by a run of consecutive blocks.
        num_inner_matrices: With sharing, interleave this many sets inside each run of blocks.
        adapter_dim: Rank of a per-block low-rank (LoRA) adapter added to each shared matrix; needs sharing.
        sandwich_norm: Extra LayerNorm on the attention and feed-forward outputs before the residual;
            turns the output-projection biases off.
        position_embedding_type: "rotary" (no position table) or "absolute" (learned, max_position_embeddings).
        rotary_embedding_base: Base of the rotary frequencies.
        max_position_embeddings: Longest sequence; the size of the absolute position table.
        type_vocab_size: Number of token types (segments); 0 for none.
        hidden_dropout_prob: Dropout on embeddings and on block outputs before the residual.
        attention_probs_dropout_prob: Dropout on attention probabilities.
        classifier_dropout_prob: Dropout before the SOP and sequence-classification heads.
        layer_norm_eps: Epsilon of every LayerNorm.
        initializer_range: Std of the normal init of matrices and embeddings; None = SmallInit sqrt(2 / (5 H)).
        gradient_checkpointing: Recompute every block in backward instead of keeping its activations.
        tie_word_embeddings: The MLM decoder uses the word-embedding matrix.
    """

    model_type = "lean_albert"

    def __init__(
        self,
        vocab_size: int = 30000,
        embedding_size: int = 128,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 64,
        intermediate_size: int = 16384,
        hidden_act: str = "gelu_pytorch_tanh",
        hidden_act_gated: bool = True,
        share_large_matrices: int = 1,
        num_inner_matrices: int = 1,
        adapter_dim: int = 0,
        sandwich_norm: bool = False,
        position_embedding_type: str = "rotary",
        rotary_embedding_base: int = 10_000,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        classifier_dropout_prob: float = 0.1,
        layer_norm_eps: float = 1e-12,
        initializer_range: float | None = None,
        gradient_checkpointing: bool = False,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = 2,
        eos_token_id: int | None = 3,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        problems = []
        if hidden_size % num_attention_heads:
            problems.append(f"hidden_size ({hidden_size}) is not a multiple of num_attention_heads "
                            f"({num_attention_heads})")
        elif position_embedding_type == "rotary" and (hidden_size // num_attention_heads) % 2:
            problems.append(f"rotary positions need an even head size, got {hidden_size // num_attention_heads}")
        if position_embedding_type not in ("rotary", "absolute"):
            problems.append(f"position_embedding_type must be 'rotary' or 'absolute', not {position_embedding_type!r}")
        share_large_matrices = int(share_large_matrices)
        if not 0 <= share_large_matrices <= num_hidden_layers:
            problems.append(f"share_large_matrices must be between 0 (no sharing) and num_hidden_layers "
                            f"({num_hidden_layers}), got {share_large_matrices}")
        if adapter_dim and not share_large_matrices:
            problems.append(f"adapter_dim={adapter_dim} adapts shared matrices, but share_large_matrices is 0; "
                            "set share_large_matrices >= 1 or adapter_dim to 0")
        if num_inner_matrices != 1 and not share_large_matrices:
            problems.append("num_inner_matrices > 1 interleaves shared matrix sets; set share_large_matrices >= 1")
        elif share_large_matrices * num_inner_matrices > num_hidden_layers:
            problems.append(f"share_large_matrices x num_inner_matrices ({share_large_matrices} x "
                            f"{num_inner_matrices}) sets exceed the {num_hidden_layers} layers that would use them")
        if problems:
            raise ValueError("LeanAlbertConfig: " + "; ".join(problems))

        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            **kwargs,
        )
        # transformers 5 ties the MLM decoder only when the config says so (no default on the base class)
        self.tie_word_embeddings = tie_word_embeddings
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_act_gated = bool(hidden_act_gated)
        self.share_large_matrices = share_large_matrices
        self.num_inner_matrices = num_inner_matrices
        self.adapter_dim = adapter_dim
        self.sandwich_norm = bool(sandwich_norm)
        self.position_embedding_type = position_embedding_type
        self.rotary_embedding_base = rotary_embedding_base
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.classifier_dropout_prob = classifier_dropout_prob
        self.layer_norm_eps = layer_norm_eps
        if initializer_range is None:  # SmallInit, arXiv:1910.05895 section 2.2
            initializer_range = math.sqrt(2 / (5 * hidden_size))
        self.initializer_range = initializer_range
        self.gradient_checkpointing = gradient_checkpointing

    @property
    def num_matrix_sets(self) -> int:
        """How many sets of large matrices the encoder holds (one per block without sharing)."""
        if not self.share_large_matrices:
            return self.num_hidden_layers
        return self.share_large_matrices * self.num_inner_matrices

    def matrix_set_of_layer(self, layer: int) -> int:
        """Which set of large matrices block `layer` uses.

        Runs of consecutive blocks share an outer set; inside a run the inner sets alternate.
        """
        if not self.share_large_matrices:
            return layer
        outer = layer * self.share_large_matrices // self.num_hidden_layers
        return outer * self.num_inner_matrices + layer % self.num_inner_matrices
