from pallas_kernels.block_attention.api import block_attention, available_implementations  # noqa: F401
