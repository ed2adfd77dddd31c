"""EAGLE-3 draft training over an hsstore store.

Modules, each with one job: `config` (draft sizes from a target or a file), `target` (read a few
tensors of a target checkpoint without loading the model), `model` (the draft), `teacher` (the
target's distribution from the stored last layer), `loss` (training-time test loss and metrics),
`export` (a directory vLLM loads). Heavy imports stay in those modules, so importing this package
costs nothing.
"""
