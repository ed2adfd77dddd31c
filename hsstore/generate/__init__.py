"""Chat data -> tokens + loss masks -> hidden states -> store writer.

Data side: `sources` (read conversations from files, the bundled ShareGPT package or the hub, with
`jsonstream` for big JSON arrays), `chat` (render with the tokenizer's own chat template and mask the
assistant tokens), `dataset` (the tokenized set, cached with HF datasets), `inputs` (all of that in
one call for the pipeline), `prepare` (normalized JSONL to look at before generating), `skips`
(counting or rejecting bad input) and `tiny` (a small random Llama target built locally for demos
and tests). Nothing heavy is imported here: transformers and datasets load only when a function
needs them.
"""
