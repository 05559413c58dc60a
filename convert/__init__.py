"""Offline checkpoint converters (`python -m convert.hf_to_flax SRC DST`, also `dllm-jax convert`)."""
