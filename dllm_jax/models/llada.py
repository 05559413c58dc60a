"""LLaDA (LLaDA-8B-Base/-Instruct, LLaDA-1.5): bidirectional llama-style body, untied LM head, no biases.

HF names (PyTorch [out, in] layout) -> params pytree (Flax [in, out] layout). `ff_proj` is the SwiGLU gate,
`up_proj` the linear branch, the block `ff_out` the down projection and `model.transformer.ff_out` the LM head.
"""

FAMILY = "llada"

# (regex on the HF name, params path; "L" = stacked per-layer leaf, transpose?)
WEIGHT_TABLE = (
    (r"model\.transformer\.wte\.weight", ("embed",), False),
    (r"model\.transformer\.ln_f\.weight", ("final_norm",), False),
    (r"model\.transformer\.ff_out\.weight", ("lm_head",), True),
    (r"model\.transformer\.blocks\.(\d+)\.attn_norm\.weight", ("layers", "attn_norm"), False),
    (r"model\.transformer\.blocks\.(\d+)\.q_proj\.weight", ("layers", "wq"), True),
    (r"model\.transformer\.blocks\.(\d+)\.k_proj\.weight", ("layers", "wk"), True),
    (r"model\.transformer\.blocks\.(\d+)\.v_proj\.weight", ("layers", "wv"), True),
    (r"model\.transformer\.blocks\.(\d+)\.q_proj\.bias", ("layers", "bq"), False),
    (r"model\.transformer\.blocks\.(\d+)\.k_proj\.bias", ("layers", "bk"), False),
    (r"model\.transformer\.blocks\.(\d+)\.v_proj\.bias", ("layers", "bv"), False),
    (r"model\.transformer\.blocks\.(\d+)\.attn_out\.weight", ("layers", "wo"), True),
    (r"model\.transformer\.blocks\.(\d+)\.ff_norm\.weight", ("layers", "mlp_norm"), False),
    (r"model\.transformer\.blocks\.(\d+)\.ff_proj\.weight", ("layers", "w_gate"), True),
    (r"model\.transformer\.blocks\.(\d+)\.up_proj\.weight", ("layers", "w_up"), True),
    (r"model\.transformer\.blocks\.(\d+)\.ff_out\.weight", ("layers", "w_down"), True),
)
