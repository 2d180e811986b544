"""One specialisation of every stage kernel (LLaMA-like heads, smaller): what the AOT tests compile and check."""

from __future__ import annotations

HEADS, KV_HEADS, HEAD_DIM, WINDOW, MAX_SELECTED = 8, 2, 64, 8, 40


def CASES() -> dict:  # noqa: N802 - a constant, built lazily (select_stages imports triton)
    """case id -> (stage, the chain's constants): every stage, H2O's score kernels, the first radix pass over token
    scores and the last over chunk scores."""
    from trt_plugins import select_stages as st

    pyramidkv = st.pyramidkv_constants(HEADS, KV_HEADS, HEAD_DIM, WINDOW, 7, "max", "kv-head", "window")
    h2o = st.pyramidkv_constants(HEADS, KV_HEADS, HEAD_DIM, WINDOW, 1, "none", "kv-head", "all")
    streaming = st.streaming_constants(KV_HEADS, HEAD_DIM, WINDOW, 4)
    chunkkv = st.chunkkv_constants(HEADS, KV_HEADS, HEAD_DIM, WINDOW, 10, 5, "avg")
    extra = {"MAX_SELECTED": MAX_SELECTED}
    cases = {"SelectPartials": (st.PARTIALS, pyramidkv), "SelectScores": (st.SCORES, pyramidkv),
             "SelectPartials-h2o": (st.PARTIALS, h2o), "SelectScores-h2o": (st.SCORES, h2o),
             "SelectPool": (st.POOL, pyramidkv), "SelectEmit": (st.EMIT, pyramidkv | extra),
             "StreamingSelect": (st.STREAMING, streaming | extra), "ChunkSums": (st.CHUNK_SUMS, chunkkv),
             "ChunkHist": (st.CHUNK_HIST, chunkkv), "ChunkEmit": (st.CHUNK_EMIT, chunkkv | extra)}
    cases |= {"SelectRadix-1": (st.RADIX, pyramidkv | {"PASS": 1}),
              "SelectRadix-3-chunks": (st.RADIX, chunkkv | {"PASS": 3})}
    return cases
