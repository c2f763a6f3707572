"""Run onnxruntime-genai's model builder with RoPE kept out of GroupQueryAttention (by hand).

    python scripts/genai_build_unfused_rope.py -i HF_FOLDER -o OUT -p fp32|int4 -e cpu -c CACHE \
        --extra_options disable_qkv_fusion=true       # onnxruntime-genai 0.15 (fuse_qkv=false in 0.18)

The stock CPU build fuses the rotary embedding into GroupQueryAttention (``do_rotary=1``), whose
CPU kernel needs a head size that is a multiple of 16; stories260K's is 8, so its stock build does
not run in onnxruntime. The builder already keeps RoPE separate for DirectML; this script makes it
do so for the CPU too (separate ``com.microsoft::RotaryEmbedding`` nodes, GroupQueryAttention with
``do_rotary=0``, a ``position_ids`` input). Unpacked Q/K/V projections are needed: with a packed
QKV projection the builder gives the separate RotaryEmbedding of K an empty input. Arguments are the builder's own.
"""

import importlib
import runpy
import sys

import onnxruntime_genai.models  # noqa: F401  (puts the builder's folder on sys.path)

# The builder's own package, importable only after the line above.
importlib.import_module("builders.base").Model.is_fused_rope_supported = lambda self: False
sys.argv = ["builder", *sys.argv[1:]]
runpy.run_module("builder", run_name="__main__")
